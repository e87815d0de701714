//! Expert-by-expert comparison of two [`ExpertSource`]s (`moe-verify diff`).
//!
//! Every `(layer, expert, tensor)` present on either side gets one [`Verdict`]: equal bit for
//! bit, equal values in another stored form, within `atol`, different (max abs difference and
//! where), missing on one side, present twice, shape mismatch — and, for differing tensors,
//! the conversion bug that explains them when one does: transposed, gate↔up swapped, or (per
//! layer) GroupedMLP `weight1` read as column blocks of its declared `[h, E·N1]` matrix.
//!
//! Streaming: one pair of tensors is in memory at a time, visited layer by layer, tensor by
//! tensor, expert by expert (so that a source reading stacked shards reads each once). The
//! column-block check is the exception: it holds one side's fc1 weights of one layer, and runs
//! only when they fit [`DiffOptions::layer_budget_bytes`].

use crate::experts::{ExpertEntry, ExpertKey, ExpertSource, ExpertValues, SourceInfo};
use crate::CheckpointError;
use moe_reference::ExpertParam;
use ndarray::ArrayD;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// Options of [`diff`].
#[derive(Clone, Copy, Debug)]
pub struct DiffOptions {
    /// Values whose absolute difference is at most this count as equal (default: exact).
    pub atol: Option<f64>,
    /// Largest f64 buffer the per-layer column-block check may hold (one side's fc1 weights).
    pub layer_budget_bytes: usize,
}

impl Default for DiffOptions {
    fn default() -> Self {
        DiffOptions { atol: None, layer_budget_bytes: 1 << 30 }
    }
}

/// A side of the comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Side {
    /// The first source.
    A,
    /// The second source.
    B,
}

/// What the comparison of one `(layer, expert, tensor)` found.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "verdict", rename_all = "kebab-case")]
pub enum Verdict {
    /// Same dtype, same bytes.
    Identical,
    /// Same values in different stored forms (dtype, quantization).
    EqualValues,
    /// Values differ by at most `--atol`.
    WithinTolerance {
        /// Largest absolute difference.
        max_abs_diff: f64,
    },
    /// Values differ, with no layout explanation.
    Differ {
        /// Largest absolute difference (infinite where one side is NaN).
        max_abs_diff: f64,
        /// Canonical index of the largest difference.
        at: Vec<usize>,
        /// A's value there.
        a: f64,
        /// B's value there.
        b: f64,
        /// Number of elements that differ (beyond `atol`).
        differing: usize,
    },
    /// B is A with the gate and up halves of fc1 swapped.
    GateUpSwapped,
    /// B is A transposed.
    Transposed,
    /// B's fc1 weights are A's GroupedMLP `weight1` read as column blocks of `[h, E·N1]` (or
    /// the reverse, `reverse`).
    ColumnBlocks {
        /// True when A is the misread side.
        reverse: bool,
    },
    /// Shapes differ (and B is not A transposed).
    ShapeMismatch {
        /// A's canonical shape.
        a: Vec<usize>,
        /// B's canonical shape.
        b: Vec<usize>,
    },
    /// Only B has it.
    MissingInA,
    /// Only A has it.
    MissingInB,
    /// A side lists it more than once.
    PresentTwice {
        /// How often A lists it.
        count_a: usize,
        /// How often B lists it.
        count_b: usize,
    },
}

impl Verdict {
    /// True when the tensors count as the same (identical, equal values, or within `atol`).
    pub fn is_same(&self) -> bool {
        matches!(self, Verdict::Identical | Verdict::EqualValues | Verdict::WithinTolerance { .. })
    }

