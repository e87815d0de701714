//! `moe-expert-dump/1` files and `moe-verify compare` (docs/dumps.md).
//!
//! Dumps written from the reference's own results must round-trip and compare clean in every
//! class and dtype; every kind of bad input must exit 2 with a message naming the key; a
//! perturbed expectation must exit 1 and name the tensor.

use moe_harness::dump::{compare_dump, CountDtype, Dump};
use moe_reference::{
    to_state_dict, Activation, Dtype, ExpertSet, Inputs, LayerClass, LayerConfig, Parallelism, Reference,
};
use ndarray::{Array1, Array2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::TensorView;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn config(class: LayerClass, dtype: Dtype) -> LayerConfig {
    LayerConfig {
        class,
        num_experts: 4,
        hidden_size: 16,
        ffn_hidden_size: 24,
        gated_linear_unit: true,
        activation: Activation::Silu,
        // GroupedMLP has no biases; the other two exercise both bias paths.
        add_bias: class != LayerClass::Grouped,
        params_dtype: dtype,
        probs_dtype: if dtype == Dtype::F16 { Dtype::F16 } else { Dtype::F32 },
        // EP rank 1 of 2: the metadata must carry the global expert count through ep_size.
        parallel: Parallelism { tp_size: 1, tp_rank: 0, ep_size: 2, ep_rank: 1 },
        ..LayerConfig::example()
    }
}

/// A dump whose expectations are the emulating reference's own results. Expert 1 gets no
/// tokens, so its weight grads must be exactly zero in the comparison.
fn reference_dump(class: LayerClass, dtype: Dtype) -> Dump {
    let cfg = config(class, dtype);
    let counts = vec![7, 0];
    let t = 7;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut r = |scale: f64, d: Dtype| d.round(rng.random_range(-1.0..1.0) * scale);
    let hidden_states = Array2::from_shape_fn((t, cfg.hidden_size), |_| r(1.0, dtype));
    let probs = Array1::from_shape_fn(t, |_| r(0.5, cfg.probs_dtype).abs());
    let grad_output = Array2::from_shape_fn((t, cfg.hidden_size), |_| r(0.1, dtype));
    let params = to_state_dict(&cfg, &ExpertSet::random(&cfg, 11)).unwrap();
    let inputs = Inputs { hidden_states, tokens_per_expert: counts, probs };
    Dump::from_reference(&cfg, params, inputs, Some(grad_output), Reference::EMULATED).unwrap()
}

fn all_cases() -> Vec<(LayerClass, Dtype)> {
    let mut cases = vec![(LayerClass::Grouped, Dtype::Bf16)];
    for class in [LayerClass::Sequential, LayerClass::TeGrouped] {
        for dtype in Dtype::ALL {
            cases.push((class, dtype));
        }
    }
    cases
}

struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run_compare(path: &Path, extra: &[&str]) -> Outcome {
    let out = Command::new(env!("CARGO_BIN_EXE_moe-verify"))
        .arg("compare")
        .arg(path)
        .args(extra)
        .output()
        .expect("run moe-verify");
    Outcome {
        code: out.status.code().expect("exit code"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn dump_round_trips_through_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    for (class, dtype) in [(LayerClass::TeGrouped, Dtype::Bf16), (LayerClass::Grouped, Dtype::Bf16)] {
        let mut dump = reference_dump(class, dtype);
        for count_dtype in [CountDtype::I64, CountDtype::I32] {
            dump.count_dtype = count_dtype;
            let path = dir.path().join(format!("{class}-{count_dtype:?}.safetensors"));
            dump.write(&path).unwrap();
            assert_eq!(Dump::read(&path).unwrap(), dump, "{class} {count_dtype:?}");
        }
    }
}

#[test]
fn reference_dumps_compare_clean_in_every_class_and_dtype() {
    for (class, dtype) in all_cases() {
        let dump = reference_dump(class, dtype);
        let bytes = dump.to_bytes().unwrap();
        let read = Dump::from_bytes(&bytes, "mem").unwrap();
        // output, dx, dp and 2 experts × (fc1, fc2 weight [+ biases]) or GroupedMLP's two.
        let expected_rows = 3 + dump.expected.weight_grads.len();
        for oracle in [false, true] {
            let report = compare_dump(&read, "mem", oracle).unwrap();
            assert_eq!(report.rows.len(), expected_rows);
            // Against itself the emulating reference is bit-exact; against the oracle it is
            // within the single (undoubled) storage-dtype bound.
            assert!(report.passed, "{class} {dtype} oracle={oracle}:\n{report}");
            if !oracle {
                assert!(report.rows.iter().all(|r| r.diff.max_abs == 0.0), "{report}");
            }
        }
    }
}

#[test]
fn cli_passes_a_reference_dump_and_prints_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ok.safetensors");
    reference_dump(LayerClass::Sequential, Dtype::Bf16).write(&path).unwrap();
    let out = run_compare(&path, &[]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("grad.local_experts.1.linear_fc2.weight") && out.stdout.contains("PASS"),
        "{}",
        out.stdout
    );
    let out = run_compare(&path, &["--json", "--oracle"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["passed"], true);
    assert_eq!(v["reference"], "reference-f64");
    assert_eq!(v["rows"][0]["name"], "output");
}

/// The raw contents of a dump, to be corrupted one key at a time.
#[derive(Clone)]
struct Raw {
    meta: BTreeMap<String, String>,
    tensors: BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>,
}

impl Raw {
    fn of(dump: &Dump) -> Raw {
        let bytes = dump.to_bytes().unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        Raw {
            meta: header.metadata().clone().unwrap().into_iter().collect(),
            tensors: st
                .tensors()
                .into_iter()
                .map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
                .collect(),
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let views: Vec<(String, TensorView)> =
            self.tensors.iter().map(|(k, (d, s, b))| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
        safetensors::serialize(views, Some(self.meta.clone().into_iter().collect())).unwrap()
    }

    fn set_meta(mut self, key: &str, value: &str) -> Raw {
        self.meta.insert(key.into(), value.into());
        self
    }

    fn without(mut self, key: &str) -> Raw {
        assert!(self.tensors.remove(key).is_some() || self.meta.remove(key).is_some(), "no key {key}");
        self
    }

    fn with_tensor(mut self, key: &str, dtype: safetensors::Dtype, shape: Vec<usize>, data: Vec<u8>) -> Raw {
        self.tensors.insert(key.into(), (dtype, shape, data));
        self
    }

    /// Overwrites element `flat` of a bf16 tensor.
    fn poke_bf16(mut self, key: &str, flat: usize, value: f32) -> Raw {
        let data = &mut self.tensors.get_mut(key).unwrap().2;
        data[2 * flat..2 * flat + 2].copy_from_slice(&half::bf16::from_f32(value).to_le_bytes());
        self
    }

    /// Replaces the per-expert tensors `{key}0`, `{key}1`, ... with their stack `key`
    /// (`[E_l, ...]`, expert-major), the single grouped form of Megatron HEAD's TEGroupedMLP.
    fn packed(mut self, key: &str) -> Raw {
        let mut e = 0;
        let mut stacked: Option<(safetensors::Dtype, Vec<usize>, Vec<u8>)> = None;
        while let Some((dtype, shape, data)) = self.tensors.remove(&format!("{key}{e}")) {
            let s = stacked.get_or_insert_with(|| (dtype, [vec![0], shape].concat(), Vec::new()));
            s.1[0] += 1;
            s.2.extend(data);
            e += 1;
        }
        let (dtype, shape, data) = stacked.unwrap_or_else(|| panic!("no {key}0"));
        self.with_tensor(key, dtype, shape, data)
    }

    fn counts(self, counts: &[i64]) -> Raw {
        let data = counts.iter().flat_map(|c| c.to_le_bytes()).collect();
        self.with_tensor("input.tokens_per_expert", safetensors::Dtype::I64, vec![counts.len()], data)
    }
}

#[test]
fn bad_input_exits_2_naming_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let dump = reference_dump(LayerClass::TeGrouped, Dtype::Bf16);
    let raw = Raw::of(&dump);
    let good = raw.bytes();
    let probs_f32 = dump.inputs.probs.iter().flat_map(|&p| (p as f32).to_le_bytes()).collect::<Vec<u8>>();
    let f32_weight = vec![0u8; 4 * 48 * 16];
    // (case, bytes, text the message must contain: the key, and what was wrong)
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        ("not-safetensors", b"PK\x03\x04 this is a zip file".to_vec(), vec!["not a readable safetensors file"]),
        ("truncated", good[..good.len() - 10].to_vec(), vec!["not a readable safetensors file"]),
        ("empty", vec![], vec!["not a readable safetensors file"]),
        ("missing-meta", raw.clone().without("hidden_size").bytes(), vec!["__metadata__.hidden_size", "missing"]),
        (
            "format",
            raw.clone().set_meta("format", "moe-expert-dump/2").bytes(),
            vec!["__metadata__.format", "moe-expert-dump/1"],
        ),
        (
            "dtype",
            raw.clone().set_meta("params_dtype", "float8_e4m3").bytes(),
            vec!["__metadata__.params_dtype", "float8_e4m3", "bfloat16"],
        ),
        (
            "activation",
            raw.clone().set_meta("activation", "relu").bytes(),
            vec!["__metadata__.activation", "relu", "squared_relu"],
        ),
        ("layer", raw.clone().set_meta("layer", "moe_mlp").bytes(), vec!["__metadata__.layer", "te_grouped"]),
        ("bool", raw.clone().set_meta("add_bias", "yes").bytes(), vec!["__metadata__.add_bias", "true or false"]),
        ("missing-param", raw.clone().without("linear_fc2.weight1").bytes(), vec!["linear_fc2.weight1", "missing"]),
        (
            "extra-param",
            raw.clone().with_tensor("linear_fc3.weight0", safetensors::Dtype::BF16, vec![1], vec![0, 0]).bytes(),
            vec!["linear_fc3.weight0", "unexpected"],
        ),
        (
            "shape",
            raw.clone()
                .with_tensor("linear_fc1.weight0", safetensors::Dtype::BF16, vec![16, 48], vec![0; 2 * 48 * 16])
                .bytes(),
            vec!["linear_fc1.weight0", "[48, 16]"],
        ),
        (
            "param-dtype",
            raw.clone().with_tensor("linear_fc1.weight0", safetensors::Dtype::F32, vec![48, 16], f32_weight).bytes(),
            vec!["linear_fc1.weight0", "float32", "bfloat16"],
        ),
        (
            "probs-dtype",
            raw.clone()
                .with_tensor("input.permuted_probs", safetensors::Dtype::I32, vec![7], probs_f32.clone())
                .bytes(),
            vec!["input.permuted_probs", "float32 or bfloat16"],
        ),
        (
            "counts-dtype",
            raw.clone().with_tensor("input.tokens_per_expert", safetensors::Dtype::F32, vec![2], vec![0; 8]).bytes(),
            vec!["input.tokens_per_expert", "int64 or int32"],
        ),
        ("counts-negative", raw.clone().counts(&[8, -1]).bytes(), vec!["input.tokens_per_expert", "negative"]),
        ("counts-sum", raw.clone().counts(&[3, 3]).bytes(), vec!["input.tokens_per_expert", "7 rows"]),
        ("counts-len", raw.clone().counts(&[7]).bytes(), vec!["input.tokens_per_expert", "[2]"]),
        (
            "nan",
            raw.clone().poke_bf16("input.permuted_local_hidden_states", 2 * 16 + 3, f32::NAN).bytes(),
            vec!["input.permuted_local_hidden_states", "NaN", "[2, 3]"],
        ),
        (
            "inf-param",
            raw.clone().poke_bf16("linear_fc2.bias0", 5, f32::INFINITY).bytes(),
            vec!["linear_fc2.bias0", "inf", "[5]"],
        ),
        (
            "inf-grad-output",
            raw.clone().poke_bf16("input.grad_output", 0, f32::NEG_INFINITY).bytes(),
            vec!["input.grad_output", "-inf", "[0, 0]"],
        ),
        (
            "tp",
            raw.clone().set_meta("tp_size", "5").set_meta("add_bias", "false").bytes(),
            vec!["__metadata__", "ffn_hidden_size (24) is not divisible", "(5)"],
        ),
        (
            "ep",
            raw.clone().set_meta("num_experts", "5").bytes(),
            vec!["__metadata__", "num_experts (5) is not divisible", "(2)"],
        ),
        ("no-grad-output", raw.clone().without("input.grad_output").bytes(), vec!["input.grad_output", "missing"]),
        (
            "unknown-expected",
            raw.clone()
                .with_tensor("expected.grad.linear_fc1.weight7", safetensors::Dtype::BF16, vec![1], vec![0, 0])
                .bytes(),
            vec!["expected.grad.linear_fc1.weight7", "not a parameter"],
        ),
        (
            "unknown-input",
            raw.clone().with_tensor("input.routing_map", safetensors::Dtype::BF16, vec![1], vec![0, 0]).bytes(),
            vec!["input.routing_map", "unknown key"],
        ),
        (
            "expected-shape",
            raw.clone()
                .with_tensor("expected.output", safetensors::Dtype::BF16, vec![7, 15], vec![0; 2 * 7 * 15])
                .bytes(),
            vec!["expected.output", "[7, 16]"],
        ),
        (
            "nothing-expected",
            raw.tensors.keys().filter(|k| k.starts_with("expected.")).fold(raw.clone(), |r, k| r.without(k)).bytes(),
            vec!["expected.*", "nothing to compare"],
        ),
    ];
    for (case, bytes, needles) in cases {
        let path = dir.path().join(format!("{case}.safetensors"));
        std::fs::write(&path, bytes).unwrap();
        let out = run_compare(&path, &[]);
        assert_eq!(out.code, 2, "{case}: stdout {} stderr {}", out.stdout, out.stderr);
        assert!(!out.stderr.contains("panicked"), "{case}: {}", out.stderr);
        let file = path.display().to_string();
        for needle in needles.iter().chain(std::iter::once(&file.as_str())) {
            assert!(out.stderr.contains(needle), "{case}: {needle:?} not in {}", out.stderr);
        }
    }
    // A file that is not there at all.
    let out = run_compare(&dir.path().join("absent.safetensors"), &["--json"]);
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("absent.safetensors") && out.stderr.contains("cannot read"), "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(v["error"].as_str().unwrap().contains("absent.safetensors"));
}

/// Megatron HEAD can build TEGroupedMLP with single grouped parameters
/// (`moe_single_grouped_weight` / `moe_single_grouped_bias`, spec §3.2): its `state_dict()` then
/// holds `linear_fc1.weight` `[E_l, N1, h]` instead of `linear_fc1.weight0..`, and a user's dump
/// of it must compare exactly like the per-expert dump of the same layer, parameters and
/// gradients packed independently; a parameter in both forms, or a stack of the wrong expert
/// count, is bad input naming the key.
#[test]
fn single_grouped_te_dumps_compare_like_per_expert_ones() {
    let dir = tempfile::tempdir().unwrap();
    let dump = reference_dump(LayerClass::TeGrouped, Dtype::Bf16);
    let discrete = compare_dump(&dump, "mem", false).unwrap();
    let raw = Raw::of(&dump);
    let params = ["linear_fc1.weight", "linear_fc2.weight", "linear_fc1.bias", "linear_fc2.bias"];
    let grads = params.map(|p| format!("expected.grad.{p}"));
    let all_packed = params.iter().copied().chain(grads.iter().map(String::as_str)).fold(raw.clone(), Raw::packed);
    let weights_only = raw.clone().packed("linear_fc1.weight").packed("linear_fc2.weight");
    let grads_only = grads.iter().fold(raw.clone(), |r, g| r.packed(g));
    for (case, packed) in [("all", all_packed.clone()), ("weights", weights_only), ("grads", grads_only)] {
        let bytes = packed.bytes();
        let read = Dump::from_bytes(&bytes, case).unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(read.params, dump.params, "{case}: parameters read as the per-expert ones");
        assert_eq!(read.expected, dump.expected, "{case}: expectations read as the per-expert ones");
        assert_eq!(compare_dump(&read, "mem", false).unwrap(), discrete, "{case}");
        let path = dir.path().join(format!("{case}.safetensors"));
        std::fs::write(&path, bytes).unwrap();
        let out = run_compare(&path, &[]);
        assert_eq!(out.code, 0, "{case}: {}{}", out.stdout, out.stderr);
        assert!(out.stdout.contains("grad.linear_fc1.weight1"), "{case}: {}", out.stdout);
    }
    let both = all_packed.clone().with_tensor(
        "linear_fc2.weight1",
        raw.tensors["linear_fc2.weight1"].0,
        raw.tensors["linear_fc2.weight1"].1.clone(),
        raw.tensors["linear_fc2.weight1"].2.clone(),
    );
    let (dt, shape, data) = all_packed.tensors["expected.grad.linear_fc1.bias"].clone();
    let short =
        all_packed.with_tensor("expected.grad.linear_fc1.bias", dt, vec![1, shape[1]], data[..data.len() / 2].to_vec());
    for (case, bad, needles) in [
        ("both-layouts", both, vec!["linear_fc2.weight", "linear_fc2.weight1", "both present"]),
        ("short-stack", short, vec!["expected.grad.linear_fc1.bias", "[2, 48]"]),
    ] {
        let path = dir.path().join(format!("{case}.safetensors"));
        std::fs::write(&path, bad.bytes()).unwrap();
        let out = run_compare(&path, &[]);
        assert_eq!(out.code, 2, "{case}: {}{}", out.stdout, out.stderr);
        for needle in needles {
            assert!(out.stderr.contains(needle), "{case}: {needle:?} not in {}", out.stderr);
        }
    }
}

#[test]
fn perturbed_expectation_exits_1_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    for (class, key) in [
        (LayerClass::TeGrouped, "grad.linear_fc2.weight0"),
        (LayerClass::Grouped, "grad.weight1"),
        (LayerClass::Sequential, "output"),
    ] {
        let mut dump = reference_dump(class, Dtype::Bf16);
        // Expert 0's block of the tensor (or the whole output) scaled by 1.5: far outside the
        // doubled bf16 bound of about 0.13·(|x| + rms).
        match key.strip_prefix("grad.") {
            Some(param) => {
                let g = dump.expected.weight_grads.get_mut(param).unwrap();
                let n = g.len() / if class == LayerClass::Grouped { 2 } else { 1 };
                g.iter_mut().take(n).for_each(|v| *v = Dtype::Bf16.round(*v * 1.5));
            }
            None => dump.expected.output.as_mut().unwrap().mapv_inplace(|v| Dtype::Bf16.round(v * 1.5)),
        }
        let path: PathBuf = dir.path().join(format!("{class}.safetensors"));
        dump.write(&path).unwrap();
        let out = run_compare(&path, &[]);
        assert_eq!(out.code, 1, "{class}: {}{}", out.stdout, out.stderr);
        let last = out.stdout.lines().last().unwrap();
        assert!(last.starts_with("FAIL: 1 of") && last.contains(key), "{class}: {}", out.stdout);
        let v: serde_json::Value = serde_json::from_str(&run_compare(&path, &["--json"]).stdout).unwrap();
        assert_eq!(v["passed"], false);
        let failed: Vec<&str> = v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["passed"] == false)
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert_eq!(failed, vec![key]);
    }
}

/// Dumps written by tools/dump_experts.py from the PyTorch stand-ins on an H100
/// (docs/gpu-validation.md, "Dumps from PyTorch"): CI has no torch, so these are the files that
/// keep the reader honest about what the Python `safetensors` writer produces.
#[test]
fn pytorch_written_dumps_compare_clean() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    for (file, class, rows) in [
        ("pytorch-h100-te_grouped-bf16-swiglu-bias.safetensors", LayerClass::TeGrouped, 19),
        ("pytorch-h100-grouped-bf16-swiglu.safetensors", LayerClass::Grouped, 5),
    ] {
        let path = data.join(file);
        let dump = Dump::read(&path).unwrap();
        assert_eq!(dump.config.class, class);
        assert_eq!(dump.inputs.tokens_per_expert, vec![37, 0, 52, 41]);
        let report = compare_dump(&dump, file, false).unwrap();
        assert_eq!(report.rows.len(), rows);
        assert!(report.passed, "{report}");
        // Expert 1 had no tokens: PyTorch's grads for it must be exactly zero, and are.
        if class == LayerClass::TeGrouped {
            let row = report.rows.iter().find(|r| r.diff.name == "grad.linear_fc1.weight1").unwrap();
            assert_eq!(row.diff.max_abs, 0.0);
        }
        assert_eq!(run_compare(&path, &[]).code, 0);
    }
}

