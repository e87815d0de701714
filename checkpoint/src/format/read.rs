//! Opening a checkpoint (every file, header and shard record validated) and loading it into
//! any layout: a plan that proves exact coverage, then one CRC-checked read per needed shard.

use super::keys::{object_id, parse_key, to_logical, KeyParts};
use super::{check_no_overlap, io, Index, ShardRecord, FORMAT, INDEX};
use crate::sharded::interleave::{check_compatible, GluOrder};
use crate::sharded::{merge, sharded_state_dict, ExpertLayout, RankCoord, ShardedEntry, ShardedTensor};
use crate::tensor::{copy_region, numel, parse_safetensors_dtype, RawStateDict, RawTensor, Region};
use crate::CheckpointError;
use moe_reference::Dtype;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Where a tensor lives inside an opened safetensors file.
#[derive(Clone, Debug)]
struct Located {
    /// Absolute byte offset of the data in the file.
    start: u64,
    nbytes: u64,
}

/// The last shard read by [`Checkpoint::load_logical_region`] and the open files.
#[derive(Debug, Default)]
pub struct ShardCache {
    shard: Option<usize>,
    bytes: Vec<u8>,
    files: HashMap<String, File>,
}

/// An opened, validated checkpoint directory.
#[derive(Debug)]
pub struct Checkpoint {
    /// The directory.
    pub dir: PathBuf,
    /// Its index.
    pub index: Index,
    /// Location of each shard (parallel to `index.shards`).
    located: Vec<Located>,
    /// Logical view of each shard (parallel to `index.shards`).
    logical: Vec<(String, Region)>,
    /// Logical key -> (logical global shape, shard indices).
    by_logical: BTreeMap<String, (Vec<usize>, Vec<usize>)>,
    /// Logical ids of the stored objects.
    object_ids: BTreeSet<(String, usize)>,
}

/// One tensor to load: the request's ShardedTensor and its box in logical space.
#[derive(Clone, Debug)]
struct Request {
    part: usize,
    st: ShardedTensor,
    lkey: String,
    lregion: Region,
    elem: usize,
}

/// A checked load: every requested region is covered exactly once by stored shards.
#[derive(Debug)]
pub struct LoadPlan {
    parts: Vec<(ExpertLayout, RankCoord)>,
    dtype: Dtype,
    requests: Vec<Request>,
    /// For each stored shard: (request, intersection in logical space).
    per_shard: Vec<Vec<(usize, Region)>>,
    /// Bytes to read from disk.
    pub read_bytes: u64,
    /// Bytes of the loaded tensors.
    pub load_bytes: u64,
}

