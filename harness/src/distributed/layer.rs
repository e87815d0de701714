//! The distributed expert layer: one call per rank, the tokens moved by [`Transport`]s.
//!
//! Rank `ep_rank·t + tp_rank` (`t` the ETP size) holds the shard `cfg.at_rank(ep_rank,
//! tp_rank)` of the experts. The tokens (rows sorted by global expert, with the upstream
//! gradient) start on rank 0:
//!
//! 1. **dispatch** — one all-to-all sends each rank the rows of its EP rank's experts (every
//!    ETP rank of an EP rank gets the same rows, as the dispatcher's all-gather over the ETP
//!    group gives them), behind a header of the first global row and the local token counts;
//! 2. the rank's [`ExpertLayer`] runs forward and backward on its shard;
//! 3. **ETP reduction** — with `t > 1`, the partial outputs, input grads and probs grads are
//!    reduce-scattered over the ETP group in Megatron's dtypes ([`EtpReduction`]), each ETP rank
//!    keeping a contiguous slice of the rows, then cast as Megatron casts them;
//! 4. **combine** — one all-to-all returns every rank's slice of the output, input grad and
//!    probs grad to rank 0, which places them at their global rows.
//!
//! Weight gradients stay on their rank ([`RankResult::partial`]). [`Fault`] plants the bugs the
//! checks must catch.

use super::transport::{Transport, TransportError};
use moe_reference::parallel::{EtpReduction, ParallelRun, RankRun};
use moe_reference::state_dict::param_specs;
use moe_reference::{
    from_state_dict, to_state_dict, ExpertLayer, ExpertSet, Inputs, LayerConfig, LayerError, LayerRun, StateDict,
    WgradTiming,
};
use ndarray::{s, Array1, Array2, ArrayD, IxDyn};
use std::ops::Range;

/// Why a distributed call failed, naming the rank where it could.
#[derive(Debug, thiserror::Error)]
pub enum DistributedError {
    /// A collective failed (a peer died or hung, an abort, NCCL).
    #[error("rank {rank}: {source}")]
    Transport {
        /// The rank that saw the failure.
        rank: usize,
        /// The failure.
        source: TransportError,
    },
    /// The rank's expert layer failed.
    #[error("rank {rank}: expert layer: {source}")]
    Layer {
        /// The rank whose layer failed.
        rank: usize,
        /// The failure.
        source: LayerError,
    },
    /// A received buffer does not have the size its header or the layout implies.
    #[error("rank {rank}: {what}")]
    Protocol {
        /// The rank that received it.
        rank: usize,
        /// What is wrong.
        what: String,
    },
}

/// Bugs planted into the distributed layer; each must make a check fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// No bug.
    None,
    /// Rank 1 loads the experts one global expert off (its shard of the experts rotated by one).
    WrongExpertOffset,
    /// Rank 0's dispatch chunk for rank 1 is dropped (sent empty).
    DroppedChunk,
    /// The ETP reduction of the output sums in a hard-coded bf16 instead of the probs dtype.
    WrongReductionDtype,
}

/// What one rank's call returns.
#[derive(Clone, Debug)]
pub struct RankResult {
    /// Global rank.
    pub rank: usize,
    /// EP rank.
    pub ep_rank: usize,
    /// ETP rank.
    pub tp_rank: usize,
    /// The global rows this rank's layer received.
    pub rows: Range<usize>,
    /// The rank's own layer call: partial output and input/probs grads before the ETP reduction,
    /// and its weight grads (in the rank's state-dict layout), which stay here.
    pub partial: LayerRun,
    /// On rank 0: the combined `(output, grad_input, grad_probs)` in global row order.
    pub combined: Option<(Array2<f64>, Array2<f64>, Array1<f64>)>,
}

/// The rows of `n` that ETP rank `k` of `t` keeps after a reduce-scatter (contiguous, the first
/// `n mod t` ranks one row more).
pub fn etp_slice(n: usize, t: usize, k: usize) -> Range<usize> {
    let (base, extra) = (n / t, n % t);
    let start = k * base + k.min(extra);
    start..start + base + usize::from(k < extra)
}

