//! Expert and expert-tensor parallelism across processes: the collectives ([`transport`]), an
//! in-process transport for CPU tests ([`fake`]), rendezvous and a CPU transport over TCP
//! ([`tcp`]), and the distributed layer ([`layer`]) whose results are checked against the f64
//! oracle by [`check_distributed`] (the error model of the parallel-decomposition property).
//! The NCCL transport is `moe_gpu::nccl`.

pub mod fake;
pub mod layer;
pub mod tcp;
pub mod transport;

pub use layer::{distributed_forward_backward, DistributedError, Fault, RankResult};
pub use transport::{Transport, TransportError};

use crate::case::Problem;
use crate::properties::{compare_reduced, PropertyFailure, Verdict};
use crate::tolerance::Tolerance;
use moe_reference::parallel::EtpReduction;
use moe_reference::{ExpertLayer, LayerConfig, StateDict, WgradTiming};
use std::time::Duration;

/// Runs the distributed layer on `cfg.parallel.ep_size × tp_size` threads linked by the fake
/// transport, the tokens of `problem` starting on rank 0; returns every rank's result in rank
/// order, or every rank's error (rank order) when any failed.
#[allow(clippy::too_many_arguments)]
pub fn run_in_threads(
    layer: &dyn ExpertLayer,
    cfg: &LayerConfig,
    problem: &Problem,
    timing: WgradTiming,
    reduction: EtpReduction,
    fault: Fault,
    timeout: Duration,
) -> Result<Vec<RankResult>, Vec<DistributedError>> {
    let world = cfg.parallel.ep_size * cfg.parallel.tp_size;
    let transports = fake::fake_transports(world, timeout);
    let results: Vec<Result<RankResult, DistributedError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = transports
            .into_iter()
            .map(|mut t| {
                scope.spawn(move || {
                    let source = (t.rank() == 0).then_some((&problem.inputs, &problem.grad_output));
                    distributed_forward_backward(&mut t, layer, cfg, &problem.weights, source, timing, reduction, fault)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a rank thread panicked")).collect()
    });
    if results.iter().all(Result::is_ok) {
        Ok(results.into_iter().map(|r| r.expect("checked")).collect())
    } else {
        Err(results.into_iter().filter_map(Result::err).collect())
    }
}

/// Checks a distributed run against the unsharded f64 oracle on `problem` under the error model
/// ([`compare_reduced`]): rank 0's combined output, input and probs grads, and every rank's
/// weight grads (`weight_grads[r]` from rank `r`) against the slices of the oracle's.
pub fn check_distributed(
    cfg: &LayerConfig,
    problem: &Problem,
    reduction: EtpReduction,
    root: &RankResult,
    weight_grads: Vec<StateDict>,
) -> Result<Verdict, PropertyFailure> {
    let rows = layer::rank_rows(cfg, &problem.inputs.tokens_per_expert);
    let (ranks, reduced) = layer::as_parallel_run(cfg, root, &rows, weight_grads)
        .map_err(|e| PropertyFailure::Error(format!("distributed run: {e}")))?;
    compare_reduced(cfg, problem, Tolerance::error_model(), reduction, &ranks, reduced)
}
