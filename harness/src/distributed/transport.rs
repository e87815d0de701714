//! The collectives the distributed layer needs ([`Transport`]), and one implementation of them
//! as a star around rank 0 ([`HubTransport`]) over any message link: in-process channels
//! ([`super::fake`]) or TCP ([`super::tcp`]). The NCCL implementation lives in `moe-gpu`.
//!
//! Every rank calls the same collectives in the same order (SPMD). In the star, each rank sends
//! its contribution to rank 0, which waits for every rank (up to a timeout), computes every
//! rank's result with [`resolve`] and sends it back. A rank that died (its link closed) or hung
//! (no contribution within the timeout) makes rank 0 abort the others with an error naming it.

use moe_reference::Dtype;
use std::time::{Duration, Instant};

/// Why a collective failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TransportError {
    /// A peer rank died, hung or sent something inconsistent.
    #[error("rank {rank}: {what}")]
    Peer {
        /// The rank at fault.
        rank: usize,
        /// What happened.
        what: String,
    },
    /// Rank 0 aborted the collective (the message names the rank at fault).
    #[error("aborted by rank 0: {0}")]
    Aborted(String),
    /// The collective's arguments are inconsistent (across ranks or with the group).
    #[error("invalid collective: {0}")]
    Invalid(String),
    /// The backend (NCCL, CUDA, the network) failed.
    #[error("transport failure: {0}")]
    Backend(String),
}

/// The collectives of expert parallelism. `send`/`data` are host `f64` values; a reduction in a
/// `dtype` rounds every partial to it and every addition (the caller applies any final cast).
pub trait Transport {
    /// This process's global rank.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn world_size(&self) -> usize;
    /// All-to-all with uneven splits: `send[j]` goes to rank `j` (`world_size` entries); returns
    /// what every rank `i` sent to this one, `recv[i]`.
    fn all_to_all(&mut self, send: Vec<Vec<f64>>) -> Result<Vec<Vec<f64>>, TransportError>;
    /// Reduce-scatter over `group` (global ranks, containing this one; every member passes the
    /// same `group`, `counts` and `dtype`): `data` has `Σ counts` values; returns the sum over
    /// the group of the `counts[k]` values of chunk `k`, `k` this rank's place in `group`.
    /// `dtype` `None` sums exactly.
    fn reduce_scatter(
        &mut self,
        group: &[usize],
        data: Vec<f64>,
        counts: &[usize],
        dtype: Option<Dtype>,
    ) -> Result<Vec<f64>, TransportError>;
    /// All-reduce (sum) over `group`, as [`Transport::reduce_scatter`] without the scatter.
    fn all_reduce(&mut self, group: &[usize], data: Vec<f64>, dtype: Option<Dtype>)
        -> Result<Vec<f64>, TransportError>;
    /// Waits for every rank.
    fn barrier(&mut self) -> Result<(), TransportError>;
}

/// One rank's contribution to a collective (what travels to rank 0 in the star).
#[derive(Clone, Debug, PartialEq)]
pub enum Collective {
    /// [`Transport::all_to_all`]: one buffer per destination.
    AllToAll(Vec<Vec<f64>>),
    /// [`Transport::reduce_scatter`] (`counts` empty for an all-reduce).
    Reduce {
        /// Global ranks of the group.
        group: Vec<usize>,
        /// Chunk sizes (empty: all-reduce).
        counts: Vec<usize>,
        /// Summation dtype (`None`: exact).
        dtype: Option<Dtype>,
        /// This rank's values.
        data: Vec<f64>,
    },
    /// [`Transport::barrier`].
    Barrier,
}

impl Collective {
    fn kind(&self) -> &'static str {
        match self {
            Collective::AllToAll(_) => "all_to_all",
            Collective::Reduce { counts, .. } if counts.is_empty() => "all_reduce",
            Collective::Reduce { .. } => "reduce_scatter",
            Collective::Barrier => "barrier",
        }
    }
}