/// The global rows `EP rank q` owns (rows sorted by global expert) and their local counts.
fn ep_rows(tokens_per_expert: &[i64], el: usize, q: usize) -> (Range<usize>, Vec<i64>) {
    let rows_of = |c: &[i64]| c.iter().map(|&c| c.max(0) as usize).sum::<usize>();
    let start = rows_of(&tokens_per_expert[..q * el]);
    let counts = tokens_per_expert[q * el..(q + 1) * el].to_vec();
    (start..start + rows_of(&counts), counts)
}

/// One rank's call of the distributed layer (module doc). `cfg` carries the global sizes and the
/// EP/ETP sizes (its ranks are ignored; the transport's rank decides); `weights` holds all `E`
/// experts unsharded (the rank shards them itself); `source` is `Some((inputs, grad_output))`
/// on rank 0 (global rows sorted by expert) and `None` elsewhere.
// The layer call's own arguments (layer, cfg, weights, inputs, timing) plus the transport, the
// reduction and the planted fault: each is independent, none belongs in a struct with another.
#[allow(clippy::too_many_arguments)]
pub fn distributed_forward_backward(
    transport: &mut dyn Transport,
    layer: &dyn ExpertLayer,
    cfg: &LayerConfig,
    weights: &ExpertSet,
    source: Option<(&Inputs, &Array2<f64>)>,
    timing: WgradTiming,
    reduction: EtpReduction,
    fault: Fault,
) -> Result<RankResult, DistributedError> {
    let rank = transport.rank();
    let world = transport.world_size();
    let (tp, ep) = (cfg.parallel.tp_size, cfg.parallel.ep_size);
    let protocol = |what: String| DistributedError::Protocol { rank, what };
    let tr = |source: TransportError| DistributedError::Transport { rank, source };
    if world != tp * ep {
        return Err(protocol(format!("{world} ranks for EP {ep} × ETP {tp}")));
    }
    if (rank == 0) != source.is_some() {
        return Err(protocol("the tokens must start on rank 0, and only there".into()));
    }
    let (q, k) = (rank / tp, rank % tp);
    let rank_cfg = cfg.at_rank(q, k);
    let el = cfg.num_local_experts();
    let h = cfg.hidden_size;
    let row_len = 2 * h + 1;

    // 1. Dispatch.
    let mut send = vec![Vec::new(); world];
    if let Some((inputs, g)) = source {
        moe_reference::layer::validate_inputs(&cfg.unsharded(), inputs)
            .map_err(|e| DistributedError::Layer { rank, source: e.into() })?;
        if g.dim() != inputs.hidden_states.dim() {
            return Err(protocol(format!(
                "grad_output is {:?}, the hidden states {:?}",
                g.dim(),
                inputs.hidden_states.dim()
            )));
        }
        for (r, buf) in send.iter_mut().enumerate() {
            let (rows, counts) = ep_rows(&inputs.tokens_per_expert, el, r / tp);
            buf.push(rows.start as f64);
            buf.extend(counts.iter().map(|&c| c as f64));
            for i in rows {
                buf.extend(inputs.hidden_states.row(i).iter());
                buf.push(inputs.probs[i]);
                buf.extend(g.row(i).iter());
            }
        }
        if fault == Fault::DroppedChunk && world > 1 {
            send[1].clear();
        }
    }
    let recv = transport.all_to_all(send).map_err(tr)?;
    let buf = &recv[0];
    if buf.len() < 1 + el {
        return Err(protocol(format!(
            "dispatch from rank 0 has {} values, less than its header (first row and {el} counts)",
            buf.len()
        )));
    }
    let start = buf[0] as usize;
    let counts: Vec<i64> = buf[1..=el].iter().map(|&c| c as i64).collect();
    let n = counts.iter().map(|&c| c.max(0) as usize).sum::<usize>();
    let body = &buf[1 + el..];
    if body.len() != n * row_len {
        return Err(protocol(format!(
            "dispatch from rank 0 has {} row values; its counts {counts:?} say {n} rows of {row_len}",
            body.len()
        )));
    }
    if let Some(i) = recv.iter().skip(1).position(|b| !b.is_empty()) {
        return Err(protocol(format!("rank {} dispatched tokens, but tokens start on rank 0", i + 1)));
    }
    let rows = start..start + n;
    let x = Array2::from_shape_fn((n, h), |(i, j)| body[i * row_len + j]);
    let probs = Array1::from_shape_fn(n, |i| body[i * row_len + h]);
    let g = Array2::from_shape_fn((n, h), |(i, j)| body[i * row_len + h + 1 + j]);
    let inputs = Inputs { hidden_states: x, tokens_per_expert: counts, probs };

    // 2. The rank's layer on its shard.
    let shard = if fault == Fault::WrongExpertOffset && rank == 1 {
        let mut rotated = weights.clone();
        rotated.experts.rotate_left(1);
        rotated.shard(&rank_cfg)
    } else {
        weights.shard(&rank_cfg)
    };
    let layer_err = |source: LayerError| DistributedError::Layer { rank, source };
    let params = to_state_dict(&rank_cfg, &shard.map_err(|e| layer_err(e.into()))?).map_err(|e| layer_err(e.into()))?;
    let partial = layer.forward_backward(&rank_cfg, &params, &inputs, &g, timing).map_err(layer_err)?;

    // 3. ETP reduction.
    let (out, gin, gp) = if tp == 1 {
        (flat(&partial.output), flat(&partial.grad_input), partial.grad_probs.to_vec())
    } else {
        let group: Vec<usize> = (q * tp..(q + 1) * tp).collect();
        let row_counts: Vec<usize> = (0..tp).map(|kk| etp_slice(n, tp, kk).len()).collect();
        let elem_counts: Vec<usize> = row_counts.iter().map(|r| r * h).collect();
        let mut output_dtypes = reduction.output_dtypes();
        if fault == Fault::WrongReductionDtype {
            output_dtypes = output_dtypes.map(|(_, cast)| (moe_reference::Dtype::Bf16, cast));
        }
        let mut reduce =
            |data: Vec<f64>, counts: &[usize], dtypes: Option<(moe_reference::Dtype, moe_reference::Dtype)>| {
                let sum = transport.reduce_scatter(&group, data, counts, dtypes.map(|d| d.0)).map_err(tr)?;
                Ok::<_, DistributedError>(match dtypes {
                    Some((_, cast)) => sum.into_iter().map(|v| cast.round(v)).collect(),
                    None => sum,
                })
            };
        let out = reduce(flat(&partial.output), &elem_counts, output_dtypes)?;
        let gin = reduce(flat(&partial.grad_input), &elem_counts, reduction.grad_input_dtypes())?;
        let gp = reduce(partial.grad_probs.to_vec(), &row_counts, reduction.grad_probs_dtypes())?;
        (out, gin, gp)
    };

    // 4. Combine on rank 0.
    let mut send = vec![Vec::new(); world];
    send[0] = [out, gin, gp].concat();
    let recv = transport.all_to_all(send).map_err(tr)?;
    let combined = match source {
        None => None,
        Some((inputs, _)) => {
            let t = inputs.hidden_states.nrows();
            let mut output = Array2::zeros((t, h));
            let mut grad_input = Array2::zeros((t, h));
            let mut grad_probs = Array1::zeros(t);
            for (r, b) in recv.iter().enumerate() {
                let (ep_rows, _) = ep_rows(&inputs.tokens_per_expert, el, r / tp);
                let slice = etp_slice(ep_rows.len(), tp, r % tp);
                let m = slice.len();
                if b.len() != m * row_len {
                    return Err(protocol(format!(
                        "combine from rank {r} has {} values, expected {m} rows × {row_len} (output, input grad, probs grad)",
                        b.len()
                    )));
                }
                let at = ep_rows.start + slice.start..ep_rows.start + slice.end;
                output.slice_mut(s![at.clone(), ..]).assign(&Array2::from_shape_fn((m, h), |(i, j)| b[i * h + j]));
                grad_input
                    .slice_mut(s![at.clone(), ..])
                    .assign(&Array2::from_shape_fn((m, h), |(i, j)| b[m * h + i * h + j]));
                grad_probs.slice_mut(s![at]).assign(&Array1::from_shape_fn(m, |i| b[2 * m * h + i]));
            }
            Some((output, grad_input, grad_probs))
        }
    };
    Ok(RankResult { rank, ep_rank: q, tp_rank: k, rows, partial, combined })
}

