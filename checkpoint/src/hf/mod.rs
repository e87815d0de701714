//! Hugging Face MoE checkpoints (`model.safetensors` or a sharded
//! `model.safetensors.index.json`) as an [`ExpertSource`].
//!
//! Files are memory-mapped and their headers parsed by the `safetensors` crate; a tensor is
//! touched only when an entry that needs it is read. The family decides the tensor names and
//! how they map to the canonical orientation (module doc of [`crate::experts`]):
//!
//! | family | stored | canonical |
//! |---|---|---|
//! | Mixtral | `model.layers.{l}.block_sparse_moe.experts.{e}.w1/w3/w2.weight` `[f,h]`/`[f,h]`/`[h,f]` | fc1 = `[w1; w3]`, fc2 = `w2` |
//! | Qwen3-MoE, DeepSeek-V3 | `model.layers.{l}.mlp.experts.{e}.gate_proj/up_proj/down_proj.weight` | fc1 = `[gate; up]`, fc2 = `down` |
//! | DeepSeek-V3 fp8 | the same `weight` in `F8_E4M3` with `weight_scale_inv` `[⌈r/128⌉, ⌈c/128⌉]` | dequantized exactly |
//! | GPT-OSS | `model.layers.{l}.mlp.experts.gate_up_proj` `[E,h,2f]` (gate = even columns, up = odd), `gate_up_proj_bias` `[E,2f]`, `down_proj` `[E,f,h]`, `down_proj_bias` `[E,h]` | fc1 = de-interleaved, transposed; fc2 = `down_projᵀ` |
//! | GPT-OSS MXFP4 | `gate_up_proj_blocks` `[E,2f,h/32,16]` + `_scales` `[E,2f,h/32]`, `down_proj_blocks` `[E,h,f/32,16]` + `_scales` | decoded exactly ([`quant`]) |
//!
//! DeepSeek-V3's first `first_k_dense_replace` layers are dense (no `experts.{e}` tensors) and
//! its `shared_experts` are not routed experts: neither is listed.

pub mod quant;
pub mod write;

use crate::experts::{ExpertEntry, ExpertKey, ExpertSource, ExpertValues, SourceFormat, SourceInfo};
use crate::tensor::RawTensor;
use crate::CheckpointError;
use memmap2::Mmap;
use moe_reference::{Dtype, ExpertParam};
use ndarray::{ArrayD, IxDyn};
use safetensors::{Dtype as StDtype, SafeTensors};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// The index file of a sharded checkpoint.
pub const INDEX: &str = "model.safetensors.index.json";
/// The file of a single-file checkpoint.
pub const SINGLE: &str = "model.safetensors";

/// A model family: which tensor names hold the experts and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Family {
    /// Mixtral (`block_sparse_moe.experts.{e}.w1/w2/w3`).
    Mixtral,
    /// Qwen3-MoE (`mlp.experts.{e}.gate_proj/up_proj/down_proj`).
    Qwen3Moe,
    /// DeepSeek-V3 (as Qwen3-MoE, optionally fp8 with `weight_scale_inv`).
    DeepseekV3,
    /// GPT-OSS (`mlp.experts.gate_up_proj` interleaved, biases, `down_proj`; or MXFP4).
    GptOss,
}

impl Family {
    /// Every family.
    pub const ALL: [Family; 4] = [Family::Mixtral, Family::Qwen3Moe, Family::DeepseekV3, Family::GptOss];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Family::Mixtral => "mixtral",
            Family::Qwen3Moe => "qwen3-moe",
            Family::DeepseekV3 => "deepseek-v3",
            Family::GptOss => "gpt-oss",
        }
    }

    /// The family of a `config.json` `model_type`.
    pub fn from_model_type(t: &str) -> Option<Family> {
        match t {
            "mixtral" => Some(Family::Mixtral),
            "qwen3_moe" | "qwen2_moe" => Some(Family::Qwen3Moe),
            "deepseek_v3" | "deepseek_v2" => Some(Family::DeepseekV3),
            "gpt_oss" => Some(Family::GptOss),
            _ => None,
        }
    }

    /// True when the experts are per-expert tensors (not GPT-OSS's stacked ones).
    fn per_expert(self) -> bool {
        self != Family::GptOss
    }
}

/// One memory-mapped safetensors file.
struct MappedFile {
    path: PathBuf,
    map: Mmap,
}

