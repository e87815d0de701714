//! Megatron `torch_dist` checkpoints (PyTorch Distributed Checkpoint as Megatron-Core writes
//! it), read as an [`ExpertSource`].
//!
//! A `torch_dist` directory holds `metadata.json` (`{"sharded_backend": "torch_dist", ...}`),
//! `.metadata` (a pickle of torch's `Metadata`: every tensor's global shape, dtype and saved
//! chunks, and where each chunk's bytes are), `__{rank}_{i}.distcp` files (each chunk a
//! `torch.save` archive at an offset) and `common.pt` (the non-sharded state, not needed for
//! expert tensors and not read). Nothing is executed: both pickles are read by a restricted
//! reader with an allowlist of globals ([`dcp::metadata_allowed`],
//! [`archive::archive_allowed`]); any other global is an error naming it and the file.
//!
//! Expert tensors are recognised by their Megatron-Core key (megatron-core 0.16.1,
//! `transformer/moe/experts.py` `sharded_state_dict` of SequentialMLP, TEGroupedMLP and the
//! legacy GroupedMLP; all three save the same keys and global shapes, spec §7.7):
//!
//! * non-singleton `{P}experts.linear_fc{1,2}.{weight,bias}`: the expert axis is prepended
//!   (`[E, N1, h]`, `[E, h, f]`, `[E, N1]`, `[E, h]`);
//! * singleton (`metadata['singleton_local_shards']`) `{P}experts.{g}.linear_fc…`, and for a
//!   GLU fc1 the halves `…weight_w` / `…weight_v` (and `bias_w`/`bias_v`), each `[f, h]`;
//! * in a whole model saved through `TransformerBlock.sharded_state_dict` (homogeneous layers),
//!   one more axis in front: the layer axis of the stacked `decoder.layers` block
//!   (`sharded_offsets = ((0, layer, L),)`), e.g. `decoder.layers.mlp.experts.experts.linear_fc1.weight`
//!   `[L, E, 2f, h]`. Without a layer axis the layer number is taken from `layers.{n}.` in the
//!   prefix (0 when there is none).
//!
//! The canonical orientation needs no transform: Megatron's global expert tensors are already
//! per-expert `[N1, h]` / `[h, f]`, with a GLU's gate rows first (`apply_swiglu_sharded_factory`
//! stores the gate half of TP rank `r` as chunk `r` of `2t` and the linear half as chunk `t + r`).

pub mod archive;
pub mod dcp;
pub mod pickle;

use crate::experts::{ExpertEntry, ExpertKey, ExpertSource, ExpertValues, SourceFormat, SourceInfo};
use crate::tensor::{copy_region, numel, safetensors_dtype, RawTensor, Region};
use crate::CheckpointError;
use dcp::{DcpMetadata, TensorMeta};
use moe_reference::{Dtype, ExpertParam};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// A Megatron `torch_dist` checkpoint directory, opened (metadata read and checked; no tensor
/// data read yet).
#[derive(Debug)]
pub struct TorchDistSource {
    info: SourceInfo,
    dir: PathBuf,
    meta: DcpMetadata,
    entries: Vec<ExpertEntry>,
    plans: HashMap<String, Plan>,
    index: HashMap<String, ChunkIndex>,
}

/// The chunks of one key by their offset on axis 0 (the layer axis, or the expert axis), so
/// that finding the chunks of one layer × expert does not scan every chunk of the key. Chunks
/// wider than 1 on axis 0 (GroupedMLP's `[E_l, …]` chunks, a singleton key's row shards) are
/// always candidates.
#[derive(Clone, Debug, Default)]
struct ChunkIndex {
    by_first: HashMap<usize, Vec<usize>>,
    wide: Vec<usize>,
}

impl ChunkIndex {
    fn new(t: &TensorMeta) -> ChunkIndex {
        let mut ix = ChunkIndex::default();
        for (i, c) in t.chunks.iter().enumerate() {
            match (c.offsets.first(), c.sizes.first()) {
                (Some(&o), Some(1)) => ix.by_first.entry(o).or_default().push(i),
                _ => ix.wide.push(i),
            }
        }
        ix
    }