fn flat(a: &Array2<f64>) -> Vec<f64> {
    a.iter().copied().collect()
}

/// Sends every rank's weight grads to rank 0 (for checking there): rank 0 gets them in rank
/// order, the others `None`. Each rank's tensors travel in its state-dict order and shapes.
pub fn gather_weight_grads(
    transport: &mut dyn Transport,
    cfg: &LayerConfig,
    own: &StateDict,
) -> Result<Option<Vec<StateDict>>, DistributedError> {
    let (rank, world, tp) = (transport.rank(), transport.world_size(), cfg.parallel.tp_size);
    let specs = |r: usize| param_specs(&cfg.at_rank(r / tp, r % tp));
    let mut send = vec![Vec::new(); world];
    for spec in specs(rank) {
        let t = own.get(&spec.name).ok_or_else(|| DistributedError::Protocol {
            rank,
            what: format!("the layer returned no weight grad {}", spec.name),
        })?;
        send[0].extend(t.iter());
    }
    let recv = transport.all_to_all(send).map_err(|source| DistributedError::Transport { rank, source })?;
    if rank != 0 {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(world);
    for (r, b) in recv.iter().enumerate() {
        let mut sd = StateDict::new();
        let mut at = 0;
        for spec in specs(r) {
            let len: usize = spec.shape.iter().product();
            let data = b.get(at..at + len).ok_or_else(|| DistributedError::Protocol {
                rank,
                what: format!("weight grads from rank {r} end before {} ({} values)", spec.name, b.len()),
            })?;
            at += len;
            sd.insert(spec.name.clone(), ArrayD::from_shape_vec(IxDyn(&spec.shape), data.to_vec()).expect("sized"));
        }
        if at != b.len() {
            return Err(DistributedError::Protocol {
                rank,
                what: format!("weight grads from rank {r}: {} extra values", b.len() - at),
            });
        }
        out.push(sd);
    }
    Ok(Some(out))
}

/// Rank 0's view of a distributed run in the form of the rank simulation: the rank calls (with
/// `weight_grads[r]` as rank `r`'s grads) and the combined tensors.
pub fn as_parallel_run(
    cfg: &LayerConfig,
    root: &RankResult,
    rows: &[Range<usize>],
    weight_grads: Vec<StateDict>,
) -> Result<(Vec<RankRun>, ParallelRun), LayerError> {
    let tp = cfg.parallel.tp_size;
    let (output, grad_input, grad_probs) =
        root.combined.clone().ok_or_else(|| LayerError::Backend("not rank 0".into()))?;
    let mut ranks = Vec::new();
    let mut rank_weight_grads: Vec<Vec<ExpertSet>> = Vec::new();
    for (r, wg) in weight_grads.into_iter().enumerate() {
        let (q, k) = (r / tp, r % tp);
        if k == 0 {
            rank_weight_grads.push(Vec::new());
        }
        rank_weight_grads[q].push(from_state_dict(&cfg.at_rank(q, k), &wg)?);
        let run = LayerRun {
            output: Array2::zeros((0, cfg.hidden_size)),
            grad_input: Array2::zeros((0, cfg.hidden_size)),
            grad_probs: Array1::zeros(0),
            weight_grads: wg,
        };
        ranks.push(RankRun { ep_rank: q, tp_rank: k, rows: rows[r].clone(), run });
    }
    Ok((ranks, ParallelRun { output, grad_input, grad_probs, rank_weight_grads }))
}

/// The global rows every rank's layer receives, from the global token counts.
pub fn rank_rows(cfg: &LayerConfig, tokens_per_expert: &[i64]) -> Vec<Range<usize>> {
    let tp = cfg.parallel.tp_size;
    (0..cfg.parallel.ep_size * tp).map(|r| ep_rows(tokens_per_expert, cfg.num_local_experts(), r / tp).0).collect()
}
