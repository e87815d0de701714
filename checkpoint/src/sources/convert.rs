//! Writing any [`ExpertSource`] as a moe-verify checkpoint (`reshard` from a Hugging Face or
//! `torch_dist` source).

use crate::diff::{diff, DiffOptions};
use crate::experts::{ExpertEntry, ExpertSource, ExpertValues};
use crate::format::{CheckpointWriter, SaveOptions, SavePart};
use crate::reshard::{ModelInfo, ReshardOptions, ReshardReport, ReshardTarget};
use crate::sharded::{from_canonical, Canonical, ExpertLayout};
use crate::tensor::RawTensor;
use crate::CheckpointError;
use moe_reference::{Dtype, ExpertParam};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// One expert layer of a source, ready to be laid out.
pub(crate) struct Layer {
    /// The decoder layer.
    pub(crate) layer: usize,
    pub(crate) info: ModelInfo,
    /// `[expert][param]` entries.
    pub(crate) entries: Vec<[Option<ExpertEntry>; 4]>,
}

/// The key prefix a layer is written under.
pub fn layer_prefix(layer: usize) -> String {
    format!("decoder.layers.{layer}.mlp.")
}

/// Groups a source's entries by layer and checks that each layer is complete: experts
/// `0..E` once each, every expert with the same tensors and shapes, fc1 `[N1, h]` with
/// `N1 ∈ {f, 2f}` for fc2 `[h, f]`.
pub(crate) fn layers(src: &dyn ExpertSource) -> Result<Vec<Layer>, CheckpointError> {
    let mut by: BTreeMap<usize, BTreeMap<usize, [Vec<ExpertEntry>; 4]>> = BTreeMap::new();
    for e in src.entries() {
        by.entry(e.key.layer).or_default().entry(e.key.expert).or_default()[e.key.param.index()].push(e.clone());
    }
    let mut out = Vec::new();
    for (layer, experts) in by {
        let bad = |msg: String| CheckpointError::Mismatch { key: format!("layer {layer}"), msg };
        let n = experts.len();
        if experts.keys().copied().ne(0..n) {
            let have: BTreeSet<usize> = experts.keys().copied().collect();
            let max = have.last().copied().unwrap_or(0);
            let missing: Vec<usize> = (0..=max).filter(|e| !have.contains(e)).collect();
            return Err(bad(format!(
                "experts {missing:?} are missing; a checkpoint needs every expert 0..{}",
                max + 1
            )));
        }
        let first = &experts[&0];
        let shape_of = |p: ExpertParam| first[p.index()].first().map(|e| e.shape.clone());
        let (Some(fc1), Some(fc2)) = (shape_of(ExpertParam::Fc1Weight), shape_of(ExpertParam::Fc2Weight)) else {
            return Err(bad("expert 0 lacks its fc1 or fc2 weight".into()));
        };
        let (&[n1, h], &[h2, f]) = (fc1.as_slice(), fc2.as_slice()) else {
            return Err(bad(format!("fc1 {fc1:?} and fc2 {fc2:?} are not matrices")));
        };
        if h != h2 || !(n1 == f || n1 == 2 * f) {
            return Err(bad(format!("fc1 {fc1:?} and fc2 {fc2:?} do not describe one expert layer")));
        }
        let bias = first[ExpertParam::Fc1Bias.index()].len() == 1;
        let mut rows = Vec::with_capacity(n);
        let mut dtype = None;
        for (e, ps) in &experts {
            let mut row: [Option<ExpertEntry>; 4] = [None, None, None, None];
            for p in ExpertParam::ALL {
                let v = &ps[p.index()];
                let want = match p {
                    ExpertParam::Fc1Weight => Some(vec![n1, h]),
                    ExpertParam::Fc2Weight => Some(vec![h, f]),
                    ExpertParam::Fc1Bias => bias.then(|| vec![n1]),
                    ExpertParam::Fc2Bias => bias.then(|| vec![h]),
                };
                match (want, v.as_slice()) {
                    (None, []) => {}
                    (Some(s), [one]) if one.shape == s => row[p.index()] = Some(one.clone()),
                    (want, got) => {
                        return Err(bad(format!(
                            "expert {e} {p:?}: expected {}, found {}",
                            want.map(|s| format!("one tensor {s:?}")).unwrap_or_else(|| "none".into()),
                            if got.is_empty() {
                                "none".to_string()
                            } else {
                                got.iter()
                                    .map(|g| format!("{:?} at {}", g.shape, g.location))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            }
                        )))
                    }
                }
            }
            if dtype.is_none() {
                dtype = Some(match src.read(row[0].as_ref().expect("fc1 weight present"))? {
                    ExpertValues::Raw(t) => t.dtype,
                    ExpertValues::Dequantized(_) => Dtype::F32,
                });
            }
            rows.push(row);
        }
        out.push(Layer {
            layer,
            info: ModelInfo {
                prefix: layer_prefix(layer),
                num_experts: n,
                hidden: h,
                ffn: f,
                glu: n1 == 2 * f,
                bias,
                singleton: false,
                dtype: dtype.unwrap_or(Dtype::Bf16),
                // Sources present canonical `[gate; linear]` rows (experts.rs).
                glu_interleave_size: None,
            },
            entries: rows,
        });
    }
    Ok(out)
}