/// A message of the star protocol.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// A rank's contribution, to rank 0.
    Op(Collective),
    /// Rank 0's answer: the buffers this rank receives.
    Reply(Vec<Vec<f64>>),
    /// Rank 0 gives up; the reason names the rank at fault.
    Abort(String),
    /// Opaque bytes broadcast from rank 0 (the NCCL unique id at rendezvous).
    Bytes(Vec<u8>),
}

/// A bidirectional message link between rank 0 and one other rank.
pub trait Link: Send {
    /// Sends `msg` to the peer.
    fn send(&mut self, msg: &Message) -> Result<(), String>;
    /// The next message from the peer, waiting until `deadline`; an error says why none came
    /// (`"timed out"`, a closed link, ...).
    fn recv(&mut self, deadline: Instant) -> Result<Message, String>;
}

/// Sums `values` (one per group member, in group order) as a reduction in `dtype` does: each
/// value rounded to it, every addition rounded ([`moe_reference::parallel::reduce_values`]
/// without the final cast).
pub fn sum_in(values: impl IntoIterator<Item = f64>, dtype: Option<Dtype>) -> f64 {
    moe_reference::parallel::reduce_values(values, dtype.map(|d| (d, d)))
}

/// Every rank's result of one collective from every rank's contribution (`contribs[i]` from
/// rank `i`), or why the contributions are inconsistent (naming the rank).
pub fn resolve(contribs: &[Collective]) -> Result<Vec<Vec<Vec<f64>>>, TransportError> {
    let n = contribs.len();
    let kind = contribs[0].kind();
    if let Some(i) = contribs.iter().position(|c| c.kind() != kind) {
        return Err(TransportError::Peer {
            rank: i,
            what: format!("called {} while rank 0 called {kind}", contribs[i].kind()),
        });
    }
    let mut out: Vec<Vec<Vec<f64>>> = vec![Vec::new(); n];
    match &contribs[0] {
        Collective::Barrier => {}
        Collective::AllToAll(_) => {
            for (i, c) in contribs.iter().enumerate() {
                let Collective::AllToAll(send) = c else { unreachable!("kinds checked") };
                if send.len() != n {
                    return Err(TransportError::Peer {
                        rank: i,
                        what: format!("all_to_all with {} buffers for {n} ranks", send.len()),
                    });
                }
            }
            for (j, o) in out.iter_mut().enumerate() {
                *o = contribs
                    .iter()
                    .map(|c| match c {
                        Collective::AllToAll(send) => send[j].clone(),
                        _ => unreachable!("kinds checked"),
                    })
                    .collect();
            }
        }
        Collective::Reduce { .. } => {
            let mut done = vec![false; n];
            for i in 0..n {
                if done[i] {
                    continue;
                }
                let Collective::Reduce { group, counts, dtype, data } = &contribs[i] else {
                    unreachable!("kinds checked")
                };
                if !group.contains(&i) || group.iter().any(|&g| g >= n) || !group.windows(2).all(|w| w[0] < w[1]) {
                    return Err(TransportError::Peer {
                        rank: i,
                        what: format!("group {group:?} is not an increasing list of ranks below {n} containing it"),
                    });
                }
                let len = if counts.is_empty() { data.len() } else { counts.iter().sum() };
                let mut parts = Vec::with_capacity(group.len());
                for &g in group {
                    let Collective::Reduce { group: g2, counts: c2, dtype: d2, data: x } = &contribs[g] else {
                        unreachable!("kinds checked")
                    };
                    if g2 != group || c2 != counts || d2 != dtype || x.len() != len {
                        return Err(TransportError::Peer {
                            rank: g,
                            what: format!(
                                "{kind} over {g2:?} (counts {c2:?}, {} values, dtype {d2:?}) disagrees with rank {i}'s over {group:?} (counts {counts:?}, {len} values, dtype {dtype:?})",
                                x.len()
                            ),
                        });
                    }
                    parts.push(x);
                    done[g] = true;
                }
                let sum: Vec<f64> = (0..len).map(|e| sum_in(parts.iter().map(|p| p[e]), *dtype)).collect();
                let mut start = 0;
                for (k, &g) in group.iter().enumerate() {
                    out[g] = if counts.is_empty() {
                        vec![sum.clone()]
                    } else {
                        let chunk = sum[start..start + counts[k]].to_vec();
                        start += counts[k];
                        vec![chunk]
                    };
                }
            }
        }
    }
    Ok(out)
}