/// Where a tensor is: file, dtype, shape and absolute byte range.
#[derive(Clone, Debug)]
struct Tensor {
    name: String,
    file: usize,
    dtype: StDtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// A tensor and its fp8 block scales, if any.
#[derive(Clone, Debug)]
struct Quant {
    t: String,
    scale: Option<String>,
}

/// How to make one canonical entry from stored tensors.
#[derive(Clone, Debug)]
enum Recipe {
    /// A per-expert `[out, in]` tensor as stored.
    Whole(Quant),
    /// Gate rows then up rows.
    Concat(Quant, Quant),
    /// Expert `e`'s slice of a stacked tensor, as stored (transformers' fused
    /// `gate_up_proj[e]` `[2f, h]` and `down_proj[e]` `[h, f]`).
    Slice(String, usize),
    /// GPT-OSS `gate_up_proj[e]` `[h, 2f]`: de-interleave the columns, transpose.
    OssGateUp(String, usize),
    /// GPT-OSS `gate_up_proj_bias[e]` `[2f]`: de-interleave.
    OssGateUpBias(String, usize),
    /// GPT-OSS `down_proj[e]` `[f, h]`: transpose.
    OssDown(String, usize),
    /// GPT-OSS `down_proj_bias[e]` `[h]`.
    OssDownBias(String, usize),
    /// GPT-OSS MXFP4 `blocks[e]`, `scales[e]`: decode `[R, 32G]`; de-interleave the rows when
    /// `interleaved` (gate_up).
    Mxfp4 { blocks: String, scales: String, e: usize, interleaved: bool },
}

/// Values on their way to the canonical form.
enum Vals {
    Raw(Dtype, Vec<u8>),
    F(Vec<f64>),
}

/// An opened Hugging Face checkpoint.
pub struct HfSource {
    info: SourceInfo,
    entries: Vec<ExpertEntry>,
    files: Vec<MappedFile>,
    tensors: HashMap<String, Tensor>,
    recipes: HashMap<(ExpertKey, String), Recipe>,
}

fn corrupt(path: &Path, reason: String) -> CheckpointError {
    CheckpointError::Corrupt { path: path.to_path_buf(), reason }
}

/// Maps and parses one safetensors file; returns its tensors.
fn map_file(path: &Path, idx: usize) -> Result<(MappedFile, Vec<Tensor>), CheckpointError> {
    let f = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => corrupt(path, "missing".into()),
        _ => CheckpointError::Io { path: path.to_path_buf(), source: e },
    })?;
    let size = f.metadata().map_err(|source| CheckpointError::Io { path: path.to_path_buf(), source })?.len();
    if size < 8 {
        return Err(corrupt(path, format!("{size} bytes: shorter than a safetensors header")));
    }
    // SAFETY: the map is read-only and private to this process; the checkpoint file is not
    // modified while the source is open (a file changed underneath would change the values read,
    // not memory safety of this process's own allocations). Every access goes through bounds
    // checked slices of the map, validated against the header below.
    let map = unsafe { Mmap::map(&f) }.map_err(|source| CheckpointError::Io { path: path.to_path_buf(), source })?;
    let (n, meta) = SafeTensors::read_metadata(&map)
        .map_err(|e| corrupt(path, format!("not a valid safetensors file (truncated or malformed header): {e}")))?;
    let start = 8 + n;
    let mut tensors = Vec::new();
    for (name, info) in meta.tensors() {
        tensors.push(Tensor {
            name: name.clone(),
            file: idx,
            dtype: info.dtype,
            shape: info.shape.clone(),
            start: start + info.data_offsets.0,
            end: start + info.data_offsets.1,
        });
    }
    Ok((MappedFile { path: path.to_path_buf(), map }, tensors))
}

fn raw_dtype(d: StDtype) -> Option<Dtype> {
    match d {
        StDtype::BF16 => Some(Dtype::Bf16),
        StDtype::F16 => Some(Dtype::F16),
        StDtype::F32 => Some(Dtype::F32),
        _ => None,
    }
}

/// `…layers.{l}.REST` -> `(l, REST)`.
fn split_layer(name: &str) -> Option<(usize, &str)> {
    let i = name.find("layers.")?;
    if i > 0 && !name[..i].ends_with('.') {
        return None;
    }
    let rest = &name[i + "layers.".len()..];
    let (l, rest) = rest.split_once('.')?;
    Some((l.parse().ok()?, rest))
}