/// The values of `entry` as a raw tensor of `dtype`; values must be exactly representable in it.
pub(crate) fn as_raw(src: &dyn ExpertSource, entry: &ExpertEntry, dtype: Dtype) -> Result<RawTensor, CheckpointError> {
    match src.read(entry)? {
        ExpertValues::Raw(t) if t.dtype == dtype => Ok(t),
        // Another storage dtype (BF16 biases beside dequantized weights written as F32): its
        // values, which must be exact in `dtype`.
        ExpertValues::Raw(t) => RawTensor::from_f64(&entry.location, &t.to_f64(), dtype),
        ExpertValues::Dequantized(a) => RawTensor::from_f64(&entry.location, &a, dtype),
    }
}

/// Writes `src` into `dst` as a moe-verify checkpoint in `target`'s class and expert-parallel
/// layout, one layer per prefix `decoder.layers.{l}.mlp.`, one destination rank in memory at
/// a time. Raw values keep their dtype; dequantized ones (fp8, MXFP4) are written as F32 and
/// must be exact there. Only `target.tp == 1` (reshard the result to split it further).
pub fn reshard_source(
    src: &dyn ExpertSource,
    dst: &Path,
    target: ReshardTarget,
    opts: ReshardOptions,
) -> Result<ReshardReport, CheckpointError> {
    if target.tp != 1 {
        return Err(CheckpointError::Layout(format!(
            "a {:?} source is converted at --tp 1; reshard the result to --tp {}",
            src.info().format,
            target.tp
        )));
    }
    if dst.exists() && !opts.force {
        return Err(CheckpointError::Exists { path: dst.to_path_buf() });
    }
    let layers = layers(src)?;
    let layouts: Vec<ExpertLayout> = layers.iter().map(|l| l.info.layout(&target)).collect();
    for l in &layouts {
        l.validate()?;
    }
    let bytes: u64 = layers
        .iter()
        .flat_map(|l| {
            l.entries
                .iter()
                .flatten()
                .flatten()
                .map(|e| (e.shape.iter().product::<usize>() * l.info.dtype.size_bytes()) as u64)
        })
        .sum();
    let report = |written, files, verified| ReshardReport {
        layouts: layouts.clone(),
        read_bytes: bytes,
        write_bytes: bytes,
        files,
        written,
        verified,
        skipped_keys: Vec::new(),
    };
    if opts.dry_run {
        return Ok(report(false, 0, false));
    }
    let mut writer = CheckpointWriter::create(dst, &SaveOptions { force: opts.force, abort_after_files: None })?;
    for (layer, layout) in layers.iter().zip(&layouts) {
        let el = layout.local_experts();
        for rank in layout.ranks() {
            let mut canonical: Canonical = Vec::with_capacity(el);
            for e in 0..el {
                let g = rank.ep_rank * el + e;
                let mut row: [Option<Cow<RawTensor>>; 4] = [None, None, None, None];
                for (p, entry) in layer.entries[g].iter().enumerate() {
                    if let Some(entry) = entry {
                        row[p] = Some(Cow::Owned(as_raw(src, entry, layer.info.dtype)?));
                    }
                }
                canonical.push(row);
            }
            let state = from_canonical(layout, canonical);
            writer.write_part(SavePart { layout, rank, state: &state })?;
        }
    }
    let saved = writer.finish_checked(|tmp| {
        if opts.verify {
            let written = super::own::OwnSource::open(tmp)?;
            let d = diff(src, &written, &DiffOptions::default())?;
            if let Some(r) = d.rows.iter().find(|r| !r.verdict.is_same()) {
                return Err(CheckpointError::VerifyFailed {
                    key: format!("layer {} expert {} {:?}", r.key.layer, r.key.expert, r.key.param),
                    msg: format!("{} after write", r.verdict.label()),
                });
            }
        }
        Ok(())
    })?;
    let mut r = report(true, saved.files, opts.verify);
    r.write_bytes = saved.bytes;
    Ok(r)
}