impl Checkpoint {
    /// Opens and validates `dir`: the index parses, every file exists with the recorded size
    /// and a well-formed safetensors header listing its shards, and the shards of each key agree
    /// on shape and dtype and do not overlap.
    pub fn open(dir: &Path) -> Result<Checkpoint, CheckpointError> {
        let not = |reason: String| CheckpointError::NotACheckpoint { path: dir.to_path_buf(), reason };
        if !dir.is_dir() {
            return Err(not("not a directory".into()));
        }
        let ipath = dir.join(INDEX);
        if !ipath.is_file() {
            return Err(not(format!("no {INDEX}")));
        }
        let text = std::fs::read(&ipath).map_err(io(&ipath))?;
        let index: Index = serde_json::from_slice(&text)
            .map_err(|e| not(format!("{} does not parse as a checkpoint index: {e}", ipath.display())))?;
        if index.format != FORMAT || index.version != 1 {
            return Err(not(format!(
                "{} has format {:?} version {}, expected {FORMAT:?} version 1",
                ipath.display(),
                index.format,
                index.version
            )));
        }
        let mut glu_prefixes = BTreeSet::new();
        for g in &index.glu_interleave {
            if g.tp == 0 || g.size == 0 || !glu_prefixes.insert(g.prefix.as_str()) {
                return Err(CheckpointError::Corrupt {
                    path: ipath.clone(),
                    reason: format!("glu_interleave record {g:?}: tp and size must be positive, one record per prefix"),
                });
            }
        }
        let mut headers: HashMap<String, (u64, serde_json::Map<String, serde_json::Value>)> = HashMap::new();
        for f in &index.files {
            if f.name.contains('/') || f.name.contains("..") {
                return Err(CheckpointError::Corrupt {
                    path: ipath.clone(),
                    reason: format!("bad file name {:?}", f.name),
                });
            }
            let path = dir.join(&f.name);
            let (start, header) = read_header(&path, f.bytes, f.header_crc32)?;
            headers.insert(f.name.clone(), (start, header));
        }
        let mut located = Vec::with_capacity(index.shards.len());
        for s in &index.shards {
            let path = dir.join(&s.file);
            let corrupt = |reason: String| CheckpointError::Corrupt { path: path.clone(), reason };
            let (start, header) = headers
                .get(&s.file)
                .ok_or_else(|| corrupt(format!("shard {} of key {} names a file not in the index", s.name, s.key)))?;
            let dtype = parse_safetensors_dtype(&s.dtype)
                .ok_or_else(|| corrupt(format!("key {}: unsupported dtype {}", s.key, s.dtype)))?;
            let info =
                header.get(&s.name).ok_or_else(|| corrupt(format!("missing tensor {} (key {})", s.name, s.key)))?;
            let hd = info.get("dtype").and_then(|v| v.as_str()).unwrap_or("");
            let hs: Option<Vec<usize>> = info.get("shape").and_then(|v| serde_json::from_value(v.clone()).ok());
            let ho: Option<[u64; 2]> = info.get("data_offsets").and_then(|v| serde_json::from_value(v.clone()).ok());
            let expect = numel(&s.local_shape) as u64 * dtype.size_bytes() as u64;
            match (hs, ho) {
                (Some(shape), Some([a, b]))
                    if hd == s.dtype && shape == s.local_shape && b >= a && b - a == expect && s.nbytes == expect =>
                {
                    located.push(Located { start: start + a, nbytes: b - a });
                }
                _ => {
                    return Err(corrupt(format!(
                        "tensor {} (key {}) header {info} does not match the index ({} {:?}, {} bytes)",
                        s.name, s.key, s.dtype, s.local_shape, expect
                    )))
                }
            }
            if s.global_shape.len() != s.global_offset.len() || !s.region().within(&s.global_shape) {
                return Err(CheckpointError::Coverage {
                    key: s.key.clone(),
                    region: s.region().to_string(),
                    msg: format!("lies outside the global shape {:?} ({})", s.global_shape, s.file),
                });
            }
        }
        // Per original key: one global shape and dtype.
        let mut per_key: BTreeMap<&str, &ShardRecord> = BTreeMap::new();
        for s in &index.shards {
            if let Some(first) = per_key.insert(&s.key, s) {
                if first.global_shape != s.global_shape || first.dtype != s.dtype {
                    return Err(CheckpointError::Mismatch {
                        key: s.key.clone(),
                        msg: format!(
                            "shards disagree: {:?} {} ({}) vs {:?} {} ({})",
                            first.global_shape, first.dtype, first.file, s.global_shape, s.dtype, s.file
                        ),
                    });
                }
            }
        }
        // Number of experts behind singleton keys, per logical key.
        let mut singleton_e: HashMap<String, usize> = HashMap::new();
        for s in &index.shards {
            if let Some(KeyParts { expert: Some(g), .. }) = parse_key(&s.key) {
                let (lk, _, _) = to_logical(&s.key, &s.region(), &s.global_shape, 1);
                let e = singleton_e.entry(lk).or_insert(0);
                *e = (*e).max(g + 1);
            }
        }
        let mut logical = Vec::with_capacity(index.shards.len());
        let mut by_logical: BTreeMap<String, (Vec<usize>, Vec<usize>)> = BTreeMap::new();
        for (i, s) in index.shards.iter().enumerate() {
            let (lk0, _, _) = to_logical(&s.key, &s.region(), &s.global_shape, 1);
            let e = singleton_e.get(&lk0).copied().unwrap_or(1);
            let (lk, lr, lg) = to_logical(&s.key, &s.region(), &s.global_shape, e);
            let entry = by_logical.entry(lk.clone()).or_insert_with(|| (lg.clone(), Vec::new()));
            if entry.0 != lg {
                return Err(CheckpointError::Mismatch {
                    key: s.key.clone(),
                    msg: format!("global shape {:?} conflicts with {:?} of the same tensor {lk}", lg, entry.0),
                });
            }
            entry.1.push(i);
            logical.push((lk, lr));
        }
        for (lk, (_, idx)) in &by_logical {
            let regions: Vec<(Region, &str)> =
                idx.iter().map(|&i| (logical[i].1.clone(), index.shards[i].file.as_str())).collect();
            check_no_overlap(lk, &regions)?;
        }
        let object_ids = index.objects.iter().map(|o| object_id(&o.key, &o.global_offset)).collect();
        Ok(Checkpoint { dir: dir.to_path_buf(), index, located, logical, by_logical, object_ids })
    }

