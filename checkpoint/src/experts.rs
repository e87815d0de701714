//! A checkpoint seen as a set of expert tensors, whatever its format.
//!
//! `diff`, `inspect` and `reshard` work on any source that can list its expert tensors and read
//! them one at a time ([`ExpertSource`]): moe-verify's own format, Megatron `torch_dist`
//! directories and Hugging Face safetensors directories each implement it. Every source presents
//! its tensors in one canonical orientation, Megatron's per-expert (SequentialMLP) one:
//!
//! * `Fc1Weight` `[N1, h]` — for a GLU, the gate rows `[0, f)` then the linear ("up") rows
//!   `[f, 2f)` (Megatron's `torch.chunk(…, 2)` order, spec §3);
//! * `Fc1Bias` `[N1]`, `Fc2Weight` `[h, f]`, `Fc2Bias` `[h]`;
//!
//! with experts numbered globally (`0..E`) and layers numbered as the model numbers its decoder
//! layers. A reader converts to this orientation (transposes, un-interleaves, unpacks
//! GroupedMLP's `weight1`/`weight2`, dequantizes) and says in [`ExpertEntry::stored_as`] what it
//! found on disk, so that a report can name the stored form.
//!
//! A GLU-interleaved TEGroupedMLP (Megatron HEAD's `moe_mlp_glu_interleave_size`, spec §7.9)
//! stores its fc1 `_w`/`_v` parts as halves of each rank's *interleaved* rows, which are not
//! the gate and linear halves; a reader that knows the saving expert-TP size and interleave
//! size (moe-verify's index records them, Megatron keeps them in the run's arguments) converts
//! with [`canonical_fc1`].
//!
//! Reading is streaming: [`ExpertSource::entries`] lists metadata only; [`ExpertSource::read`]
//! materialises one tensor, so memory stays bounded by the largest tensor, not the checkpoint.

use crate::sharded::interleave::{stored_to_canonical, GluOrder};
use crate::tensor::RawTensor;
use crate::CheckpointError;
use moe_reference::ExpertParam;
use ndarray::ArrayD;
use std::path::PathBuf;

/// Where one expert tensor sits in a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ExpertKey {
    /// Decoder layer number (0 for a checkpoint of a single expert layer).
    pub layer: usize,
    /// Global expert index `0..E`.
    pub expert: usize,
    /// Which of the expert's four tensors.
    pub param: ExpertParam,
}

/// One expert tensor a source holds, known from metadata alone (nothing read yet).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ExpertEntry {
    /// Its place in the model.
    pub key: ExpertKey,
    /// Shape in the canonical orientation (module doc).
    pub shape: Vec<usize>,
    /// The stored form, for reports: dtype and any transform applied on read, e.g.
    /// `"BF16"`, `"BF16, transposed [h, 2f] -> [2f, h]"`, `"F8_E4M3 x 128x128 weight_scale_inv"`,
    /// `"MXFP4 blocks+scales"`.
    pub stored_as: String,
    /// File and key it comes from, for messages (`"model-00001-of-00002.safetensors:
    /// model.layers.3.mlp.experts.7.down_proj.weight"`).
    pub location: String,
}

/// The values of one expert tensor in the canonical orientation.
#[derive(Clone, Debug, PartialEq)]
pub enum ExpertValues {
    /// Stored values, exactly (their dtype's bytes): equal bytes means bit-for-bit equal.
    Raw(RawTensor),
    /// Values computed on read (dequantized fp8 × scale, MXFP4 × E8M0), exact in `f64`.
    Dequantized(ArrayD<f64>),
}

impl ExpertValues {
    /// The values as `f64` (exact for every variant).
    pub fn to_f64(&self) -> ArrayD<f64> {
        match self {
            ExpertValues::Raw(t) => t.to_f64(),
            ExpertValues::Dequantized(a) => a.clone(),
        }
    }

    /// Shape in the canonical orientation.
    pub fn shape(&self) -> Vec<usize> {
        match self {
            ExpertValues::Raw(t) => t.shape.clone(),
            ExpertValues::Dequantized(a) => a.shape().to_vec(),
        }
    }
}

/// The on-disk format of a source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceFormat {
    /// moe-verify's own format (`moe-verify-index.json` + safetensors parts).
    MoeVerify,
    /// Megatron `torch_dist` (PyTorch Distributed Checkpoint: `.metadata`, `*.distcp`).
    TorchDist,
    /// Hugging Face `model.safetensors` or a sharded `model.safetensors.index.json`.
    HuggingFace,
}

/// What a source is and what was inferred about it (printed by `diff` and `inspect`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SourceInfo {
    /// The directory (or file) opened.
    pub path: PathBuf,
    /// Its format.
    pub format: SourceFormat,
    /// The model family when known (`"mixtral"`, `"qwen3-moe"`, `"deepseek-v3"`, `"gpt-oss"`,
    /// or the Megatron class name for Megatron formats).
    pub family: Option<String>,
    /// One line per inference made (`"format: torch_dist (found .metadata)"`,
    /// `"layers 0..2 stacked on axis 0 of decoder.layers.mlp.experts..."`), in order.
    pub inferred: Vec<String>,
}

/// A checkpoint that can list its expert tensors and read them one at a time.
pub trait ExpertSource {
    /// What the source is.
    fn info(&self) -> &SourceInfo;

    /// Every expert tensor stored, in any order. A key listed twice means the checkpoint holds
    /// that tensor twice (a converter bug `diff` reports as "present twice").
    fn entries(&self) -> &[ExpertEntry];

    /// The values of one listed entry, in the canonical orientation.
    fn read(&self, entry: &ExpertEntry) -> Result<ExpertValues, CheckpointError>;
}

/// One expert's stored GLU fc1 weight `[2f, h]` or bias `[2f]`, saved by a layout whose fc1
/// rows are in `order` (expert-TP size, interleave size), in the canonical orientation (gate
/// rows then linear rows). `what` names the tensor in the error when its shape is not that of
/// a GLU fc1 with an even row count dividing as `order` requires.
pub fn canonical_fc1(what: &str, stored: &RawTensor, order: GluOrder) -> Result<RawTensor, CheckpointError> {
    let rows = stored.shape.first().copied().unwrap_or(0);
    let f = rows / 2;
    let divides = order.size.is_none_or(|s| f.is_multiple_of(order.tp * s));
    if stored.shape.is_empty() || stored.shape.len() > 2 || rows == 0 || rows % 2 != 0 || !divides {
        return Err(CheckpointError::Mismatch {
            key: what.into(),
            msg: format!(
                "shape {:?} is not a GLU fc1 [2f, h] or [2f] whose f divides into expert-TP {} x interleave {:?}",
                stored.shape, order.tp, order.size
            ),
        });
    }
    let row_len = stored.data.len() / rows.max(1);
    let data = stored_to_canonical(&stored.data, f, row_len, order);
    Ok(RawTensor { dtype: stored.dtype, shape: stored.shape.clone(), data })
}
