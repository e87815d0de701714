//! The on-disk format: a directory with one safetensors file per saving rank and a JSON index
//! of every shard.
//!
//! ```text
//! DIR/
//!   index.json            {"format": "moe-verify-checkpoint", "version": 1,
//!                          "files": [{"name", "bytes", "header_crc32"}],
//!                          "shards": [{"key", "dtype", "global_shape", "global_offset",
//!                                      "local_shape", "file", "name", "nbytes", "crc32"}],
//!                          "objects": [{"key", "global_shape", "global_offset"}],
//!                          "glu_interleave": [{"prefix", "tp", "size"}]}   (only when interleaved)
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
//!
//! Submodules: `write` ([`CheckpointWriter`], [`save`]: integrity check, atomic rename),
//! `read` ([`Checkpoint::open`] with validation, loading into any layout through
//! [`Checkpoint::plan`] and [`Checkpoint::execute`] with exact-coverage checks) and `keys`
//! ([`parse_key`], [`to_logical`]: the logical key space in which singleton and non-singleton
//! checkpoints hold the same tensors).

mod keys;
mod read;
mod write;

pub use keys::{parse_key, to_logical, KeyParts};
pub use read::{Checkpoint, LoadPlan, ShardCache};
pub use write::{save, CheckpointWriter, PartRecords, SaveOptions, SavePart, SaveReport};

use super::tensor::Region;
use super::CheckpointError;
use serde::{Deserialize, Serialize};
use std::path::Path;

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

/// The GLU fc1 row order an expert layer was saved in, when it is interleaved (Megatron HEAD's
/// `moe_mlp_glu_interleave_size`, spec §7.9): the stored `_w`/`_v` halves then depend on the
/// expert-TP size and interleave size ([`crate::sharded::interleave`]). Absent: the halves
/// `[gate; linear]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GluRecord {
    /// The expert layer's key prefix `P`.
    pub prefix: String,
    /// Expert-tensor-parallel size of the saving layout.
    pub tp: usize,
    /// `moe_mlp_glu_interleave_size` of the saving layout.
    pub size: usize,
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
    /// The expert layers saved GLU-interleaved, by prefix (omitted when none is).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub glu_interleave: Vec<GluRecord>,
}

/// Maps an I/O error on `path` to [`CheckpointError::Io`].
pub(super) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_path_buf(), source }
}

/// Checks that the `regions` of `key` (each with the file it is stored in) do not overlap.
pub(super) fn check_no_overlap(key: &str, regions: &[(Region, &str)]) -> Result<(), CheckpointError> {
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
