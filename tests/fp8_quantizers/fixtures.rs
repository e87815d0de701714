//! Golden fixtures from TransformerEngine's reference quantizers (`tests/data/fp8/`), bit for bit.

use super::E4M3;
use std::path::PathBuf;

use half::bf16;
use moe_reference::fp8::{
    blockwise::BlockTile,
    codec::{decode, encode_torch},
    delayed::{AmaxComputeAlgo, DelayedScaling, DelayedScalingConfig},
    mxfp8::{block_exponent, MxBlock, Mxfp8Quantizer},
    scale::ScaleOptions,
    BlockQuantizer, CurrentScalingQuantizer, Fp8Format, Fp8Quantizer, Fp8Tensor, Scales, Usage,
};
use moe_reference::Dtype;
use ndarray::Array2;
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Golden fixtures from TransformerEngine's reference quantizers.
// ---------------------------------------------------------------------------------------------

const FIXTURE_COMMAND: &str = "python3 tools/fp8_fixtures.py --te-references $TE/tests/pytorch/references \
     --te-mxfp8-test $TE/tests/pytorch/test_mxfp8_2d_quantize.py --te-quantization \
     $TE/transformer_engine/pytorch/quantization.py --te-commit <sha> --out tests/data/fp8";

/// The parsed fixture. The fixtures are committed: a missing or unreadable one is a failure
/// (it names the file and how to regenerate it), never a skip.
fn fixture(test: &str, file: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/fp8").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "fp8_quantizers::{test}: fixture {} is missing ({e}); regenerate it with {FIXTURE_COMMAND}",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn b64(text: &str) -> Vec<u8> {
    fn val(c: u8) -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("bad base64 byte {c}"),
        }
    }
    let bytes: Vec<u8> = text.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, &c)| acc | (val(c) << (18 - 6 * i)));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("fixture field {key} missing in {v:.200}"))
}

fn u32_of(v: &Value, key: &str) -> u32 {
    v[key].as_u64().unwrap_or_else(|| panic!("fixture field {key}")) as u32
}

fn shape_of(v: &Value, key: &str) -> (usize, usize) {
    let s: Vec<usize> = v[key].as_array().expect(key).iter().map(|d| d.as_u64().unwrap() as usize).collect();
    (s[0], s[1])
}

/// The fixture's input tensors, as f32 values of their dtype.
fn inputs(doc: &Value) -> std::collections::BTreeMap<String, (Array2<f32>, Dtype)> {
    let mut out = std::collections::BTreeMap::new();
    for (name, t) in doc["inputs"].as_object().expect("inputs") {
        let dtype = Dtype::parse(str_of(t, "dtype")).unwrap();
        let (m, n) = shape_of(t, "shape");
        let raw = b64(str_of(t, "b64"));
        let values: Vec<f32> = match dtype {
            Dtype::F32 => f32s(&raw),
            Dtype::Bf16 => raw.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::F16 => raw.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        };
        out.insert(name.clone(), (Array2::from_shape_vec((m, n), values).unwrap(), dtype));
    }
    out
}

fn assert_codes(what: &str, got: &Array2<u8>, want_b64: &str) {
    let want = b64(want_b64);
    let got: Vec<u8> = got.iter().copied().collect();
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(k) = got.iter().zip(&want).position(|(a, b)| a != b) {
        let differing = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        panic!(
            "{what}: code {k} is {:#04x}, TE's reference has {:#04x} ({differing} of {} differ)",
            got[k],
            want[k],
            got.len()
        );
    }
}

fn assert_scale_grid(what: &str, got: &Scales, want: &[f32], shape: (usize, usize)) {
    let grid = match got {
        Scales::Block { scale_inv, .. } => scale_inv,
        other => panic!("{what}: {other:?}"),
    };
    assert_eq!(grid.dim(), shape, "{what}: scale grid shape");
    for (k, (g, w)) in grid.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{what}: scale_inv {k}: {g:e} vs TE's {w:e}");
    }
}