    /// A short label (`identical`, `transposed`, …) for tables.
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Identical => "identical",
            Verdict::EqualValues => "equal-values",
            Verdict::WithinTolerance { .. } => "within-atol",
            Verdict::Differ { .. } => "DIFFER",
            Verdict::GateUpSwapped => "GATE/UP SWAPPED",
            Verdict::Transposed => "TRANSPOSED",
            Verdict::ColumnBlocks { .. } => "COLUMN BLOCKS",
            Verdict::ShapeMismatch { .. } => "SHAPE MISMATCH",
            Verdict::MissingInA => "MISSING IN A",
            Verdict::MissingInB => "MISSING IN B",
            Verdict::PresentTwice { .. } => "PRESENT TWICE",
        }
    }
}

/// One compared tensor.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    /// Which tensor.
    pub key: ExpertKey,
    /// What was found.
    pub verdict: Verdict,
    /// A's entries (stored form and location).
    pub a: Vec<ExpertEntry>,
    /// B's entries.
    pub b: Vec<ExpertEntry>,
}

/// The result of [`diff`].
#[derive(Clone, Debug, Serialize)]
pub struct DiffReport {
    /// What A is.
    pub a: SourceInfo,
    /// What B is.
    pub b: SourceInfo,
    /// One row per `(layer, expert, tensor)`, sorted.
    pub rows: Vec<Row>,
    /// Findings about whole experts and layers (`"layer 0: experts 4..8 missing in B"`).
    pub findings: Vec<String>,
}

impl DiffReport {
    /// True when every row is the same.
    pub fn same(&self) -> bool {
        self.rows.iter().all(|r| r.verdict.is_same())
    }

    /// Rows per verdict label.
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        let mut m = BTreeMap::new();
        for r in &self.rows {
            *m.entry(r.verdict.label()).or_insert(0) += 1;
        }
        m
    }
}

/// The flat row-major index of canonical position `idx` of `shape`, as a position vector.
fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut out = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        let s = shape[d].max(1);
        out[d] = i % s;
        i /= s;
    }
    out
}

/// Compares two same-shape value arrays: `(max |a − b|, flat index, elements beyond atol)`. A
/// NaN on one side only is an infinite difference; NaN on both is equal.
fn compare(a: &ArrayD<f64>, b: &ArrayD<f64>, atol: f64) -> (f64, usize, usize) {
    let (mut worst, mut at, mut n) = (0.0f64, 0usize, 0usize);
    for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
        let d = match (x.is_nan(), y.is_nan()) {
            (true, true) => 0.0,
            (true, false) | (false, true) => f64::INFINITY,
            _ if x == y => 0.0,
            _ => (x - y).abs(),
        };
        if d > atol || (d.is_nan() && atol.is_finite()) {
            n += 1;
        }
        if d > worst {
            worst = d;
            at = i;
        }
    }
    (worst, at, n)
}

/// Exact equality of values (NaN equal to NaN).
fn equal(a: &ArrayD<f64>, b: &ArrayD<f64>) -> bool {
    a.shape() == b.shape() && a.iter().zip(b.iter()).all(|(x, y)| x == y || (x.is_nan() && y.is_nan()))
}

/// `a` transposed (2-D).
fn transposed(a: &ArrayD<f64>) -> Option<ArrayD<f64>> {
    (a.ndim() == 2).then(|| a.t().as_standard_layout().into_owned())
}

/// `a` with its first and second halves of rows swapped (axis 0).
fn halves_swapped(a: &ArrayD<f64>) -> Option<ArrayD<f64>> {
    let n = *a.shape().first()?;
    if n < 2 || !n.is_multiple_of(2) {
        return None;
    }
    let h = n / 2;
    let idx: Vec<usize> = (h..n).chain(0..h).collect();
    Some(a.select(ndarray::Axis(0), &idx))
}