/// Megatron's zero-token call (spec §4.4 step 3, §4.5.1): `T = 0`, every count zero. The dump
/// holds `[0, h]` tensors, and every weight grad must be exactly zero.
#[test]
fn zero_token_dump_round_trips_and_compares_clean() {
    for class in LayerClass::ALL {
        let cfg = config(class, Dtype::Bf16);
        let params = to_state_dict(&cfg, &ExpertSet::random(&cfg, 3)).unwrap();
        let inputs = Inputs {
            hidden_states: Array2::zeros((0, cfg.hidden_size)),
            tokens_per_expert: vec![0, 0],
            probs: Array1::zeros(0),
        };
        let grad = Some(Array2::zeros((0, cfg.hidden_size)));
        let dump = Dump::from_reference(&cfg, params, inputs, grad, Reference::EMULATED).unwrap();
        let read = Dump::from_bytes(&dump.to_bytes().unwrap(), "zero").unwrap();
        assert_eq!(read, dump);
        let report = compare_dump(&read, "zero", false).unwrap();
        assert!(report.passed, "{report}");
    }
}

/// Dumps written before `num_experts` was recorded give the global count as
/// `num_local_experts × ep_size`; 3 local experts on EP 2 tell a product from a sum.
#[test]
fn a_dump_without_num_experts_has_num_local_experts_times_ep_size() {
    let cfg = LayerConfig { num_experts: 6, ..config(LayerClass::TeGrouped, Dtype::Bf16) };
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let t = 4;
    let hidden_states = Array2::from_shape_fn((t, cfg.hidden_size), |_| Dtype::Bf16.round(rng.random_range(-1.0..1.0)));
    let probs = Array1::from_elem(t, 0.5);
    let params = to_state_dict(&cfg, &ExpertSet::random(&cfg, 5)).unwrap();
    let inputs = Inputs { hidden_states, tokens_per_expert: vec![1, 0, 3], probs };
    let dump = Dump::from_reference(&cfg, params, inputs, None, Reference::EMULATED).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.safetensors");
    std::fs::write(&path, Raw::of(&dump).without("num_experts").bytes()).unwrap();
    assert_eq!(Dump::read(&path).unwrap().config.num_experts, 6);
}

