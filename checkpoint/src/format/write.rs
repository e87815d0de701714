//! Saving: one safetensors file per part, the index last, and an atomic rename into place.

use super::{check_no_overlap, io, FileRecord, GluRecord, Index, ObjectRecord, ShardRecord, FORMAT, INDEX};
use crate::sharded::interleave::GluOrder;
use crate::sharded::{build, present, shard_pieces, ExpertLayout, RankCoord, ShardedEntry};
use crate::tensor::{numel, safetensors_dtype, RawStateDict, Region};
use crate::CheckpointError;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One process's share of a save: its layout, rank and class state dict.
#[derive(Clone, Copy, Debug)]
pub struct SavePart<'a> {
    /// The layer layout.
    pub layout: &'a ExpertLayout,
    /// The rank.
    pub rank: RankCoord,
    /// The rank's class state dict.
    pub state: &'a RawStateDict,
}

/// Options of [`save`].
#[derive(Clone, Debug, Default)]
pub struct SaveOptions {
    /// Replace an existing directory.
    pub force: bool,
    /// Fault injection for tests: fail after writing this many data files, as a crash would.
    pub abort_after_files: Option<usize>,
}

/// What [`save`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaveReport {
    /// Number of data files.
    pub files: usize,
    /// Number of shards.
    pub shards: usize,
    /// Bytes of tensor data.
    pub bytes: u64,
}

/// A tensor shard ready to write: record (file name filled at write) and byte pieces.
struct Pending<'a> {
    record: ShardRecord,
    pieces: Vec<&'a [u8]>,
}

/// The safetensors name of a shard.
fn shard_name(key: &str, offset: &[usize], shape: &[usize]) -> String {
    let j = |v: &[usize]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(".");
    format!("{key}/shard_{}_{}", j(offset), j(shape))
}

/// Checks that the main replicas of every key tile its global tensor exactly once (Megatron's
/// `validate_sharding_integrity`): same shape and dtype, no overlap, full coverage.
fn check_integrity(records: &[&ShardRecord]) -> Result<(), CheckpointError> {
    let mut by_key: BTreeMap<&str, Vec<&ShardRecord>> = BTreeMap::new();
    for r in records {
        by_key.entry(&r.key).or_default().push(r);
    }
    for (key, rs) in by_key {
        let first = rs[0];
        for r in &rs {
            if r.global_shape != first.global_shape || r.dtype != first.dtype {
                return Err(CheckpointError::Mismatch {
                    key: key.into(),
                    msg: format!(
                        "shards disagree on the global tensor: {:?} {} vs {:?} {}",
                        first.global_shape, first.dtype, r.global_shape, r.dtype
                    ),
                });
            }
            if !r.region().within(&r.global_shape) {
                return Err(CheckpointError::Coverage {
                    key: key.into(),
                    region: r.region().to_string(),
                    msg: format!("lies outside the global shape {:?}", r.global_shape),
                });
            }
        }
        check_no_overlap(key, &rs.iter().map(|r| (r.region(), r.file.as_str())).collect::<Vec<_>>())?;
        let covered: usize = rs.iter().map(|r| r.region().numel()).sum();
        let total = numel(&first.global_shape);
        if covered != total {
            let full = Region { offset: vec![0; first.global_shape.len()], shape: first.global_shape.clone() };
            return Err(CheckpointError::Coverage {
                key: key.into(),
                region: full.to_string(),
                msg: format!(
                    "main replicas cover {covered} of {total} elements (a replica id that is not \
                     main for a distinct shard drops it)"
                ),
            });
        }
    }
    Ok(())
}

/// Removes a temporary directory unless disarmed.
struct TempDir(Option<PathBuf>);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// A hidden sibling path of `dir` for a temporary or backup directory.
fn sibling(dir: &Path, tag: &str) -> Result<PathBuf, CheckpointError> {
    let name = dir.file_name().ok_or_else(|| CheckpointError::NotACheckpoint {
        path: dir.to_path_buf(),
        reason: "the path has no final component".into(),
    })?;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Ok(parent.join(format!(".{}.{tag}-{}-{nanos}", name.to_string_lossy(), std::process::id())))
}

fn fsync_dir(dir: &Path) -> Result<(), CheckpointError> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(io(dir))
}

