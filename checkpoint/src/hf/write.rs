//! Writing any [`ExpertSource`]'s experts as a Hugging Face directory of one family
//! (`moe-verify reshard SRC DST --hf FAMILY`): `model.safetensors` with the family's expert
//! tensor names and layouts (the inverse of the reader, module doc of [`super`]) and a
//! `config.json` naming the family and the expert sizes. Only expert tensors are written, so the
//! directory is for `diff` and inspection, not a loadable model.
//!
//! The file is streamed: its header is computed from the entries' shapes, then each tensor is
//! produced from one expert's canonical tensor at a time. It is written into a hidden sibling
//! directory and renamed into place, so a failure leaves nothing at the destination.

use super::{Family, SINGLE};
use crate::experts::{ExpertEntry, ExpertSource};
use crate::sources::convert::{as_raw, layers};
use crate::tensor::{safetensors_dtype, RawTensor};
use crate::CheckpointError;
use moe_reference::{Dtype, ExpertParam};
use std::io::Write;
use std::path::{Path, PathBuf};

/// How one stored tensor (or one expert's part of a stacked one) comes from a canonical tensor.
#[derive(Clone, Copy, Debug)]
enum Transform {
    /// As is.
    Whole,
    /// Rows `[start, end)` of a matrix.
    Rows(usize, usize),
    /// Transposed matrix.
    Transpose,
    /// fc1 `[2f, h]` to GPT-OSS `[h, 2f]` with gate on even columns, up on odd.
    OssInterleaveT,
    /// fc1 bias `[2f]` to GPT-OSS's interleaved order.
    OssInterleave,
}

/// One tensor of the output file: name, shape, dtype and its pieces (in order).
struct Planned {
    name: String,
    shape: Vec<usize>,
    dtype: Dtype,
    pieces: Vec<(ExpertEntry, Transform)>,
}

fn apply(t: &RawTensor, tr: Transform) -> Vec<u8> {
    let el = t.dtype.size_bytes();
    let (rows, cols) = match t.shape[..] {
        [r, c] => (r, c),
        [n] => (n, 1),
        _ => (t.data.len() / el, 1),
    };
    let gather = |n: usize, idx: &dyn Fn(usize) -> usize| -> Vec<u8> {
        let mut out = Vec::with_capacity(n * el);
        for i in 0..n {
            let s = idx(i) * el;
            out.extend_from_slice(&t.data[s..s + el]);
        }
        out
    };
    let f = rows / 2;
    let from_interleaved = |c: usize| if c.is_multiple_of(2) { c / 2 } else { f + c / 2 };
    match tr {
        Transform::Whole => t.data.clone(),
        Transform::Rows(a, b) => t.data[a * cols * el..b * cols * el].to_vec(),
        Transform::Transpose => gather(rows * cols, &|k| (k % rows) * cols + k / rows),
        // out [h, 2f]: out[i, c] = fc1[from_interleaved(c), i].
        Transform::OssInterleaveT => gather(rows * cols, &|k| from_interleaved(k % rows) * cols + k / rows),
        Transform::OssInterleave => gather(rows, &from_interleaved),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_path_buf(), source }
}

