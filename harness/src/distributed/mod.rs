//! Expert and expert-tensor parallelism across processes: the collectives ([`transport`]), an
//! in-process transport for CPU tests ([`fake`]), rendezvous and a CPU transport over TCP
//! ([`tcp`]), and the distributed layer ([`layer`]) whose results are checked against the f64
//! oracle by [`check_distributed`] (the error model of the parallel-decomposition property).
//! The NCCL transport is `moe_gpu::nccl`.

pub mod checkpoint;
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

/// Checks a transport's collectives on every rank against [`transport::resolve`] (the star's
/// exact semantics) on deterministic contributions every rank can compute: an uneven
/// all-to-all (some chunks empty) must be delivered exactly; reduce-scatters and all-reduces in
/// bf16, f32 and f64 must equal the rank-order result exactly with two ranks (one addition: any
/// order rounds the same) and lie within `(world−1)·u·Σ|x|` of it with more. Values include
/// `1 + 2⁻⁹`-style sums that differ between a bf16 and an f32 reduction, so a transport that
/// reduces in the wrong dtype fails. Returns what differed.
pub fn transport_self_test(t: &mut dyn Transport) -> Result<(), String> {
    use moe_reference::Dtype;
    use transport::Collective;
    let (rank, world) = (t.rank(), t.world_size());
    let e = |err: TransportError| format!("rank {rank}: {err}");
    // All-to-all: rank i sends rank j (i + j) % 3 values i·100 + j + k/8.
    let a2a = |i: usize| -> Vec<Vec<f64>> {
        (0..world).map(|j| (0..(i + j) % 3).map(|k| (i * 100 + j) as f64 + k as f64 / 8.0).collect()).collect()
    };
    let got = t.all_to_all(a2a(rank)).map_err(e)?;
    let want = transport::resolve(&(0..world).map(|i| Collective::AllToAll(a2a(i))).collect::<Vec<_>>())
        .map_err(|err| err.to_string())?;
    if got != want[rank] {
        return Err(format!("rank {rank}: all_to_all delivered {got:?}, expected {:?}", want[rank]));
    }
    let group: Vec<usize> = (0..world).collect();
    let q = 2f64.powi(-9);
    let data = |i: usize| -> Vec<f64> {
        (0..2 * world + 1).map(|k| if i == 0 { 1.0 + k as f64 } else { q * (1 + (k + i) % 3) as f64 }).collect()
    };
    // Uneven chunks: the first rank one value more.
    let counts: Vec<usize> = (0..world).map(|k| layer::etp_slice(2 * world + 1, world, k).len()).collect();
    for dtype in [Some(Dtype::Bf16), Some(Dtype::F32), None] {
        for scatter in [true, false] {
            let got = if scatter {
                t.reduce_scatter(&group, data(rank), &counts, dtype).map_err(e)?
            } else {
                t.all_reduce(&group, data(rank), dtype).map_err(e)?
            };
            let contribs: Vec<Collective> = (0..world)
                .map(|i| Collective::Reduce {
                    group: group.clone(),
                    counts: if scatter { counts.clone() } else { Vec::new() },
                    dtype,
                    data: data(i),
                })
                .collect();
            let want = transport::resolve(&contribs).map_err(|err| err.to_string())?.swap_remove(rank).swap_remove(0);
            let u = dtype.map_or(f64::EPSILON / 2.0, |d| d.unit_roundoff());
            let ok = got.len() == want.len()
                && got.iter().zip(&want).all(|(g, w)| {
                    if world <= 2 {
                        g == w
                    } else {
                        (g - w).abs() <= 2.0 * (world - 1) as f64 * u * (w.abs() + 1.0)
                    }
                });
            if !ok {
                let op = if scatter { "reduce_scatter" } else { "all_reduce" };
                return Err(format!("rank {rank}: {op} in {dtype:?} gave {got:?}, expected {want:?}"));
            }
        }
    }
    t.barrier().map_err(e)
}
