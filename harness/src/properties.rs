//! The properties of spec §10, each checked for one implementation family ([`Backend`]) on one
//! [`Case`].

use crate::case::{Case, Problem};
use crate::compare::{compare_runs, compare_state_dicts, compare_tensor, contraction_length, Bounds, TensorDiff};
use crate::tolerance::Tolerance;
use moe_reference::parallel::run_parallel;
use moe_reference::{
    oracle_with_scales, to_state_dict, ExpertLayer, ExpertSet, LayerClass, LayerConfig, LayerError, LayerRun, Numerics,
    OracleRun, Reference, WgradTiming,
};
use ndarray::{s, Array1, Array2};

/// A family of implementations, one [`ExpertLayer`] per class (the reference serves all three;
/// a CUDA backend has one struct per class).
pub trait Backend: Send + Sync {
    /// The family's name (`reference`, `cuda`, ...).
    fn name(&self) -> String;
    /// The implementation of `class`, or `None` when the family has none.
    fn layer(&self, class: LayerClass) -> Option<&dyn ExpertLayer>;
    /// The numerics of the dispatcher's ETP reduction when simulating ranks of this family.
    fn reduction(&self, cfg: &LayerConfig) -> Numerics {
        Numerics::Emulated(cfg.params_dtype)
    }
}

/// The reference, emulating the storage dtype, as a [`Backend`].
#[derive(Clone, Copy, Debug, Default)]
pub struct ReferenceBackend;

impl Backend for ReferenceBackend {
    fn name(&self) -> String {
        "reference".into()
    }
    fn layer(&self, _class: LayerClass) -> Option<&dyn ExpertLayer> {
        Some(&Reference::EMULATED)
    }
}

/// A backend made of one implementation per class (the shape of the CUDA backend: one struct per
/// Megatron class). A class without an implementation is reported as skipped.
pub struct PerClassBackend {
    name: String,
    sequential: Option<Box<dyn ExpertLayer>>,
    grouped: Option<Box<dyn ExpertLayer>>,
    te_grouped: Option<Box<dyn ExpertLayer>>,
}

impl PerClassBackend {
    /// A backend named `name` with the given implementations of `SequentialMLP`, `GroupedMLP`
    /// and `TEGroupedMLP`.
    pub fn new(
        name: &str,
        sequential: Option<Box<dyn ExpertLayer>>,
        grouped: Option<Box<dyn ExpertLayer>>,
        te_grouped: Option<Box<dyn ExpertLayer>>,
    ) -> PerClassBackend {
        PerClassBackend { name: name.to_string(), sequential, grouped, te_grouped }
    }
}

impl Backend for PerClassBackend {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn layer(&self, class: LayerClass) -> Option<&dyn ExpertLayer> {
        match class {
            LayerClass::Sequential => self.sequential.as_deref(),
            LayerClass::Grouped => self.grouped.as_deref(),
            LayerClass::TeGrouped => self.te_grouped.as_deref(),
        }
    }
}

/// The checked properties (spec §10).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Property {
    /// Forward, input/probs grads and every weight grad match the f64 oracle, at the case's
    /// EP/ETP layout (ranks simulated, partial sums reduced, rank grads reassembled).
    MatchesOracle,
    /// §10.2/§10.3: the f64 oracle run rank by rank equals the unsharded oracle run, and each
    /// rank's weight grads are the corresponding slices of the unsharded grads.
    ParallelDecomposition,
    /// §10.1: the other classes, given the same weights converted to their layouts, agree.
    ClassEquivalence,
    /// §10.4: experts without tokens get exactly-zero weight grads; an all-empty call returns
    /// `[0, h]` and zero grads for every parameter.
    ZeroTokens,
    /// §10.5: padding every segment with zero rows and zero probs changes nothing.
    PaddingNeutrality,
    /// §10.6: deferred wgrad (`backward` then `backward_dw`) equals immediate, bit for bit.
    DeferredWgrad,
    /// §10.7: `y(x, 2p) = 2·y(x, p)` and `dp_i = Σ_j G_ij·y_ij / p_i`.
    ProbsLinearity,
}

impl Property {
    /// All properties.
    pub const ALL: [Property; 7] = [
        Property::MatchesOracle,
        Property::ParallelDecomposition,
        Property::ClassEquivalence,
        Property::ZeroTokens,
        Property::PaddingNeutrality,
        Property::DeferredWgrad,
        Property::ProbsLinearity,
    ];