/// Compares one pair of values.
fn verdict(param: ExpertParam, va: &ExpertValues, vb: &ExpertValues, atol: Option<f64>) -> Verdict {
    if let (ExpertValues::Raw(x), ExpertValues::Raw(y)) = (va, vb) {
        if x.dtype == y.dtype && x.shape == y.shape && x.data == y.data {
            return Verdict::Identical;
        }
    }
    let (a, b) = (va.to_f64(), vb.to_f64());
    if a.shape() != b.shape() {
        if transposed(&a).is_some_and(|t| equal(&t, &b)) {
            return Verdict::Transposed;
        }
        return Verdict::ShapeMismatch { a: a.shape().to_vec(), b: b.shape().to_vec() };
    }
    if equal(&a, &b) {
        return Verdict::EqualValues;
    }
    let tol = atol.unwrap_or(0.0);
    let (worst, at, differing) = compare(&a, &b, tol);
    if atol.is_some() && differing == 0 {
        return Verdict::WithinTolerance { max_abs_diff: worst };
    }
    if matches!(param, ExpertParam::Fc1Weight | ExpertParam::Fc1Bias)
        && halves_swapped(&a).is_some_and(|s| equal(&s, &b))
    {
        return Verdict::GateUpSwapped;
    }
    if a.ndim() == 2 && a.shape()[0] == a.shape()[1] && transposed(&a).is_some_and(|t| equal(&t, &b)) {
        return Verdict::Transposed;
    }
    let flat_a: Vec<f64> = a.iter().copied().collect();
    let flat_b: Vec<f64> = b.iter().copied().collect();
    Verdict::Differ {
        max_abs_diff: worst,
        at: unravel(at, a.shape()),
        a: flat_a.get(at).copied().unwrap_or(f64::NAN),
        b: flat_b.get(at).copied().unwrap_or(f64::NAN),
        differing,
    }
}

/// Groups a source's entries by key.
fn by_key(s: &dyn ExpertSource) -> BTreeMap<ExpertKey, Vec<&ExpertEntry>> {
    let mut m: BTreeMap<ExpertKey, Vec<&ExpertEntry>> = BTreeMap::new();
    for e in s.entries() {
        m.entry(e.key).or_default().push(e);
    }
    m
}

/// Compares `a` and `b` expert by expert.
pub fn diff(a: &dyn ExpertSource, b: &dyn ExpertSource, opts: &DiffOptions) -> Result<DiffReport, CheckpointError> {
    let (ka, kb) = (by_key(a), by_key(b));
    let keys: BTreeSet<ExpertKey> = ka.keys().chain(kb.keys()).copied().collect();
    // Layer, then tensor, then expert: consecutive reads come from the same stored tensor.
    let mut order: Vec<ExpertKey> = keys.into_iter().collect();
    order.sort_by_key(|k| (k.layer, k.param, k.expert));
    let mut rows = Vec::with_capacity(order.len());
    for key in order {
        let ea: Vec<ExpertEntry> = ka.get(&key).map(|v| v.iter().map(|e| (*e).clone()).collect()).unwrap_or_default();
        let eb: Vec<ExpertEntry> = kb.get(&key).map(|v| v.iter().map(|e| (*e).clone()).collect()).unwrap_or_default();
        let verdict = match (ea.len(), eb.len()) {
            (0, _) => Verdict::MissingInA,
            (_, 0) => Verdict::MissingInB,
            (1, 1) => {
                let (va, vb) = (a.read(&ea[0])?, b.read(&eb[0])?);
                verdict(key.param, &va, &vb, opts.atol)
            }
            (na, nb) => Verdict::PresentTwice { count_a: na, count_b: nb },
        };
        rows.push(Row { key, verdict, a: ea, b: eb });
    }
    rows.sort_by_key(|r| r.key);
    let mut findings = Vec::new();
    column_blocks(a, b, &mut rows, opts, &mut findings)?;
    missing_findings(&rows, &mut findings);
    Ok(DiffReport { a: a.info().clone(), b: b.info().clone(), rows, findings })
}

/// Formats sorted indices as ranges: `0..4, 6`.
fn ranges(v: &[usize]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        out.push(if i == j { v[i].to_string() } else { format!("{}..{}", v[i], v[j] + 1) });
        i = j + 1;
    }
    out.join(", ")
}

