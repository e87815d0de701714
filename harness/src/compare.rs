//! Tensor comparison under the [`Tolerance`] model, with failure reports that name the worst
//! element and its index.

use crate::tolerance::Tolerance;
use moe_reference::{LayerConfig, LayerRun, OracleRun, StateDict};
use ndarray::ArrayViewD;

/// The comparison of one tensor.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TensorDiff {
    /// Tensor name (`output`, `grad.permuted_local_hidden_states`, `grad.<parameter>`, ...).
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// `max |got − exp|`.
    pub max_abs: f64,
    /// `max |got − exp| / |exp|` over elements with `exp ≠ 0`.
    pub max_rel: f64,
    /// `‖got − exp‖_F / ‖exp‖_F` (0 when both are zero; infinite when only `exp` is zero).
    pub rel_frobenius: f64,
    /// The tolerance applied.
    pub tolerance: Tolerance,
    /// Elements outside the tolerance (NaN counts as outside).
    pub violations: usize,
    /// Index of the worst element (largest error relative to its bound); for `[T, h]` tensors
    /// this is `(token, feature)`.
    pub worst_index: Vec<usize>,
    /// `got` at the worst element.
    pub worst_got: f64,
    /// `exp` at the worst element.
    pub worst_expected: f64,
    /// `|got − exp| / bound` at the worst element (≤ 1 passes).
    pub worst_ratio: f64,
    /// DeepGEMM's `calc_diff(got, exp) = 1 − 2·Σ got·exp / Σ (got² + exp²)`, in f64: 0 for equal
    /// tensors (also both zero), 1 for orthogonal ones, 2 for `got = −exp`; NaN anywhere gives
    /// NaN. Reported beside `worst_ratio` (fp8 cases); never a verdict of its own.
    pub calc_diff: f64,
}

impl TensorDiff {
    /// True when every element is within tolerance.
    pub fn passed(&self) -> bool {
        self.violations == 0
    }
}

impl std::fmt::Display for TensorDiff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {:?}: {} — max abs {:.3e}, max rel {:.3e}, rel fro {:.3e}, {}; {} violation(s); worst at {:?}: got {:.9e}, expected {:.9e} ({:.2}x the bound)",
            self.name,
            self.shape,
            if self.passed() { "pass" } else { "FAIL" },
            self.max_abs,
            self.max_rel,
            self.rel_frobenius,
            self.tolerance,
            self.violations,
            self.worst_index,
            self.worst_got,
            self.worst_expected,
            self.worst_ratio
        )
    }
}

/// DeepGEMM's test helper `calc_diff` (issue 12): `1 − 2·Σ x·y / Σ (x² + y²)`,
/// accumulated in f64; 0 when both are all zero (DeepGEMM divides by zero there).
pub fn calc_diff(x: &[f64], y: &[f64]) -> f64 {
    let (mut xy, mut sq) = (0.0f64, 0.0f64);
    for (&a, &b) in x.iter().zip(y) {
        xy += a * b;
        sq += a * a + b * b;
    }
    if sq == 0.0 {
        return if xy.is_nan() { f64::NAN } else { 0.0 };
    }
    1.0 - 2.0 * xy / sq
}

fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for (axis, &len) in shape.iter().enumerate().rev() {
        if len > 0 {
            index[axis] = flat % len;
            flat /= len;
        }
    }
    index
}

/// Per-element inputs of the bound: the oracle's error scale `S` and absolute allowance `A`.
#[derive(Clone, Debug, Default)]
pub struct Bounds<'a> {
    /// Error scale (default `|exp|`).
    pub scale: Option<ArrayViewD<'a, f64>>,
    /// Absolute allowance for rounding-ambiguous branches (default 0).
    pub allowance: Option<ArrayViewD<'a, f64>>,
}

impl Bounds<'_> {
    /// `S = |exp|`, `A = 0`.
    pub const RELATIVE: Bounds<'static> = Bounds { scale: None, allowance: None };
}

/// The oracle's error scales and allowances for a whole [`LayerRun`].
#[derive(Clone, Copy, Debug)]
pub struct ErrorModel<'a> {
    /// Error scales, same layout as the run.
    pub scales: &'a LayerRun,
    /// Allowances, same layout as the run.
    pub allowance: &'a LayerRun,
}

