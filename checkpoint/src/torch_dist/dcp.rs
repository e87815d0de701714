//! PyTorch Distributed Checkpoint's `.metadata`: a pickle of
//! `torch.distributed.checkpoint.metadata.Metadata`, read with the restricted reader.
//!
//! What is used (torch 2.x, `torch/distributed/checkpoint/metadata.py` and `filesystem.py`):
//!
//! * `Metadata.state_dict_metadata`: `{fqn: TensorStorageMetadata | BytesStorageMetadata}`;
//!   a `TensorStorageMetadata` has `properties` (`TensorProperties`, pickled by its
//!   `__getstate__` as a tuple whose first element is the dtype, e.g. the global
//!   `torch.float32`), `size` (`torch.Size`) and `chunks` (`ChunkStorageMetadata(offsets,
//!   sizes)`, each a `torch.Size`);
//! * `Metadata.storage_data`: `{MetadataIndex(fqn, offset, index): _StorageInfo(relative_path,
//!   offset, length[, transform_descriptors])}`: where each chunk's bytes are, `offset` being the
//!   chunk's global offset.
//!
//! Everything else (`planner_data`, `storage_meta`, `all_local_plans`, …) is parsed (its globals
//! are allowlisted) but not used.

use super::pickle::{self, Value};
use std::collections::{BTreeMap, HashMap};

/// The globals a `.metadata` pickle may name (torch 2.4–2.15 as written by Megatron-Core
/// 0.16.1's `FileSystemWriterAsync`, which pickles torch's own `Metadata`).
pub fn metadata_allowed(module: &str, name: &str) -> bool {
    match module {
        "torch.distributed.checkpoint.metadata" => matches!(
            name,
            "Metadata"
                | "TensorStorageMetadata"
                | "BytesStorageMetadata"
                | "ChunkStorageMetadata"
                | "TensorProperties"
                | "MetadataIndex"
                | "StorageMeta"
                | "_MEM_FORMAT_ENCODING"
        ),
        "torch.distributed.checkpoint.filesystem" => name == "_StorageInfo",
        "torch.distributed.checkpoint.planner" => {
            matches!(name, "SavePlan" | "WriteItem" | "WriteItemType" | "TensorWriteData" | "BytesIOWriteData")
        }
        "torch.serialization" => name == "_get_layout",
        "torch" => name == "Size" || torch_dtype(name).is_some() || OTHER_DTYPES.contains(&name),
        "collections" => name == "OrderedDict",
        _ => false,
    }
}

/// Storage dtypes the reader decodes: torch's dtype name -> safetensors-style name.
pub fn torch_dtype(name: &str) -> Option<moe_reference::Dtype> {
    use moe_reference::Dtype;
    match name {
        "float32" | "float" => Some(Dtype::F32),
        "bfloat16" => Some(Dtype::Bf16),
        "float16" | "half" => Some(Dtype::F16),
        _ => None,
    }
}

/// torch dtypes that may appear on non-expert tensors (allowed as names, never decoded).
const OTHER_DTYPES: &[&str] = &[
    "float64",
    "double",
    "int64",
    "long",
    "int32",
    "int",
    "int16",
    "short",
    "int8",
    "uint8",
    "bool",
    "complex64",
    "complex128",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e8m0fnu",
    "uint16",
    "uint32",
    "uint64",
];

/// One tensor of the checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorMeta {
    /// torch dtype name (`float32`, `bfloat16`, ...).
    pub dtype: String,
    /// Global shape.
    pub size: Vec<usize>,
    /// Saved chunks, in the order of the metadata.
    pub chunks: Vec<Chunk>,
}

/// A chunk: a box of the global tensor.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Chunk {
    /// Global offset.
    pub offsets: Vec<usize>,
    /// Extent.
    pub sizes: Vec<usize>,
}

/// Where an item's bytes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageInfo {
    /// File name relative to the checkpoint directory.
    pub relative_path: String,
    /// Byte offset in the file.
    pub offset: u64,
    /// Byte length.
    pub length: u64,
    /// `transform_descriptors` (compression etc.), when present and non-empty.
    pub transforms: Vec<String>,
}