/// Writes one safetensors file: the 8-byte header length, the JSON header (space-padded to 8
/// bytes), then every tensor's bytes. Returns the file size.
fn write_safetensors(path: &Path, shards: &[Pending<'_>]) -> Result<(u64, u32), CheckpointError> {
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for s in shards {
        header.insert(
            s.record.name.clone(),
            serde_json::json!({
                "dtype": s.record.dtype,
                "shape": s.record.local_shape,
                "data_offsets": [offset, offset + s.record.nbytes],
            }),
        );
        offset += s.record.nbytes;
    }
    let mut hbytes = serde_json::to_vec(&header).expect("header serializes");
    while !hbytes.len().is_multiple_of(8) {
        hbytes.push(b' ');
    }
    let mut f = File::create(path).map_err(io(path))?;
    let total = 8 + hbytes.len() as u64 + offset;
    f.set_len(total).map_err(io(path))?;
    let len = (hbytes.len() as u64).to_le_bytes();
    let mut hc = crc32fast::Hasher::new();
    hc.update(&len);
    hc.update(&hbytes);
    f.write_all(&len).map_err(io(path))?;
    f.write_all(&hbytes).map_err(io(path))?;
    for s in shards {
        for p in &s.pieces {
            f.write_all(p).map_err(io(path))?;
        }
    }
    f.sync_all().map_err(io(path))?;
    Ok((total, hc.finalize()))
}

/// Writes a checkpoint part by part, so that a conversion holds one rank's tensors in memory at
/// a time: [`CheckpointWriter::create`] makes a hidden temporary directory beside `dir`,
/// [`CheckpointWriter::write_part`] writes one safetensors file per part with main-replica
/// shards, and [`CheckpointWriter::finish`] checks that the main replicas tile every global
/// tensor exactly once, writes `index.json` last, fsyncs and renames into place. Dropping the
/// writer (or any error) removes the temporary directory.
pub struct CheckpointWriter {
    dir: PathBuf,
    tmp: TempDir,
    tmp_path: PathBuf,
    abort_after_files: Option<usize>,
    files: Vec<FileRecord>,
    shards: Vec<ShardRecord>,
    objects: BTreeMap<String, ObjectRecord>,
    /// The GLU row order of each GLU layer's prefix (all parts of a prefix must agree).
    glu: BTreeMap<String, GluOrder>,
    bytes: u64,
    /// Set for a rank of a distributed save ([`CheckpointWriter::join`]): its files are named
    /// after it, and it owns no directory.
    rank: Option<usize>,
}

/// What one rank of a distributed save wrote into the shared staging directory
/// ([`CheckpointWriter::into_part`]), to be merged by rank 0 ([`CheckpointWriter::absorb`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartRecords {
    /// The rank's data files.
    pub files: Vec<FileRecord>,
    /// Its main-replica shards.
    pub shards: Vec<ShardRecord>,
    /// Its main-replica objects, by unique key.
    pub objects: Vec<(String, ObjectRecord)>,
    /// The GLU row order of each GLU layer it saved, by prefix (rank 0 checks that every rank
    /// agrees and records interleaved ones in the index).
    #[serde(default)]
    pub glu: Vec<(String, GluOrder)>,
}

impl PartRecords {
    /// The records as JSON bytes (to send to rank 0).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("records serialize")
    }

    /// Parses [`PartRecords::to_bytes`]; an error says what is wrong.
    pub fn from_bytes(bytes: &[u8]) -> Result<PartRecords, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("part records: {e}"))
    }
}