/// A dump of a GLU-interleaved TEGroupedMLP (Megatron HEAD's `moe_mlp_glu_interleave_size`,
/// metadata `glu_interleave_size`, spec §4.10) round-trips and compares clean; read without
/// the key, the same parameters mean another layer and the comparison fails (exit 1): the key
/// is what makes the comparison right. A value that is not a positive integer, does not divide
/// the rank's half width, or sits on a class Megatron does not interleave is bad input (exit 2)
/// naming the key.
#[test]
fn interleaved_te_dumps_compare_with_their_interleave_size() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LayerConfig { glu_interleave_size: Some(4), ..config(LayerClass::TeGrouped, Dtype::Bf16) };
    let base = reference_dump(LayerClass::TeGrouped, Dtype::Bf16);
    let params = to_state_dict(&cfg, &ExpertSet::random(&cfg, 11)).unwrap();
    let dump =
        Dump::from_reference(&cfg, params, base.inputs.clone(), base.grad_output.clone(), Reference::EMULATED).unwrap();
    let path = dir.path().join("interleaved.safetensors");
    dump.write(&path).unwrap();
    let read = Dump::read(&path).unwrap();
    assert_eq!(read, dump);
    assert_eq!(read.config.glu_interleave_size, Some(4));
    assert_eq!(run_compare(&path, &[]).code, 0);

    let raw = Raw::of(&dump);
    let plain = dir.path().join("plain.safetensors");
    std::fs::write(&plain, raw.clone().without("glu_interleave_size").bytes()).unwrap();
    let out = run_compare(&plain, &[]);
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);

    for (case, value, needles) in [
        ("not-a-number", "four", vec!["__metadata__.glu_interleave_size", "positive integer"]),
        ("not-dividing", "5", vec!["N1 = 48", "2·glu_interleave_size = 10"]),
    ] {
        let p = dir.path().join(format!("{case}.safetensors"));
        std::fs::write(&p, raw.clone().set_meta("glu_interleave_size", value).bytes()).unwrap();
        let out = run_compare(&p, &[]);
        assert_eq!(out.code, 2, "{case}: {}", out.stderr);
        for n in needles {
            assert!(out.stderr.contains(n), "{case}: {n:?} not in {}", out.stderr);
        }
    }
    let seq = Raw::of(&reference_dump(LayerClass::Sequential, Dtype::Bf16)).set_meta("glu_interleave_size", "2");
    let p = dir.path().join("sequential.safetensors");
    std::fs::write(&p, seq.bytes()).unwrap();
    let out = run_compare(&p, &[]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("glu_interleave_size 2 with SequentialMLP"), "{}", out.stderr);
}