/// The parts of `Metadata` the reader uses.
#[derive(Clone, Debug, Default)]
pub struct DcpMetadata {
    /// Tensor entries by fqn.
    pub tensors: BTreeMap<String, TensorMeta>,
    /// Bytes entries (ShardedObjects: `_extra_state`, common objects).
    pub bytes: Vec<String>,
    /// Storage of tensor chunks, by (fqn, chunk offset), and of bytes items (offset `[]`).
    pub storage: HashMap<(String, Vec<usize>), StorageInfo>,
}

type R<T> = Result<T, String>;

/// Parses a `.metadata` pickle. Errors are messages (the caller adds the file).
pub fn parse_metadata(data: &[u8]) -> R<DcpMetadata> {
    let v = pickle::load(data, &metadata_allowed).map_err(|e| e.to_string())?;
    let root = object(&v, "torch.distributed.checkpoint.metadata", "Metadata", "the pickle's root")?;
    let sdm = field(&root, "state_dict_metadata")?.ok_or("Metadata has no state_dict_metadata")?;
    let mut out = DcpMetadata::default();
    for (k, v) in dict_items(&sdm, "state_dict_metadata")? {
        let fqn = k.as_str().ok_or_else(|| format!("state_dict_metadata key is {}, not a str", k.kind()))?.to_string();
        let Value::Object(o) = &v else {
            return Err(format!("state_dict_metadata[{fqn}] is {}", v.kind()));
        };
        let class = o.borrow().class.name.clone();
        match class.as_str() {
            "BytesStorageMetadata" => out.bytes.push(fqn),
            "TensorStorageMetadata" => {
                let t = tensor_meta(&v).map_err(|e| format!("state_dict_metadata[{fqn}]: {e}"))?;
                out.tensors.insert(fqn, t);
            }
            other => return Err(format!("state_dict_metadata[{fqn}] is a {other}")),
        }
    }
    let sd = field(&root, "storage_data")?.ok_or("Metadata has no storage_data")?;
    for (k, v) in dict_items(&sd, "storage_data")? {
        let idx = object(&k, "torch.distributed.checkpoint.metadata", "MetadataIndex", "storage_data key")?;
        let fqn = field(&idx, "fqn")?
            .and_then(|f| f.as_str().map(str::to_string))
            .ok_or("MetadataIndex without a str fqn")?;
        let offset = match field(&idx, "offset")? {
            None | Some(Value::None) => Vec::new(),
            Some(o) => size(&o).map_err(|e| format!("storage_data[{fqn}].offset: {e}"))?,
        };
        let info = object(&v, "torch.distributed.checkpoint.filesystem", "_StorageInfo", "storage_data value")?;
        let relative_path = field(&info, "relative_path")?
            .and_then(|f| f.as_str().map(str::to_string))
            .ok_or_else(|| format!("storage_data[{fqn}]: _StorageInfo without relative_path"))?;
        let num = |n: &str| -> R<u64> {
            let x = field(&info, n)?
                .and_then(|f| f.as_int())
                .ok_or_else(|| format!("storage_data[{fqn}]: _StorageInfo without an int {n}"))?;
            u64::try_from(x).map_err(|_| format!("storage_data[{fqn}]: negative {n} {x}"))
        };
        let transforms = match field(&info, "transform_descriptors")? {
            None | Some(Value::None) => Vec::new(),
            Some(t) => list_items(&t, "transform_descriptors")?
                .iter()
                .map(|x| x.as_str().map(str::to_string).unwrap_or_else(|| x.kind()))
                .collect(),
        };
        let si = StorageInfo { relative_path, offset: num("offset")?, length: num("length")?, transforms };
        if out.storage.insert((fqn.clone(), offset.clone()), si).is_some() {
            return Err(format!("storage_data lists {fqn} at offset {offset:?} twice"));
        }
    }
    Ok(out)
}

