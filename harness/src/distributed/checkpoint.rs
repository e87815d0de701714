//! Distributed checkpoints: every rank writes its own shards concurrently into one staging
//! directory, rank 0 merges the records, checks that they tile every tensor, writes the one
//! index and moves the checkpoint into place ([`save_distributed`]). The save is atomic: when
//! any rank fails or dies before the end, rank 0 removes the staging directory and the target
//! is left as it was (absent, or the previous checkpoint). A checkpoint saved at one layout
//! loads at any other, on any number of ranks ([`load_rank`]).

use super::transport::Transport;
use moe_checkpoint::{
    Checkpoint, CheckpointWriter, ExpertLayout, PartRecords, RankCoord, RawStateDict, SaveOptions, SavePart, SaveReport,
};
use std::path::{Path, PathBuf};

/// Bytes as `f64` values (one per byte) for the transport.
fn to_values(bytes: &[u8]) -> Vec<f64> {
    bytes.iter().map(|&b| f64::from(b)).collect()
}

/// The inverse of [`to_values`]; an error names the bad value.
fn to_bytes(values: &[f64]) -> Result<Vec<u8>, String> {
    values
        .iter()
        .map(|&v| {
            if (0.0..=255.0).contains(&v) && v.fract() == 0.0 {
                Ok(v as u8)
            } else {
                Err(format!("{v} is not a byte"))
            }
        })
        .collect()
}

/// An outcome message: `Ok(payload)` or `Err(reason)`, as bytes.
fn encode(r: Result<Vec<u8>, String>) -> Vec<f64> {
    let mut out = match &r {
        Ok(_) => vec![1.0],
        Err(_) => vec![0.0],
    };
    out.extend(to_values(&match r {
        Ok(p) => p,
        Err(e) => e.into_bytes(),
    }));
    out
}

fn decode(values: &[f64], from: usize) -> Result<Vec<u8>, String> {
    let (&tag, rest) = values.split_first().ok_or_else(|| format!("rank {from} sent an empty message"))?;
    let bytes = to_bytes(rest).map_err(|e| format!("rank {from}: {e}"))?;
    if tag == 1.0 {
        Ok(bytes)
    } else {
        Err(format!("rank {from}: {}", String::from_utf8_lossy(&bytes)))
    }
}

/// Rank 0 sends every rank one message (`msg(r)`), everyone returns its own.
fn scatter(t: &mut dyn Transport, msg: impl Fn(usize) -> Vec<f64>) -> Result<Vec<f64>, String> {
    let world = t.world_size();
    let send = if t.rank() == 0 { (0..world).map(msg).collect() } else { vec![Vec::new(); world] };
    Ok(t.all_to_all(send).map_err(|e| format!("rank {}: {e}", t.rank()))?.swap_remove(0))
}

/// Every rank sends rank 0 one message; rank 0 gets all (rank order), the others nothing.
fn gather(t: &mut dyn Transport, msg: Vec<f64>) -> Result<Vec<Vec<f64>>, String> {
    let mut send = vec![Vec::new(); t.world_size()];
    send[0] = msg;
    t.all_to_all(send).map_err(|e| format!("rank {}: {e}", t.rank()))
}

/// Saves this rank's class state dict `state` (rank `coord` of `layout`) as its part of the
/// checkpoint at `dir`; every rank calls it. Rank 0 creates the staging directory (failing
/// when `dir` exists and `opts.force` is off), every rank writes its shards there, rank 0
/// merges, writes the index and renames into place, then tells every rank the outcome. Returns
/// rank 0's report on every rank, or an error naming the rank that failed; on any error the
/// target is untouched. `opts.abort_after_files` injects a crash in this rank's write (tests).
pub fn save_distributed(
    t: &mut dyn Transport,
    dir: &Path,
    layout: &ExpertLayout,
    coord: RankCoord,
    state: &RawStateDict,
    opts: &SaveOptions,
) -> Result<SaveReport, String> {
    let rank = t.rank();
    // 1. Rank 0 opens the staging directory and tells every rank where it is.
    let mut root = None;
    let staged = if rank == 0 {
        match CheckpointWriter::create(dir, &SaveOptions { abort_after_files: None, ..opts.clone() }) {
            Ok(w) => {
                let p = w.staging_path().to_string_lossy().into_owned().into_bytes();
                root = Some(w);
                Ok(p)
            }
            Err(e) => Err(e.to_string()),
        }
    } else {
        Ok(Vec::new())
    };
    let got = scatter(t, |_| encode(staged.clone()))?;
    let staging = PathBuf::from(String::from_utf8_lossy(&decode(&got, 0)?).into_owned());

    // 2. Every rank writes its part.
    let mut w = CheckpointWriter::join(&staging, rank, opts);
    let part = w
        .write_part(SavePart { layout, rank: coord, state })
        .map(|()| w.into_part().to_bytes())
        .map_err(|e| format!("writing its shards: {e}"));
    let parts = gather(t, encode(part))?;

    // 3. Rank 0 merges and finishes (dropping the writer on any error removes the staging
    // directory), then tells every rank the outcome.
    let outcome: Result<SaveReport, String> = match root.take() {
        None => Ok(SaveReport { files: 0, shards: 0, bytes: 0 }),
        Some(mut w) => (|| {
            for (r, p) in parts.iter().enumerate() {
                let records = PartRecords::from_bytes(&decode(p, r)?).map_err(|e| format!("rank {r}: {e}"))?;
                w.absorb(records).map_err(|e| format!("rank {r}: {e}"))?;
            }
            w.finish().map_err(|e| format!("rank 0: finishing the checkpoint: {e}"))
        })(),
    };
    let report_bytes =
        outcome.as_ref().map(|r| format!("{} {} {}", r.files, r.shards, r.bytes).into_bytes()).map_err(Clone::clone);
    let got = scatter(t, |_| encode(report_bytes.clone()))?;
    let text = String::from_utf8_lossy(&decode(&got, 0)?).into_owned();
    let n: Vec<u64> = text.split(' ').filter_map(|v| v.parse().ok()).collect();
    match n[..] {
        [files, shards, bytes] => Ok(SaveReport { files: files as usize, shards: shards as usize, bytes }),
        _ => Err(format!("rank 0 sent a malformed report {text:?}")),
    }
}

/// Loads rank `coord`'s class state dict at `layout` (any layout and number of ranks, not
/// necessarily the one saved) from the checkpoint at `dir`.
pub fn load_rank(dir: &Path, layout: &ExpertLayout, coord: RankCoord) -> Result<RawStateDict, String> {
    let ckpt = Checkpoint::open(dir).map_err(|e| e.to_string())?;
    let mut parts = ckpt.load(&[(layout.clone(), coord)], None).map_err(|e| e.to_string())?;
    Ok(parts.swap_remove(0))
}