/// The star: rank 0 holds a link to every other rank, the others one link to rank 0.
enum Role {
    Hub(Vec<Box<dyn Link>>),
    Leaf(Box<dyn Link>),
}

/// [`Transport`] as a star around rank 0 over [`Link`]s, with a timeout per collective.
pub struct HubTransport {
    rank: usize,
    world: usize,
    timeout: Duration,
    role: Role,
}

impl HubTransport {
    /// Rank 0 with `links[i]` to rank `i + 1`.
    pub fn hub(links: Vec<Box<dyn Link>>, timeout: Duration) -> HubTransport {
        HubTransport { rank: 0, world: links.len() + 1, timeout, role: Role::Hub(links) }
    }

    /// Rank `rank` (> 0) of `world`, with its link to rank 0.
    pub fn leaf(rank: usize, world: usize, link: Box<dyn Link>, timeout: Duration) -> HubTransport {
        HubTransport { rank, world, timeout, role: Role::Leaf(link) }
    }

    fn collective(&mut self, op: Collective) -> Result<Vec<Vec<f64>>, TransportError> {
        let deadline = Instant::now() + self.timeout;
        let timeout = self.timeout;
        match &mut self.role {
            Role::Leaf(link) => {
                // Rank 0 waits up to `timeout` for the slowest rank before it answers or aborts
                // naming it; a leaf waits twice as long, so it hears rank 0's verdict rather
                // than timing out on rank 0 at the same moment.
                let deadline = deadline + timeout;
                let kind = op.kind();
                link.send(&Message::Op(op))
                    .map_err(|e| TransportError::Peer { rank: 0, what: format!("cannot reach it: {e}") })?;
                match link.recv(deadline) {
                    Ok(Message::Reply(r)) => Ok(r),
                    Ok(Message::Abort(why)) => Err(TransportError::Aborted(why)),
                    Ok(other) => Err(TransportError::Peer { rank: 0, what: format!("sent {other:?}, not a reply") }),
                    Err(e) => Err(TransportError::Peer {
                        rank: 0,
                        what: format!("no answer to {kind} within {} s: {e}", 2.0 * timeout.as_secs_f64()),
                    }),
                }
            }
            Role::Hub(links) => {
                let kind = op.kind();
                let mut contribs = vec![op];
                let mut failure = None;
                for (i, link) in links.iter_mut().enumerate() {
                    match link.recv(deadline) {
                        Ok(Message::Op(c)) => contribs.push(c),
                        Ok(other) => {
                            failure = Some(TransportError::Peer {
                                rank: i + 1,
                                what: format!("sent {other:?} instead of its {kind} contribution"),
                            });
                            break;
                        }
                        Err(e) => {
                            failure = Some(TransportError::Peer {
                                rank: i + 1,
                                what: format!(
                                    "no {kind} contribution (died or hung; waited up to {} s): {e}",
                                    timeout.as_secs_f64()
                                ),
                            });
                            break;
                        }
                    }
                }
                let result = match failure {
                    Some(f) => Err(f),
                    None => resolve(&contribs),
                };
                match result {
                    Ok(mut replies) => {
                        for (i, link) in links.iter_mut().enumerate() {
                            let reply = std::mem::take(&mut replies[i + 1]);
                            link.send(&Message::Reply(reply)).map_err(|e| TransportError::Peer {
                                rank: i + 1,
                                what: format!("cannot reach it: {e}"),
                            })?;
                        }
                        Ok(std::mem::take(&mut replies[0]))
                    }
                    Err(e) => {
                        let why = e.to_string();
                        for link in links.iter_mut() {
                            // Best effort: a dead peer cannot be told.
                            let _ = link.send(&Message::Abort(why.clone()));
                        }
                        Err(e)
                    }
                }
            }
        }
    }