fn tensor_meta(v: &Value) -> R<TensorMeta> {
    let props = field(v, "properties")?.ok_or("no properties")?;
    let Value::Object(p) = &props else { return Err(format!("properties is {}", props.kind())) };
    // TensorProperties.__getstate__: (dtype, layout, requires_grad, memory_format, pin_memory[, strides]).
    let dtype_v = match p.borrow().state.clone() {
        Some(Value::Tuple(t)) if !t.is_empty() => t[0].clone(),
        Some(s @ Value::Dict(_)) => dict_get(&s, "dtype")?.ok_or("properties without dtype")?,
        other => return Err(format!("TensorProperties state is {}", other.map_or("missing".into(), |s| s.kind()))),
    };
    let dtype = match &dtype_v {
        Value::Global(g) if g.module == "torch" => g.name.clone(),
        other => return Err(format!("dtype is {}", other.kind())),
    };
    let size_v = field(v, "size")?.ok_or("no size")?;
    let global = size(&size_v).map_err(|e| format!("size: {e}"))?;
    let chunks_v = field(v, "chunks")?.ok_or("no chunks")?;
    let mut chunks = Vec::new();
    for c in list_items(&chunks_v, "chunks")? {
        let offsets = size(&field(&c, "offsets")?.ok_or("chunk without offsets")?)?;
        let sizes = size(&field(&c, "sizes")?.ok_or("chunk without sizes")?)?;
        chunks.push(Chunk { offsets, sizes });
    }
    Ok(TensorMeta { dtype, size: global, chunks })
}

/// A `torch.Size` (REDUCE of `torch.Size` with one tuple of ints) or a plain tuple of ints.
pub fn size(v: &Value) -> R<Vec<usize>> {
    let t = match v {
        Value::Object(o) => {
            let o = o.borrow();
            if !(o.class.module == "torch" && o.class.name == "Size") || o.args.len() != 1 {
                return Err(format!("expected torch.Size, found {}", v.kind()));
            }
            o.args[0].clone()
        }
        other => other.clone(),
    };
    let items: Vec<Value> = match &t {
        Value::Tuple(t) => t.to_vec(),
        Value::List(l) => l.borrow().clone(),
        other => return Err(format!("expected a tuple of ints, found {}", other.kind())),
    };
    items
        .iter()
        .map(|x| {
            x.as_int()
                .and_then(|i| usize::try_from(i).ok())
                .ok_or_else(|| format!("dimension {} is not a non-negative int", x.kind()))
        })
        .collect()
}

fn object(v: &Value, module: &str, name: &str, what: &str) -> R<Value> {
    match v {
        Value::Object(o) if o.borrow().class.module == module && o.borrow().class.name == name => Ok(v.clone()),
        other => Err(format!("{what}: expected {module}.{name}, found {}", other.kind())),
    }
}

/// A dataclass field: the object's BUILD state is a dict (or `(None, slots dict)`).
fn field(v: &Value, name: &str) -> R<Option<Value>> {
    let Value::Object(o) = v else { return Err(format!("expected an object with field {name}, found {}", v.kind())) };
    let state = o.borrow().state.clone();
    match state {
        Some(s @ Value::Dict(_)) => dict_get(&s, name),
        Some(Value::Tuple(t)) if t.len() == 2 => {
            for part in t.iter() {
                if let Value::Dict(_) = part {
                    if let Some(x) = dict_get(part, name)? {
                        return Ok(Some(x));
                    }
                }
            }
            Ok(None)
        }
        None => Ok(None),
        Some(other) => Err(format!("object state is {}", other.kind())),
    }
}

fn dict_get(d: &Value, key: &str) -> R<Option<Value>> {
    let Value::Dict(d) = d else { return Err(format!("expected a dict, found {}", d.kind())) };
    Ok(d.borrow().iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v.clone()))
}

fn dict_items(d: &Value, what: &str) -> R<Vec<(Value, Value)>> {
    match d {
        Value::Dict(d) => Ok(d.borrow().clone()),
        other => Err(format!("{what} is {}, not a dict", other.kind())),
    }
}

fn list_items(v: &Value, what: &str) -> R<Vec<Value>> {
    match v {
        Value::List(l) => Ok(l.borrow().clone()),
        Value::Tuple(t) => Ok(t.to_vec()),
        other => Err(format!("{what} is {}, not a list", other.kind())),
    }
}
