//! Parallel decomposition: every simulated rank a call of the backend, the ETP partials reduced
//! as Megatron reduces them, compared with the unsharded oracle.
//!
//! # Error model of a reduced element
//!
//! Rank `r`'s partial `y_r` is within `C·(S_r + A_r + rms)` of the oracle's partial on the same
//! shard, where `S_r`/`A_r` are that oracle's running error bound and allowance. The dispatcher
//! then adds the `t` partials in a reduction dtype `R` (rounding every addition) and casts the
//! sum to a dtype `D` ([`EtpReduction`]). So the reduced element's bound scale is
//!
//! ```text
//! S = Σ_r S_r + (t−1)·(u_R·Σ_r |y_r| + η_R) + [D ≠ R]·(u_D·|Σ_r y_r| + η_D),   A = Σ_r A_r
//! ```
//!
//! with `|y_r|` the oracle's partials. At `t = 1` (EP only) nothing is added and the cast of a
//! storage-dtype partial is exact: `S = S_0`. The comparison is against the *unsharded* oracle,
//! whose value equals `Σ_r y_r` exactly in f64 arithmetic up to summation order (a relative
//! `√K·2⁻⁵³` that the storage-dtype terms dwarf).

use super::{internal, lift, oracle, verdict, Ctx, PropertyFailure, Verdict};
use crate::case::Problem;
use crate::compare::{compare_state_dicts, compare_tensor, Bounds, TensorDiff};
use crate::tolerance::Tolerance;
use moe_reference::parallel::{ep_rank_inputs, reduce_ranks, run_ranks, EtpReduction, ParallelRun, RankRun};
use moe_reference::{oracle_with_scales, to_state_dict, Dtype, LayerConfig, OracleRun};
use ndarray::{s, ArrayD, Dimension};

/// One tensor of a [`moe_reference::LayerRun`] (output, input grad or probs grad).
type Part = fn(&moe_reference::LayerRun) -> ArrayD<f64>;

/// The oracle's run (values, bounds, allowances) on the same shard and rows as a backend rank.
fn oracle_rank(cfg: &LayerConfig, p: &Problem, rank: &RankRun) -> Result<OracleRun, PropertyFailure> {
    let rank_cfg = cfg.at_rank(rank.ep_rank, rank.tp_rank);
    let params = to_state_dict(&rank_cfg, &p.weights.shard(&rank_cfg).map_err(internal)?).map_err(internal)?;
    let (rows, inputs) = ep_rank_inputs(&p.inputs, cfg.num_local_experts(), rank.ep_rank);
    let g = p.grad_output.slice(s![rows, ..]).to_owned();
    oracle_with_scales(&rank_cfg, &params, &inputs, &g).map_err(|e| internal(format!("oracle at rank: {e}")))
}

/// The bound scale of one reduced element from its partials' scales and the oracle's partial
/// values (module doc).
fn reduced_scale(scales: impl Iterator<Item = f64>, values: &[f64], dtypes: Option<(Dtype, Dtype)>) -> f64 {
    let s: f64 = scales.sum();
    let t = values.len();
    let Some((sum, cast)) = dtypes.filter(|_| t > 1) else {
        return s;
    };
    let magnitude: f64 = values.iter().map(|v| v.abs()).sum();
    let additions = (t - 1) as f64 * (sum.unit_roundoff() * magnitude + sum.subnormal_spacing());
    let total: f64 = values.iter().sum();
    let final_cast = if cast == sum { 0.0 } else { cast.unit_roundoff() * total.abs() + cast.subnormal_spacing() };
    s + additions + final_cast
}

/// For one of the reduced tensors (`[T, h]` or `[T]`), the error scale and allowance of every
/// global element from the oracle's rank runs (`groups`: the ETP ranks of each EP rank).
fn reduced_bounds<D: Dimension>(
    shape: D,
    groups: &[(&[RankRun], &[OracleRun])],
    part: Part,
    dtypes: Option<(Dtype, Dtype)>,
) -> (ArrayD<f64>, ArrayD<f64>) {
    let mut scale = ArrayD::zeros(shape.into_dyn());
    let mut allowance = scale.clone();
    for (ranks, oracles) in groups {
        let rows = ranks[0].rows.clone();
        let values: Vec<ArrayD<f64>> = oracles.iter().map(|o| part(&o.run)).collect();
        let scales: Vec<ArrayD<f64>> = oracles.iter().map(|o| part(&o.scales)).collect();
        let allows: Vec<ArrayD<f64>> = oracles.iter().map(|o| part(&o.allowance)).collect();
        for (local, _) in values[0].indexed_iter() {
            let mut global = local.clone();
            global[0] += rows.start;
            let vals: Vec<f64> = values.iter().map(|v| v[&local]).collect();
            scale[&global] = reduced_scale(scales.iter().map(|s| s[&local]), &vals, dtypes);
            allowance[&global] = allows.iter().map(|a| a[&local]).sum();
        }
    }
    (scale, allowance)
}