/// Whole experts missing on one side, per layer.
fn missing_findings(rows: &[Row], findings: &mut Vec<String>) {
    let layers: BTreeSet<usize> = rows.iter().map(|r| r.key.layer).collect();
    for layer in layers {
        for (side, v, name) in [(Side::A, Verdict::MissingInA, "A"), (Side::B, Verdict::MissingInB, "B")] {
            let _ = side;
            let mut whole = Vec::new();
            let mut partial = Vec::new();
            let experts: BTreeSet<usize> = rows.iter().filter(|r| r.key.layer == layer).map(|r| r.key.expert).collect();
            for e in experts {
                let of: Vec<&Row> = rows.iter().filter(|r| r.key.layer == layer && r.key.expert == e).collect();
                let missing = of.iter().filter(|r| r.verdict == v).count();
                if missing == of.len() {
                    whole.push(e);
                } else if missing > 0 {
                    partial.push(e);
                }
            }
            if !whole.is_empty() {
                findings.push(format!(
                    "layer {layer}: expert{} {} missing in {name} (every tensor)",
                    if whole.len() > 1 { "s" } else { "" },
                    ranges(&whole)
                ));
            }
            if !partial.is_empty() {
                findings.push(format!(
                    "layer {layer}: expert{} {} missing some tensors in {name}",
                    if partial.len() > 1 { "s" } else { "" },
                    ranges(&partial)
                ));
            }
        }
    }
}

/// One layer's fc1 weights, `[E][N1·h]`, and `[N1, h]`.
type LayerFc1 = (Vec<Vec<f64>>, [usize; 2]);