/// Why: a dump is a file users diff and check in; `safetensors` takes its metadata as a
/// `HashMap`, whose iteration order differs between maps, so the same dump serialized twice
/// gave different header bytes. Serializing twice must give the same bytes, and they must read
/// back to the same dump.
#[test]
fn the_same_dump_serializes_to_the_same_bytes() {
    use moe_harness::dump::Dump;
    use moe_reference::{to_state_dict, ExpertSet, LayerConfig, Reference};
    let cfg = LayerConfig { num_experts: 3, hidden_size: 8, ffn_hidden_size: 4, ..LayerConfig::example() };
    let sd = to_state_dict(&cfg, &ExpertSet::random(&cfg, 5)).unwrap();
    let inputs = moe_reference::Inputs {
        hidden_states: ndarray::Array2::from_elem((4, 8), 0.5),
        tokens_per_expert: vec![1, 0, 3],
        probs: ndarray::Array1::from_elem(4, 0.25),
    };
    let dump = Dump::from_reference(&cfg, sd, inputs, None, Reference::EMULATED).unwrap();
    let first = dump.to_bytes().unwrap();
    for _ in 0..8 {
        assert_eq!(dump.to_bytes().unwrap(), first, "header bytes differ between two serializations");
    }
    let back = Dump::from_bytes(&first, "dump.safetensors").unwrap();
    assert_eq!(back.to_bytes().unwrap(), first);
}