impl<'a> From<&'a OracleRun> for ErrorModel<'a> {
    fn from(o: &'a OracleRun) -> Self {
        ErrorModel { scales: &o.scales, allowance: &o.allowance }
    }
}

/// Compares `got` with `expected` under `tol`: element `i` passes when
/// `|got_i − exp_i| ≤ rtol·(S_i + A_i + rms(S_block)) + atol`, where `S` is the oracle's error bound
/// (see [`moe_reference::oracle_with_scales`]; `|exp|` when not given) and `A` its allowance for
/// rounding-ambiguous branches (0 when not given). The flat (row-major) data is split into
/// `blocks` equal contiguous blocks, each with its own rms (one block per expert of packed
/// weights). A shape mismatch is reported as a total failure.
pub fn compare_tensor(
    name: &str,
    got: ArrayViewD<f64>,
    expected: ArrayViewD<f64>,
    bounds: Bounds,
    blocks: usize,
    tol: Tolerance,
) -> TensorDiff {
    let shape = expected.shape().to_vec();
    let mut diff = TensorDiff {
        name: name.to_string(),
        shape: shape.clone(),
        max_abs: 0.0,
        max_rel: 0.0,
        rel_frobenius: 0.0,
        tolerance: tol,
        violations: 0,
        worst_index: vec![],
        worst_got: f64::NAN,
        worst_expected: f64::NAN,
        worst_ratio: 0.0,
        calc_diff: f64::NAN,
    };
    // A tensor of the wrong shape, or bounds of the wrong shape (a harness bug), fail every
    // element rather than being compared against something else.
    let mismatch = if got.shape() != expected.shape() {
        Some(format!("shape mismatch: got {:?}", got.shape()))
    } else if bounds.scale.as_ref().is_some_and(|s| s.shape() != expected.shape()) {
        Some(format!("error-scale shape mismatch: {:?}", bounds.scale.as_ref().map(|s| s.shape().to_vec())))
    } else if bounds.allowance.as_ref().is_some_and(|a| a.shape() != expected.shape()) {
        Some(format!("allowance shape mismatch: {:?}", bounds.allowance.as_ref().map(|a| a.shape().to_vec())))
    } else {
        None
    };
    if let Some(why) = mismatch {
        diff.violations = expected.len().max(1);
        diff.max_abs = f64::INFINITY;
        diff.max_rel = f64::INFINITY;
        diff.rel_frobenius = f64::INFINITY;
        diff.worst_ratio = f64::INFINITY;
        diff.calc_diff = f64::INFINITY;
        diff.name = format!("{name} ({why})");
        return diff;
    }
    let g: Vec<f64> = got.iter().copied().collect();
    let e: Vec<f64> = expected.iter().copied().collect();
    let sc: Vec<f64> = match bounds.scale {
        Some(s) => s.iter().map(|v| v.abs()).collect(),
        None => e.iter().map(|v| v.abs()).collect(),
    };
    let allow: Vec<f64> = match bounds.allowance {
        Some(a) => a.iter().map(|v| v.abs()).collect(),
        None => vec![0.0; e.len()],
    };
    let n = e.len();
    let blocks = blocks.max(1);
    let block_len = n.div_ceil(blocks).max(1);
    let (mut err2, mut exp2) = (0.0f64, 0.0f64);
    let mut worst: Option<usize> = None;
    let chunks = g.chunks(block_len).zip(e.chunks(block_len)).zip(sc.chunks(block_len)).zip(allow.chunks(block_len));
    for (b, (((gb, eb), sb), ab)) in chunks.enumerate() {
        let rms = (sb.iter().map(|x| x * x).sum::<f64>() / sb.len() as f64).sqrt();
        for (i, (((&gv, &ev), &sv), &av)) in gb.iter().zip(eb).zip(sb).zip(ab).enumerate() {
            let d = (gv - ev).abs();
            let bound = tol.bound(sv + av, rms);
            let ratio = if d.is_nan() {
                f64::INFINITY
            } else if d == 0.0 {
                0.0
            } else if bound == 0.0 {
                f64::INFINITY
            } else {
                d / bound
            };
            if ratio > 1.0 {
                diff.violations += 1;
            }
            let d_or_inf = if d.is_nan() { f64::INFINITY } else { d };
            diff.max_abs = diff.max_abs.max(d_or_inf);
            if ev != 0.0 {
                diff.max_rel = diff.max_rel.max(d_or_inf / ev.abs());
            }
            err2 += d_or_inf * d_or_inf;
            exp2 += ev * ev;
            if worst.is_none() || ratio > diff.worst_ratio {
                diff.worst_ratio = ratio;
                worst = Some(b * block_len + i);
            }
        }
    }
    diff.rel_frobenius = if err2 == 0.0 { 0.0 } else { (err2 / exp2).sqrt() };
    diff.calc_diff = calc_diff(&g, &e);
    if let Some(w) = worst {
        diff.worst_index = unravel(w, &shape);
        diff.worst_got = g[w];
        diff.worst_expected = e[w];
    }
    diff
}