    /// A short kebab-case name.
    pub fn name(self) -> &'static str {
        match self {
            Property::MatchesOracle => "matches-oracle",
            Property::ParallelDecomposition => "parallel-decomposition",
            Property::ClassEquivalence => "class-equivalence",
            Property::ZeroTokens => "zero-tokens",
            Property::PaddingNeutrality => "padding-neutrality",
            Property::DeferredWgrad => "deferred-wgrad",
            Property::ProbsLinearity => "probs-linearity",
        }
    }
}

/// The outcome of checking one property on one case.
#[derive(Debug)]
pub enum Verdict {
    /// Checked; the diffs are all within tolerance (or the list is empty for exact checks).
    Checked(Vec<TensorDiff>),
    /// Not applicable to this case or not supported by the implementation (with the reason).
    Skipped(String),
}

/// Why a property failed.
#[derive(Debug, thiserror::Error)]
pub enum PropertyFailure {
    /// Some tensors were outside tolerance.
    #[error("{}", .0.iter().filter(|d| !d.passed()).map(|d| d.to_string()).collect::<Vec<_>>().join("\n"))]
    Mismatch(Vec<TensorDiff>),
    /// The implementation returned an error on a valid case.
    #[error("implementation error: {0}")]
    Error(String),
}

fn single_rank_cfg(case: &Case) -> LayerConfig {
    case.cfg.unsharded()
}

/// Runs `layer` at `cfg`'s layout (ranks simulated when tp/ep > 1) and returns a [`LayerRun`]
/// in the unsharded layout (rank grads reassembled).
pub fn run_layout(
    layer: &dyn ExpertLayer,
    cfg: &LayerConfig,
    p: &Problem,
    timing: WgradTiming,
    reduce: Numerics,
) -> Result<LayerRun, LayerError> {
    let global = cfg.unsharded();
    if cfg.parallel.tp_size == 1 && cfg.parallel.ep_size == 1 {
        let params = to_state_dict(&global, &p.weights)?;
        return layer.forward_backward(&global, &params, &p.inputs, &p.grad_output, timing);
    }
    let run = run_parallel(layer, cfg, &p.weights, &p.inputs, &p.grad_output, timing, reduce)?;
    let grads = ExpertSet::unshard(cfg, &run.rank_weight_grads)?;
    Ok(LayerRun {
        output: run.output,
        grad_input: run.grad_input,
        grad_probs: run.grad_probs,
        weight_grads: to_state_dict(&global, &grads)?,
    })
}

/// The unsharded f64 oracle's results and error model for a problem.
fn oracle(cfg: &LayerConfig, p: &Problem) -> Result<OracleRun, PropertyFailure> {
    let global = cfg.unsharded();
    let params = to_state_dict(&global, &p.weights).map_err(|e| PropertyFailure::Error(format!("oracle: {e}")))?;
    oracle_with_scales(&global, &params, &p.inputs, &p.grad_output)
        .map_err(|e| PropertyFailure::Error(format!("oracle: {e}")))
}

fn lift(e: LayerError) -> Result<Verdict, PropertyFailure> {
    match e {
        LayerError::Unsupported(why) => Ok(Verdict::Skipped(why)),
        other => Err(PropertyFailure::Error(other.to_string())),
    }
}

fn verdict(diffs: Vec<TensorDiff>) -> Result<Verdict, PropertyFailure> {
    if diffs.iter().all(TensorDiff::passed) {
        Ok(Verdict::Checked(diffs))
    } else {
        Err(PropertyFailure::Mismatch(diffs))
    }
}

