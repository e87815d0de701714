//! # moe-checkpoint
//!
//! Distributed checkpoints of the expert layers, interchangeable with Megatron-Core's
//! `sharded_state_dict` layout (spec §7).
//!
//! * [`sharded`]: the ShardedTensor / ShardedObject entries Megatron-Core builds for each class,
//!   layout and rank, and the factory build/merge between a class state dict and shard data.
//! * [`format`](mod@format): the on-disk format (safetensors files + JSON index), atomic save, validated
//!   open, and load into any layout with exact-coverage checks.
//! * [`reshard`](mod@reshard): checkpoint -> checkpoint conversion to another class or parallel layout.
//! * [`tensor`]: raw dtype-byte tensors and region copies.
//! * [`torch_dist`]: Megatron `torch_dist` checkpoints (PyTorch Distributed Checkpoint) read as an
//!   [`ExpertSource`], through a restricted pickle reader that executes nothing.
//!
//! Values stay in their storage dtype's bytes on this path (save and load are byte copies);
//! [`tensor::RawTensor::to_f64`] converts where the reference needs `f64`.
//!
//! What a class's state dict holds is the reference's knowledge, used here as is: layouts are
//! built on [`moe_reference::LayerConfig`] (and validated by it), per-expert names and
//! canonical shapes come from [`moe_reference::state_dict`], GroupedMLP's `weight1`/`weight2`
//! are reinterpreted by [`moe_reference::GroupedWeight`] (on bytes here, on values there), and
//! values are encoded by [`moe_reference::codec`].

#![deny(missing_docs)]

pub mod diff;
pub mod experts;
pub mod format;
pub mod hf;
pub mod reshard;
pub mod sharded;
pub mod sources;
pub mod tensor;
pub mod torch_dist;

pub use experts::{ExpertEntry, ExpertKey, ExpertSource, ExpertValues, SourceFormat, SourceInfo};
pub use format::{save, Checkpoint, CheckpointWriter, Index, LoadPlan, PartRecords, SaveOptions, SavePart, SaveReport};
pub use reshard::{infer_models, reshard, ModelInfo, ReshardOptions, ReshardReport, ReshardTarget};
pub use sharded::{
    layout_json, layout_json_at, sharded_state_dict, ExpertLayout, RankCoord, ShardedEntry, ShardedObject,
    ShardedTensor,
};
pub use sources::{detect_format, open_source, SourceOverrides};
pub use tensor::{RawStateDict, RawTensor, Region};
pub use torch_dist::TorchDistSource;

use std::path::PathBuf;

/// Everything that can go wrong saving, opening, loading or converting a checkpoint. Each
/// variant names the file or the key (and region) at fault.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// An I/O error on a path.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The directory is not a checkpoint (no index, or an index of another format).
    #[error("{}: not a moe-verify checkpoint: {reason}", path.display())]
    NotACheckpoint {
        /// The directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The path is not a checkpoint of the format being read (Hugging Face, `torch_dist`), or of
    /// any format `diff`/`inspect`/`reshard` know.
    #[error("{}: not a {format} checkpoint: {reason}", path.display())]
    NotASource {
        /// The path.
        path: PathBuf,
        /// The format expected (`"Hugging Face"`, `"torch_dist"`, `"known"`).
        format: &'static str,
        /// Why.
        reason: String,
    },
    /// A file is truncated, malformed, or its data fails the CRC check.
    #[error("{}: corrupt: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The destination exists and overwriting was not requested.
    #[error("{} already exists; pass --force to replace it", path.display())]
    Exists {
        /// The destination.
        path: PathBuf,
    },
    /// A requested or saved region is not covered exactly once.
    #[error("key {key}: region {region}: {msg}")]
    Coverage {
        /// The key.
        key: String,
        /// The region, as `[start:end, ...]` in global coordinates.
        region: String,
        /// What is wrong.
        msg: String,
    },
    /// Two stored shards of one tensor overlap.
    #[error("key {key}: overlapping shards {a} and {b}")]
    Overlap {
        /// The key.
        key: String,
        /// The first shard (region and file).
        a: String,
        /// The second shard.
        b: String,
    },
    /// Global shape or dtype differ between the checkpoint and the request (or within one).
    #[error("key {key}: {msg}")]
    Mismatch {
        /// The key.
        key: String,
        /// What differs.
        msg: String,
    },
    /// An invalid layout (sizes, class rules).
    #[error("invalid layout: {0}")]
    Layout(String),
    /// A class state dict that does not match its layout.
    #[error("state dict entry {key}: {msg}")]
    State {
        /// The state-dict name.
        key: String,
        /// What is wrong.
        msg: String,
    },
    /// A value that cannot be stored exactly.
    #[error("tensor {key}: {msg}")]
    Value {
        /// The tensor.
        key: String,
        /// What is wrong.
        msg: String,
    },
    /// The written checkpoint does not reproduce the source (verify-after-write).
    #[error("verification failed for key {key}: {msg}")]
    VerifyFailed {
        /// The key.
        key: String,
        /// What differs.
        msg: String,
    },
    /// A save stopped by [`SaveOptions::abort_after_files`] (tests simulate a crash with it).
    #[error("save aborted (fault injection) after {0} data files")]
    Injected(usize),
}

impl CheckpointError {
    /// True when the error means a check failed (the CLI's exit code 1) rather than bad input
    /// or usage (exit code 2).
    pub fn is_check_failure(&self) -> bool {
        matches!(self, CheckpointError::VerifyFailed { .. })
    }
}