/// The contraction length `K` of the error model for a layer call: the largest of `h`, `N1`
/// and the largest expert segment.
pub fn contraction_length(cfg: &LayerConfig, tokens_per_expert: &[i64]) -> usize {
    let max_seg = tokens_per_expert.iter().copied().max().unwrap_or(0).max(0) as usize;
    cfg.hidden_size.max(cfg.n1()).max(max_seg)
}

/// Compares every tensor of two [`LayerRun`]s: `output`, `grad.permuted_local_hidden_states`,
/// `grad.permuted_probs` and `grad.<parameter>` for every parameter of `cfg`'s class (packed
/// GroupedMLP weights compared per expert block), with the oracle's error model when given.
/// Missing gradients are reported as failures.
pub fn compare_runs(
    cfg: &LayerConfig,
    got: &LayerRun,
    expected: &LayerRun,
    model: Option<ErrorModel>,
    tol: Tolerance,
) -> Vec<TensorDiff> {
    let b = |f: fn(&LayerRun) -> ArrayViewD<f64>| match model {
        Some(m) => Bounds { scale: Some(f(m.scales)), allowance: Some(f(m.allowance)) },
        None => Bounds { scale: None, allowance: None },
    };
    type View = fn(&LayerRun) -> ArrayViewD<f64>;
    let activations: [(&str, View); 3] = [
        ("output", |r| r.output.view().into_dyn()),
        ("grad.permuted_local_hidden_states", |r| r.grad_input.view().into_dyn()),
        ("grad.permuted_probs", |r| r.grad_probs.view().into_dyn()),
    ];
    let mut out: Vec<TensorDiff> =
        activations.iter().map(|&(name, f)| compare_tensor(name, f(got), f(expected), b(f), 1, tol)).collect();
    out.extend(compare_state_dicts(
        "grad.",
        cfg,
        &got.weight_grads,
        &expected.weight_grads,
        model.map(|m| (&m.scales.weight_grads, &m.allowance.weight_grads)),
        tol,
    ));
    out
}