/// The per-expert tensor a name holds: `(layer, expert, role)` with role 0 gate, 1 up, 2 down.
fn per_expert_name(family: Family, name: &str) -> Option<(usize, usize, usize)> {
    let (l, rest) = split_layer(name)?;
    let (head, tail) = match family {
        Family::Mixtral => ("block_sparse_moe.experts.", [("w1.weight", 0), ("w3.weight", 1), ("w2.weight", 2)]),
        _ => ("mlp.experts.", [("gate_proj.weight", 0), ("up_proj.weight", 1), ("down_proj.weight", 2)]),
    };
    let rest = rest.strip_prefix(head)?;
    let (e, t) = rest.split_once('.')?;
    let e: usize = e.parse().ok()?;
    tail.iter().find(|(s, _)| *s == t).map(|&(_, r)| (l, e, r))
}

/// Infers the family from tensor names alone.
fn family_from_names(names: &BTreeSet<String>) -> Option<(Family, String)> {
    if let Some(n) = names.iter().find(|n| n.contains(".block_sparse_moe.experts.")) {
        return Some((Family::Mixtral, format!("tensor {n}")));
    }
    if let Some(n) = names
        .iter()
        .find(|n| n.contains(".mlp.experts.gate_up_proj_bias") || n.contains(".mlp.experts.gate_up_proj_blocks"))
    {
        return Some((Family::GptOss, format!("tensor {n}")));
    }
    if let Some(n) = names.iter().find(|n| n.ends_with(".mlp.experts.gate_up_proj")) {
        return Some((
            Family::Qwen3Moe,
            format!("tensor {n}: transformers' fused [E, 2f, h] layout without biases; pass --family if another"),
        ));
    }
    if let Some(n) = names.iter().find(|n| per_expert_name(Family::Qwen3Moe, n).is_some()) {
        if names.iter().any(|m| m.contains(".mlp.experts.") && m.ends_with("weight_scale_inv")) {
            return Some((Family::DeepseekV3, format!("tensor {n} with fp8 weight_scale_inv")));
        }
        return Some((Family::Qwen3Moe, format!("tensor {n}")));
    }
    None
}