/// §10.2/§10.3 for the backend under test (see [`super::Property::ParallelDecomposition`]).
pub(super) fn parallel_decomposition(ctx: &Ctx) -> Result<Verdict, PropertyFailure> {
    let (cfg, p) = (ctx.cfg(), &ctx.problem);
    if cfg.parallel.tp_size == 1 && cfg.parallel.ep_size == 1 {
        return Ok(Verdict::Skipped("single rank".into()));
    }
    let ranks = match run_ranks(ctx.layer, cfg, &p.weights, &p.inputs, &p.grad_output, ctx.case.timing) {
        Ok(r) => r,
        Err(e) => return lift(e),
    };
    let reduction: EtpReduction = ctx.backend.reduction(cfg);
    let (t, h) = p.inputs.hidden_states.dim();
    let reduced = reduce_ranks(cfg, &ranks, t, h, reduction).map_err(internal)?;
    compare_reduced(cfg, p, ctx.tol, reduction, &ranks, reduced)
}

/// Compares a sharded run — the rank calls `ranks` (their rows and weight grads) and the ETP
/// reductions `reduced` — with the unsharded oracle on `p` (module doc's error model, the
/// reductions in `reduction`'s dtypes). The simulated ranks above and the distributed layer
/// ([`crate::distributed`]) share it.
pub fn compare_reduced(
    cfg: &LayerConfig,
    p: &Problem,
    tol: Tolerance,
    reduction: EtpReduction,
    ranks: &[RankRun],
    reduced: ParallelRun,
) -> Result<Verdict, PropertyFailure> {
    let oracles = ranks.iter().map(|r| oracle_rank(cfg, p, r)).collect::<Result<Vec<_>, _>>()?;
    let o = oracle(cfg, p)?;
    let tp = cfg.parallel.tp_size;
    let groups: Vec<(&[RankRun], &[OracleRun])> = ranks.chunks(tp).zip(oracles.chunks(tp)).collect();

    let mut diffs: Vec<TensorDiff> = Vec::new();
    let mut reduced_tensor = |name: &str, part: Part, got: ArrayD<f64>, want: ArrayD<f64>, dtypes| {
        let (scale, allowance) = reduced_bounds(want.raw_dim(), &groups, part, dtypes);
        diffs.push(compare_tensor(
            &format!("reduced {name}"),
            got.view(),
            want.view(),
            Bounds { scale: Some(scale.view()), allowance: Some(allowance.view()) },
            1,
            tol,
        ));
    };
    reduced_tensor(
        "output",
        |r| r.output.clone().into_dyn(),
        reduced.output.into_dyn(),
        o.run.output.clone().into_dyn(),
        reduction.output_dtypes(),
    );
    reduced_tensor(
        "grad.permuted_local_hidden_states",
        |r| r.grad_input.clone().into_dyn(),
        reduced.grad_input.into_dyn(),
        o.run.grad_input.clone().into_dyn(),
        reduction.grad_input_dtypes(),
    );
    reduced_tensor(
        "grad.permuted_probs",
        |r| r.grad_probs.clone().into_dyn(),
        reduced.grad_probs.into_dyn(),
        o.run.grad_probs.clone().into_dyn(),
        reduction.grad_probs_dtypes(),
    );

    // Each rank's weight grads (from the backend) against the slices of the unsharded oracle's
    // grads, with the bounds of the oracle run on that rank's shard (the same slices).
    let full = moe_reference::from_state_dict(&cfg.unsharded(), &o.run.weight_grads).map_err(internal)?;
    for (rank, o_rank) in ranks.iter().zip(&oracles) {
        let rank_cfg: LayerConfig = cfg.at_rank(rank.ep_rank, rank.tp_rank);
        let want = to_state_dict(&rank_cfg, &full.shard(&rank_cfg).map_err(internal)?).map_err(internal)?;
        diffs.extend(compare_state_dicts(
            &format!("rank(ep={},tp={}).grad.", rank.ep_rank, rank.tp_rank),
            &rank_cfg,
            &rank.run.weight_grads,
            &want,
            Some((&o_rank.scales.weight_grads, &o_rank.allowance.weight_grads)),
            tol,
        ));
    }
    verdict(diffs)
}