impl CheckpointWriter {
    /// Starts a checkpoint at `dir`; fails when `dir` exists and `opts.force` is off.
    pub fn create(dir: &Path, opts: &SaveOptions) -> Result<CheckpointWriter, CheckpointError> {
        if dir.exists() && !opts.force {
            return Err(CheckpointError::Exists { path: dir.to_path_buf() });
        }
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if !parent.is_dir() {
            return Err(CheckpointError::Io {
                path: parent.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the destination's parent directory does not exist",
                ),
            });
        }
        let tmp_path = sibling(dir, "tmp")?;
        std::fs::create_dir(&tmp_path).map_err(io(&tmp_path))?;
        Ok(CheckpointWriter {
            dir: dir.to_path_buf(),
            tmp: TempDir(Some(tmp_path.clone())),
            tmp_path,
            abort_after_files: opts.abort_after_files,
            files: Vec::new(),
            shards: Vec::new(),
            objects: BTreeMap::new(),
            glu: BTreeMap::new(),
            bytes: 0,
            rank: None,
        })
    }

    /// The hidden staging directory the checkpoint is written into before it moves into place
    /// (the ranks of a distributed save write their parts here).
    pub fn staging_path(&self) -> &Path {
        &self.tmp_path
    }

    /// A writer for rank `rank` of a distributed save into `staging` (rank 0's
    /// [`CheckpointWriter::staging_path`]): it writes its parts' files there, named after the
    /// rank, owns nothing, and hands its records to rank 0 with [`CheckpointWriter::into_part`].
    pub fn join(staging: &Path, rank: usize, opts: &SaveOptions) -> CheckpointWriter {
        CheckpointWriter {
            dir: staging.to_path_buf(),
            tmp: TempDir(None),
            tmp_path: staging.to_path_buf(),
            abort_after_files: opts.abort_after_files,
            files: Vec::new(),
            shards: Vec::new(),
            objects: BTreeMap::new(),
            glu: BTreeMap::new(),
            bytes: 0,
            rank: Some(rank),
        }
    }

    /// The records of what this rank wrote.
    pub fn into_part(mut self) -> PartRecords {
        PartRecords {
            files: std::mem::take(&mut self.files),
            shards: std::mem::take(&mut self.shards),
            objects: std::mem::take(&mut self.objects).into_iter().collect(),
            glu: std::mem::take(&mut self.glu).into_iter().collect(),
        }
    }

    /// Adds another rank's records (rank 0 of a distributed save, before
    /// [`CheckpointWriter::finish`], which checks that all parts together tile every tensor).
    pub fn absorb(&mut self, part: PartRecords) -> Result<(), CheckpointError> {
        for f in &part.files {
            if self.files.iter().any(|g| g.name == f.name) {
                return Err(CheckpointError::Overlap {
                    key: f.name.clone(),
                    a: f.name.clone(),
                    b: "a file of the same name".into(),
                });
            }
        }
        for (k, o) in part.objects {
            if self.objects.insert(k.clone(), o).is_some() {
                return Err(CheckpointError::Overlap {
                    key: k,
                    a: "a main replica".into(),
                    b: "another main replica of the same object".into(),
                });
            }
        }
        for (prefix, order) in part.glu {
            self.record_glu(&prefix, order, "ranks")?;
        }
        self.bytes += part.shards.iter().map(|s| s.nbytes).sum::<u64>();
        self.files.extend(part.files);
        self.shards.extend(part.shards);
        Ok(())
    }

    /// Records the GLU row order of the layer at `prefix`; `who` (parts, ranks) of one save that
    /// disagree on it are an error naming its fc1 key.
    fn record_glu(&mut self, prefix: &str, order: GluOrder, who: &str) -> Result<(), CheckpointError> {
        match self.glu.insert(prefix.to_string(), order) {
            Some(other) if other != order => Err(CheckpointError::Mismatch {
                key: format!("{prefix}experts.linear_fc1.weight"),
                msg: format!("{who} of one save disagree on the GLU row order: {other:?} and {order:?}"),
            }),
            _ => Ok(()),
        }
    }

    /// Writes the main-replica shards of one part (one process) into a file of its own.
    pub fn write_part(&mut self, part: SavePart<'_>) -> Result<(), CheckpointError> {
        let (entries, canon) = build(part.layout, part.rank, part.state)?;
        if let Some(order) = part.layout.glu_order() {
            self.record_glu(&part.layout.prefix, order, "parts")?;
        }
        let file = match self.rank {
            None => format!("rank{:05}.safetensors", self.files.len()),
            Some(r) => format!("rank{r:05}.part{}.safetensors", self.files.len()),
        };
        let mut pending = Vec::new();
        for entry in &entries {
            match entry {
                ShardedEntry::Tensor(st) if st.is_main_replica() => {
                    let pieces = shard_pieces(st, &canon);
                    let dtype = present(&canon[st.source.experts.start], st.source.param).dtype;
                    let nbytes: usize = pieces.iter().map(|p| p.len()).sum();
                    let mut h = crc32fast::Hasher::new();
                    for p in &pieces {
                        h.update(p);
                    }
                    let extent = st.extent();
                    pending.push(Pending {
                        record: ShardRecord {
                            key: st.key.clone(),
                            dtype: safetensors_dtype(dtype).into(),
                            global_shape: st.global_shape.clone(),
                            global_offset: st.global_offset.clone(),
                            name: shard_name(&st.key, &st.global_offset, &extent),
                            local_shape: extent,
                            file: file.clone(),
                            nbytes: nbytes as u64,
                            crc32: h.finalize(),
                        },
                        pieces,
                    });
                }
                ShardedEntry::Object(o) if o.is_main_replica() => {
                    let rec = ObjectRecord {
                        key: o.key.clone(),
                        global_shape: o.global_shape.clone(),
                        global_offset: o.global_offset.clone(),
                    };
                    if self.objects.insert(o.unique_key(), rec).is_some() {
                        return Err(CheckpointError::Overlap {
                            key: o.key.clone(),
                            a: o.unique_key(),
                            b: "another main replica of the same object".into(),
                        });
                    }
                }
                _ => {}
            }
        }
        if pending.is_empty() {
            return Ok(());
        }
        if self.abort_after_files == Some(self.files.len()) {
            return Err(CheckpointError::Injected(self.files.len()));
        }
        let (size, header_crc32) = write_safetensors(&self.tmp_path.join(&file), &pending)?;
        self.bytes += pending.iter().map(|p| p.record.nbytes).sum::<u64>();
        self.files.push(FileRecord { name: file, bytes: size, header_crc32 });
        self.shards.extend(pending.into_iter().map(|p| p.record));
        Ok(())
    }

    /// Checks integrity, writes the index and moves the checkpoint into place.
    pub fn finish(self) -> Result<SaveReport, CheckpointError> {
        self.finish_checked(|_| Ok(()))
    }

    /// As [`CheckpointWriter::finish`], but runs `check` on the complete temporary checkpoint
    /// directory before it is moved into place; an error leaves the destination untouched.
    pub fn finish_checked(
        mut self,
        check: impl FnOnce(&Path) -> Result<(), CheckpointError>,
    ) -> Result<SaveReport, CheckpointError> {
        check_integrity(&self.shards.iter().collect::<Vec<_>>())?;
        let mut shards = std::mem::take(&mut self.shards);
        shards.sort_by(|a, b| (&a.key, &a.global_offset).cmp(&(&b.key, &b.global_offset)));
        let mut objs: Vec<ObjectRecord> = std::mem::take(&mut self.objects).into_values().collect();
        objs.sort_by(|a, b| (&a.key, &a.global_offset).cmp(&(&b.key, &b.global_offset)));
        let glu_interleave = std::mem::take(&mut self.glu)
            .into_iter()
            .filter_map(|(prefix, o)| o.size.map(|size| GluRecord { prefix, tp: o.tp, size }))
            .collect();
        let index = Index {
            format: FORMAT.into(),
            version: 1,
            files: std::mem::take(&mut self.files),
            shards,
            objects: objs,
            glu_interleave,
        };
        let ipath = self.tmp_path.join(INDEX);
        let mut f = File::create(&ipath).map_err(io(&ipath))?;
        f.write_all(&serde_json::to_vec_pretty(&index).expect("index serializes")).map_err(io(&ipath))?;
        f.sync_all().map_err(io(&ipath))?;
        fsync_dir(&self.tmp_path)?;
        check(&self.tmp_path)?;
        let dir = self.dir.clone();
        let backup = if dir.exists() {
            let b = sibling(&dir, "old")?;
            std::fs::rename(&dir, &b).map_err(io(&dir))?;
            Some(b)
        } else {
            None
        };
        if let Err(e) = std::fs::rename(&self.tmp_path, &dir) {
            if let Some(b) = &backup {
                let _ = std::fs::rename(b, &dir);
            }
            return Err(CheckpointError::Io { path: dir, source: e });
        }
        self.tmp.0 = None;
        if let Some(b) = backup {
            std::fs::remove_dir_all(&b).map_err(io(&b))?;
        }
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fsync_dir(parent)?;
        }
        Ok(SaveReport { files: index.files.len(), shards: index.shards.len(), bytes: self.bytes })
    }
}

/// Saves the main-replica shards of every part into `dir`, atomically (a
/// [`CheckpointWriter`] over `parts`).
///
/// Fails, leaving nothing behind, when `dir` exists and `opts.force` is off, when two parts
/// disagree on a key's global tensor, or when the main replicas do not tile a global tensor
/// exactly.
pub fn save(dir: &Path, parts: &[SavePart<'_>], opts: &SaveOptions) -> Result<SaveReport, CheckpointError> {
    let mut w = CheckpointWriter::create(dir, opts)?;
    for p in parts {
        w.write_part(*p)?;
    }
    w.finish()
}