/// The fc1 weights of `layer` on one side as `[E][N1·h]` f64 (row-major `[N1, h]` each), when
/// every expert `0..E` is there once with one shape and they fit `budget` bytes.
fn layer_fc1(s: &dyn ExpertSource, layer: usize, budget: usize) -> Result<Option<LayerFc1>, CheckpointError> {
    let mut es: Vec<&ExpertEntry> =
        s.entries().iter().filter(|e| e.key.layer == layer && e.key.param == ExpertParam::Fc1Weight).collect();
    es.sort_by_key(|e| e.key.expert);
    if es.is_empty() || es.iter().enumerate().any(|(i, e)| e.key.expert != i) {
        return Ok(None);
    }
    let shape = es[0].shape.clone();
    let [n1, h] = shape[..] else { return Ok(None) };
    if es.iter().any(|e| e.shape != shape) || es.len() * n1 * h * 8 > budget {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(es.len());
    for e in es {
        out.push(s.read(e)?.to_f64().iter().copied().collect());
    }
    Ok(Some((out, [n1, h])))
}

/// Expert `e`'s canonical fc1 as a GroupedMLP checkpoint reader that takes column block `e` of
/// `weight1`'s declared `[h, E·N1]` matrix would produce it, from the true per-expert weights.
fn column_block(w: &[Vec<f64>], n1: usize, h: usize, e: usize) -> Vec<f64> {
    // weight1's flat memory is E blocks [h, N1] (W1[x]ᵀ); the declared view is [h, E·N1].
    let en1 = w.len() * n1;
    let packed = |flat: usize| {
        let (x, r) = (flat / (h * n1), flat % (h * n1));
        let (i, j) = (r / n1, r % n1); // W1[x]ᵀ[i, j] = W1[x][j, i]
        w[x][j * h + i]
    };
    // Column block e: [h, N1] with element (i, j) = declared[i, e·N1 + j]; canonical = its ᵀ.
    let mut out = vec![0.0; n1 * h];
    for j in 0..n1 {
        for i in 0..h {
            out[j * h + i] = packed(i * en1 + e * n1 + j);
        }
    }
    out
}

/// Re-labels a layer whose differing fc1 weights are the column-block misreading of the
/// other side's.
fn column_blocks(
    a: &dyn ExpertSource,
    b: &dyn ExpertSource,
    rows: &mut [Row],
    opts: &DiffOptions,
    findings: &mut Vec<String>,
) -> Result<(), CheckpointError> {
    let bad = |r: &Row| matches!(r.verdict, Verdict::Differ { .. } | Verdict::ShapeMismatch { .. });
    let layers: BTreeSet<usize> =
        rows.iter().filter(|r| r.key.param == ExpertParam::Fc1Weight && bad(r)).map(|r| r.key.layer).collect();
    for layer in layers {
        let fc1: Vec<usize> = (0..rows.len())
            .filter(|&i| rows[i].key.layer == layer && rows[i].key.param == ExpertParam::Fc1Weight)
            .collect();
        if fc1.len() < 2 || !fc1.iter().all(|&i| bad(&rows[i])) {
            continue;
        }
        let fits = |s: &dyn ExpertSource| {
            let n: usize = s
                .entries()
                .iter()
                .filter(|e| e.key.layer == layer && e.key.param == ExpertParam::Fc1Weight)
                .map(|e| e.shape.iter().product::<usize>())
                .sum();
            n * 8 <= opts.layer_budget_bytes
        };
        if !fits(a) && !fits(b) {
            findings.push(format!(
                "layer {layer}: every fc1 weight differs; the GroupedMLP column-block check was skipped (one \
                 side's fc1 weights exceed {} bytes as f64)",
                opts.layer_budget_bytes
            ));
            continue;
        }
        for (truth, misread, reverse) in [(a, b, false), (b, a, true)] {
            let Some((w, [n1, h])) = layer_fc1(truth, layer, opts.layer_budget_bytes)? else { continue };
            let mut all = true;
            for &i in &fc1 {
                let e = rows[i].key.expert;
                let entries = if reverse { &rows[i].a } else { &rows[i].b };
                if e >= w.len() || entries.len() != 1 {
                    all = false;
                    break;
                }
                let got: Vec<f64> = misread.read(&entries[0])?.to_f64().iter().copied().collect();
                let want = column_block(&w, n1, h, e);
                // The misread block, transposed back or not: same elements in either order.
                let shape = &entries[0].shape;
                let same = if shape[..] == [n1, h] {
                    got == want
                } else if shape[..] == [h, n1] {
                    (0..n1).all(|j| (0..h).all(|i| got[i * n1 + j] == want[j * h + i]))
                } else {
                    false
                };
                if !same {
                    all = false;
                    break;
                }
            }
            if all {
                for &i in &fc1 {
                    rows[i].verdict = Verdict::ColumnBlocks { reverse };
                }
                let (wrong, right) = if reverse { ("A", "B") } else { ("B", "A") };
                findings.push(format!(
                    "layer {layer}: {wrong}'s fc1 weights are {right}'s GroupedMLP weight1 read as column blocks of the \
                     declared [h, E*N1] matrix (weight1's memory is E blocks [h, N1]: use view(E, h, N1))"
                ));
                break;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::RawTensor;
    use moe_reference::Dtype;
    use ndarray::IxDyn;

    fn raw(shape: &[usize], vals: &[f64]) -> ExpertValues {
        let a = ArrayD::from_shape_vec(IxDyn(shape), vals.to_vec()).unwrap();
        ExpertValues::Raw(RawTensor::from_f64("t", &a, Dtype::F32).unwrap())
    }

    #[test]
    fn each_single_pair_verdict_is_reachable() {
        let a = raw(&[2, 2], &[1.0, 2.0, 3.0, 4.0]);
        let v = |b: &ExpertValues, p, atol| verdict(p, &a, b, atol);
        assert_eq!(v(&raw(&[2, 2], &[1.0, 2.0, 3.0, 4.0]), ExpertParam::Fc2Weight, None), Verdict::Identical);
        // Swapped halves on fc1 only: on fc2 the same data is a plain difference.
        let swapped = raw(&[2, 2], &[3.0, 4.0, 1.0, 2.0]);
        assert_eq!(v(&swapped, ExpertParam::Fc1Weight, None), Verdict::GateUpSwapped);
        assert!(matches!(v(&swapped, ExpertParam::Fc2Weight, None), Verdict::Differ { .. }));
        assert_eq!(v(&raw(&[2, 2], &[1.0, 3.0, 2.0, 4.0]), ExpertParam::Fc2Weight, None), Verdict::Transposed);
        let off = raw(&[2, 2], &[1.0, 2.0, 3.0, 4.5]);
        assert_eq!(v(&off, ExpertParam::Fc2Weight, Some(0.5)), Verdict::WithinTolerance { max_abs_diff: 0.5 });
        match v(&off, ExpertParam::Fc2Weight, Some(0.25)) {
            Verdict::Differ { max_abs_diff, at, a, b, differing } => {
                assert_eq!((max_abs_diff, at, a, b, differing), (0.5, vec![1, 1], 4.0, 4.5, 1));
            }
            other => panic!("{other:?}"),
        }
        let bf = ExpertValues::Dequantized(ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![1.0, 2.0, 3.0, 4.0]).unwrap());
        assert_eq!(v(&bf, ExpertParam::Fc2Weight, None), Verdict::EqualValues);
        let a23 = raw(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let t32 = raw(&[3, 2], &[1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        assert_eq!(verdict(ExpertParam::Fc2Weight, &a23, &t32, None), Verdict::Transposed);
        let r32 = raw(&[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(
            verdict(ExpertParam::Fc2Weight, &a23, &r32, None),
            Verdict::ShapeMismatch { a: vec![2, 3], b: vec![3, 2] }
        );
    }

    /// A source of given entries whose reads all return `value`-filled tensors.
    struct Fake {
        info: SourceInfo,
        entries: Vec<ExpertEntry>,
        value: f64,
    }

    impl ExpertSource for Fake {
        fn info(&self) -> &SourceInfo {
            &self.info
        }
        fn entries(&self) -> &[ExpertEntry] {
            &self.entries
        }
        fn read(&self, e: &ExpertEntry) -> Result<ExpertValues, CheckpointError> {
            Ok(ExpertValues::Dequantized(ArrayD::from_elem(IxDyn(&e.shape), self.value)))
        }
    }

    fn fake(value: f64) -> Fake {
        let entries = (0..2)
            .map(|e| ExpertEntry {
                key: ExpertKey { layer: 0, expert: e, param: ExpertParam::Fc1Weight },
                shape: vec![4, 2],
                stored_as: "F64".into(),
                location: format!("fake[{e}]"),
            })
            .collect();
        let info =
            SourceInfo { path: "fake".into(), format: crate::SourceFormat::MoeVerify, family: None, inferred: vec![] };
        Fake { info, entries, value }
    }

    #[test]
    fn a_layer_too_large_for_the_column_block_check_says_so() {
        // Every fc1 differs: with room the check runs (and finds no column-block pattern);
        // without room the report says the check was skipped instead of staying silent.
        let (a, b) = (fake(1.0), fake(2.0));
        let r = diff(&a, &b, &DiffOptions::default()).unwrap();
        assert!(r.findings.is_empty(), "{:?}", r.findings);
        let r = diff(&a, &b, &DiffOptions { atol: None, layer_budget_bytes: 8 }).unwrap();
        assert_eq!(r.findings.len(), 1);
        assert!(r.findings[0].contains("column-block check was skipped"), "{:?}", r.findings);
    }

    #[test]
    fn ranges_compress_runs() {
        assert_eq!(ranges(&[0, 1, 2, 5, 7, 8]), "0..3, 5, 7..9");
    }
}
