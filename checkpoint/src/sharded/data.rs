//! Megatron's factory build and merge: a rank's class state dict to the local data of its
//! ShardedTensors and back, through the canonical per-expert tensors.

use super::{sharded_state_dict, ExpertLayout, Half, RankCoord, ShardedEntry, ShardedTensor};
use crate::tensor::{RawStateDict, RawTensor};
use crate::CheckpointError;
use moe_reference::state_dict::per_expert_name;
use moe_reference::{Dtype, ExpertParam, GroupedWeight, LayerClass};
use std::borrow::Cow;
use std::ops::Range;

/// One rank's canonical per-expert tensors (`[out, in]`, indexed by [`ExpertParam::index`]),
/// each possibly absent (biases); borrowed from the class state dict where no conversion is
/// needed.
pub type Canonical<'a> = Vec<[Option<Cow<'a, RawTensor>>; 4]>;

/// Tensor `p` of one expert's [`Canonical`] row, which must hold it.
pub fn present<'c>(row: &'c [Option<Cow<'_, RawTensor>>; 4], p: ExpertParam) -> &'c RawTensor {
    row[p.index()].as_deref().unwrap_or_else(|| panic!("canonical {p:?} absent"))
}

/// Reads a class state dict (one rank) into canonical per-expert tensors, checking names and
/// shapes. GroupedMLP's packed weights are reinterpreted per expert as the reference does
/// ([`GroupedWeight::unpack`], spec §3.3), here on the dtype's bytes.
pub fn to_canonical<'a>(l: &ExpertLayout, sd: &'a RawStateDict) -> Result<Canonical<'a>, CheckpointError> {
    let c = &l.config;
    let get = |name: &str, shape: &[usize]| -> Result<&'a RawTensor, CheckpointError> {
        let t = sd.get(name).ok_or_else(|| CheckpointError::State {
            key: name.to_string(),
            msg: format!("missing from the {} state dict", c.class.megatron_name()),
        })?;
        if t.shape != shape {
            return Err(CheckpointError::State {
                key: name.to_string(),
                msg: format!("shape {:?}, expected {:?}", t.shape, shape),
            });
        }
        Ok(t)
    };
    let mut out: Canonical = vec![[None, None, None, None]; c.num_local_experts()];
    match c.class {
        LayerClass::Sequential | LayerClass::TeGrouped => {
            for (e, row) in out.iter_mut().enumerate() {
                for p in ExpertParam::ALL.into_iter().filter(|p| p.present(c)) {
                    row[p.index()] = Some(Cow::Borrowed(get(&per_expert_name(c.class, e, p), &p.shape(c))?));
                }
            }
        }
        LayerClass::Grouped => {
            for w in GroupedWeight::ALL {
                let packed = get(w.name(), &w.shape(c))?;
                let p = w.param();
                for (e, row) in out.iter_mut().enumerate() {
                    let data = w.unpack(c, &packed.data, packed.elem(), e);
                    row[p.index()] = Some(Cow::Owned(RawTensor { dtype: packed.dtype, shape: p.shape(c), data }));
                }
            }
        }
    }
    Ok(out)
}

/// The inverse of [`to_canonical`]: the class state dict of one rank.
pub fn from_canonical(l: &ExpertLayout, canonical: Canonical<'_>) -> RawStateDict {
    let c = &l.config;
    let mut sd = RawStateDict::new();
    match c.class {
        LayerClass::Sequential | LayerClass::TeGrouped => {
            for (e, row) in canonical.into_iter().enumerate() {
                for (p, t) in ExpertParam::ALL.into_iter().zip(row) {
                    if let Some(t) = t {
                        sd.insert(per_expert_name(c.class, e, p), t.into_owned());
                    }
                }
            }
        }
        LayerClass::Grouped => {
            for w in GroupedWeight::ALL {
                let p = w.param();
                let dtype = present(&canonical[0], p).dtype;
                let data = w.pack(c, canonical.iter().map(|row| present(row, p).data.as_slice()), dtype.size_bytes());
                sd.insert(w.name().into(), RawTensor { dtype, shape: w.shape(c), data });
            }
        }
    }
    sd
}

/// The byte range of `half` within one canonical tensor (rows are contiguous, row-major).
fn half_bytes(t: &RawTensor, half: Half) -> Range<usize> {
    let n = t.data.len();
    match half {
        Half::All => 0..n,
        Half::W => 0..n / 2,
        Half::V => n / 2..n,
    }
}

/// The local data of `st` as byte slices of the canonical tensors, in row-major order
/// (the factory build, without copying).
pub fn shard_pieces<'a>(st: &ShardedTensor, c: &'a Canonical<'_>) -> Vec<&'a [u8]> {
    let s = &st.source;
    s.experts
        .clone()
        .map(|e| {
            let t = present(&c[e], s.param);
            &t.data[half_bytes(t, s.half)]
        })
        .collect()
}

/// Megatron's build: every ShardedTensor of `rank` with its local data, from a class state dict.
pub fn build<'a>(
    l: &ExpertLayout,
    rank: RankCoord,
    sd: &'a RawStateDict,
) -> Result<(Vec<ShardedEntry>, Canonical<'a>), CheckpointError> {
    l.require_no_outer_offsets("save")?;
    let entries = sharded_state_dict(l, rank)?;
    let c = to_canonical(l, sd)?;
    Ok((entries, c))
}

/// Megatron's merge: the class state dict of `rank` from the loaded local data of each of its
/// ShardedTensors (`loaded[i]` belongs to the i-th tensor entry of
/// [`sharded_state_dict`]`(l, rank)`).
pub fn merge(
    l: &ExpertLayout,
    rank: RankCoord,
    dtype: Dtype,
    loaded: Vec<(ShardedTensor, Vec<u8>)>,
) -> Result<RawStateDict, CheckpointError> {
    let _ = rank;
    let cfg = &l.config;
    let mut c: Canonical<'static> = (0..l.local_experts()).map(|_| [None, None, None, None]).collect();
    for (st, data) in loaded {
        let s = &st.source;
        let want = s.param.shape(cfg);
        let full = want.iter().product::<usize>() * dtype.size_bytes();
        if s.half == Half::All && s.experts.len() == 1 && data.len() == full {
            // The shard is the whole tensor: move it, no copy.
            c[s.experts.start][s.param.index()] = Some(Cow::Owned(RawTensor { dtype, shape: want, data }));
            continue;
        }
        let per = data.len() / s.experts.len().max(1);
        for (i, e) in s.experts.clone().enumerate() {
            let t =
                c[e][s.param.index()].get_or_insert_with(|| Cow::Owned(RawTensor::zeros(dtype, want.clone()))).to_mut();
            let range = half_bytes(t, s.half);
            if range.len() != per {
                return Err(CheckpointError::State {
                    key: st.key.clone(),
                    msg: format!("loaded {} bytes per expert, expected {}", per, range.len()),
                });
            }
            t.data[range].copy_from_slice(&data[i * per..(i + 1) * per]);
        }
    }
    for (e, row) in c.iter().enumerate() {
        for p in ExpertParam::ALL {
            if p.present(cfg) && row[p.index()].is_none() {
                return Err(CheckpointError::State {
                    key: format!("local expert {e} {p:?}"),
                    msg: "no shard loaded for it".into(),
                });
            }
        }
    }
    Ok(from_canonical(l, c))
}