    fn one(mut r: Vec<Vec<f64>>) -> Result<Vec<f64>, TransportError> {
        match r.len() {
            1 => Ok(r.pop().expect("one buffer")),
            n => Err(TransportError::Backend(format!("expected one reduced buffer, got {n}"))),
        }
    }
}

impl Transport for HubTransport {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_to_all(&mut self, send: Vec<Vec<f64>>) -> Result<Vec<Vec<f64>>, TransportError> {
        if send.len() != self.world {
            return Err(TransportError::Invalid(format!(
                "all_to_all with {} buffers for {} ranks",
                send.len(),
                self.world
            )));
        }
        let r = self.collective(Collective::AllToAll(send))?;
        if r.len() != self.world {
            return Err(TransportError::Backend(format!(
                "all_to_all returned {} buffers for {} ranks",
                r.len(),
                self.world
            )));
        }
        Ok(r)
    }
    fn reduce_scatter(
        &mut self,
        group: &[usize],
        data: Vec<f64>,
        counts: &[usize],
        dtype: Option<Dtype>,
    ) -> Result<Vec<f64>, TransportError> {
        check_reduce(self.rank, group, data.len(), Some(counts))?;
        Self::one(self.collective(Collective::Reduce {
            group: group.to_vec(),
            counts: counts.to_vec(),
            dtype,
            data,
        })?)
    }
    fn all_reduce(
        &mut self,
        group: &[usize],
        data: Vec<f64>,
        dtype: Option<Dtype>,
    ) -> Result<Vec<f64>, TransportError> {
        check_reduce(self.rank, group, data.len(), None)?;
        Self::one(self.collective(Collective::Reduce { group: group.to_vec(), counts: Vec::new(), dtype, data })?)
    }
    fn barrier(&mut self) -> Result<(), TransportError> {
        self.collective(Collective::Barrier).map(|_| ())
    }
}

/// Checks a reduction's arguments on the calling rank: the group contains it, the counts (one
/// per member, non-empty for a reduce-scatter) add up to the data.
pub fn check_reduce(rank: usize, group: &[usize], len: usize, counts: Option<&[usize]>) -> Result<(), TransportError> {
    if !group.contains(&rank) || !group.windows(2).all(|w| w[0] < w[1]) {
        return Err(TransportError::Invalid(format!(
            "rank {rank} reduces over {group:?}, which is not an increasing list of ranks containing it"
        )));
    }
    if let Some(c) = counts {
        if c.len() != group.len() || c.iter().sum::<usize>() != len {
            return Err(TransportError::Invalid(format!(
                "reduce_scatter of {len} values in chunks {c:?} over {} ranks",
                group.len()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A leaf's link with a script: the contribution it delivers to rank 0, and whether the
    /// reply reaches it (false: the peer died after sending its contribution).
    struct Scripted {
        contribution: Option<Message>,
        takes_reply: bool,
    }

    impl Link for Scripted {
        fn send(&mut self, _msg: &Message) -> Result<(), String> {
            if self.takes_reply {
                Ok(())
            } else {
                Err("the peer's end is gone".into())
            }
        }
        fn recv(&mut self, _deadline: Instant) -> Result<Message, String> {
            self.contribution.take().ok_or_else(|| "timed out".to_string())
        }
    }

    /// Only a peer that dies between its contribution and rank 0's reply reaches the hub's
    /// reply-send error, which no multi-process run makes happen on cue: here rank 2 (the
    /// second link) is gone at the reply, and the error must name rank 2, not its link index
    /// or a neighbour.
    #[test]
    fn a_peer_gone_before_the_reply_is_named_by_its_rank() {
        let leaf = |takes_reply| -> Box<dyn Link> {
            Box::new(Scripted { contribution: Some(Message::Op(Collective::Barrier)), takes_reply })
        };
        let mut hub = HubTransport::hub(vec![leaf(true), leaf(false), leaf(true)], Duration::from_secs(1));
        match hub.barrier() {
            Err(TransportError::Peer { rank, what }) => {
                assert_eq!(rank, 2, "{what}");
                assert!(what.contains("cannot reach it"), "{what}");
            }
            other => panic!("expected rank 2 named, got {other:?}"),
        }
    }
}