    /// Indices of the chunks that may intersect `region`, in chunk order.
    fn candidates(&self, region: &Region) -> Vec<usize> {
        let mut out = self.wide.clone();
        if let (Some(&o), Some(&n)) = (region.offset.first(), region.shape.first()) {
            if n <= self.by_first.len() {
                for a in o..o + n {
                    out.extend(self.by_first.get(&a).into_iter().flatten());
                }
            } else {
                out.extend(self.by_first.values().flatten());
            }
        }
        out.sort_unstable();
        out
    }
}

/// How to assemble one canonical tensor: pieces (boxes of stored global tensors) concatenated
/// along the canonical first axis.
#[derive(Clone, Debug)]
struct Plan {
    dtype: Dtype,
    shape: Vec<usize>,
    pieces: Vec<(String, Region)>,
}

/// A stored key that is an expert tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertKeyName {
    /// Everything before `experts.` (e.g. `decoder.layers.mlp.experts.`).
    pub prefix: String,
    /// The global expert of a singleton key.
    pub expert: Option<usize>,
    /// The parameter.
    pub param: ExpertParam,
    /// `Some('w')`/`Some('v')` for a singleton GLU half.
    pub half: Option<char>,
}

/// Parses a Megatron expert key (module doc); `None` for any other key.
pub fn parse_expert_key(key: &str) -> Option<ExpertKeyName> {
    let mut search = 0;
    while let Some(i) = key[search..].find("experts.").map(|i| i + search) {
        search = i + 1;
        if i > 0 && !key[..i].ends_with('.') {
            continue; // e.g. `shared_experts.`
        }
        let rest = &key[i + "experts.".len()..];
        let (expert, rest) = match rest.split_once('.') {
            Some((n, r)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => (Some(n.parse().ok()?), r),
            _ => (None, rest),
        };
        let (param, half) = match rest {
            "linear_fc1.weight" => (ExpertParam::Fc1Weight, None),
            "linear_fc1.bias" => (ExpertParam::Fc1Bias, None),
            "linear_fc2.weight" => (ExpertParam::Fc2Weight, None),
            "linear_fc2.bias" => (ExpertParam::Fc2Bias, None),
            "linear_fc1.weight_w" => (ExpertParam::Fc1Weight, Some('w')),
            "linear_fc1.weight_v" => (ExpertParam::Fc1Weight, Some('v')),
            "linear_fc1.bias_w" => (ExpertParam::Fc1Bias, Some('w')),
            "linear_fc1.bias_v" => (ExpertParam::Fc1Bias, Some('v')),
            _ => continue,
        };
        return Some(ExpertKeyName { prefix: key[..i].to_string(), expert, param, half });
    }
    None
}

/// The layer number in a prefix: the number after the last `layers.` (`decoder.layers.3.mlp.`).
fn prefix_layer(prefix: &str) -> Option<usize> {
    let i = prefix.rfind("layers.")?;
    if i > 0 && !prefix[..i].ends_with('.') {
        return None;
    }
    prefix[i + "layers.".len()..].split('.').next()?.parse().ok()
}

impl TorchDistSource {
    /// Opens a `torch_dist` directory: reads `metadata.json` (when present) and `.metadata`,
    /// finds the expert tensors, and checks that every one of their chunks is listed in
    /// `storage_data`, lies in an existing file, and that the chunks cover each expert tensor
    /// exactly once. Errors name the file and the key.
    pub fn open(dir: &Path) -> Result<TorchDistSource, CheckpointError> {
        let md_path = dir.join(".metadata");
        let mut inferred = Vec::new();
        let mj = dir.join("metadata.json");
        if mj.is_file() {
            let text =
                std::fs::read_to_string(&mj).map_err(|source| CheckpointError::Io { path: mj.clone(), source })?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| CheckpointError::Corrupt { path: mj.clone(), reason: format!("not JSON: {e}") })?;
            let backend = v.get("sharded_backend").and_then(|b| b.as_str()).unwrap_or("");
            if backend != "torch_dist" {
                return Err(CheckpointError::NotASource {
                    format: "torch_dist",
                    path: dir.to_path_buf(),
                    reason: format!("metadata.json says sharded_backend {backend:?}, only \"torch_dist\" is read"),
                });
            }
            inferred.push("format: torch_dist (metadata.json: sharded_backend torch_dist; .metadata)".to_string());
        } else {
            inferred.push("format: torch_dist (found .metadata; no metadata.json)".to_string());
        }
        if !md_path.is_file() {
            return Err(CheckpointError::NotASource {
                format: "torch_dist",
                path: dir.to_path_buf(),
                reason: "no .metadata file (not a PyTorch Distributed Checkpoint)".into(),
            });
        }
        let bytes = std::fs::read(&md_path).map_err(|source| CheckpointError::Io { path: md_path.clone(), source })?;
        let meta =
            dcp::parse_metadata(&bytes).map_err(|reason| CheckpointError::Corrupt { path: md_path.clone(), reason })?;
        let mut src = TorchDistSource {
            info: SourceInfo {
                path: dir.to_path_buf(),
                format: SourceFormat::TorchDist,
                family: Some("megatron-core".into()),
                inferred,
            },
            dir: dir.to_path_buf(),
            meta,
            entries: Vec::new(),
            plans: HashMap::new(),
            index: HashMap::new(),
        };
        src.build_entries()?;
        Ok(src)
    }

    /// The parsed `.metadata` (tensor keys, shapes, chunks, storage).
    pub fn metadata(&self) -> &DcpMetadata {
        &self.meta
    }

    fn md_path(&self) -> PathBuf {
        self.dir.join(".metadata")
    }

    fn corrupt(&self, key: &str, msg: impl std::fmt::Display) -> CheckpointError {
        CheckpointError::Corrupt { path: self.md_path(), reason: format!("key {key}: {msg}") }
    }

    fn build_entries(&mut self) -> Result<(), CheckpointError> {
        // Expert keys, grouped by (prefix, expert, param) so that `_w`/`_v` halves pair up.
        type Group = BTreeMap<Option<char>, (String, TensorMeta)>;
        let mut groups: BTreeMap<(String, Option<usize>, ExpertParam), Group> = BTreeMap::new();
        for (key, t) in &self.meta.tensors {
            let Some(k) = parse_expert_key(key) else { continue };
            let g = groups.entry((k.prefix.clone(), k.expert, k.param)).or_default();
            g.insert(k.half, (key.clone(), t.clone()));
        }
        for group in groups.values() {
            for (key, t) in group.values() {
                self.index.insert(key.clone(), ChunkIndex::new(t));
            }
        }
        let mut file_sizes: HashMap<String, u64> = HashMap::new();
        let mut prefixes: BTreeMap<String, (BTreeSet<usize>, BTreeSet<usize>, bool, bool)> = BTreeMap::new();
        let mut entries = Vec::new();
        let mut plans = HashMap::new();
        for ((prefix, expert, param), group) in &groups {
            let halves: Vec<&(String, TensorMeta)> =
                match (group.get(&None), group.get(&Some('w')), group.get(&Some('v'))) {
                    (Some(whole), None, None) => vec![whole],
                    (None, Some(w), Some(v)) => vec![w, v],
                    _ => {
                        let keys: Vec<&str> = group.values().map(|(k, _)| k.as_str()).collect();
                        return Err(self.corrupt(
                            &keys.join(", "),
                            "an expert tensor must be stored whole or as both GLU halves _w and _v",
                        ));
                    }
                };
            let param_nd = if param.is_bias() { 1 } else { 2 };
            let expert_axes = usize::from(expert.is_none());
            let mut lead = None;
            let mut dtype = None;
            for (key, t) in &halves {
                self.check_chunks(key, t, &mut file_sizes)?;
                let dt = dcp::torch_dtype(&t.dtype).ok_or_else(|| {
                    self.corrupt(
                        key,
                        format!("dtype torch.{}; expert tensors are read in float32, bfloat16 or float16", t.dtype),
                    )
                })?;
                if t.size.len() < param_nd + expert_axes || t.size.len() > param_nd + expert_axes + 1 {
                    return Err(self.corrupt(
                        key,
                        format!(
                            "global shape {:?}: expected {} axes ({}{}the parameter's {param_nd})",
                            t.size,
                            param_nd + expert_axes,
                            "[layer axis] ",
                            if expert_axes == 1 { "expert axis, " } else { "" }
                        ),
                    ));
                }
                let l = t.size.len() - param_nd;
                if let Some((lk, ls)) = &lead {
                    if ls != &t.size[..l].to_vec() || dtype != Some(dt) || t.size[l + 1..] != halves[0].1.size[l + 1..]
                    {
                        return Err(CheckpointError::Mismatch {
                            key: format!("{lk} / {key}"),
                            msg: format!(
                                "GLU halves differ: {:?} {} and {:?} {}",
                                halves[0].1.size, halves[0].1.dtype, t.size, t.dtype
                            ),
                        });
                    }
                } else {
                    lead = Some((key.clone(), t.size[..l].to_vec()));
                    dtype = Some(dt);
                }
            }
            let (_, lead) = lead.expect("one half at least");
            let dtype = dtype.expect("set with lead");
            let stacked = lead.len() > expert_axes; // a layer axis in front
            let layers: Vec<(usize, Option<usize>)> = if stacked {
                (0..lead[0]).map(|l| (l, Some(l))).collect()
            } else {
                vec![(prefix_layer(prefix).unwrap_or(0), None)]
            };
            let experts: Vec<(usize, Option<usize>)> = match expert {
                Some(g) => vec![(*g, None)],
                None => (0..lead[lead.len() - 1]).map(|g| (g, Some(g))).collect(),
            };
            let p = prefixes.entry(prefix.clone()).or_default();
            p.2 |= stacked;
            p.3 |= expert.is_some();
            for &(layer, l_idx) in &layers {
                p.0.insert(layer);
                for &(g, g_idx) in &experts {
                    p.1.insert(g);
                    let mut pieces = Vec::new();
                    let mut rows = 0;
                    let mut idx_txt = Vec::new();
                    for (key, t) in &halves {
                        let mut offset: Vec<usize> = Vec::new();
                        let mut shape: Vec<usize> = Vec::new();
                        for i in [l_idx, g_idx].into_iter().flatten() {
                            offset.push(i);
                            shape.push(1);
                        }
                        idx_txt = offset.iter().map(|x| x.to_string()).collect();
                        let pn = t.size.len() - param_nd;
                        offset.extend(std::iter::repeat_n(0, param_nd));
                        shape.extend(&t.size[pn..]);
                        rows += t.size[pn];
                        pieces.push((key.clone(), Region { offset, shape }));
                    }
                    let t0 = &halves[0].1;
                    let mut shape = t0.size[t0.size.len() - param_nd..].to_vec();
                    shape[0] = rows;
                    let at = if idx_txt.is_empty() { String::new() } else { format!("[{}]", idx_txt.join(", ")) };
                    let location = if halves.len() == 2 {
                        format!(".metadata: {}{at} + {}{at}", halves[0].0, halves[1].0)
                    } else {
                        format!(".metadata: {}{at}", halves[0].0)
                    };
                    let stored_as = match (halves.len(), stacked, expert.is_none()) {
                        (2, _, _) => format!(
                            "{}, GLU halves _w/_v {:?} each",
                            safetensors_dtype(dtype),
                            &t0.size[t0.size.len() - param_nd..]
                        ),
                        (_, true, true) => {
                            format!("{}, stacked [layer, expert, ...] {:?}", safetensors_dtype(dtype), t0.size)
                        }
                        (_, true, false) => format!("{}, stacked [layer, ...] {:?}", safetensors_dtype(dtype), t0.size),
                        (_, false, true) => format!("{}, [expert, ...] {:?}", safetensors_dtype(dtype), t0.size),
                        (_, false, false) => safetensors_dtype(dtype).to_string(),
                    };
                    for (key, region) in &pieces {
                        self.check_cover(key, &self.meta.tensors[key], region)?;
                    }
                    let key = ExpertKey { layer, expert: g, param: *param };
                    plans.insert(location.clone(), Plan { dtype, shape: shape.clone(), pieces });
                    entries.push(ExpertEntry { key, shape, stored_as, location });
                }
            }
        }
        for (prefix, (layers, experts, stacked, singleton)) in &prefixes {
            let range = |s: &BTreeSet<usize>| match (s.first(), s.last()) {
                (Some(a), Some(b)) if b - a + 1 == s.len() => format!("{a}..{}", b + 1),
                _ => format!("{s:?}"),
            };
            self.info.inferred.push(format!(
                "expert keys {prefix}experts.*: layers {} {}, experts {} ({} keys)",
                range(layers),
                if *stacked { "stacked on a leading layer axis" } else { "from the key prefix" },
                range(experts),
                if *singleton { "singleton" } else { "expert axis, non-singleton" },
            ));
        }
        if entries.is_empty() {
            self.info.inferred.push("no Megatron expert keys found".into());
        }
        entries.sort_by(|a, b| (a.key, &a.location).cmp(&(b.key, &b.location)));
        self.entries = entries;
        self.plans = plans;
        Ok(())
    }

    /// Every chunk of `key` lies in the tensor, has a storage record, and that record's bytes
    /// lie in an existing file.
    fn check_chunks(&self, key: &str, t: &TensorMeta, sizes: &mut HashMap<String, u64>) -> Result<(), CheckpointError> {
        for c in &t.chunks {
            let r = Region { offset: c.offsets.clone(), shape: c.sizes.clone() };
            if c.offsets.len() != t.size.len() || c.sizes.len() != t.size.len() || !r.within(&t.size) {
                return Err(self.corrupt(key, format!("chunk {r} outside the global shape {:?}", t.size)));
            }
            let Some(si) = self.meta.storage.get(&(key.to_string(), c.offsets.clone())) else {
                return Err(self.corrupt(key, format!("chunk {r} has no storage_data record")));
            };
            if !si.transforms.is_empty() {
                return Err(
                    self.corrupt(key, format!("chunk {r} is stored with transforms {:?} (not read)", si.transforms))
                );
            }
            let rp = &si.relative_path;
            if rp.is_empty() || rp.contains('/') || rp.contains('\\') || rp == ".." || rp == "." {
                return Err(
                    self.corrupt(key, format!("chunk {r}: relative_path {rp:?} is not a file name in the checkpoint"))
                );
            }
            let size = match sizes.get(rp) {
                Some(s) => *s,
                None => {
                    let path = self.dir.join(rp);
                    let s = std::fs::metadata(&path)
                        .map_err(|e| CheckpointError::Corrupt {
                            path: path.clone(),
                            reason: format!("named by .metadata for key {key} chunk {r}: {e}"),
                        })?
                        .len();
                    sizes.insert(rp.clone(), s);
                    s
                }
            };
            if si.offset.checked_add(si.length).is_none_or(|end| end > size) {
                return Err(CheckpointError::Corrupt {
                    path: self.dir.join(rp),
                    reason: format!(
                        "truncated: key {key} chunk {r} is bytes {}..{} but the file has {size}",
                        si.offset,
                        si.offset.saturating_add(si.length)
                    ),
                });
            }
        }
        Ok(())
    }

    /// The chunks of `key` that may intersect `region` (all of them for an unindexed key).
    fn chunks_near<'t>(&self, key: &str, t: &'t TensorMeta, region: &Region) -> Vec<&'t dcp::Chunk> {
        match self.index.get(key) {
            Some(ix) => ix.candidates(region).into_iter().map(|i| &t.chunks[i]).collect(),
            None => t.chunks.iter().collect(),
        }
    }

    /// The chunks of `key` cover `region` exactly once.
    fn check_cover(&self, key: &str, t: &TensorMeta, region: &Region) -> Result<(), CheckpointError> {
        let mut hits: Vec<Region> = Vec::new();
        for c in self.chunks_near(key, t, region) {
            let r = Region { offset: c.offsets.clone(), shape: c.sizes.clone() };
            if let Some(i) = r.intersect(region) {
                if let Some(h) = hits.iter().find(|h| h.intersect(&i).is_some()) {
                    return Err(CheckpointError::Overlap { key: key.to_string(), a: h.to_string(), b: i.to_string() });
                }
                hits.push(i);
            }
        }
        let covered: usize = hits.iter().map(Region::numel).sum();
        if covered != region.numel() {
            return Err(CheckpointError::Coverage {
                key: key.to_string(),
                region: region.to_string(),
                msg: format!(
                    "the saved chunks cover {covered} of {} elements (missing expert coverage)",
                    region.numel()
                ),
            });
        }
        Ok(())
    }

    /// Reads the box `region` of stored tensor `key` (dtype `dtype`) from its chunks.
    fn read_region(&self, key: &str, dtype: Dtype, region: &Region) -> Result<Vec<u8>, CheckpointError> {
        let t = self.meta.tensors.get(key).ok_or_else(|| self.corrupt(key, "not in .metadata"))?;
        let elem = dtype.size_bytes();
        let mut out = vec![0u8; region.numel() * elem];
        for c in self.chunks_near(key, t, region) {
            let cr = Region { offset: c.offsets.clone(), shape: c.sizes.clone() };
            let Some(i) = cr.intersect(region) else { continue };
            let si = self
                .meta
                .storage
                .get(&(key.to_string(), c.offsets.clone()))
                .ok_or_else(|| self.corrupt(key, format!("chunk {cr} has no storage_data record")))?;
            let path = self.dir.join(&si.relative_path);
            let file =
                std::fs::File::open(&path).map_err(|source| CheckpointError::Io { path: path.clone(), source })?;
            let chunk: RawTensor = archive::read_tensor(file, si.offset, si.length, dtype, &c.sizes).map_err(|e| {
                CheckpointError::Corrupt {
                    path: path.clone(),
                    reason: format!("key {key} chunk {cr} (bytes {}..{}): {e}", si.offset, si.offset + si.length),
                }
            })?;
            copy_region(&chunk.data, &cr, &mut out, region, &i, elem);
        }
        Ok(out)
    }
}