impl HfSource {
    /// Opens a Hugging Face checkpoint directory (or one `.safetensors` file), as `family`
    /// when given (else from `config.json`'s `model_type`, else from tensor names).
    pub fn open(path: &Path, family: Option<Family>) -> Result<HfSource, CheckpointError> {
        let not =
            |reason: String| CheckpointError::NotASource { path: path.to_path_buf(), format: "Hugging Face", reason };
        let mut inferred = Vec::new();
        let (dir, file_names, weight_map): (PathBuf, Vec<String>, Option<BTreeMap<String, String>>) = if path.is_file()
        {
            let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            inferred.push(format!("format: Hugging Face single file {name}"));
            (dir, vec![name], None)
        } else if path.join(INDEX).is_file() {
            let ipath = path.join(INDEX);
            let text = std::fs::read(&ipath).map_err(|source| CheckpointError::Io { path: ipath.clone(), source })?;
            let v: serde_json::Value =
                serde_json::from_slice(&text).map_err(|e| corrupt(&ipath, format!("does not parse as JSON: {e}")))?;
            let wm = v
                .get("weight_map")
                .and_then(|w| w.as_object())
                .ok_or_else(|| corrupt(&ipath, "no \"weight_map\" object".into()))?;
            let mut map = BTreeMap::new();
            for (k, f) in wm {
                let f = f.as_str().ok_or_else(|| corrupt(&ipath, format!("key {k}: file is not a string")))?;
                if f.contains('/') || f.contains('\\') || f == ".." || f.is_empty() {
                    return Err(corrupt(&ipath, format!("key {k}: bad file name {f:?}")));
                }
                map.insert(k.clone(), f.to_string());
            }
            let files: BTreeSet<String> = map.values().cloned().collect();
            for f in &files {
                if !path.join(f).is_file() {
                    let key = map.iter().find(|(_, v)| *v == f).map(|(k, _)| k.as_str()).unwrap_or("");
                    return Err(corrupt(
                        &ipath,
                        format!("names shard {f} (e.g. for key {key}), which is missing from {}", path.display()),
                    ));
                }
            }
            inferred.push(format!("format: Hugging Face sharded ({INDEX}, {} files)", files.len()));
            (path.to_path_buf(), files.into_iter().collect(), Some(map))
        } else if path.join(SINGLE).is_file() {
            inferred.push(format!("format: Hugging Face single file ({SINGLE})"));
            (path.to_path_buf(), vec![SINGLE.to_string()], None)
        } else {
            return Err(not(format!("no {INDEX} or {SINGLE}")));
        };
        let mut files = Vec::new();
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (i, name) in file_names.iter().enumerate() {
            let (mf, ts) = map_file(&dir.join(name), i)?;
            for t in ts {
                let listed_here = weight_map.as_ref().is_none_or(|m| m.get(&t.name) == Some(name));
                if listed_here {
                    tensors.insert(t.name.clone(), t);
                }
            }
            files.push(mf);
        }
        if let Some(m) = &weight_map {
            for (k, f) in m {
                if !tensors.contains_key(k) {
                    return Err(corrupt(&dir.join(f), format!("key {k}: listed in {INDEX} but not in this file")));
                }
            }
        }
        // config.json: model_type and what it says about the experts.
        let cpath = dir.join("config.json");
        let config: Option<serde_json::Value> = if cpath.is_file() {
            let text = std::fs::read(&cpath).map_err(|source| CheckpointError::Io { path: cpath.clone(), source })?;
            Some(serde_json::from_slice(&text).map_err(|e| corrupt(&cpath, format!("does not parse as JSON: {e}")))?)
        } else {
            None
        };
        let model_type = config.as_ref().and_then(|c| c.get("model_type")).and_then(|t| t.as_str());
        let names: BTreeSet<String> = tensors.keys().cloned().collect();
        let family = match (family, model_type.and_then(Family::from_model_type)) {
            (Some(f), _) => {
                inferred.push(format!("family: {} (given)", f.name()));
                f
            }
            (None, Some(f)) => {
                inferred.push(format!("family: {} (config.json model_type {:?})", f.name(), model_type.unwrap_or("")));
                f
            }
            (None, None) => match family_from_names(&names) {
                Some((f, why)) => {
                    let about = match model_type {
                        Some(t) => format!("config.json model_type {t:?} is not a known MoE family; "),
                        None => String::new(),
                    };
                    inferred.push(format!("family: {} ({about}from {why})", f.name()));
                    f
                }
                None => {
                    return Err(not(
                        "no MoE expert tensors (block_sparse_moe.experts.{e}.w1, mlp.experts.{e}.gate_proj, \
                         mlp.experts.gate_up_proj) and no known config.json model_type"
                            .into(),
                    ))
                }
            },
        };
        if let Some(c) = &config {
            for k in ["num_local_experts", "num_experts", "n_routed_experts", "first_k_dense_replace"] {
                if let Some(v) = c.get(k).and_then(|v| v.as_u64()) {
                    inferred.push(format!("config.json {k} = {v}"));
                }
            }
        }
        let mut src = HfSource {
            info: SourceInfo {
                path: path.to_path_buf(),
                format: SourceFormat::HuggingFace,
                family: Some(family.name().into()),
                inferred,
            },
            entries: Vec::new(),
            files,
            tensors,
            recipes: HashMap::new(),
        };
        if family.per_expert() {
            src.list_per_expert(family)?;
        } else {
            src.list_gpt_oss()?;
        }
        if src.entries.is_empty() {
            return Err(not(format!("no {} expert tensors found", family.name())));
        }
        let layers: BTreeSet<usize> = src.entries.iter().map(|e| e.key.layer).collect();
        let experts: BTreeSet<usize> = src.entries.iter().map(|e| e.key.expert).collect();
        src.info.inferred.push(format!(
            "expert layers {:?}, {} experts (max index {})",
            layers,
            experts.len(),
            experts.last().copied().unwrap_or(0)
        ));
        Ok(src)
    }

    fn tensor(&self, name: &str) -> &Tensor {
        &self.tensors[name]
    }