    /// The GLU fc1 row order the expert layer under `prefix` was saved in: its
    /// [`super::GluRecord`], or the plain halves when it has none.
    pub fn glu_order(&self, prefix: &str) -> GluOrder {
        self.index
            .glu_interleave
            .iter()
            .find(|g| g.prefix == prefix)
            .map_or(GluOrder::HALVES, |g| GluOrder { tp: g.tp, size: Some(g.size) })
    }

    /// Checks that `parts` can be loaded: every requested tensor region is covered exactly
    /// once with the requested global shape and dtype (`None`: the checkpoint's dtype), and
    /// every requested object exists. Reads no tensor data.
    pub fn plan(&self, parts: &[(ExpertLayout, RankCoord)], dtype: Option<Dtype>) -> Result<LoadPlan, CheckpointError> {
        let mut requests = Vec::new();
        let mut ckpt_dtype: Option<Dtype> = None;
        for (pi, (layout, rank)) in parts.iter().enumerate() {
            layout.require_no_outer_offsets("load")?;
            // A GLU-interleaved save's `_w`/`_v` halves mean the same units only in a layout
            // that orders fc1 rows the same way (spec §7.9).
            if let Some(load) = layout.glu_order() {
                check_compatible(
                    &format!("{}experts.linear_fc1.weight", layout.prefix),
                    layout.config.ffn_hidden_size,
                    self.glu_order(&layout.prefix),
                    load,
                )?;
            }
            for entry in sharded_state_dict(layout, *rank)? {
                match entry {
                    ShardedEntry::Tensor(st) => {
                        let region = Region { offset: st.global_offset.clone(), shape: st.extent() };
                        let (lkey, lregion, lglobal) =
                            to_logical(&st.key, &region, &st.global_shape, layout.config.num_experts);
                        let Some((stored_global, idx)) = self.by_logical.get(&lkey) else {
                            return Err(CheckpointError::Coverage {
                                key: st.key.clone(),
                                region: region.to_string(),
                                msg: format!("no shard of this tensor in {}", self.dir.display()),
                            });
                        };
                        if *stored_global != lglobal {
                            return Err(CheckpointError::Mismatch {
                                key: st.key.clone(),
                                msg: format!(
                                    "requested global shape {:?} (as {lkey} {:?}), checkpoint has {:?}",
                                    st.global_shape, lglobal, stored_global
                                ),
                            });
                        }
                        let stored_dtype =
                            parse_safetensors_dtype(&self.index.shards[idx[0]].dtype).expect("validated at open");
                        let want = dtype.or(ckpt_dtype).unwrap_or(stored_dtype);
                        if stored_dtype != want {
                            return Err(CheckpointError::Mismatch {
                                key: st.key.clone(),
                                msg: format!("requested dtype {want}, checkpoint has {stored_dtype}"),
                            });
                        }
                        ckpt_dtype = Some(want);
                        requests.push(Request { part: pi, st, lkey, lregion, elem: want.size_bytes() });
                    }
                    ShardedEntry::Object(o) => {
                        if !self.object_ids.contains(&object_id(&o.key, &o.global_offset)) {
                            return Err(CheckpointError::Coverage {
                                key: o.key.clone(),
                                region: format!("{:?}", o.global_offset),
                                msg: "missing ShardedObject".into(),
                            });
                        }
                    }
                }
            }
        }
        let mut per_shard: Vec<Vec<(usize, Region)>> = vec![Vec::new(); self.index.shards.len()];
        let mut load_bytes = 0u64;
        for (ri, r) in requests.iter().enumerate() {
            let (_, idx) = &self.by_logical[&r.lkey];
            let mut covered = 0usize;
            for &si in idx {
                if let Some(x) = self.logical[si].1.intersect(&r.lregion) {
                    covered += x.numel();
                    per_shard[si].push((ri, x));
                }
            }
            let total = r.lregion.numel();
            if covered != total {
                return Err(CheckpointError::Coverage {
                    key: r.st.key.clone(),
                    region: Region { offset: r.st.global_offset.clone(), shape: r.st.extent() }.to_string(),
                    msg: format!("stored shards cover {covered} of {total} elements (missing shard)"),
                });
            }
            load_bytes += (total * r.elem) as u64;
        }
        let read_bytes =
            per_shard.iter().enumerate().filter(|(_, v)| !v.is_empty()).map(|(i, _)| self.located[i].nbytes).sum();
        let dtype = ckpt_dtype.or(dtype).unwrap_or(Dtype::Bf16);
        Ok(LoadPlan { parts: parts.to_vec(), dtype, requests, per_shard, read_bytes, load_bytes })
    }