#[test]
fn fixture_per_tensor_current_scaling() {
    let doc = fixture("fixture_per_tensor_current_scaling", "per_tensor.json");
    let inputs = inputs(&doc);
    let cases = doc["cases"].as_array().expect("cases");
    assert!(cases.len() >= 32, "{} cases", cases.len());
    for case in cases {
        let (x, dtype) = &inputs[str_of(case, "input")];
        let format = Fp8Format::parse(str_of(case, "format")).unwrap();
        let options = ScaleOptions {
            force_pow_2_scales: case["force_pow_2_scales"].as_bool().unwrap(),
            amax_epsilon: f32::from_bits(u32_of(case, "amax_epsilon_bits")),
        };
        let what = format!("{} {format} {options:?}", str_of(case, "input"));
        let out = CurrentScalingQuantizer { format, options }.quantize("x", x.view(), *dtype, Usage::BOTH).unwrap();
        let (row, col) = (out.rowwise.unwrap(), out.columnwise.unwrap());
        assert_codes(&what, &row.data, str_of(case, "data_b64"));
        assert_codes(&format!("{what} transpose"), &col.data, str_of(case, "data_t_b64"));
        for (t, key) in [(&row, "scale_inv_bits"), (&col, "scale_inv_t_bits")] {
            let Scales::PerTensor { scale_inv } = t.scales else { panic!() };
            assert_eq!(scale_inv.to_bits(), u32_of(case, key), "{what}: {key}");
        }
    }
}

#[test]
fn fixture_blockwise() {
    let doc = fixture("fixture_blockwise", "blockwise.json");
    let inputs = inputs(&doc);
    for case in doc["cases"].as_array().expect("cases") {
        let (x, dtype) = &inputs[str_of(case, "input")];
        let format = Fp8Format::parse(str_of(case, "format")).unwrap();
        let tile = BlockTile::parse(str_of(case, "tile")).unwrap();
        let options = ScaleOptions {
            force_pow_2_scales: case["force_pow_2_scales"].as_bool().unwrap(),
            amax_epsilon: f32::from_bits(u32_of(case, "amax_epsilon_bits")),
        };
        let what = format!("{} {} {format} {options:?}", str_of(case, "input"), tile.name());
        let out = BlockQuantizer { format, tile, options }.quantize("x", x.view(), *dtype, Usage::BOTH).unwrap();
        let (row, col) = (out.rowwise.unwrap(), out.columnwise.unwrap());
        assert_codes(&what, &row.data, str_of(case, "data_b64"));
        assert_scale_grid(
            &what,
            &row.scales,
            &f32s(&b64(str_of(case, "scale_inv_b64"))),
            shape_of(case, "scale_inv_shape"),
        );
        assert_codes(&format!("{what} columnwise"), &col.data, str_of(case, "data_t_b64"));
        let want_t = f32s(&b64(str_of(case, "scale_inv_t_b64")));
        assert_scale_grid(&format!("{what} columnwise"), &col.scales, &want_t, shape_of(case, "scale_inv_t_shape"));
    }
}

#[test]
fn fixture_mxfp8() {
    let doc = fixture("fixture_mxfp8", "mxfp8.json");
    let table = &doc["e8m0"];
    let amaxes = table["amax_bits"].as_array().unwrap();
    let want = table["e8m0"].as_array().unwrap();
    for (a, w) in amaxes.iter().zip(want) {
        let amax = f32::from_bits(a.as_u64().unwrap() as u32);
        assert_eq!(u64::from(block_exponent(amax, E4M3)), w.as_u64().unwrap(), "e8m0 of amax {amax:e}");
    }
    let inputs = inputs(&doc);
    for case in doc["cases"].as_array().expect("cases") {
        let (x, dtype) = &inputs[str_of(case, "input")];
        let block = match str_of(case, "block") {
            "1x32" => MxBlock::Row1x32,
            "32x32" => MxBlock::Square32,
            other => panic!("block {other}"),
        };
        let what = format!("{} {}", str_of(case, "input"), str_of(case, "block"));
        let out = Mxfp8Quantizer { format: E4M3, block }.quantize("x", x.view(), *dtype, Usage::BOTH).unwrap();
        let (row, col) = (out.rowwise.unwrap(), out.columnwise.unwrap());
        let check = |t: &Fp8Tensor, data: &str, e: &str, shape: &str, what: &str| {
            assert_codes(what, &t.data, str_of(case, data));
            let Scales::E8m0 { exponents, .. } = &t.scales else { panic!() };
            assert_eq!(exponents.dim(), shape_of(case, shape), "{what}: e8m0 shape");
            assert_codes(&format!("{what} e8m0"), exponents, str_of(case, e));
        };
        check(&row, "data_b64", "e8m0_b64", "e8m0_shape", &what);
        if block == MxBlock::Row1x32 {
            check(&col, "data_t_b64", "e8m0_t_b64", "e8m0_t_shape", &format!("{what} columnwise"));
        } else {
            assert_eq!(col, row.transposed());
        }
    }
}

