//! The on-disk format: a directory with one safetensors file per saving rank and a JSON index
//! of every shard.
//!
//! ```text
//! DIR/
//!   index.json            {"format": "moe-verify-checkpoint", "version": 1,
//!                          "files": [{"name", "bytes", "header_crc32"}],
//!                          "shards": [{"key", "dtype", "global_shape", "global_offset",
//!                                      "local_shape", "file", "name", "nbytes", "crc32"}],
//!                          "objects": [{"key", "global_shape", "global_offset"}]}
//!   rank00000.safetensors  one tensor per shard, named "{key}/shard_{offset}_{shape}"
//! ```
//!
//! `local_shape` in the index and the safetensors shape are the shard's extent in the global
//! index space (prepended axes included as 1s), so a shard is a box of the global tensor.
//! Only main replicas (replica id `(0, 0, 0)`) are written. `crc32` is the CRC-32 (IEEE) of
//! the shard's bytes, checked on every read.
//!
//! Saving is atomic: everything is written into a hidden temporary directory beside the
//! target, fsynced, and renamed into place; `index.json` is written last, so an interrupted
//! save never leaves a directory that opens as a checkpoint.

use super::sharded::{build, merge, shard_pieces, sharded_state_dict, ExpertLayout, RankCoord};
use super::sharded::{present, ShardedEntry, ShardedTensor};
use super::tensor::{copy_region, numel, parse_safetensors_dtype, safetensors_dtype};
use super::tensor::{RawStateDict, RawTensor, Region};
use super::CheckpointError;
use moe_reference::Dtype;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The `format` field of `index.json`.
pub const FORMAT: &str = "moe-verify-checkpoint";
/// The index file name.
pub const INDEX: &str = "index.json";

/// One shard in the index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    /// Checkpoint key.
    pub key: String,
    /// safetensors dtype name (`BF16`, `F16`, `F32`).
    pub dtype: String,
    /// Global shape of the key's tensor.
    pub global_shape: Vec<usize>,
    /// The shard's global offset.
    pub global_offset: Vec<usize>,
    /// The shard's extent (same number of axes as the global shape).
    pub local_shape: Vec<usize>,
    /// The safetensors file (relative to the checkpoint directory).
    pub file: String,
    /// The tensor's name inside that file.
    pub name: String,
    /// Byte length.
    pub nbytes: u64,
    /// CRC-32 (IEEE) of the bytes.
    pub crc32: u32,
}

impl ShardRecord {
    /// The shard's box in the global index space.
    pub fn region(&self) -> Region {
        Region { offset: self.global_offset.clone(), shape: self.local_shape.clone() }
    }
}

/// One ShardedObject in the index (`_extra_state`; its value is `None` for these layers).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRecord {
    /// Checkpoint key.
    pub key: String,
    /// Global shape.
    pub global_shape: Vec<usize>,
    /// Global offset.
    pub global_offset: Vec<usize>,
}

/// One file in the index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// File name.
    pub name: String,
    /// Size in bytes.
    pub bytes: u64,
    /// CRC-32 of the first `8 + header length` bytes (length prefix and JSON header), so that
    /// no byte of a file goes unchecked.
    pub header_crc32: u32,
}

/// `index.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    /// Always [`FORMAT`].
    pub format: String,
    /// Format version (1).
    pub version: u32,
    /// Every data file.
    pub files: Vec<FileRecord>,
    /// Every shard, sorted by key then offset.
    pub shards: Vec<ShardRecord>,
    /// Every ShardedObject, sorted by key then offset.
    pub objects: Vec<ObjectRecord>,
}

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

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_path_buf(), source }
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