    /// Reads shard `i` into `buf` (exactly its bytes) and checks its CRC.
    fn read_shard(&self, files: &mut HashMap<String, File>, i: usize, buf: &mut [u8]) -> Result<(), CheckpointError> {
        let s = &self.index.shards[i];
        let path = self.dir.join(&s.file);
        if !files.contains_key(&s.file) {
            files.insert(s.file.clone(), File::open(&path).map_err(io(&path))?);
        }
        let f = &files[&s.file];
        f.read_exact_at(buf, self.located[i].start).map_err(io(&path))?;
        let crc = crc32fast::hash(buf);
        if crc != s.crc32 {
            return Err(CheckpointError::Corrupt {
                path,
                reason: format!("tensor {} (key {}): CRC-32 {crc:08x}, index says {:08x}", s.name, s.key, s.crc32),
            });
        }
        Ok(())
    }

    /// Executes a plan: reads each needed shard once, verifies its CRC and scatters it into the
    /// requested tensors, then merges them into each part's class state dict.
    pub fn execute(&self, plan: LoadPlan) -> Result<Vec<RawStateDict>, CheckpointError> {
        let mut bufs: Vec<Vec<u8>> = plan.requests.iter().map(|r| vec![0u8; r.lregion.numel() * r.elem]).collect();
        let mut files = HashMap::new();
        let mut order: Vec<usize> = (0..plan.per_shard.len()).filter(|&i| !plan.per_shard[i].is_empty()).collect();
        order.sort_by_key(|&i| (&self.index.shards[i].file, self.located[i].start));
        let mut scratch = Vec::new();
        for si in order {
            let targets = &plan.per_shard[si];
            let stored = &self.logical[si].1;
            let (ri, x) = &targets[0];
            if targets.len() == 1 && x == stored && *x == plan.requests[*ri].lregion {
                // Same box on both sides: read straight into the destination.
                self.read_shard(&mut files, si, &mut bufs[*ri])?;
                continue;
            }
            scratch.resize(self.located[si].nbytes as usize, 0);
            self.read_shard(&mut files, si, &mut scratch)?;
            for (ri, x) in targets {
                let r = &plan.requests[*ri];
                copy_region(&scratch, stored, &mut bufs[*ri], &r.lregion, x, r.elem);
            }
        }
        let mut per_part: Vec<Vec<(ShardedTensor, Vec<u8>)>> = vec![Vec::new(); plan.parts.len()];
        for (r, b) in plan.requests.into_iter().zip(bufs) {
            per_part[r.part].push((r.st, b));
        }
        plan.parts
            .iter()
            .zip(per_part)
            .map(|((layout, rank), loaded)| merge(layout, *rank, plan.dtype, loaded))
            .collect()
    }

