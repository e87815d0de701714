//! FP8 dumps (issue 12 item 6): `moe-expert-dump/1` with an fp8 recipe in its metadata and,
//! optionally, the weights as the implementation quantized them. Reference-written fp8 dumps
//! compare clean under every recipe; scales that do not match their bytes, unaligned splits TE
//! refuses and unknown recipes exit 2 naming the key; a wrong expectation or a quantization
//! other than TE's exits 1 naming the tensor.

use moe_harness::dump::{fp8, Dump};
use moe_reference::fp8::Scales;
use moe_reference::{
    to_state_dict, Dtype, ExpertSet, Fp8Config, Fp8Recipe, Inputs, LayerClass, LayerConfig, Reference, TeFormat,
};
use ndarray::{Array1, Array2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

fn fp8_config(class: LayerClass, recipe: Fp8Recipe, format: TeFormat) -> LayerConfig {
    LayerConfig {
        class,
        num_experts: 2,
        hidden_size: 32,
        ffn_hidden_size: 32,
        add_bias: true,
        fp8: Some(Fp8Config::new(recipe).with_format(format)),
        ..LayerConfig::example()
    }
}

/// A dump whose expectations and quantized weights are the emulating reference's own; expert 1
/// has no tokens, expert 0 an unaligned 7 (padded by the layer).
fn fp8_dump(cfg: &LayerConfig, counts: Vec<i64>) -> Dump {
    let t = counts.iter().sum::<i64>() as usize;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut r = |scale: f64, d: Dtype| d.round(rng.random_range(-1.0..1.0) * scale);
    let hidden_states = Array2::from_shape_fn((t, cfg.hidden_size), |_| r(1.0, Dtype::Bf16));
    let probs = Array1::from_shape_fn(t, |_| r(1.0, Dtype::F32).abs());
    let grad_output = Array2::from_shape_fn((t, cfg.hidden_size), |_| r(0.1, Dtype::Bf16));
    let params = to_state_dict(cfg, &ExpertSet::random(cfg, 3)).unwrap();
    let inputs = Inputs { hidden_states, tokens_per_expert: counts, probs };
    Dump::from_reference(cfg, params, inputs, Some(grad_output), Reference::EMULATED).unwrap()
}

struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

fn compare(path: &Path, extra: &[&str]) -> Outcome {
    let out =
        std::process::Command::new(crate::moe_verify_bin()).arg("compare").arg(path).args(extra).output().unwrap();
    Outcome {
        code: out.status.code().unwrap(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

type Tensors = BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>;

/// The dump's bytes with its tensors and metadata edited by `edit`.
fn edited(dump: &Dump, edit: impl FnOnce(&mut Tensors, &mut HashMap<String, String>)) -> Vec<u8> {
    let bytes = dump.to_bytes().unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Tensors =
        st.tensors().into_iter().map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec()))).collect();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = header.metadata().clone().unwrap();
    edit(&mut tensors, &mut meta);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(k, (d, s, b))| (k.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize(views, Some(meta)).unwrap()
}

#[test]
fn fp8_reference_dumps_round_trip_and_compare_clean_under_every_recipe() {
    let dir = tempfile::tempdir().unwrap();
    for class in [LayerClass::Sequential, LayerClass::TeGrouped] {
        for recipe in Fp8Recipe::ALL {
            let cfg = fp8_config(class, recipe, recipe.default_format());
            let dump = fp8_dump(&cfg, vec![7, 0]);
            assert_eq!(dump.fp8_weights.len(), 4, "fc1 and fc2 weights of both experts");
            let path = dir.path().join(format!("{class}-{recipe}.safetensors"));
            dump.write(&path).unwrap();
            assert_eq!(Dump::read(&path).unwrap(), dump, "{class} {recipe}");
            let out = compare(&path, &[]);
            assert_eq!(out.code, 0, "{class} {recipe}:\n{}{}", out.stdout, out.stderr);
            assert!(out.stdout.contains(&format!("fp8       {}", cfg.fp8.unwrap().label())), "{}", out.stdout);
            assert!(out.stdout.contains("calc_diff"), "{}", out.stdout);
            let json = compare(&path, &["--json", "--oracle"]);
            assert_eq!(json.code, 0, "{class} {recipe} against the oracle:\n{}{}", json.stdout, json.stderr);
            let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
            assert_eq!(v["fp8"], cfg.fp8.unwrap().label());
            let rows = v["rows"].as_array().unwrap();
            assert!(rows.iter().any(|r| r["name"].as_str().unwrap().starts_with("fp8.")), "{v}");
            assert!(rows.iter().all(|r| r["calc_diff"].is_number()), "{v}");
        }
    }
}

/// A scale_inv doubled (one exponent step) no longer turns the bytes into the weight: bad input,
/// exit 2, naming the scale tensor, its weight and the first element that does not match.
#[test]
fn scales_that_do_not_match_their_bytes_exit_2_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    for recipe in Fp8Recipe::ALL {
        let dump = fp8_dump(&fp8_config(LayerClass::TeGrouped, recipe, TeFormat::E4M3), vec![7, 0]);
        let key = "fp8.linear_fc1.weight1.scale_inv";
        let bytes = edited(&dump, |t, _| {
            let (d, _, b) = t.get_mut(key).unwrap();
            if *d == safetensors::Dtype::U8 {
                b[0] += 1; // E8M0: one exponent up
            } else {
                let v = f32::from_le_bytes(b[..4].try_into().unwrap()) * 2.0;
                b[..4].copy_from_slice(&v.to_le_bytes());
            }
        });
        let path = dir.path().join(format!("{recipe}.safetensors"));
        std::fs::write(&path, bytes).unwrap();
        let out = compare(&path, &[]);
        assert_eq!(out.code, 2, "{recipe}: {}{}", out.stdout, out.stderr);
        for needle in [key, "do not match the bytes", "linear_fc1.weight1", "element [0, 0]"] {
            assert!(out.stderr.contains(needle), "{recipe}: {needle:?} not in {}", out.stderr);
        }
    }
}

/// Codes and scales that do represent the weight, but not as TE quantizes it (power-of-2 scales
/// where the recipe uses f32 ones): the dump is valid and its `fp8.` row differs, exit 1.
#[test]
fn a_quantization_other_than_tes_exits_1_naming_the_weight() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = fp8_config(LayerClass::Sequential, Fp8Recipe::Tensorwise, TeFormat::Hybrid);
    let mut dump = fp8_dump(&cfg, vec![7, 0]);
    let name = "local_experts.0.linear_fc2.weight";
    let pow2 = LayerConfig { fp8: cfg.fp8.map(|f| Fp8Config { power_2_scales: true, ..f }), ..cfg.clone() };
    let w = dump.params[name].view().into_dimensionality::<ndarray::Ix2>().unwrap().to_owned();
    let other = fp8::reference_weight(&pow2, name, w.view()).unwrap();
    assert_ne!(other.scales, dump.fp8_weights[name].scales);
    dump.fp8_weights.insert(name.into(), other);
    let path = dir.path().join("pow2.safetensors");
    dump.write(&path).unwrap();
    let out = compare(&path, &[]);
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.trim_end().ends_with(&format!("FAIL: 1 of {} tensor(s) differ: fp8.{name}", 3 + 4 + 4 + 4)),
        "{}",
        out.stdout
    );
}