/// Checks `property` for `backend` on `case`.
pub fn check(backend: &dyn Backend, property: Property, case: &Case) -> Result<Verdict, PropertyFailure> {
    let cfg = &case.cfg;
    let Some(layer) = backend.layer(cfg.class) else {
        return Ok(Verdict::Skipped(format!("{} has no {} implementation", backend.name(), cfg.class)));
    };
    if let Err(e) = layer.supports(cfg) {
        return lift(e);
    }
    let p = case.problem();
    // A malformed case (negative or mis-sized counts) is an error for every property, also for
    // those that would skip it (single rank) or rewrite its counts (zero tokens).
    if let Err(e) = moe_reference::layer::validate_inputs(&cfg.unsharded(), &p.inputs) {
        return Err(PropertyFailure::Error(format!("invalid case: {e}")));
    }
    let tol = Tolerance::error_model();
    let reduce = backend.reduction(cfg);
    let run =
        |layer: &dyn ExpertLayer, cfg: &LayerConfig, p: &Problem, timing| run_layout(layer, cfg, p, timing, reduce);
    match property {
        Property::MatchesOracle => {
            let o = oracle(cfg, &p)?;
            match run(layer, cfg, &p, case.timing) {
                Ok(got) => verdict(compare_runs(&single_rank_cfg(case), &got, &o.run, Some((&o).into()), tol)),
                Err(e) => lift(e),
            }
        }
        Property::ParallelDecomposition => {
            if cfg.parallel.tp_size == 1 && cfg.parallel.ep_size == 1 {
                return Ok(Verdict::Skipped("single rank".into()));
            }
            let o = oracle(cfg, &p)?;
            let (expected, scales) = (&o.run, &o.scales);
            let par = run_parallel(
                &Reference::ORACLE,
                cfg,
                &p.weights,
                &p.inputs,
                &p.grad_output,
                case.timing,
                Numerics::Oracle,
            )
            .map_err(|e| PropertyFailure::Error(e.to_string()))?;
            let exact = Tolerance::f64_reordering(contraction_length(cfg, &case.tokens_per_expert));
            let global = single_rank_cfg(case);
            // The oracle's error bounds are in units of the storage dtype's roundoff; divided by
            // it they are the magnitudes of the terms behind each element, the right scale for
            // comparing two f64 computations that differ in summation order.
            let us = cfg.params_dtype.unit_roundoff();
            let magnitude = |a: &ndarray::ArrayD<f64>| a.mapv(|v| v / us);
            let out_mag = magnitude(&scales.output.clone().into_dyn());
            let dx_mag = magnitude(&scales.grad_input.clone().into_dyn());
            let dp_mag = magnitude(&scales.grad_probs.clone().into_dyn());
            let mut diffs = vec![
                compare_tensor(
                    "output",
                    par.output.view().into_dyn(),
                    expected.output.view().into_dyn(),
                    Bounds { scale: Some(out_mag.view()), allowance: None },
                    1,
                    exact,
                ),
                compare_tensor(
                    "grad.permuted_local_hidden_states",
                    par.grad_input.view().into_dyn(),
                    expected.grad_input.view().into_dyn(),
                    Bounds { scale: Some(dx_mag.view()), allowance: None },
                    1,
                    exact,
                ),
                compare_tensor(
                    "grad.permuted_probs",
                    par.grad_probs.view().into_dyn(),
                    expected.grad_probs.view().into_dyn(),
                    Bounds { scale: Some(dp_mag.view()), allowance: None },
                    1,
                    exact,
                ),
            ];
            // Each rank's grads equal the slices of the unsharded grads (compared in the rank's layout).
            let full = moe_reference::from_state_dict(&global, &expected.weight_grads)
                .map_err(|e| PropertyFailure::Error(e.to_string()))?;
            let full_scales = moe_reference::from_state_dict(&global, &scales.weight_grads)
                .map_err(|e| PropertyFailure::Error(e.to_string()))?;
            for (q, ranks) in par.rank_weight_grads.iter().enumerate() {
                for (r, grads) in ranks.iter().enumerate() {
                    let rank_cfg = cfg.at_rank(q, r);
                    let want = full.shard(&rank_cfg).map_err(|e| PropertyFailure::Error(e.to_string()))?;
                    let want_scales =
                        full_scales.shard(&rank_cfg).map_err(|e| PropertyFailure::Error(e.to_string()))?;
                    let to_sd =
                        |s: &ExpertSet| to_state_dict(&rank_cfg, s).map_err(|e| PropertyFailure::Error(e.to_string()));
                    diffs.extend(compare_state_dicts(
                        &format!("rank(ep={q},tp={r}).grad."),
                        &rank_cfg,
                        &to_sd(grads)?,
                        &to_sd(&want)?,
                        Some((
                            &to_sd(&want_scales)?.into_iter().map(|(k, v)| (k, magnitude(&v))).collect(),
                            &Default::default(),
                        )),
                        exact,
                    ));
                }
            }
            verdict(diffs)
        }
        Property::ClassEquivalence => {
            let mut diffs = Vec::new();
            let o = oracle(cfg, &p)?;
            let first = match run(layer, cfg, &p, WgradTiming::Immediate) {
                Ok(r) => r,
                Err(e) => return lift(e),
            };
            let first_grads = moe_reference::from_state_dict(&single_rank_cfg(case), &first.weight_grads)
                .map_err(|e| PropertyFailure::Error(e.to_string()))?;
            for other in LayerClass::ALL.into_iter().filter(|&c| c != cfg.class) {
                let other_cfg = LayerConfig { class: other, ..cfg.clone() };
                if other_cfg.validate().is_err() {
                    continue;
                }
                let Some(other_layer) = backend.layer(other) else {
                    continue;
                };
                if other_layer.supports(&other_cfg).is_err() || !classes_agree(cfg, &other_cfg) {
                    continue;
                }
                let second = match run(other_layer, &other_cfg, &p, WgradTiming::Immediate) {
                    Ok(r) => r,
                    Err(LayerError::Unsupported(_)) => continue,
                    Err(e) => return Err(PropertyFailure::Error(e.to_string())),
                };
                // Both carry storage-dtype rounding (at different points): twice the tolerance.
                let t2 = tol.times(2.0);
                let mut d = compare_runs(
                    &single_rank_cfg(case),
                    &first,
                    &LayerRun { weight_grads: Default::default(), ..second.clone() },
                    Some((&o).into()),
                    t2,
                );
                d.truncate(3);
                let second_grads = moe_reference::from_state_dict(&other_cfg.unsharded(), &second.weight_grads)
                    .map_err(|e| PropertyFailure::Error(e.to_string()))?;
                let to_sd = |s: &ExpertSet| {
                    to_state_dict(&single_rank_cfg(case), s).map_err(|e| PropertyFailure::Error(e.to_string()))
                };
                d.extend(compare_state_dicts(
                    &format!("vs {other}: grad."),
                    &single_rank_cfg(case),
                    &to_sd(&second_grads)?,
                    &to_sd(&first_grads)?,
                    Some((&o.scales.weight_grads, &o.allowance.weight_grads)),
                    t2,
                ));
                for x in d.iter_mut().take(3) {
                    x.name = format!("vs {other}: {}", x.name);
                }
                diffs.extend(d);
            }
            if diffs.is_empty() {
                return Ok(Verdict::Skipped("no other class supports this configuration".into()));
            }
            verdict(diffs)
        }
        Property::ZeroTokens => {
            // Empty some experts of this case (every other one, and the last) and require exact zeros.
            let mut zeroed = case.clone();
            let e = zeroed.tokens_per_expert.len();
            for (i, n) in zeroed.tokens_per_expert.iter_mut().enumerate() {
                if i % 2 == 1 || i + 1 == e {
                    *n = 0;
                }
            }
            let all_empty = Case { tokens_per_expert: vec![0; e], ..case.clone() };
            let mut diffs = Vec::new();
            for c in [&zeroed, &all_empty] {
                let p = c.problem();
                let got = match run(layer, cfg, &p, c.timing) {
                    Ok(r) => r,
                    Err(e) => return lift(e),
                };
                let grads = moe_reference::from_state_dict(&single_rank_cfg(c), &got.weight_grads)
                    .map_err(|e| PropertyFailure::Error(e.to_string()))?;
                for (g, w) in grads.experts.iter().enumerate() {
                    if c.tokens_per_expert[g] != 0
                        || (cfg.class == LayerClass::Sequential && cfg.num_local_experts() == 1)
                    {
                        continue;
                    }
                    for (name, shape, values) in w.tensors() {
                        let zeros = vec![0.0; values.len()];
                        let got = ndarray::ArrayD::from_shape_vec(shape.clone(), values).unwrap();
                        let want = ndarray::ArrayD::from_shape_vec(shape, zeros).unwrap();
                        diffs.push(compare_tensor(
                            &format!("tokens={:?}: expert {g} grad {name}", c.tokens_per_expert),
                            got.view(),
                            want.view(),
                            Bounds::RELATIVE,
                            1,
                            Tolerance::EXACT,
                        ));
                    }
                }
                if c.num_tokens() == 0 {
                    let want = Array2::<f64>::zeros((0, cfg.hidden_size));
                    diffs.push(compare_tensor(
                        "all-empty output",
                        got.output.view().into_dyn(),
                        want.view().into_dyn(),
                        Bounds::RELATIVE,
                        1,
                        Tolerance::EXACT,
                    ));
                }
            }
            verdict(diffs)
        }
        Property::PaddingNeutrality => {
            if cfg.class == LayerClass::Grouped || cfg.padding_multiple.is_some() {
                return Ok(Verdict::Skipped("class has no padding or case already padded".into()));
            }
            let unpadded = match run(layer, cfg, &p, WgradTiming::Immediate) {
                Ok(r) => r,
                Err(e) => return lift(e),
            };
            let padded_cfg = LayerConfig { padding_multiple: Some(16), ..cfg.clone() };
            let padded = match run(layer, &padded_cfg, &p, WgradTiming::Immediate) {
                Ok(r) => r,
                Err(e) => return lift(e),
            };
            let o = oracle(cfg, &p)?;
            verdict(compare_runs(&single_rank_cfg(case), &padded, &unpadded, Some((&o).into()), tol.times(2.0)))
        }
        Property::DeferredWgrad => {
            if cfg.class == LayerClass::Grouped {
                return Ok(Verdict::Skipped("GroupedMLP never defers weight gradients".into()));
            }
            let (immediate, deferred) =
                match (run(layer, cfg, &p, WgradTiming::Immediate), run(layer, cfg, &p, WgradTiming::Deferred)) {
                    (Ok(a), Ok(b)) => (a, b),
                    (Err(e), _) | (_, Err(e)) => return lift(e),
                };
            verdict(compare_runs(&single_rank_cfg(case), &deferred, &immediate, None, Tolerance::EXACT))
        }
        Property::ProbsLinearity => {
            if cfg.apply_probs_on_input {
                return Ok(Verdict::Skipped("probs on input: the output is not linear in p".into()));
            }
            let base = match run(layer, cfg, &p, WgradTiming::Immediate) {
                Ok(r) => r,
                Err(e) => return lift(e),
            };
            let mut doubled = p.clone();
            doubled.inputs.probs.mapv_inplace(|v| 2.0 * v);
            let twice = match run(layer, cfg, &doubled, WgradTiming::Immediate) {
                Ok(r) => r,
                Err(e) => return lift(e),
            };
            let o = oracle(cfg, &p)?;
            let (expected, scales) = (&o.run, &o.scales);
            let scaled = base.output.mapv(|v| 2.0 * v);
            let scaled_scale = scales.output.mapv(|v| 2.0 * v);
            let mut diffs = vec![compare_tensor(
                "y(x, 2p) vs 2 y(x, p)",
                twice.output.view().into_dyn(),
                scaled.view().into_dyn(),
                Bounds { scale: Some(scaled_scale.view().into_dyn()), allowance: None },
                1,
                tol.times(2.0),
            )];
            // dp_i = Σ_j G_ij·y_ij / p_i, over rows with p_i ≠ 0, from the oracle's output.
            let rows: Vec<usize> = (0..p.inputs.num_tokens()).filter(|&i| p.inputs.probs[i] != 0.0).collect();
            let implied = Array1::from_iter(rows.iter().map(|&i| {
                (&p.grad_output.slice(s![i, ..]) * &expected.output.slice(s![i, ..])).sum() / p.inputs.probs[i]
            }));
            let implied_scale = Array1::from_iter(rows.iter().map(|&i| {
                (p.grad_output.slice(s![i, ..]).mapv(f64::abs) * scales.output.slice(s![i, ..])).sum()
                    / p.inputs.probs[i]
            }));
            let got = Array1::from_iter(rows.iter().map(|&i| base.grad_probs[i]));
            diffs.push(compare_tensor(
                "dp vs G·y/p",
                got.view().into_dyn(),
                implied.view().into_dyn(),
                Bounds { scale: Some(implied_scale.view().into_dyn()), allowance: None },
                1,
                tol.times(2.0),
            ));
            verdict(diffs)
        }
    }
}

/// Whether two classes compute the same function for these configurations (spec §4.9):
/// GroupedMLP ignores the clamp and the GLU offset, so it is only equivalent when neither is set.
fn classes_agree(a: &LayerConfig, b: &LayerConfig) -> bool {
    let grouped = a.class == LayerClass::Grouped || b.class == LayerClass::Grouped;
    !(grouped && (a.clamp_value.is_some() || a.glu_linear_offset != 0.0))
}
