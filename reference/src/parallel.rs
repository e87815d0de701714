//! Expert parallel and expert-tensor parallel, simulated as ranks in one process (spec §6).
//!
//! The global problem has all `E` experts and rows sorted by global expert. EP rank `q` gets the
//! rows of global experts `q·E_l .. (q+1)·E_l`; every ETP rank of that EP rank sees the same rows
//! and probs (the dispatcher gathers them) and produces a partial output, a partial input
//! gradient and a partial probs gradient. The dispatcher sums the partials over the ETP group
//! ([`EtpReduction`]):
//!
//! * the **output** is cast to the probs dtype, reduce-scattered with summation in that dtype,
//!   and cast back to the storage dtype (`combine_preprocess`:
//!   `reduce_scatter_to_sequence_parallel_region(hidden_states.to(self.probs.dtype)).to(hidden_states.dtype)`,
//!   `megatron/core/transformer/moe/token_dispatcher.py`);
//! * the **input gradient** is the backward of the hidden states' all-gather over the ETP group,
//!   a reduce-scatter in the hidden states' own (storage) dtype;
//! * the **probs gradient** is the backward of the probs' all-gather, a reduce-scatter in the
//!   probs dtype.
//!
//! NCCL sums a ring: every addition of a rank's partial is rounded to the reduction dtype. The
//! simulation adds the ranks in order `0, 1, …, t−1`, rounding after every addition; the error
//! model of a reduced element (used by the harness) is `(t−1)·u_R·Σ_r |partial_r|` for the
//! additions plus `u_s·|sum|` for the final cast, which holds for any ring order.

use crate::config::LayerConfig;
use crate::dtype::{Dtype, Numerics};
use crate::implementation::{ExpertLayer, LayerError, LayerRun};
use crate::layer::{Inputs, WgradTiming};
use crate::state_dict::{from_state_dict, to_state_dict};
use crate::weights::ExpertSet;
use ndarray::{s, Array1, Array2};
use std::ops::Range;

/// The rows and inputs EP rank `ep_rank` receives from global inputs (rows sorted by global
/// expert): the rows of global experts `ep_rank·E_l .. (ep_rank+1)·E_l`, with their counts.
/// Counts must be non-negative (validate the inputs first).
pub fn ep_rank_inputs(inputs: &Inputs, num_local_experts: usize, ep_rank: usize) -> (Range<usize>, Inputs) {
    let el = num_local_experts;
    let rows_of = |counts: &[i64]| counts.iter().map(|&c| c.max(0) as usize).sum::<usize>();
    let start = rows_of(&inputs.tokens_per_expert[..ep_rank * el]);
    let counts = inputs.tokens_per_expert[ep_rank * el..(ep_rank + 1) * el].to_vec();
    let rows = start..start + rows_of(&counts);
    let rank_inputs = Inputs {
        hidden_states: inputs.hidden_states.slice(s![rows.clone(), ..]).to_owned(),
        tokens_per_expert: counts,
        probs: inputs.probs.slice(s![rows.clone()]).to_owned(),
    };
    (rows, rank_inputs)
}

/// How the dispatcher reduces the ETP partials: the dtype of each reduce-scatter, or no
/// rounding at all for the f64 oracle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EtpReduction {
    /// Exact sums (the f64 oracle's decomposition).
    Exact,
    /// Megatron's reductions for a layer storing `storage` and routing with `probs` dtype:
    /// outputs summed in `probs` then cast to `storage`, input grads summed in `storage`,
    /// probs grads summed in `probs`.
    Megatron {
        /// The params/activations dtype.
        storage: Dtype,
        /// The probs (router) dtype.
        probs: Dtype,
    },
}

impl EtpReduction {
    /// Megatron's reductions for `cfg`'s dtypes.
    pub fn megatron(cfg: &LayerConfig) -> EtpReduction {
        EtpReduction::Megatron { storage: cfg.params_dtype, probs: cfg.probs_dtype }
    }

    /// The reductions matching a reference numerics: exact for the oracle, Megatron's for an
    /// emulated storage dtype.
    pub fn for_numerics(numerics: Numerics, cfg: &LayerConfig) -> EtpReduction {
        match numerics {
            Numerics::Oracle => EtpReduction::Exact,
            Numerics::Emulated(storage) => EtpReduction::Megatron { storage, probs: cfg.probs_dtype },
        }
    }