/// TE's unfused Python update (the fixture's source) against this module's emulation of it, and
/// the fused kernel's scale within one ulp of it (`reciprocal(amax)·fp8_max` vs one division).
#[test]
fn fixture_delayed_scaling() {
    let doc = fixture("fixture_delayed_scaling", "delayed.json");
    let (mut off_by_one, mut steps) = (0, 0);
    for seq in doc["sequences"].as_array().expect("sequences") {
        let format = Fp8Format::parse(str_of(seq, "format")).unwrap();
        let config = DelayedScalingConfig {
            margin: seq["margin"].as_i64().unwrap() as i32,
            amax_history_len: seq["amax_history_len"].as_u64().unwrap() as usize,
            amax_compute_algo: AmaxComputeAlgo::parse(str_of(seq, "amax_compute_algo")).unwrap(),
        };
        let mut state = DelayedScaling::new(format, config).unwrap();
        let mut fused = state.clone();
        for (k, st) in seq["steps"].as_array().unwrap().iter().enumerate() {
            state.record_amax(f32::from_bits(u32_of(st, "amax_bits")));
            state.update_unfused();
            let what = format!("{format} {config:?} step {k}");
            assert_eq!(state.scale().to_bits(), u32_of(st, "scale_bits"), "{what}: scale {}", state.scale());
            let history: Vec<u32> = state.amax_history().iter().map(|v| v.to_bits()).collect();
            let want: Vec<u32> = f32s(&b64(str_of(st, "history_b64"))).iter().map(|v| v.to_bits()).collect();
            assert_eq!(history, want, "{what}: amax history");
            fused.record_amax(f32::from_bits(u32_of(st, "amax_bits")));
            fused.update();
            assert_eq!(fused.amax_history(), state.amax_history(), "{what}: fused history");
            let ulps = (i64::from(fused.scale().to_bits()) - i64::from(state.scale().to_bits())).abs();
            assert!(ulps <= 1, "{what}: fused scale {} vs unfused {}", fused.scale(), state.scale());
            off_by_one += usize::from(ulps == 1);
            steps += 1;
            // The next step starts from the fixture's scale on both paths.
            fused = state.clone();
        }
    }
    assert!(steps >= 300 && off_by_one * 2 < steps, "{off_by_one} of {steps} scales differ by one ulp");
}

#[test]
fn fixture_torch_cast() {
    let doc = fixture("fixture_torch_cast", "torch_cast.json");
    let xs: Vec<f32> =
        doc["input_bits"].as_array().unwrap().iter().map(|b| f32::from_bits(b.as_u64().unwrap() as u32)).collect();
    for fmt in Fp8Format::ALL {
        let want = doc[fmt.name()].as_array().unwrap();
        for (x, w) in xs.iter().zip(want) {
            assert_eq!(
                u64::from(encode_torch(*x, fmt)),
                w.as_u64().unwrap(),
                "{fmt} torch cast of {x:e} ({:#x})",
                x.to_bits()
            );
        }
        let decoded = f32s(&b64(str_of(&doc, &format!("{}_decoded_b64", fmt.name()))));
        for (code, want) in decoded.iter().enumerate() {
            let got = decode(code as u8, fmt);
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "{fmt} decode {code:#04x}");
        }
    }
}