/// A wrong expectation in an fp8 dump (the output doubled) fails like in any other dump.
#[test]
fn a_wrong_expectation_in_an_fp8_dump_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let mut dump = fp8_dump(&fp8_config(LayerClass::TeGrouped, Fp8Recipe::Blockwise, TeFormat::E4M3), vec![7, 0]);
    dump.expected.output.as_mut().unwrap().mapv_inplace(|v| 2.0 * v);
    let path = dir.path().join("doubled.safetensors");
    dump.write(&path).unwrap();
    let out = compare(&path, &[]);
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("differ: output"), "{}", out.stdout);
}

/// Bad fp8 input, each exit 2 with a message naming the key: an unknown recipe, E5M2 as a TE
/// format, splits TE refuses without Megatron's padding (MXFP8: multiples of 32; SequentialMLP's
/// TE `Linear`: multiples of 8), fp8 tensors
/// in a dump without a recipe, scales without codes, codes of the wrong dtype.
#[test]
fn bad_fp8_input_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let dump = fp8_dump(&fp8_config(LayerClass::TeGrouped, Fp8Recipe::Tensorwise, TeFormat::Hybrid), vec![7, 0]);
    let mxfp8 = LayerConfig {
        fp8: Some(Fp8Config { pad_to_alignment: false, ..Fp8Config::new(Fp8Recipe::Mxfp8) }),
        ..fp8_config(LayerClass::TeGrouped, Fp8Recipe::Mxfp8, TeFormat::E4M3)
    };
    let mut unaligned =
        fp8_dump(&LayerConfig { fp8: Some(Fp8Config::new(Fp8Recipe::Mxfp8)), ..mxfp8.clone() }, vec![7, 32]);
    unaligned.config = mxfp8;
    // SequentialMLP's TE Linear without Megatron's padding: rows a multiple of 8 (every recipe).
    let seq_nopad = LayerConfig {
        fp8: Some(Fp8Config { pad_to_alignment: false, ..Fp8Config::new(Fp8Recipe::Tensorwise) }),
        ..fp8_config(LayerClass::Sequential, Fp8Recipe::Tensorwise, TeFormat::Hybrid)
    };
    let mut unaligned_seq =
        fp8_dump(&LayerConfig { fp8: Some(Fp8Config::new(Fp8Recipe::Tensorwise)), ..seq_nopad.clone() }, vec![8, 5]);
    unaligned_seq.config = seq_nopad;
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        (
            "unaligned-sequential",
            unaligned_seq.to_bytes().unwrap(),
            vec!["input.tokens_per_expert", "expert 1 linear_fc1.input", "divisible by 8"],
        ),
        (
            "unknown-recipe",
            edited(&dump, |_, m| {
                m.insert("fp8_recipe".into(), "nvfp4".into());
            }),
            vec!["__metadata__.fp8_recipe", "nvfp4", "tensorwise, delayed, blockwise or mxfp8"],
        ),
        (
            "e5m2",
            edited(&dump, |_, m| {
                m.insert("fp8_format".into(), "e5m2".into());
            }),
            vec!["__metadata__.fp8_format", "Pure E5M2 training is not supported"],
        ),
        (
            "unaligned-mxfp8",
            unaligned.to_bytes().unwrap(),
            vec!["input.tokens_per_expert", "expert 0 linear_fc1.input", "divisible by 32"],
        ),
        (
            "fp8-tensor-without-recipe",
            edited(&dump, |_, m| {
                m.retain(|k, _| !k.starts_with("fp8_"));
            }),
            vec!["fp8.linear_fc1.weight0", "without __metadata__.fp8_recipe"],
        ),
        (
            "scales-without-codes",
            edited(&dump, |t, _| {
                t.remove("fp8.linear_fc2.weight0");
            }),
            vec!["fp8.linear_fc2.weight0.scale_inv", "scales without their codes"],
        ),
        (
            "codes-dtype",
            edited(&dump, |t, _| {
                t.get_mut("fp8.linear_fc2.weight0").unwrap().0 = safetensors::Dtype::F8_E5M2;
            }),
            vec!["fp8.linear_fc2.weight0", "F8_E4M3"],
        ),
        (
            "scale-shape",
            edited(&dump, |t, _| {
                let s = t.get_mut("fp8.linear_fc2.weight0.scale_inv").unwrap();
                s.1 = vec![1, 1];
            }),
            vec!["fp8.linear_fc2.weight0.scale_inv", "shape [1, 1]"],
        ),
        (
            "format-without-recipe",
            {
                let plain = Dump { fp8_weights: BTreeMap::new(), ..dump.clone() };
                edited(&plain, |_, m| {
                    m.remove("fp8_recipe");
                })
            },
            vec!["__metadata__.fp8_format", "without fp8_recipe"],
        ),
    ];
    for (case, bytes, needles) in cases {
        let path = dir.path().join(format!("{case}.safetensors"));
        std::fs::write(&path, bytes).unwrap();
        let out = compare(&path, &[]);
        assert_eq!(out.code, 2, "{case}: {}{}", out.stdout, out.stderr);
        for needle in needles {
            assert!(out.stderr.contains(needle), "{case}: {needle:?} not in {}", out.stderr);
        }
    }
    // The scales the reference writes are the recipe's layout.
    let t = &dump.fp8_weights["linear_fc1.weight0"];
    assert!(matches!(t.scales, Scales::PerTensor { .. }));
}