    /// `(sum dtype, final cast dtype)` of the output's reduction (`None`: exact).
    pub fn output_dtypes(self) -> Option<(Dtype, Dtype)> {
        match self {
            EtpReduction::Exact => None,
            EtpReduction::Megatron { storage, probs } => Some((probs, storage)),
        }
    }

    /// `(sum dtype, final cast dtype)` of the input gradient's reduction (`None`: exact).
    pub fn grad_input_dtypes(self) -> Option<(Dtype, Dtype)> {
        match self {
            EtpReduction::Exact => None,
            EtpReduction::Megatron { storage, .. } => Some((storage, storage)),
        }
    }

    /// `(sum dtype, final cast dtype)` of the probs gradient's reduction (`None`: exact).
    pub fn grad_probs_dtypes(self) -> Option<(Dtype, Dtype)> {
        match self {
            EtpReduction::Exact => None,
            EtpReduction::Megatron { probs, .. } => Some((probs, probs)),
        }
    }
}

/// Sums `partials` (one value per ETP rank, in rank order) as a reduce-scatter in `dtypes`
/// (`(sum dtype, cast dtype)`) does: each partial cast to the sum dtype, every addition rounded
/// to it, the result cast to the cast dtype. `None` sums exactly.
pub fn reduce_values(partials: impl IntoIterator<Item = f64>, dtypes: Option<(Dtype, Dtype)>) -> f64 {
    match dtypes {
        None => partials.into_iter().sum(),
        Some((sum, cast)) => {
            let mut it = partials.into_iter();
            let first = it.next().map_or(0.0, |v| sum.round(v));
            cast.round(it.fold(first, |acc, v| sum.round(acc + sum.round(v))))
        }
    }
}

/// One rank's call of the layer: its place, the global rows it received, and what it returned.
#[derive(Clone, Debug)]
pub struct RankRun {
    /// EP rank.
    pub ep_rank: usize,
    /// ETP rank.
    pub tp_rank: usize,
    /// The global rows (of the unsharded inputs) this rank received.
    pub rows: Range<usize>,
    /// The rank's partial output, partial input/probs grads and its weight grads (in the rank's
    /// own state-dict layout).
    pub run: LayerRun,
}

/// Calls `layer` once per (ep_rank, tp_rank) of `cfg`'s sizes, each on its shard of
/// `global_weights` (all `E` experts, unsharded) and on the rows of its EP rank; returns the
/// calls in order `(ep 0, tp 0), (ep 0, tp 1), …`.
pub fn run_ranks(
    layer: &dyn ExpertLayer,
    cfg: &LayerConfig,
    global_weights: &ExpertSet,
    inputs: &Inputs,
    grad_output: &Array2<f64>,
    timing: WgradTiming,
) -> Result<Vec<RankRun>, LayerError> {
    cfg.validate()?;
    // Validates shapes, counts and finiteness against the unsharded layer.
    crate::layer::validate_inputs(&cfg.unsharded(), inputs)?;
    let p = cfg.parallel;
    let mut out = Vec::with_capacity(p.ep_size * p.tp_size);
    for q in 0..p.ep_size {
        let (rows, rank_inputs) = ep_rank_inputs(inputs, cfg.num_local_experts(), q);
        let g = grad_output.slice(s![rows.clone(), ..]).to_owned();
        for r in 0..p.tp_size {
            let rank_cfg = cfg.at_rank(q, r);
            let params = to_state_dict(&rank_cfg, &global_weights.shard(&rank_cfg)?)?;
            let run = layer.forward_backward(&rank_cfg, &params, &rank_inputs, &g, timing)?;
            out.push(RankRun { ep_rank: q, tp_rank: r, rows: rows.clone(), run });
        }
    }
    Ok(out)
}

