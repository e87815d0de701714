//! Interleaved rounds: blocks of back-to-back calls of the dense GEMM and of every strategy,
//! alternating, so each strategy's reading has a dense reading taken in the same thermal state.

use super::report::RowId;
use crate::timing::{block_calls, median};
use moe_gpu::{Engine, GpuError};

/// One timed block of the interleaved rounds: (item, round, calls, seconds per call).
pub(super) type Block = (usize, usize, usize, f64);

/// `rounds` rounds over `items` items (`run(eng, item, calls)` times `calls` calls of item
/// `item` and returns the seconds per call), the order reversed every other round. Each item's
/// block length is set once, from a 2-call block before the first round, to about
/// [`crate::timing::BLOCK_SECS`].
pub(super) fn interleaved(
    eng: &mut Engine,
    rounds: usize,
    items: usize,
    run: &mut dyn FnMut(&mut Engine, usize, usize) -> Result<f64, GpuError>,
) -> Result<Vec<Block>, GpuError> {
    let calls: Vec<usize> = (0..items).map(|i| run(eng, i, 2).map(block_calls)).collect::<Result<_, _>>()?;
    let mut blocks = Vec::with_capacity(rounds * items);
    for r in 0..rounds {
        let order: Vec<usize> = if r % 2 == 0 { (0..items).collect() } else { (0..items).rev().collect() };
        for i in order {
            blocks.push((i, r, calls[i], run(eng, i, calls[i])?));
        }
    }
    Ok(blocks)
}

/// Per strategy (item ≥ 1): median TFLOP/s, its per-round % of the same round's dense reading
/// (median, min-max) and its per-round time ratio to the first strategy (median, min-max; > 1:
/// faster than the first).
pub(super) fn rounds_summary(
    id: &RowId,
    labels: &[&str],
    blocks: &[Block],
    flops: &dyn Fn(usize) -> f64,
) -> Vec<String> {
    let per_round = |item: usize| -> Vec<f64> {
        let mut v: Vec<(usize, f64)> = blocks.iter().filter(|b| b.0 == item).map(|b| (b.1, b.3)).collect();
        v.sort_by_key(|x| x.0);
        v.into_iter().map(|x| x.1).collect()
    };
    let range = |v: &[f64]| -> (f64, f64, f64) {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (median(v.to_vec()), lo, hi)
    };
    let dense = per_round(0);
    let first = per_round(1);
    let mut out = Vec::new();
    let (dm, dlo, dhi) = range(&dense.iter().map(|s| flops(0) / s / 1e12).collect::<Vec<_>>());
    out.push(format!(
        "ROUNDS {} {} {} {} dense: {dm:.1} TFLOP/s (rounds {}, {dlo:.1}-{dhi:.1})",
        id.shape,
        id.dist,
        id.class,
        id.mode,
        dense.len()
    ));
    for (item, label) in labels.iter().enumerate().skip(1) {
        let t = per_round(item);
        let (tm, _, _) = range(&t.iter().map(|s| flops(item) / s / 1e12).collect::<Vec<_>>());
        let pct: Vec<f64> = t.iter().zip(&dense).map(|(s, d)| 100.0 * (flops(item) / s) / (flops(0) / d)).collect();
        let (pm, plo, phi) = range(&pct);
        let ratio: Vec<f64> = first.iter().zip(&t).map(|(f, s)| f / s).collect();
        let (rm, rlo, rhi) = range(&ratio);
        out.push(format!(
            "ROUNDS {} {} {} {} {label}: {tm:.1} TFLOP/s, {pm:.1}% of interleaved dense ({plo:.1}-{phi:.1}), \
             x{rm:.3} vs {} ({rlo:.3}-{rhi:.3})",
            id.shape, id.dist, id.class, id.mode, labels[1]
        ));
    }
    out
}
