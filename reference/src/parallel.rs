//! Expert parallel and expert-tensor parallel, simulated as ranks in one process (spec §6).
//!
//! The global problem has all `E` experts and rows sorted by global expert. EP rank `q` gets the
//! rows of global experts `q·E_l .. (q+1)·E_l`; every ETP rank of that EP rank sees the same rows
//! and probs (the dispatcher gathers them) and produces a partial output. The partial outputs,
//! input grads and probs grads are summed over the ETP ranks as the dispatcher's
//! reduce-scatter does: in fp32 (the probs dtype), then cast back.

use crate::config::LayerConfig;
use crate::dtype::Numerics;
use crate::implementation::{ExpertLayer, LayerError};
use crate::layer::{Inputs, WgradTiming};
use crate::state_dict::{from_state_dict, to_state_dict};
use crate::weights::ExpertSet;
use ndarray::{s, Array1, Array2};

/// The rows and inputs EP rank `ep_rank` receives from global inputs (rows sorted by global
/// expert): the rows of global experts `ep_rank·E_l .. (ep_rank+1)·E_l`, with their counts.
/// Counts must be non-negative (validate the inputs first).
pub fn ep_rank_inputs(inputs: &Inputs, num_local_experts: usize, ep_rank: usize) -> (std::ops::Range<usize>, Inputs) {
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

/// Runs `layer` on every (ep_rank, tp_rank) of `cfg`'s sizes and reassembles the global result.
///
/// `global_weights` holds all `E` experts unsharded; `inputs.tokens_per_expert` has `E` counts
/// (global expert order). `reduce` is the numerics of the ETP reduction (the storage dtype's
/// emulation for a storage-dtype implementation, the oracle for the f64 reference).
pub fn run_parallel(
    layer: &dyn ExpertLayer,
    cfg: &LayerConfig,
    global_weights: &ExpertSet,
    inputs: &Inputs,
    grad_output: &Array2<f64>,
    timing: WgradTiming,
    reduce: Numerics,
) -> Result<ParallelRun, LayerError> {
    cfg.validate()?;
    let global_cfg = cfg.unsharded();
    // Validates shapes, counts and finiteness against the unsharded layer.
    crate::layer::validate_inputs(&global_cfg, inputs)?;
    let (t, h) = inputs.hidden_states.dim();
    let p = cfg.parallel;
    let el = cfg.num_local_experts();
    let mut output = Array2::zeros((t, h));
    let mut grad_input = Array2::zeros((t, h));
    let mut grad_probs = Array1::zeros(t);
    let mut rank_weight_grads = Vec::with_capacity(p.ep_size);
    for q in 0..p.ep_size {
        let (rank_rows, rank_inputs) = ep_rank_inputs(inputs, el, q);
        let (start, rows) = (rank_rows.start, rank_rows.len());
        let g = grad_output.slice(s![rank_rows.clone(), ..]).to_owned();
        let mut y = Array2::<f64>::zeros((rows, h));
        let mut dx = Array2::<f64>::zeros((rows, h));
        let mut dp = Array1::<f64>::zeros(rows);
        let mut grads = Vec::with_capacity(p.tp_size);
        for r in 0..p.tp_size {
            let rank_cfg = cfg.at_rank(q, r);
            let params = to_state_dict(&rank_cfg, &global_weights.shard(&rank_cfg)?)?;
            let run = layer.forward_backward(&rank_cfg, &params, &rank_inputs, &g, timing)?;
            y += &run.output.mapv(|v| reduce.fp32(v));
            dx += &run.grad_input.mapv(|v| reduce.fp32(v));
            dp += &run.grad_probs;
            grads.push(from_state_dict(&rank_cfg, &run.weight_grads)?);
        }
        output.slice_mut(s![start..start + rows, ..]).assign(&y.mapv(|v| reduce.store(reduce.fp32(v))));
        grad_input.slice_mut(s![start..start + rows, ..]).assign(&dx.mapv(|v| reduce.store(reduce.fp32(v))));
        grad_probs.slice_mut(s![start..start + rows]).assign(&dp.mapv(|v| reduce.to(cfg.probs_dtype, reduce.fp32(v))));
        rank_weight_grads.push(grads);
    }
    Ok(ParallelRun { output, grad_input, grad_probs, rank_weight_grads })
}