/// The tensors of `family` for every layer of `src`, in file order.
fn plan(src: &dyn ExpertSource, family: Family) -> Result<(Vec<Planned>, serde_json::Value), CheckpointError> {
    let layers = layers(src)?;
    let mut out = Vec::new();
    let mut config = serde_json::Map::new();
    let model_type = match family {
        Family::Mixtral => "mixtral",
        Family::Qwen3Moe => "qwen3_moe",
        Family::DeepseekV3 => "deepseek_v3",
        Family::GptOss => "gpt_oss",
    };
    config.insert("model_type".into(), model_type.into());
    config.insert("moe_verify_note".into(), "expert tensors only, written by moe-verify reshard --hf".into());
    for l in &layers {
        let m = &l.info;
        let bad = |msg: String| CheckpointError::Layout(format!("layer {}: {msg}", l.layer));
        if !m.glu {
            return Err(bad(format!("{} experts are gated (fc1 [2f, h]); this layer has fc1 [f, h]", family.name())));
        }
        if m.bias && family != Family::GptOss {
            return Err(bad(format!("{} experts have no biases; this layer has them", family.name())));
        }
        let (e_n, h, f) = (m.num_experts, m.hidden, m.ffn);
        let ent = |e: usize, p: ExpertParam| l.entries[e][p.index()].clone().expect("listed by layers()");
        let p = format!("model.layers.{}.", l.layer);
        match family {
            Family::GptOss => {
                let stacked = |name: &str, shape: Vec<usize>, param, tr| Planned {
                    name: format!("{p}mlp.experts.{name}"),
                    shape,
                    dtype: m.dtype,
                    pieces: (0..e_n).map(|e| (ent(e, param), tr)).collect(),
                };
                out.push(stacked(
                    "gate_up_proj",
                    vec![e_n, h, 2 * f],
                    ExpertParam::Fc1Weight,
                    Transform::OssInterleaveT,
                ));
                if m.bias {
                    out.push(stacked(
                        "gate_up_proj_bias",
                        vec![e_n, 2 * f],
                        ExpertParam::Fc1Bias,
                        Transform::OssInterleave,
                    ));
                }
                out.push(stacked("down_proj", vec![e_n, f, h], ExpertParam::Fc2Weight, Transform::Transpose));
                if m.bias {
                    out.push(stacked("down_proj_bias", vec![e_n, h], ExpertParam::Fc2Bias, Transform::Whole));
                }
            }
            _ => {
                let (head, [g, u, d]) = match family {
                    Family::Mixtral => ("block_sparse_moe.experts", ["w1", "w3", "w2"]),
                    _ => ("mlp.experts", ["gate_proj", "up_proj", "down_proj"]),
                };
                for e in 0..e_n {
                    let one = |w: &str, shape: Vec<usize>, param, tr| Planned {
                        name: format!("{p}{head}.{e}.{w}.weight"),
                        shape,
                        dtype: m.dtype,
                        pieces: vec![(ent(e, param), tr)],
                    };
                    out.push(one(g, vec![f, h], ExpertParam::Fc1Weight, Transform::Rows(0, f)));
                    out.push(one(u, vec![f, h], ExpertParam::Fc1Weight, Transform::Rows(f, 2 * f)));
                    out.push(one(d, vec![h, f], ExpertParam::Fc2Weight, Transform::Whole));
                }
            }
        }
        let experts_key = match family {
            Family::Mixtral | Family::GptOss => "num_local_experts",
            Family::Qwen3Moe => "num_experts",
            Family::DeepseekV3 => "n_routed_experts",
        };
        config.insert(experts_key.into(), e_n.into());
        config.insert("hidden_size".into(), h.into());
        let ffn_key = if matches!(family, Family::Qwen3Moe | Family::DeepseekV3) {
            "moe_intermediate_size"
        } else {
            "intermediate_size"
        };
        config.insert(ffn_key.into(), f.into());
    }
    let n_layers = layers.iter().map(|l| l.layer + 1).max().unwrap_or(0);
    config.insert("num_hidden_layers".into(), n_layers.into());
    if family == Family::DeepseekV3 {
        let first = layers.iter().map(|l| l.layer).min().unwrap_or(0);
        config.insert("first_k_dense_replace".into(), first.into());
    }
    Ok((out, serde_json::Value::Object(config)))
}

/// A hidden sibling of `dir` for writing before the rename.
fn tmp_sibling(dir: &Path) -> Result<PathBuf, CheckpointError> {
    let name =
        dir.file_name().ok_or_else(|| CheckpointError::Layout(format!("{}: no directory name", dir.display())))?;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    Ok(dir.with_file_name(format!(".{}.tmp-{}-{nanos}", name.to_string_lossy(), std::process::id())))
}

/// Writes `src`'s experts into `dst` as a Hugging Face directory of `family`; returns the bytes
/// of tensor data written.
pub fn write_hf(src: &dyn ExpertSource, dst: &Path, family: Family, force: bool) -> Result<u64, CheckpointError> {
    if dst.exists() && !force {
        return Err(CheckpointError::Exists { path: dst.to_path_buf() });
    }
    let (planned, config) = plan(src, family)?;
    // Header: offsets in file order; padded with spaces to 8 bytes as safetensors writers do.
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut offset = 0u64;
    for t in &planned {
        let n = (t.shape.iter().product::<usize>() * t.dtype.size_bytes()) as u64;
        header.insert(
            t.name.clone(),
            serde_json::json!({ "dtype": safetensors_dtype(t.dtype), "shape": t.shape, "data_offsets": [offset, offset + n] }),
        );
        offset += n;
    }
    let mut hbytes = serde_json::to_vec(&header).expect("header serializes");
    while !hbytes.len().is_multiple_of(8) {
        hbytes.push(b' ');
    }
    let tmp = tmp_sibling(dst)?;
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;
    let result = (|| {
        let path = tmp.join(SINGLE);
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).map_err(io(&path))?);
        f.write_all(&(hbytes.len() as u64).to_le_bytes()).map_err(io(&path))?;
        f.write_all(&hbytes).map_err(io(&path))?;
        let mut last: Option<(ExpertEntry, RawTensor)> = None;
        for t in &planned {
            for (entry, tr) in &t.pieces {
                if last.as_ref().is_none_or(|(e, _)| e != entry) {
                    last = Some((entry.clone(), as_raw(src, entry, t.dtype)?));
                }
                let raw = &last.as_ref().expect("just set").1;
                f.write_all(&apply(raw, *tr)).map_err(io(&path))?;
            }
        }
        let file = f.into_inner().map_err(|e| CheckpointError::Io { path: path.clone(), source: e.into_error() })?;
        file.sync_all().map_err(io(&path))?;
        let cpath = tmp.join("config.json");
        std::fs::write(&cpath, serde_json::to_vec_pretty(&config).expect("config serializes")).map_err(io(&cpath))?;
        if dst.exists() {
            std::fs::remove_dir_all(dst).map_err(io(dst))?;
        }
        std::fs::rename(&tmp, dst).map_err(io(dst))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.map(|()| offset)
}