/// Compares two state dicts of `cfg`'s class parameter by parameter, names prefixed by `prefix`,
/// with optional (error scales, allowances) in the same layout.
pub fn compare_state_dicts(
    prefix: &str,
    cfg: &LayerConfig,
    got: &StateDict,
    expected: &StateDict,
    model: Option<(&StateDict, &StateDict)>,
    tol: Tolerance,
) -> Vec<TensorDiff> {
    moe_reference::param_specs(cfg)
        .into_iter()
        .filter_map(|spec| {
            let exp = expected.get(&spec.name)?;
            let name = format!("{prefix}{}", spec.name);
            Some(match got.get(&spec.name) {
                Some(g) => compare_tensor(
                    &name,
                    g.view(),
                    exp.view(),
                    Bounds {
                        scale: model.and_then(|(s, _)| s.get(&spec.name)).map(|s| s.view()),
                        allowance: model.and_then(|(_, a)| a.get(&spec.name)).map(|a| a.view()),
                    },
                    spec.expert_blocks,
                    tol,
                ),
                None => {
                    let mut d = compare_tensor(&name, exp.view(), exp.view(), Bounds::RELATIVE, 1, tol);
                    d.name = format!("{name} (missing)");
                    d.violations = exp.len().max(1);
                    d
                }
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{arr1, arr2};

    #[test]
    fn reports_worst_element_with_its_token_feature_index() {
        let exp = arr2(&[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]);
        let mut got = exp.clone();
        got[[1, 2]] = 6.5;
        let d = compare_tensor(
            "output",
            got.view().into_dyn(),
            exp.view().into_dyn(),
            Bounds::RELATIVE,
            1,
            Tolerance { rtol: 1e-3, atol: 0.0 },
        );
        assert!(!d.passed());
        assert_eq!(d.violations, 1);
        assert_eq!(d.worst_index, vec![1, 2]);
        assert_eq!((d.worst_got, d.worst_expected), (6.5, 6.0));
        assert!((d.max_abs - 0.5).abs() < 1e-15);
    }

    #[test]
    fn a_failure_prints_the_tensor_the_worst_element_its_index_and_the_errors() {
        // The report a user reads when a verdict fails: every number in it must be the diff's.
        let exp = arr2(&[[1.0, 2.0], [4.0, 8.0]]);
        let mut got = exp.clone();
        got[[1, 0]] = 4.5;
        let tol = Tolerance { rtol: 0.01, atol: 0.0 };
        let d = compare_tensor("output", got.view().into_dyn(), exp.view().into_dyn(), Bounds::RELATIVE, 1, tol);
        let text = d.to_string();
        // By hand: rel fro = 0.5/√85 = 5.423e-2; the bound of [1, 0] is 0.01·(|4| + rms) with
        // rms = √(85/4) = 4.6098, so 0.5 / 0.086098 = 5.81.
        assert_eq!(
            text,
            "output [2, 2]: FAIL — max abs 5.000e-1, max rel 1.250e-1, rel fro 5.423e-2, 1.00e-2x; 1 violation(s); \
             worst at [1, 0]: got 4.500000000e0, expected 4.000000000e0 (5.81x the bound)"
        );
        let pass = compare_tensor("output", exp.view().into_dyn(), exp.view().into_dyn(), Bounds::RELATIVE, 1, tol);
        assert!(pass.to_string().starts_with("output [2, 2]: pass — max abs 0.000e0"), "{pass}");
    }

    #[test]
    fn allowances_and_rms_floors_are_per_block() {
        // Two experts' blocks: the second has an allowance of 1 on its first element, which
        // lets an error of 0.9 through there (and only there), and its own rms floor.
        let exp = arr1(&[1.0, 1.0, 4.0, 4.0]);
        let allowance = arr1(&[0.0, 0.0, 1.0, 0.0]);
        let tol = Tolerance { rtol: 1.0, atol: 0.0 };
        let check = |got: ndarray::Array1<f64>| {
            compare_tensor(
                "g",
                got.view().into_dyn(),
                exp.view().into_dyn(),
                Bounds {
                    scale: Some(arr1(&[0.1, 0.1, 0.1, 0.1]).into_dyn().view()),
                    allowance: Some(allowance.view().into_dyn()),
                },
                2,
                tol,
            )
        };
        // bound of [2] = 0.1 + 1 + rms 0.1 = 1.2; of [3] = 0.2; of [0] = 0.2.
        assert!(check(arr1(&[1.0, 1.0, 5.1, 4.0])).passed());
        assert_eq!(check(arr1(&[1.0, 1.0, 4.0, 4.3])).worst_index, vec![3]);
        assert_eq!(check(arr1(&[1.3, 1.0, 4.0, 4.0])).violations, 1);
        let d = check(arr1(&[1.0, 1.0, 5.1, 4.0]));
        assert!((d.worst_ratio - 1.1 / 1.2).abs() < 1e-12, "{d}");
    }

    #[test]
    fn the_contraction_length_is_the_longest_sum_of_the_call() {
        // K of the error model's √K: the hidden size (fc1), the fc1 width N1 (fc2) or the
        // largest expert segment (the weight-gradient GEMMs), whichever is longest.
        let cfg = LayerConfig { hidden_size: 16, ffn_hidden_size: 32, ..LayerConfig::example() };
        assert_eq!(contraction_length(&cfg, &[3, 40, 0]), 64, "GLU: N1 = 2f");
        assert_eq!(contraction_length(&cfg, &[3, 100, 0]), 100);
        let wide = LayerConfig { hidden_size: 200, gated_linear_unit: false, ..cfg };
        assert_eq!(contraction_length(&wide, &[-1, 5]), 200);
        assert_eq!(
            contraction_length(
                &LayerConfig { hidden_size: 1, ffn_hidden_size: 1, gated_linear_unit: false, ..cfg },
                &[]
            ),
            1
        );
    }

    #[test]
    fn calc_diff_is_deepgemms_formula_in_f64() {
        // By hand: x = (1, 2), y = (1, 3): 1 − 2·7/(1+4+1+9) = 1/15.
        assert!((calc_diff(&[1.0, 2.0], &[1.0, 3.0]) - 1.0 / 15.0).abs() < 1e-15);
        assert_eq!(calc_diff(&[0.5, -2.0], &[0.5, -2.0]), 0.0);
        assert_eq!(calc_diff(&[1.0, 0.0], &[0.0, 1.0]), 1.0);
        assert_eq!(calc_diff(&[1.0, -1.0], &[-1.0, 1.0]), 2.0);
        assert_eq!(calc_diff(&[0.0], &[0.0]), 0.0);
        assert!(calc_diff(&[f64::NAN], &[1.0]).is_nan());
        // A 1% scale error: 1 − 2·1.01/(1 + 1.0201) = 4.95e-5, DeepGEMM's 1e-3 threshold
        // sees a 4.6% one.
        let d = calc_diff(&[1.01, 2.02], &[1.0, 2.0]);
        assert!((d - (1.0 - 2.02 / 2.0201)).abs() < 1e-15, "{d}");
        // compare_tensor reports it.
        let exp = arr1(&[1.0, 2.0]);
        let got = arr1(&[1.0, 3.0]);
        let t = compare_tensor(
            "g",
            got.view().into_dyn(),
            exp.view().into_dyn(),
            Bounds::RELATIVE,
            1,
            Tolerance { rtol: 1.0, atol: 0.0 },
        );
        assert!((t.calc_diff - 1.0 / 15.0).abs() < 1e-15);
    }

    #[test]
    fn an_error_exactly_at_its_bound_passes() {
        // "≤ 1 passes": error 0.5 against the bound 1·(0.25 + rms 0.25) = 0.5, both exact in
        // binary, is a ratio of exactly 1.
        let exp = arr1(&[1.0]);
        let scale = arr1(&[0.25]);
        let d = compare_tensor(
            "g",
            arr1(&[1.5]).view().into_dyn(),
            exp.view().into_dyn(),
            Bounds { scale: Some(scale.view().into_dyn()), allowance: None },
            1,
            Tolerance { rtol: 1.0, atol: 0.0 },
        );
        assert_eq!((d.worst_ratio, d.violations), (1.0, 0));
    }

    #[test]
    fn bounds_of_the_wrong_shape_fail_instead_of_being_replaced() {
        let exp = arr1(&[1.0, 2.0]);
        let wrong = arr1(&[1.0, 2.0, 3.0]);
        let tol = Tolerance { rtol: 1.0, atol: 0.0 };
        let scale = compare_tensor(
            "g",
            exp.view().into_dyn(),
            exp.view().into_dyn(),
            Bounds { scale: Some(wrong.view().into_dyn()), allowance: None },
            1,
            tol,
        );
        assert!(!scale.passed() && scale.name.contains("error-scale shape mismatch"), "{scale}");
        let allowance = compare_tensor(
            "g",
            exp.view().into_dyn(),
            exp.view().into_dyn(),
            Bounds { scale: None, allowance: Some(wrong.view().into_dyn()) },
            1,
            tol,
        );
        assert!(!allowance.passed() && allowance.name.contains("allowance shape mismatch"), "{allowance}");
    }

    #[test]
    fn nan_never_passes_and_empty_blocks_must_be_exact_zero() {
        let exp = arr1(&[0.0, 0.0, 1.0, 1.0]);
        let got = arr1(&[f64::NAN, 0.0, 1.0, 1.0]);
        let d = compare_tensor(
            "g",
            got.view().into_dyn(),
            exp.view().into_dyn(),
            Bounds::RELATIVE,
            2,
            Tolerance { rtol: 0.5, atol: 0.0 },
        );
        assert_eq!(d.violations, 1);
        // Block 0 (an empty expert) has rms 0: a tiny non-zero value fails.
        let got = arr1(&[1e-30, 0.0, 1.0, 1.0]);
        let d = compare_tensor(
            "g",
            got.view().into_dyn(),
            exp.view().into_dyn(),
            Bounds::RELATIVE,
            2,
            Tolerance { rtol: 0.5, atol: 0.0 },
        );
        assert_eq!(d.violations, 1);
        assert_eq!(d.worst_index, vec![0]);
    }
}