    /// Loads the class state dict of every part ([`Checkpoint::plan`] then
    /// [`Checkpoint::execute`]).
    pub fn load(
        &self,
        parts: &[(ExpertLayout, RankCoord)],
        dtype: Option<Dtype>,
    ) -> Result<Vec<RawStateDict>, CheckpointError> {
        let plan = self.plan(parts, dtype)?;
        self.execute(plan)
    }

    /// The plain global tensors, by checkpoint key (`logical`: by logical key, so that singleton
    /// and non-singleton checkpoints compare). Fails when a tensor is not fully covered.
    pub fn load_global(&self, logical: bool) -> Result<BTreeMap<String, RawTensor>, CheckpointError> {
        let mut files = HashMap::new();
        if logical {
            return self
                .by_logical
                .iter()
                .map(|(k, (shape, idx))| Ok((k.clone(), self.assemble(&mut files, k, shape, idx, true)?)))
                .collect();
        }
        let mut groups: BTreeMap<String, (Vec<usize>, Vec<usize>)> = BTreeMap::new();
        for (i, s) in self.index.shards.iter().enumerate() {
            groups.entry(s.key.clone()).or_insert_with(|| (s.global_shape.clone(), Vec::new())).1.push(i);
        }
        groups
            .iter()
            .map(|(k, (shape, idx))| Ok((k.clone(), self.assemble(&mut files, k, shape, idx, false)?)))
            .collect()
    }

    /// One logical global tensor (see [`Checkpoint::logical_tensors`]).
    pub fn load_logical(&self, key: &str) -> Result<RawTensor, CheckpointError> {
        let (shape, idx) = self.by_logical.get(key).ok_or_else(|| CheckpointError::Coverage {
            key: key.into(),
            region: "[]".into(),
            msg: format!("no such tensor in {}", self.dir.display()),
        })?;
        self.assemble(&mut HashMap::new(), key, shape, idx, true)
    }

    /// True when the stored shards of logical tensor `key` cover `region` completely (shards
    /// never overlap, checked at open, so covered elements add up).
    pub fn logical_covers(&self, key: &str, region: &Region) -> bool {
        let Some((_, idx)) = self.by_logical.get(key) else { return false };
        let covered: usize = idx.iter().filter_map(|&i| self.logical[i].1.intersect(region)).map(|x| x.numel()).sum();
        covered == region.numel()
    }

    /// The box `region` (logical coordinates) of logical tensor `key`, read from the shards it
    /// intersects (each read whole, CRC-checked). `cache` keeps the last shard read, so that
    /// reading one expert after another out of a stacked shard reads that shard once.
    pub fn load_logical_region(
        &self,
        key: &str,
        region: &Region,
        cache: &mut ShardCache,
    ) -> Result<RawTensor, CheckpointError> {
        let (shape, idx) = self.by_logical.get(key).ok_or_else(|| CheckpointError::Coverage {
            key: key.into(),
            region: region.to_string(),
            msg: format!("no such tensor in {}", self.dir.display()),
        })?;
        if !region.within(shape) {
            return Err(CheckpointError::Coverage {
                key: key.into(),
                region: region.to_string(),
                msg: format!("outside the global shape {shape:?}"),
            });
        }
        let dtype = parse_safetensors_dtype(&self.index.shards[idx[0]].dtype).expect("validated at open");
        let mut t = RawTensor::zeros(dtype, region.shape.clone());
        let mut covered = 0;
        for &i in idx {
            let Some(x) = self.logical[i].1.intersect(region) else { continue };
            if cache.shard != Some(i) {
                cache.shard = None;
                cache.bytes.resize(self.located[i].nbytes as usize, 0);
                self.read_shard(&mut cache.files, i, &mut cache.bytes)?;
                cache.shard = Some(i);
            }
            copy_region(&cache.bytes, &self.logical[i].1, &mut t.data, region, &x, dtype.size_bytes());
            covered += x.numel();
        }
        if covered != region.numel() {
            return Err(CheckpointError::Coverage {
                key: key.into(),
                region: region.to_string(),
                msg: format!("stored shards cover {covered} of {} elements", region.numel()),
            });
        }
        Ok(t)
    }