fn check_no_overlap(key: &str, regions: &[(Region, &str)]) -> Result<(), CheckpointError> {
    let mut sorted: Vec<&(Region, &str)> = regions.iter().collect();
    sorted.sort_by(|a, b| a.0.offset.cmp(&b.0.offset));
    // Sweep along axis 0: once a later box starts past this one's end on axis 0, no later box
    // can meet it (sorted lexicographically, so axis-0 starts are non-decreasing).
    for (i, a) in sorted.iter().enumerate() {
        let end0 = a.0.offset.first().map(|o| o + a.0.shape[0]);
        for b in &sorted[i + 1..] {
            if let (Some(e), Some(&b0)) = (end0, b.0.offset.first()) {
                if b0 >= e {
                    break;
                }
            }
            if a.0.intersect(&b.0).is_some() {
                return Err(CheckpointError::Overlap {
                    key: key.into(),
                    a: format!("{} in {}", a.0, a.1),
                    b: format!("{} in {}", b.0, b.1),
                });
            }
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
    bytes: u64,
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
            bytes: 0,
        })
    }

    /// Writes the main-replica shards of one part (one process) into a file of its own.
    pub fn write_part(&mut self, part: SavePart<'_>) -> Result<(), CheckpointError> {
        let (entries, canon) = build(part.layout, part.rank, part.state)?;
        let file = format!("rank{:05}.safetensors", self.files.len());
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
        let index =
            Index { format: FORMAT.into(), version: 1, files: std::mem::take(&mut self.files), shards, objects: objs };
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

/// Where a tensor lives inside an opened safetensors file.
#[derive(Clone, Debug)]
struct Located {
    /// Absolute byte offset of the data in the file.
    start: u64,
    nbytes: u64,
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

/// A parsed expert key: `P experts.[{g}.]linear_fcX.NAME`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyParts {
    /// The prefix `P`.
    pub prefix: String,
    /// The global expert of a singleton key.
    pub expert: Option<usize>,
    /// `linear_fc1` or `linear_fc2`.
    pub module: String,
    /// `weight`, `weight_w`, `weight_v`, `bias`, `bias_w`, `bias_v` or `_extra_state`.
    pub name: String,
}

/// Parses an expert checkpoint key; `None` for other keys.
pub fn parse_key(key: &str) -> Option<KeyParts> {
    let (head, name) = key.rsplit_once('.')?;
    let (head, module) = head.rsplit_once('.')?;
    if module != "linear_fc1" && module != "linear_fc2" {
        return None;
    }
    let prefix_of = |h: &str| -> Option<String> {
        if h == "experts" {
            Some(String::new())
        } else {
            h.strip_suffix(".experts").map(|p| format!("{p}."))
        }
    };
    if let Some(prefix) = prefix_of(head) {
        return Some(KeyParts { prefix, expert: None, module: module.into(), name: name.into() });
    }
    let (h2, g) = head.rsplit_once('.')?;
    let g: usize = g.parse().ok()?;
    let prefix = prefix_of(h2)?;
    Some(KeyParts { prefix, expert: Some(g), module: module.into(), name: name.into() })
}

/// Maps a shard of `key` (box `region` of a tensor of `global_shape`) to the logical,
/// non-singleton key space `P experts.linear_fcX.{weight,bias}` with shape `[E, …]`, in which
/// singleton and non-singleton checkpoints describe the same tensors. `num_experts` is `E`
/// (needed for singleton keys). Keys that are not expert keys map to themselves.
pub fn to_logical(
    key: &str,
    region: &Region,
    global_shape: &[usize],
    num_experts: usize,
) -> (String, Region, Vec<usize>) {
    let Some(k) = parse_key(key) else {
        return (key.into(), region.clone(), global_shape.to_vec());
    };
    let Some(g) = k.expert else {
        return (key.into(), region.clone(), global_shape.to_vec());
    };
    let (base, row_shift, rows_mult) = match k.name.as_str() {
        "weight" | "bias" => (k.name.clone(), 0, 1),
        "weight_w" | "bias_w" => (k.name[..k.name.len() - 2].to_string(), 0, 2),
        "weight_v" | "bias_v" => (k.name[..k.name.len() - 2].to_string(), global_shape[0], 2),
        _ => return (key.into(), region.clone(), global_shape.to_vec()),
    };
    let lkey = format!("{}experts.{}.{}", k.prefix, k.module, base);
    let mut offset = vec![g];
    offset.extend(&region.offset);
    offset[1] += row_shift;
    let mut shape = vec![1];
    shape.extend(&region.shape);
    let mut gshape = vec![num_experts];
    gshape.extend(global_shape);
    gshape[1] *= rows_mult;
    (lkey, Region { offset, shape }, gshape)
}

/// The logical id of an object: (non-singleton key, global expert).
fn object_id(key: &str, offset: &[usize]) -> (String, usize) {
    match parse_key(key) {
        Some(KeyParts { prefix, expert: Some(g), module, name }) => (format!("{prefix}experts.{module}.{name}"), g),
        _ => (key.into(), offset.first().copied().unwrap_or(0)),
    }
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

    /// Checks that `parts` can be loaded: every requested tensor region is covered exactly
    /// once with the requested global shape and dtype (`None`: the checkpoint's dtype), and
    /// every requested object exists. Reads no tensor data.
    pub fn plan(&self, parts: &[(ExpertLayout, RankCoord)], dtype: Option<Dtype>) -> Result<LoadPlan, CheckpointError> {
        let mut requests = Vec::new();
        let mut ckpt_dtype: Option<Dtype> = None;
        for (pi, (layout, rank)) in parts.iter().enumerate() {
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
