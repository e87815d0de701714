//! Hugging Face checkpoints and `moe-verify diff` (issue 14): the fixtures under
//! `tests/data/hf/` (written by transformers' `save_pretrained`, see
//! tools/make_hf_fixtures.py) against their expected canonical weights written in moe-verify's
//! format by our own writer; planted conversion bugs, each named precisely; bad input.
//!
//! * [`fixtures`]: every family diffs identical against the same weights in our format;
//!   `reshard` from HF and `inspect`.
//! * [`planted`]: one test per `diff` verdict, each with the conversion bug only it names.
//! * [`bad_input`]: missing shard, truncated header, mismatched shapes and dtypes, torch_dist
//!   without its reader — a clear error naming file and key, exit 2, nothing written.

mod bad_input;
mod fixtures;
mod planted;

use moe_checkpoint::diff::{diff, DiffOptions, DiffReport};
use moe_checkpoint::sharded::{ExpertLayout, RankCoord};
use moe_checkpoint::tensor::{RawStateDict, RawTensor};
use moe_checkpoint::{open_source, save, SaveOptions, SavePart, SourceOverrides};
use moe_reference::state_dict::per_expert_name;
use moe_reference::{Dtype, ExpertParam, LayerClass, LayerConfig, Parallelism};
use safetensors::tensor::TensorView;
use safetensors::{Dtype as StDtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The families with a fixture directory each.
pub(super) const FIXTURES: [&str; 6] =
    ["mixtral", "qwen3-moe", "deepseek-v3", "deepseek-v3-fp8", "gpt-oss", "gpt-oss-mxfp4"];

pub(super) fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/hf").join(name)
}

/// A stored tensor: dtype, shape, bytes.
pub(super) type Stored = (StDtype, Vec<usize>, Vec<u8>);

/// Every tensor of a safetensors file.
pub(super) fn read_st(path: &Path) -> BTreeMap<String, Stored> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec()))).collect()
}

/// Writes tensors as a safetensors file.
pub(super) fn write_st(path: &Path, tensors: &BTreeMap<String, Stored>) {
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|(k, (d, s, b))| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn dtype_of(d: StDtype) -> Dtype {
    match d {
        StDtype::BF16 => Dtype::Bf16,
        StDtype::F16 => Dtype::F16,
        StDtype::F32 => Dtype::F32,
        other => panic!("expected.safetensors holds {other:?}"),
    }
}

/// The expected canonical weights of a fixture: `(layer, expert, param)` -> tensor.
pub(super) fn expected(name: &str) -> BTreeMap<(usize, usize, ExpertParam), RawTensor> {
    let mut out = BTreeMap::new();
    for (k, (d, s, b)) in read_st(&fixture(name).join("expected.safetensors")) {
        let p: Vec<&str> = k.split('.').collect();
        let (l, e) = (p[1].parse().unwrap(), p[3].parse().unwrap());
        let param = match (p[4], p[5]) {
            ("fc1", "weight") => ExpertParam::Fc1Weight,
            ("fc1", "bias") => ExpertParam::Fc1Bias,
            ("fc2", "weight") => ExpertParam::Fc2Weight,
            ("fc2", "bias") => ExpertParam::Fc2Bias,
            _ => panic!("unexpected key {k}"),
        };
        out.insert((l, e, param), RawTensor { dtype: dtype_of(d), shape: s, data: b });
    }
    out
}

/// The layer config of one layer of canonical weights.
pub(super) fn layer_config(
    w: &BTreeMap<(usize, usize, ExpertParam), RawTensor>,
    layer: usize,
    class: LayerClass,
    ep: usize,
) -> LayerConfig {
    let experts = w.keys().filter(|k| k.0 == layer && k.2 == ExpertParam::Fc1Weight).count();
    let fc1 = &w[&(layer, 0, ExpertParam::Fc1Weight)].shape;
    let fc2 = &w[&(layer, 0, ExpertParam::Fc2Weight)].shape;
    LayerConfig {
        class,
        num_experts: experts,
        hidden_size: fc2[0],
        ffn_hidden_size: fc2[1],
        gated_linear_unit: fc1[0] == 2 * fc2[1],
        add_bias: w.contains_key(&(layer, 0, ExpertParam::Fc1Bias)),
        parallel: Parallelism { tp_size: 1, ep_size: ep, ..Parallelism::SINGLE },
        ..LayerConfig::example()
    }
}

/// Writes canonical weights as a moe-verify checkpoint with our own writer: SequentialMLP,
/// `ep` expert-parallel ranks, one prefix per layer (`prefix(layer)`).
pub(super) fn write_ours(
    dir: &Path,
    w: &BTreeMap<(usize, usize, ExpertParam), RawTensor>,
    ep: usize,
    prefix: impl Fn(usize) -> String,
) {
    let layers: std::collections::BTreeSet<usize> = w.keys().map(|k| k.0).collect();
    let mut parts: Vec<(ExpertLayout, RankCoord, RawStateDict)> = Vec::new();
    for l in layers {
        let cfg = layer_config(w, l, LayerClass::Sequential, ep);
        let layout = ExpertLayout { prefix: prefix(l), ..ExpertLayout::new(cfg.clone()) };
        let el = cfg.num_local_experts();
        for q in 0..ep {
            let mut sd = RawStateDict::new();
            for e in 0..el {
                for p in ExpertParam::ALL {
                    if let Some(t) = w.get(&(l, q * el + e, p)) {
                        sd.insert(per_expert_name(LayerClass::Sequential, e, p), t.clone());
                    }
                }
            }
            parts.push((layout.clone(), RankCoord::new(q, 0), sd));
        }
    }
    let save_parts: Vec<SavePart> =
        parts.iter().map(|(layout, rank, state)| SavePart { layout, rank: *rank, state }).collect();
    save(dir, &save_parts, &SaveOptions::default()).unwrap();
}

/// `decoder.layers.{l}.mlp.`
pub(super) fn megatron_prefix(l: usize) -> String {
    format!("decoder.layers.{l}.mlp.")
}

/// Opens both sides with inference and diffs them.
pub(super) fn diff_dirs(a: &Path, b: &Path, atol: Option<f64>) -> DiffReport {
    let o = SourceOverrides::default();
    let (sa, sb) = (open_source(a, &o).unwrap(), open_source(b, &o).unwrap());
    diff(sa.as_ref(), sb.as_ref(), &DiffOptions { atol, ..DiffOptions::default() }).unwrap()
}

/// Runs the binary.
pub(super) fn moe_verify(args: &[&std::ffi::OsStr]) -> std::process::Output {
    std::process::Command::new(crate::moe_verify_bin()).args(args).output().unwrap()
}

/// A copy of a fixture directory whose `model.safetensors` tensors went through `edit`.
pub(super) fn planted_hf(dst: &Path, name: &str, edit: impl FnOnce(&mut BTreeMap<String, Stored>)) {
    std::fs::create_dir_all(dst).unwrap();
    std::fs::copy(fixture(name).join("config.json"), dst.join("config.json")).unwrap();
    let mut t = read_st(&fixture(name).join("model.safetensors"));
    edit(&mut t);
    write_st(&dst.join("model.safetensors"), &t);
}