impl ExpertSource for TorchDistSource {
    fn info(&self) -> &SourceInfo {
        &self.info
    }

    fn entries(&self) -> &[ExpertEntry] {
        &self.entries
    }

    fn read(&self, entry: &ExpertEntry) -> Result<ExpertValues, CheckpointError> {
        let plan = self.plans.get(&entry.location).ok_or_else(|| CheckpointError::State {
            key: entry.location.clone(),
            msg: "not an entry of this torch_dist source".into(),
        })?;
        let mut data = Vec::with_capacity(numel(&plan.shape) * plan.dtype.size_bytes());
        for (key, region) in &plan.pieces {
            data.extend(self.read_region(key, plan.dtype, region)?);
        }
        Ok(ExpertValues::Raw(RawTensor { dtype: plan.dtype, shape: plan.shape.clone(), data }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_keys_are_recognised_and_others_are_not() {
        let k = parse_expert_key("decoder.layers.mlp.experts.experts.linear_fc1.weight").unwrap();
        assert_eq!(
            (k.prefix.as_str(), k.expert, k.param, k.half),
            ("decoder.layers.mlp.experts.", None, ExpertParam::Fc1Weight, None)
        );
        let k = parse_expert_key("decoder.layers.3.mlp.experts.experts.7.linear_fc1.bias_v").unwrap();
        assert_eq!((k.expert, k.param, k.half), (Some(7), ExpertParam::Fc1Bias, Some('v')));
        assert_eq!(prefix_layer(&k.prefix), Some(3));
        // Shared experts, dense MLPs and extra state are not expert tensors.
        assert!(parse_expert_key("decoder.layers.mlp.shared_experts.linear_fc1.weight").is_none());
        assert!(parse_expert_key("decoder.layers.mlp.linear_fc1.weight").is_none());
        assert!(parse_expert_key("decoder.layers.mlp.experts.experts.linear_fc1._extra_state/shard_0_1").is_none());
    }
}