    fn assemble(
        &self,
        files: &mut HashMap<String, File>,
        key: &str,
        shape: &[usize],
        idx: &[usize],
        logical: bool,
    ) -> Result<RawTensor, CheckpointError> {
        let dtype = parse_safetensors_dtype(&self.index.shards[idx[0]].dtype).expect("validated at open");
        let mut t = RawTensor::zeros(dtype, shape.to_vec());
        let full = Region { offset: vec![0; shape.len()], shape: shape.to_vec() };
        let mut covered = 0;
        for &i in idx {
            let region = if logical { self.logical[i].1.clone() } else { self.index.shards[i].region() };
            let mut buf = vec![0u8; self.located[i].nbytes as usize];
            self.read_shard(files, i, &mut buf)?;
            copy_region(&buf, &region, &mut t.data, &full, &region, dtype.size_bytes());
            covered += region.numel();
        }
        if covered != full.numel() {
            return Err(CheckpointError::Coverage {
                key: key.into(),
                region: full.to_string(),
                msg: format!("stored shards cover {covered} of {} elements", full.numel()),
            });
        }
        Ok(t)
    }

    /// Reads every shard and checks its CRC; returns the bytes read.
    pub fn verify(&self) -> Result<u64, CheckpointError> {
        let mut files = HashMap::new();
        let mut total = 0;
        let mut buf = Vec::new();
        for i in 0..self.index.shards.len() {
            buf.resize(self.located[i].nbytes as usize, 0);
            self.read_shard(&mut files, i, &mut buf)?;
            total += self.located[i].nbytes;
        }
        Ok(total)
    }

    /// The logical tensors (key, global shape, dtype) of the checkpoint.
    pub fn logical_tensors(&self) -> Vec<(String, Vec<usize>, Dtype)> {
        self.by_logical
            .iter()
            .map(|(k, (shape, idx))| {
                let d = parse_safetensors_dtype(&self.index.shards[idx[0]].dtype).expect("validated at open");
                (k.clone(), shape.clone(), d)
            })
            .collect()
    }
}

/// Reads and checks a safetensors header; returns the data start and the header map.
fn read_header(
    path: &Path,
    expected_size: u64,
    expected_crc: u32,
) -> Result<(u64, serde_json::Map<String, serde_json::Value>), CheckpointError> {
    let corrupt = |reason: String| CheckpointError::Corrupt { path: path.to_path_buf(), reason };
    let f = File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => corrupt("listed in the index but missing".into()),
        _ => CheckpointError::Io { path: path.to_path_buf(), source: e },
    })?;
    let size = f.metadata().map_err(io(path))?.len();
    if size != expected_size {
        return Err(corrupt(format!("{size} bytes, the index records {expected_size} (truncated or replaced)")));
    }
    let mut n = [0u8; 8];
    f.read_exact_at(&mut n, 0).map_err(|_| corrupt("shorter than a safetensors header".into()))?;
    let n = u64::from_le_bytes(n);
    if n > 100_000_000 || 8 + n > size {
        return Err(corrupt(format!("safetensors header length {n} does not fit the {size}-byte file")));
    }
    let mut h = vec![0u8; n as usize];
    f.read_exact_at(&mut h, 8).map_err(io(path))?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&h).map_err(|e| corrupt(format!("safetensors header does not parse: {e}")))?;
    let mut hc = crc32fast::Hasher::new();
    hc.update(&n.to_le_bytes());
    hc.update(&h);
    let crc = hc.finalize();
    if crc != expected_crc {
        return Err(corrupt(format!("header CRC-32 {crc:08x}, the index records {expected_crc:08x}")));
    }
    let mut end = 0u64;
    for (name, info) in &header {
        if name == "__metadata__" {
            continue;
        }
        if let Some([_, b]) = info.get("data_offsets").and_then(|v| serde_json::from_value::<[u64; 2]>(v.clone()).ok())
        {
            end = end.max(b);
        }
    }
    if 8 + n + end != size {
        return Err(corrupt(format!("safetensors data ends at byte {} but the file has {size} bytes", 8 + n + end)));
    }
    Ok((8 + n, header))
}