/// The assembled result of running every (EP, ETP) rank.
#[derive(Clone, Debug)]
pub struct ParallelRun {
    /// Output `[T, h]` in global row order, ETP partial sums reduced.
    pub output: Array2<f64>,
    /// Input gradient `[T, h]`, ETP partials reduced.
    pub grad_input: Array2<f64>,
    /// Probs gradient `[T]`, ETP partials reduced.
    pub grad_probs: Array1<f64>,
    /// Each rank's weight gradients in canonical form, `[ep_rank][tp_rank]`.
    pub rank_weight_grads: Vec<Vec<ExpertSet>>,
}

/// Reduces the rank calls of [`run_ranks`] as the dispatcher does (`reduction`) into the global
/// row order: `t` rows and `h` features in all.
pub fn reduce_ranks(
    cfg: &LayerConfig,
    ranks: &[RankRun],
    t: usize,
    h: usize,
    reduction: EtpReduction,
) -> Result<ParallelRun, LayerError> {
    let p = cfg.parallel;
    let mut output = Array2::zeros((t, h));
    let mut grad_input = Array2::zeros((t, h));
    let mut grad_probs = Array1::zeros(t);
    let mut rank_weight_grads = Vec::with_capacity(p.ep_size);
    for group in ranks.chunks(p.tp_size.max(1)) {
        let rows = group[0].rows.clone();
        let n = rows.len();
        let reduce2 = |f: fn(&LayerRun) -> &Array2<f64>, dtypes| {
            Array2::from_shape_fn((n, h), |(i, j)| reduce_values(group.iter().map(|r| f(&r.run)[[i, j]]), dtypes))
        };
        output.slice_mut(s![rows.clone(), ..]).assign(&reduce2(|r| &r.output, reduction.output_dtypes()));
        grad_input.slice_mut(s![rows.clone(), ..]).assign(&reduce2(|r| &r.grad_input, reduction.grad_input_dtypes()));
        let dp = Array1::from_shape_fn(n, |i| {
            reduce_values(group.iter().map(|r| r.run.grad_probs[i]), reduction.grad_probs_dtypes())
        });
        grad_probs.slice_mut(s![rows]).assign(&dp);
        let grads = group
            .iter()
            .map(|r| from_state_dict(&cfg.at_rank(r.ep_rank, r.tp_rank), &r.run.weight_grads))
            .collect::<Result<Vec<_>, _>>()?;
        rank_weight_grads.push(grads);
    }
    Ok(ParallelRun { output, grad_input, grad_probs, rank_weight_grads })
}

/// Runs `layer` on every (ep_rank, tp_rank) of `cfg`'s sizes ([`run_ranks`]) and reassembles the
/// global result ([`reduce_ranks`]).
///
/// `global_weights` holds all `E` experts unsharded; `inputs.tokens_per_expert` has `E` counts
/// (global expert order). `reduction` is how the dispatcher sums the ETP partials (exact for the
/// f64 reference, [`EtpReduction::megatron`] for a storage-dtype implementation).
pub fn run_parallel(
    layer: &dyn ExpertLayer,
    cfg: &LayerConfig,
    global_weights: &ExpertSet,
    inputs: &Inputs,
    grad_output: &Array2<f64>,
    timing: WgradTiming,
    reduction: EtpReduction,
) -> Result<ParallelRun, LayerError> {
    let ranks = run_ranks(layer, cfg, global_weights, inputs, grad_output, timing)?;
    let (t, h) = inputs.hidden_states.dim();
    reduce_ranks(cfg, &ranks, t, h, reduction)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reductions_round_every_addition_and_the_final_cast() {
        // In bf16 (spacing 2^-7 at 1) each 2^-9 is a quarter of a spacing: a ring that rounds
        // after every addition stays at 1, while the exact sum 1 + 3·2^-9 is three quarters of
        // a spacing above 1 and rounds up to 1 + 2^-7.
        let b = Dtype::Bf16;
        let parts = [1.0, 2f64.powi(-9), 2f64.powi(-9), 2f64.powi(-9)];
        assert_eq!(reduce_values(parts, Some((b, b))), 1.0);
        assert_eq!(reduce_values(parts, None), 1.0 + 3.0 * 2f64.powi(-9));
        // Summed in f32 the additions are exact; the cast to bf16 rounds once.
        assert_eq!(reduce_values(parts, Some((Dtype::F32, b))), 1.0 + 2f64.powi(-7));
    }
}
