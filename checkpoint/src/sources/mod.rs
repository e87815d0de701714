//! Opening any checkpoint as an [`ExpertSource`]: [`open_source`] detects the format from the
//! directory's files (or takes it from [`SourceOverrides`]) and dispatches to its reader.
//!
//! | found | format |
//! |---|---|
//! | `index.json` with `"format": "moe-verify-checkpoint"` | moe-verify ([`own::OwnSource`]) |
//! | `.metadata` | Megatron `torch_dist` |
//! | `model.safetensors.index.json` or `model.safetensors` (or a `.safetensors` file) | Hugging Face ([`crate::hf::HfSource`]) |

pub mod convert;
pub mod own;

use crate::experts::{ExpertSource, SourceFormat};
use crate::hf::{Family, HfSource};
use crate::CheckpointError;
use std::ops::Range;
use std::path::Path;

/// What the user said about a source, overriding inference.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceOverrides {
    /// The format (default: detected from the files).
    pub format: Option<SourceFormat>,
    /// The Hugging Face model family (default: `config.json`'s `model_type`, then tensor names).
    pub family: Option<Family>,
    /// The Megatron expert class a `torch_dist` reader should assume (default: from the keys).
    pub class: Option<moe_reference::LayerClass>,
    /// Only these decoder layers (default: all).
    pub layers: Option<Range<usize>>,
}

/// Which format `path` holds, and why (one line for [`crate::SourceInfo::inferred`]).
pub fn detect_format(path: &Path) -> Result<(SourceFormat, String), CheckpointError> {
    let not = |reason: String| CheckpointError::NotASource { path: path.to_path_buf(), format: "known", reason };
    if path.is_file() {
        if path.extension().is_some_and(|e| e == "safetensors") {
            return Ok((SourceFormat::HuggingFace, "format: Hugging Face (a .safetensors file)".into()));
        }
        return Err(not("a file that is not .safetensors; pass a checkpoint directory".into()));
    }
    if !path.is_dir() {
        return Err(not("no such file or directory".into()));
    }
    let index = path.join(crate::format::INDEX);
    if index.is_file() {
        let text = std::fs::read(&index).map_err(|source| CheckpointError::Io { path: index.clone(), source })?;
        let is_ours = serde_json::from_slice::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("format").and_then(|f| f.as_str()).map(|f| f == crate::format::FORMAT))
            .unwrap_or(false);
        if is_ours {
            return Ok((SourceFormat::MoeVerify, format!("format: moe-verify checkpoint (found {})", index.display())));
        }
    }
    if path.join(".metadata").is_file() {
        return Ok((SourceFormat::TorchDist, "format: torch_dist (found .metadata)".into()));
    }
    for name in [crate::hf::INDEX, crate::hf::SINGLE] {
        if path.join(name).is_file() {
            return Ok((SourceFormat::HuggingFace, format!("format: Hugging Face (found {name})")));
        }
    }
    Err(not(format!(
        "found none of {} (moe-verify), .metadata (torch_dist), {} or {} (Hugging Face)",
        crate::format::INDEX,
        crate::hf::INDEX,
        crate::hf::SINGLE
    )))
}

/// Opens `path` as an [`ExpertSource`] of the detected (or overridden) format. Entries outside
/// `overrides.layers` are left out.
pub fn open_source(path: &Path, overrides: &SourceOverrides) -> Result<Box<dyn ExpertSource>, CheckpointError> {
    let format = match overrides.format {
        Some(f) => f,
        None => detect_format(path)?.0,
    };
    let source: Box<dyn ExpertSource> = match format {
        SourceFormat::MoeVerify => Box::new(own::OwnSource::open(path)?),
        SourceFormat::HuggingFace => Box::new(HfSource::open(path, overrides.family)?),
        SourceFormat::TorchDist => Box::new(crate::torch_dist::TorchDistSource::open(path)?),
    };
    Ok(match &overrides.layers {
        Some(r) => Box::new(LayerFilter::new(source, r.clone())),
        None => source,
    })
}

/// A source restricted to a range of layers.
struct LayerFilter {
    inner: Box<dyn ExpertSource>,
    info: crate::SourceInfo,
    entries: Vec<crate::ExpertEntry>,
}

impl LayerFilter {
    fn new(inner: Box<dyn ExpertSource>, layers: Range<usize>) -> LayerFilter {
        let entries = inner.entries().iter().filter(|e| layers.contains(&e.key.layer)).cloned().collect();
        let mut info = inner.info().clone();
        info.inferred.push(format!("layers {}..{} only (given)", layers.start, layers.end));
        LayerFilter { inner, info, entries }
    }
}

impl ExpertSource for LayerFilter {
    fn info(&self) -> &crate::SourceInfo {
        &self.info
    }

    fn entries(&self) -> &[crate::ExpertEntry] {
        &self.entries
    }

    fn read(&self, entry: &crate::ExpertEntry) -> Result<crate::ExpertValues, CheckpointError> {
        self.inner.read(entry)
    }
}
