//! The properties of spec §10, each checked for one implementation family ([`Backend`]) on one
//! [`Case`].
//!
//! Every property runs the implementation under test for every claim it makes; the f64 oracle
//! only supplies expected values and error bounds. Each [`Property`]'s documentation says which
//! computations come from the backend. `tests/self_test.rs` plants, for each property, a bug
//! in a wrapper of the reference ([`crate::planted`]) that this property must report.

mod checks;
mod parallel;

pub use parallel::compare_reduced;

use crate::case::{Case, Problem};
use crate::tolerance::Tolerance;
use moe_reference::parallel::{run_parallel, EtpReduction};
use moe_reference::{
    oracle_with_scales, to_state_dict, ExpertLayer, ExpertSet, LayerClass, LayerConfig, LayerError, LayerRun,
    OracleRun, Reference, WgradTiming,
};

/// A family of implementations, one [`ExpertLayer`] per class (the reference serves all three;
/// a CUDA backend has one struct per class).
pub trait Backend: Send + Sync {
    /// The family's name (`reference`, `cuda`, ...).
    fn name(&self) -> String;
    /// The implementation of `class`, or `None` when the family has none.
    fn layer(&self, class: LayerClass) -> Option<&dyn ExpertLayer>;
    /// How the dispatcher reduces this family's ETP partials when ranks are simulated: by
    /// default Megatron's reductions for `cfg`'s dtypes ([`EtpReduction::megatron`]).
    fn reduction(&self, cfg: &LayerConfig) -> EtpReduction {
        EtpReduction::megatron(cfg)
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

/// A backend whose one implementation serves every class, as the reference does; the planted-bug
/// tests wrap a faulty reference in it.
pub struct EveryClass<L>(pub L);

impl<L: ExpertLayer> Backend for EveryClass<L> {
    fn name(&self) -> String {
        self.0.name()
    }
    fn layer(&self, _class: LayerClass) -> Option<&dyn ExpertLayer> {
        Some(&self.0)
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

/// The checked properties (spec §10). "The backend" below is the implementation under test;
/// "the oracle" is the f64 reference, which only ever supplies expected values and bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Property {
    /// The **unsharded** layer matches the f64 oracle: the backend's forward output, input and
    /// probs grads and every weight/bias grad (one `forward_backward` call at EP = ETP = 1, with
    /// the case's wgrad timing) are within the error model of the oracle's. Sharded layouts are
    /// [`Property::ParallelDecomposition`]'s claim.
    MatchesOracle,
    /// §10.2/§10.3, the **sharded** layer matches the unsharded oracle: every simulated
    /// (EP, ETP) rank is one call of the backend on its shard of the weights and the rows of its
    /// EP rank; the harness reduces the ETP partials as Megatron's dispatcher does
    /// ([`EtpReduction`]: outputs in the probs dtype, input grads in the storage dtype) and
    /// compares the reduced output, input and probs grads with the unsharded oracle under the
    /// error model plus the reduction's rounding; each rank's weight grads (from the backend)
    /// are compared with the slices of the oracle's unsharded grads. Skipped at EP = ETP = 1.
    ParallelDecomposition,
    /// §10.1: the backend's implementations of the other classes, given the same weights
    /// converted to their layouts, agree with the backend's implementation of the case's class
    /// (outputs and grads, each side a backend call at the case's layout; twice the error
    /// model, the oracle supplying only the bounds).
    ClassEquivalence,
    /// §10.4: the backend, called at the case's layout with some experts emptied (every other
    /// one and the last) and with every expert empty, returns exactly-zero weight grads for the
    /// empty experts, and `[0, h]` for the all-empty call.
    ZeroTokens,
    /// §10.5: the backend called with Megatron's padding of every segment to 16 rows (zero rows,
    /// zero probs) returns what the backend returns unpadded (twice the error model).
    PaddingNeutrality,
    /// §10.6: the backend with deferred wgrad (`backward`, then `backward_dw`) returns the same
    /// outputs and grads as the backend with immediate wgrad, bit for bit.
    DeferredWgrad,
    /// §10.7: the backend's `y(x, 2p)` equals twice the backend's `y(x, p)`, and the backend's
    /// `dp_i` equals `Σ_j G_ij·y_ij / p_i` with `y` from the oracle (twice the error model).
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
    Checked(Vec<crate::compare::TensorDiff>),
    /// Not applicable to this case or not supported by the implementation (with the reason).
    Skipped(String),
}

/// Why a property failed.
#[derive(Debug, thiserror::Error)]
pub enum PropertyFailure {
    /// Some tensors were outside tolerance.
    #[error("{}", .0.iter().filter(|d| !d.passed()).map(|d| d.to_string()).collect::<Vec<_>>().join("\n"))]
    Mismatch(Vec<crate::compare::TensorDiff>),
    /// The implementation returned an error on a valid case.
    #[error("implementation error: {0}")]
    Error(String),
}

/// Runs `layer` at `cfg`'s layout (ranks simulated when tp/ep > 1, ETP partials reduced by
/// `reduction`) and returns a [`LayerRun`] in the unsharded layout (rank grads reassembled).
pub fn run_layout(
    layer: &dyn ExpertLayer,
    cfg: &LayerConfig,
    p: &Problem,
    timing: WgradTiming,
    reduction: EtpReduction,
) -> Result<LayerRun, LayerError> {
    let global = cfg.unsharded();
    if cfg.parallel.tp_size == 1 && cfg.parallel.ep_size == 1 {
        let params = to_state_dict(&global, &p.weights)?;
        return layer.forward_backward(&global, &params, &p.inputs, &p.grad_output, timing);
    }
    let run = run_parallel(layer, cfg, &p.weights, &p.inputs, &p.grad_output, timing, reduction)?;
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

/// [`oracle`] for properties that compare two fp8 runs of the backend quantizing their input,
/// weights and upstream gradient alike: the fp8 channel counts only the derived operands
/// ([`moe_reference::oracle_with_scales_paired`]); the same as [`oracle`] without fp8.
fn oracle_paired(cfg: &LayerConfig, p: &Problem) -> Result<OracleRun, PropertyFailure> {
    let global = cfg.unsharded();
    let params = to_state_dict(&global, &p.weights).map_err(|e| PropertyFailure::Error(format!("oracle: {e}")))?;
    moe_reference::oracle_with_scales_paired(&global, &params, &p.inputs, &p.grad_output)
        .map_err(|e| PropertyFailure::Error(format!("oracle: {e}")))
}

/// A backend's refusal is a declared skip; any other error fails the property.
fn lift(e: LayerError) -> Result<Verdict, PropertyFailure> {
    match e {
        LayerError::Unsupported(why) => Ok(Verdict::Skipped(why)),
        other => Err(PropertyFailure::Error(other.to_string())),
    }
}

/// Any error of the harness's own bookkeeping (state-dict conversions, sharding).
fn internal(e: impl std::fmt::Display) -> PropertyFailure {
    PropertyFailure::Error(e.to_string())
}

fn verdict(diffs: Vec<crate::compare::TensorDiff>) -> Result<Verdict, PropertyFailure> {
    if diffs.iter().all(crate::compare::TensorDiff::passed) {
        Ok(Verdict::Checked(diffs))
    } else {
        Err(PropertyFailure::Mismatch(diffs))
    }
}

/// What every property check gets: the backend, its layer for the case's class, the case and
/// its tensors, the error model's tolerance.
struct Ctx<'a> {
    backend: &'a dyn Backend,
    layer: &'a dyn ExpertLayer,
    case: &'a Case,
    problem: Problem,
    tol: Tolerance,
}

impl Ctx<'_> {
    fn cfg(&self) -> &LayerConfig {
        &self.case.cfg
    }

    /// The backend's layer `layer` at `cfg`'s layout on `p`.
    fn run(
        &self,
        layer: &dyn ExpertLayer,
        cfg: &LayerConfig,
        p: &Problem,
        timing: WgradTiming,
    ) -> Result<LayerRun, LayerError> {
        run_layout(layer, cfg, p, timing, self.backend.reduction(cfg))
    }
}

/// The declared skip of a GroupedMLP case with an fp8 recipe: Megatron's legacy GroupedMLP has
/// no fp8 path. At its last revision (`megatron/core/transformer/moe/experts.py` at
/// `77a00ec1c9`) its forward runs `grouped_gemm`'s bf16 `gg.ops.gmm` on its two packed weights,
/// with no TE linears, quantizers or `Fp8Padding`, and `config.fp8` only makes it refuse
/// `moe_act` recompute; it was removed at `2caa681a1d`. `LayerConfig::validate` refuses the
/// combination; the runner counts these skips per property ([`crate::runner::PropertyReport`]).
pub fn grouped_fp8_skip(f: &moe_reference::Fp8Config) -> String {
    format!("{GROUPED_FP8_REASON}: fp8 {} does not apply", f.label())
}

/// Why GroupedMLP cases with fp8 are skipped ([`grouped_fp8_skip`]).
pub const GROUPED_FP8_REASON: &str =
    "GroupedMLP has no fp8 path (Megatron experts.py GroupedMLP@77a00ec1c9: bf16 gg.ops.gmm, no quantizers)";

/// Checks `property` for `backend` on `case` (a GroupedMLP case with fp8 is a declared skip,
/// [`grouped_fp8_skip`]).
pub fn check(backend: &dyn Backend, property: Property, case: &Case) -> Result<Verdict, PropertyFailure> {
    let cfg = &case.cfg;
    if let (LayerClass::Grouped, Some(f)) = (cfg.class, cfg.fp8) {
        return Ok(Verdict::Skipped(grouped_fp8_skip(&f)));
    }
    let Some(layer) = backend.layer(cfg.class) else {
        return Ok(Verdict::Skipped(format!("{} has no {} implementation", backend.name(), cfg.class)));
    };
    if let Err(e) = layer.supports(cfg) {
        return lift(e);
    }
    let problem = case.problem();
    // A malformed case (negative or mis-sized counts) is an error for every property, also for
    // those that would skip it (single rank) or rewrite its counts (zero tokens).
    if let Err(e) = moe_reference::layer::validate_inputs(&cfg.unsharded(), &problem.inputs) {
        return Err(PropertyFailure::Error(format!("invalid case: {e}")));
    }
    let ctx = Ctx { backend, layer, case, problem, tol: Tolerance::error_model() };
    match property {
        Property::MatchesOracle => checks::matches_oracle(&ctx),
        Property::ParallelDecomposition => parallel::parallel_decomposition(&ctx),
        Property::ClassEquivalence => checks::class_equivalence(&ctx),
        Property::ZeroTokens => checks::zero_tokens(&ctx),
        Property::PaddingNeutrality => checks::padding_neutrality(&ctx),
        Property::DeferredWgrad => checks::deferred_wgrad(&ctx),
        Property::ProbsLinearity => checks::probs_linearity(&ctx),
    }
}