    fn location(&self, name: &str) -> String {
        let t = self.tensor(name);
        let f = &self.files[t.file].path;
        format!("{}:{name}", f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
    }

    fn bytes(&self, t: &Tensor) -> &[u8] {
        &self.files[t.file].map[t.start..t.end]
    }

    fn push(&mut self, key: ExpertKey, shape: Vec<usize>, stored_as: String, location: String, recipe: Recipe) {
        self.recipes.insert((key, location.clone()), recipe);
        self.entries.push(ExpertEntry { key, shape, stored_as, location });
    }

    /// A per-expert weight and its fp8 scale: checks dtype and shapes; returns the stored form.
    fn quant(&self, name: &str) -> Result<(Quant, String), CheckpointError> {
        let t = self.tensor(name);
        let file = &self.files[t.file].path;
        let bad = |msg: String| CheckpointError::Mismatch { key: format!("{}:{name}", file.display()), msg };
        if t.shape.len() != 2 {
            return Err(bad(format!("shape {:?}, expected a 2-D [out, in] weight", t.shape)));
        }
        match t.dtype {
            StDtype::F8_E4M3 => {
                let sname = format!("{name}_scale_inv");
                let Some(s) = self.tensors.get(&sname) else {
                    return Err(bad(format!("F8_E4M3 weight without its {sname}")));
                };
                let want = vec![t.shape[0].div_ceil(quant::FP8_BLOCK), t.shape[1].div_ceil(quant::FP8_BLOCK)];
                if s.shape != want || raw_dtype(s.dtype).is_none() {
                    return Err(bad(format!(
                        "{sname} is {:?} {:?}, expected F32/BF16/F16 {want:?} (128x128 blocks of {:?})",
                        s.dtype, s.shape, t.shape
                    )));
                }
                Ok((Quant { t: name.into(), scale: Some(sname) }, "F8_E4M3 x 128x128 weight_scale_inv".into()))
            }
            d if raw_dtype(d).is_some() => Ok((Quant { t: name.into(), scale: None }, format!("{d:?}"))),
            d => Err(bad(format!("dtype {d:?}, expected BF16, F16, F32 or F8_E4M3 (with weight_scale_inv)"))),
        }
    }

    fn list_per_expert(&mut self, family: Family) -> Result<(), CheckpointError> {
        let mut by: BTreeMap<(usize, usize), [Option<String>; 3]> = BTreeMap::new();
        for n in self.tensors.keys() {
            if let Some((l, e, r)) = per_expert_name(family, n) {
                by.entry((l, e)).or_default()[r] = Some(n.clone());
            }
        }
        if by.is_empty() {
            return self.list_fused();
        }
        for ((layer, expert), [gate, up, down]) in by {
            match (&gate, &up) {
                (Some(g), Some(u)) => {
                    let (qg, sg) = self.quant(g)?;
                    let (qu, _) = self.quant(u)?;
                    let (tg, tu) = (self.tensor(g), self.tensor(u));
                    if tg.shape != tu.shape || tg.dtype != tu.dtype {
                        return Err(CheckpointError::Mismatch {
                            key: self.location(u),
                            msg: format!(
                                "{:?} {:?}, but the gate {} is {:?} {:?}",
                                tu.dtype, tu.shape, g, tg.dtype, tg.shape
                            ),
                        });
                    }
                    let shape = vec![2 * tg.shape[0], tg.shape[1]];
                    let loc = format!("{} + {}", self.location(g), self.location(u));
                    let key = ExpertKey { layer, expert, param: ExpertParam::Fc1Weight };
                    self.push(key, shape, format!("{sg}, [gate; up] concatenated"), loc, Recipe::Concat(qg, qu));
                }
                (Some(n), None) | (None, Some(n)) => {
                    let missing = if gate.is_none() { "gate (w1/gate_proj)" } else { "up (w3/up_proj)" };
                    return Err(CheckpointError::Mismatch {
                        key: self.location(n),
                        msg: format!("layer {layer} expert {expert}: the {missing} weight is missing, fc1 needs both"),
                    });
                }
                (None, None) => {}
            }
            if let Some(d) = down {
                let (q, s) = self.quant(&d)?;
                let shape = self.tensor(&d).shape.clone();
                let key = ExpertKey { layer, expert, param: ExpertParam::Fc2Weight };
                let loc = self.location(&d);
                self.push(key, shape, s, loc, Recipe::Whole(q));
            }
        }
        Ok(())
    }

    /// transformers' own in-memory layout, saved with `save_original_format=False`:
    /// `model.layers.{l}.mlp.experts.gate_up_proj` `[E, 2f, h]` (gate rows first, as the forward's
    /// `.chunk(2)` splits it) and `down_proj` `[E, h, f]`.
    fn list_fused(&mut self) -> Result<(), CheckpointError> {
        let mut todo = Vec::new();
        for (n, t) in &self.tensors {
            let Some((layer, rest)) = split_layer(n) else { continue };
            let param = match rest {
                "mlp.experts.gate_up_proj" => ExpertParam::Fc1Weight,
                "mlp.experts.down_proj" => ExpertParam::Fc2Weight,
                _ => continue,
            };
            raw_dtype(t.dtype).ok_or_else(|| CheckpointError::Mismatch {
                key: self.location(n),
                msg: format!("dtype {:?}, expected BF16, F16 or F32", t.dtype),
            })?;
            let [e, r, c] = t.shape[..] else {
                return Err(CheckpointError::Mismatch {
                    key: self.location(n),
                    msg: format!("shape {:?}, expected [E, 2f, h] or [E, h, f]", t.shape),
                });
            };
            for x in 0..e {
                let key = ExpertKey { layer, expert: x, param };
                let stored = format!("{:?}, fused [E, {r}, {c}] (transformers layout)", t.dtype);
                todo.push((key, vec![r, c], stored, format!("{}[{x}]", self.location(n)), Recipe::Slice(n.clone(), x)));
            }
        }
        if !todo.is_empty() {
            self.info.inferred.push("layout: transformers' fused experts.gate_up_proj / down_proj".into());
        }
        for (k, s, st, loc, r) in todo {
            self.push(k, s, st, loc, r);
        }
        Ok(())
    }

    fn list_gpt_oss(&mut self) -> Result<(), CheckpointError> {
        let mut layers: BTreeMap<usize, BTreeMap<String, String>> = BTreeMap::new();
        for n in self.tensors.keys() {
            if let Some((l, rest)) = split_layer(n) {
                if let Some(t) = rest.strip_prefix("mlp.experts.") {
                    if !t.contains('.') {
                        layers.entry(l).or_default().insert(t.to_string(), n.clone());
                    }
                }
            }
        }
        for (layer, ts) in layers {
            let shape_of = |k: &str| ts.get(k).map(|n| self.tensor(n).shape.clone());
            let bad = |k: &str, msg: String| CheckpointError::Mismatch {
                key: ts.get(k).map(|n| self.location(n)).unwrap_or_else(|| k.to_string()),
                msg,
            };
            let mut todo: Vec<(ExpertKey, Vec<usize>, String, String, Recipe)> = Vec::new();
            let check_raw = |k: &str| -> Result<String, CheckpointError> {
                let d = self.tensor(&ts[k]).dtype;
                raw_dtype(d)
                    .map(|_| format!("{d:?}"))
                    .ok_or_else(|| bad(k, format!("dtype {d:?}, expected BF16, F16 or F32")))
            };
            // fc1 weight.
            if let Some(s) = shape_of("gate_up_proj") {
                let st = check_raw("gate_up_proj")?;
                let [e, h, f2] = s[..] else {
                    return Err(bad("gate_up_proj", format!("shape {s:?}, expected [E, h, 2f]")));
                };
                if !f2.is_multiple_of(2) {
                    return Err(bad("gate_up_proj", format!("shape {s:?}: the last axis (2f) must be even")));
                }
                for x in 0..e {
                    todo.push((
                        ExpertKey { layer, expert: x, param: ExpertParam::Fc1Weight },
                        vec![f2, h],
                        format!("{st}, [h, 2f] gate/up interleaved -> de-interleaved, transposed"),
                        format!("{}[{x}]", self.location(&ts["gate_up_proj"])),
                        Recipe::OssGateUp(ts["gate_up_proj"].clone(), x),
                    ));
                }
            } else if let (Some(b), Some(sc)) = (shape_of("gate_up_proj_blocks"), shape_of("gate_up_proj_scales")) {
                self.mxfp4_entries(layer, &ts, "gate_up_proj", &b, &sc, true, &mut todo)?;
            }
            if let Some(s) = shape_of("gate_up_proj_bias") {
                let st = check_raw("gate_up_proj_bias")?;
                let [e, f2] = s[..] else {
                    return Err(bad("gate_up_proj_bias", format!("shape {s:?}, expected [E, 2f]")));
                };
                if !f2.is_multiple_of(2) {
                    return Err(bad("gate_up_proj_bias", format!("shape {s:?}: 2f must be even")));
                }
                for x in 0..e {
                    todo.push((
                        ExpertKey { layer, expert: x, param: ExpertParam::Fc1Bias },
                        vec![f2],
                        format!("{st}, gate/up interleaved -> de-interleaved"),
                        format!("{}[{x}]", self.location(&ts["gate_up_proj_bias"])),
                        Recipe::OssGateUpBias(ts["gate_up_proj_bias"].clone(), x),
                    ));
                }
            }
            if let Some(s) = shape_of("down_proj") {
                let st = check_raw("down_proj")?;
                let [e, f, h] = s[..] else { return Err(bad("down_proj", format!("shape {s:?}, expected [E, f, h]"))) };
                for x in 0..e {
                    todo.push((
                        ExpertKey { layer, expert: x, param: ExpertParam::Fc2Weight },
                        vec![h, f],
                        format!("{st}, [f, h] -> transposed"),
                        format!("{}[{x}]", self.location(&ts["down_proj"])),
                        Recipe::OssDown(ts["down_proj"].clone(), x),
                    ));
                }
            } else if let (Some(b), Some(sc)) = (shape_of("down_proj_blocks"), shape_of("down_proj_scales")) {
                self.mxfp4_entries(layer, &ts, "down_proj", &b, &sc, false, &mut todo)?;
            }
            if let Some(s) = shape_of("down_proj_bias") {
                let st = check_raw("down_proj_bias")?;
                let [e, h] = s[..] else { return Err(bad("down_proj_bias", format!("shape {s:?}, expected [E, h]"))) };
                for x in 0..e {
                    todo.push((
                        ExpertKey { layer, expert: x, param: ExpertParam::Fc2Bias },
                        vec![h],
                        st.clone(),
                        format!("{}[{x}]", self.location(&ts["down_proj_bias"])),
                        Recipe::OssDownBias(ts["down_proj_bias"].clone(), x),
                    ));
                }
            }
            for (k, s, st, loc, r) in todo {
                self.push(k, s, st, loc, r);
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn mxfp4_entries(
        &self,
        layer: usize,
        ts: &BTreeMap<String, String>,
        base: &str,
        b: &[usize],
        sc: &[usize],
        interleaved: bool,
        todo: &mut Vec<(ExpertKey, Vec<usize>, String, String, Recipe)>,
    ) -> Result<(), CheckpointError> {
        let (bn, sn) = (&ts[&format!("{base}_blocks")], &ts[&format!("{base}_scales")]);
        let bad = |msg: String| CheckpointError::Mismatch { key: self.location(bn), msg };
        let [e, r, g, 16] = b[..] else { return Err(bad(format!("shape {b:?}, expected [E, rows, groups, 16]"))) };
        if sc != [e, r, g] {
            return Err(bad(format!("{sn} has shape {sc:?}, expected [{e}, {r}, {g}] to match the blocks")));
        }
        let (tb, ts_) = (self.tensor(bn), self.tensor(sn));
        if tb.dtype != StDtype::U8 || !matches!(ts_.dtype, StDtype::U8 | StDtype::F8_E8M0) {
            return Err(bad(format!(
                "dtypes {:?} / {:?}, expected U8 blocks and U8 (E8M0) scales",
                tb.dtype, ts_.dtype
            )));
        }
        if interleaved && !r.is_multiple_of(2) {
            return Err(bad(format!("shape {b:?}: 2f rows must be even")));
        }
        let param = if interleaved { ExpertParam::Fc1Weight } else { ExpertParam::Fc2Weight };
        for x in 0..e {
            todo.push((
                ExpertKey { layer, expert: x, param },
                vec![r, 32 * g],
                if interleaved {
                    "MXFP4 blocks+scales, rows gate/up interleaved -> de-interleaved".into()
                } else {
                    "MXFP4 blocks+scales".into()
                },
                format!("{} + {}[{x}]", self.location(bn), self.location(sn)),
                Recipe::Mxfp4 { blocks: bn.clone(), scales: sn.clone(), e: x, interleaved },
            ));
        }
        Ok(())
    }

    /// Expert `e`'s slice of a stacked tensor, as bytes.
    fn expert_slice(&self, name: &str, e: usize) -> (&Tensor, &[u8]) {
        let t = self.tensor(name);
        let b = self.bytes(t);
        let per = b.len() / t.shape[0].max(1);
        (t, &b[e * per..(e + 1) * per])
    }

    fn load_quant(&self, q: &Quant) -> Vals {
        let t = self.tensor(&q.t);
        let b = self.bytes(t);
        match &q.scale {
            None => Vals::Raw(raw_dtype(t.dtype).expect("checked at open"), b.to_vec()),
            Some(s) => {
                let st = self.tensor(s);
                let scales = moe_reference::codec::from_bytes(raw_dtype(st.dtype).expect("checked"), self.bytes(st));
                Vals::F(quant::dequantize_fp8_blockwise(b, t.shape[0], t.shape[1], &scales))
            }
        }
    }
}

/// `out[i] = src[idx(i)]` for `n` elements of `elem` bytes (or f64s).
fn gather(v: &Vals, n: usize, idx: impl Fn(usize) -> usize) -> Vals {
    match v {
        Vals::Raw(d, b) => {
            let el = d.size_bytes();
            let mut out = Vec::with_capacity(n * el);
            for i in 0..n {
                let s = idx(i) * el;
                out.extend_from_slice(&b[s..s + el]);
            }
            Vals::Raw(*d, out)
        }
        Vals::F(x) => Vals::F((0..n).map(|i| x[idx(i)]).collect()),
    }
}

/// Row `j` of the canonical fc1 (`[gate; up]`) is row/column `interleaved(j, f)` of GPT-OSS's
/// interleaved layout: gate `j` at `2j`, up `j` at `2j + 1`.
fn interleaved(j: usize, f: usize) -> usize {
    if j < f {
        2 * j
    } else {
        2 * (j - f) + 1
    }
}

impl ExpertSource for HfSource {
    fn info(&self) -> &SourceInfo {
        &self.info
    }

    fn entries(&self) -> &[ExpertEntry] {
        &self.entries
    }

    fn read(&self, entry: &ExpertEntry) -> Result<ExpertValues, CheckpointError> {
        let recipe = self.recipes.get(&(entry.key, entry.location.clone())).ok_or_else(|| {
            CheckpointError::Mismatch { key: entry.location.clone(), msg: "not an entry of this source".into() }
        })?;
        let shape = entry.shape.clone();
        let vals = match recipe {
            Recipe::Whole(q) => self.load_quant(q),
            Recipe::Concat(g, u) => match (self.load_quant(g), self.load_quant(u)) {
                (Vals::Raw(d, mut a), Vals::Raw(_, b)) => {
                    a.extend_from_slice(&b);
                    Vals::Raw(d, a)
                }
                (Vals::F(mut a), Vals::F(b)) => {
                    a.extend_from_slice(&b);
                    Vals::F(a)
                }
                _ => unreachable!("gate and up dtypes were checked equal at open"),
            },
            Recipe::OssGateUp(n, e) => {
                let (t, b) = self.expert_slice(n, *e);
                let v = Vals::Raw(raw_dtype(t.dtype).expect("checked"), b.to_vec());
                let (h, f2) = (t.shape[1], t.shape[2]);
                gather(&v, f2 * h, |k| {
                    let (j, i) = (k / h, k % h);
                    i * f2 + interleaved(j, f2 / 2)
                })
            }
            Recipe::OssGateUpBias(n, e) => {
                let (t, b) = self.expert_slice(n, *e);
                let v = Vals::Raw(raw_dtype(t.dtype).expect("checked"), b.to_vec());
                let f2 = t.shape[1];
                gather(&v, f2, |j| interleaved(j, f2 / 2))
            }
            Recipe::OssDown(n, e) => {
                let (t, b) = self.expert_slice(n, *e);
                let v = Vals::Raw(raw_dtype(t.dtype).expect("checked"), b.to_vec());
                let (f, h) = (t.shape[1], t.shape[2]);
                gather(&v, h * f, |k| (k % f) * h + k / f)
            }
            Recipe::Slice(n, e) | Recipe::OssDownBias(n, e) => {
                let (t, b) = self.expert_slice(n, *e);
                Vals::Raw(raw_dtype(t.dtype).expect("checked"), b.to_vec())
            }
            Recipe::Mxfp4 { blocks, scales, e, interleaved: il } => {
                let (tb, b) = self.expert_slice(blocks, *e);
                let (_, s) = self.expert_slice(scales, *e);
                let (r, g) = (tb.shape[1], tb.shape[2]);
                let v = Vals::F(quant::decode_mxfp4(b, s, r, g));
                if *il {
                    let cols = 32 * g;
                    gather(&v, r * cols, |k| interleaved(k / cols, r / 2) * cols + k % cols)
                } else {
                    v
                }
            }
        };
        Ok(match vals {
            Vals::Raw(dtype, data) => ExpertValues::Raw(RawTensor { dtype, shape, data }),
            Vals::F(x) => ExpertValues::Dequantized(ArrayD::from_shape_vec(IxDyn(&shape), x).map_err(|e| {
                CheckpointError::Mismatch {
                    key: entry.location.clone(),
                    msg: format!("values do not fill {shape:?}: {e}"),
                }
            })?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_per_family() {
        assert_eq!(
            per_expert_name(Family::Mixtral, "model.layers.3.block_sparse_moe.experts.7.w3.weight"),
            Some((3, 7, 1))
        );
        assert_eq!(
            per_expert_name(Family::Qwen3Moe, "model.layers.0.mlp.experts.12.down_proj.weight"),
            Some((0, 12, 2))
        );
        // Shared experts and dense MLPs are not routed experts.
        assert_eq!(per_expert_name(Family::DeepseekV3, "model.layers.1.mlp.shared_experts.gate_proj.weight"), None);
        assert_eq!(per_expert_name(Family::DeepseekV3, "model.layers.0.mlp.gate_proj.weight"), None);
        assert_eq!(per_expert_name(Family::Qwen3Moe, "model.layers.0.mlp.experts.1.down_proj.weight_scale_inv"), None);
    }

    #[test]
    fn interleaving_puts_gate_on_even_positions() {
        // f = 3: canonical rows [g0 g1 g2 u0 u1 u2] come from positions [0 2 4 1 3 5].
        let got: Vec<usize> = (0..6).map(|j| interleaved(j, 3)).collect();
        assert_eq!(got, vec![0, 2, 4, 1, 3, 5]);
    }
}