/// A dump written by the PyTorch fp8 stand-in (`tools/test_dump_experts.py`, case
/// `fp8_te_bf16_tensorwise_e4m3_bias`: TEGroupedMLP, bias, E4M3, every GEMM through
/// `torch._scaled_mm`, torch 2.15.0 on CPU): the recipe and the quantized weights are read, the
/// weights equal TE's quantization bit for bit, and every tensor is within the error model.
#[test]
fn a_torch_scaled_mm_written_fp8_dump_compares_clean() {
    let file = "pytorch-cpu-te_grouped-bf16-fp8-tensorwise-e4m3-bias.safetensors";
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(file);
    let dump = Dump::read(&path).unwrap();
    assert_eq!(dump.config.fp8, Some(Fp8Config::new(Fp8Recipe::Tensorwise).with_format(TeFormat::E4M3)));
    assert_eq!(dump.inputs.tokens_per_expert, vec![37, 0, 52, 41]);
    // Expert 1 had no tokens: the stand-in ran no fp8 GEMM for it and wrote no quantized weight.
    assert_eq!(dump.fp8_weights.len(), 6);
    let report = moe_harness::dump::compare_dump(&dump, file, false).unwrap();
    assert!(report.passed, "{report}");
    assert_eq!(report.rows.iter().filter(|r| r.diff.name.starts_with("fp8.")).count(), 6);
    let oracle = moe_harness::dump::compare_dump(&dump, file, true).unwrap();
    assert!(oracle.passed, "{oracle}");
    assert_eq!(compare(&path, &[]).code, 0);
}
