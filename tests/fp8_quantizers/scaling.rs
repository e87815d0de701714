//! Per-tensor scales from TE's `compute_scale_from_amax`, current scaling and delayed scaling.

use super::{pow2, q, E4M3, E5M2};

use half::bf16;
use moe_reference::fp8::{
    delayed::{AmaxComputeAlgo, DelayedScaling, DelayedScalingConfig},
    scale::{block_scale, compute_scale_from_amax, current_scale, ScaleOptions},
    ColumnwiseCopy, CurrentScalingQuantizer, Fp8Quantizer, Fp8Tensor, Scales, Usage,
};
use moe_reference::Dtype;
use ndarray::{arr2, Array2};

// ---------------------------------------------------------------------------------------------
// Scales, from TE's compute_scale_from_amax written out.
// ---------------------------------------------------------------------------------------------

#[test]
fn hand_derived_scales() {
    let cur = ScaleOptions::CURRENT_SCALING_DEFAULT;
    let p2 = ScaleOptions { force_pow_2_scales: true, amax_epsilon: 0.0 };
    // scale = fp8_max / amax.
    assert_eq!(current_scale(1.0, E4M3, cur), 448.0);
    assert_eq!(current_scale(1.0, E5M2, cur), 57344.0);
    // 448/3 = 149.333…, correctly rounded to f32: 149.33333587646484375 (0x43155555).
    assert_eq!(current_scale(3.0, E4M3, cur).to_bits(), 0x4315_5555);
    // Power of 2: keep sign and exponent (round down): 448 → 256, 57344 → 32768, 149.3 → 128.
    assert_eq!(current_scale(1.0, E4M3, p2), 256.0);
    assert_eq!(current_scale(1.0, E5M2, p2), 32768.0);
    assert_eq!(current_scale(3.0, E4M3, p2), 128.0);
    // amax 0, inf, NaN: scale 1 (before and after the epsilon floor).
    for a in [0.0, f32::INFINITY, f32::NAN] {
        assert_eq!(current_scale(a, E4M3, cur), 1.0, "amax {a}");
        assert_eq!(current_scale(a, E4M3, p2), 1.0, "amax {a}");
    }
    // The epsilon floors the amax (and rescues amax 0): 448 / 2^-10 = 458752.
    let eps = ScaleOptions { force_pow_2_scales: false, amax_epsilon: pow2(-10) };
    assert_eq!(current_scale(0.0, E4M3, eps), 458752.0);
    assert_eq!(current_scale(pow2(-12), E4M3, eps), 458752.0);
    assert_eq!(current_scale(1.0, E4M3, eps), 448.0);
    // Tiny amax: 448 / 1e-39 overflows f32 → value_for_inf: f32 max for current scaling,
    // 2^127 with power-of-2 scales (the mask of 0x7F7FFFFF).
    assert_eq!(current_scale(1e-39, E4M3, cur), f32::MAX);
    assert_eq!(current_scale(1e-39, E4M3, p2), pow2(127));
    // Blocks take the input dtype's largest finite value instead.
    assert_eq!(block_scale(1e-39, E4M3, Dtype::Bf16, cur), f32::from_bits(0x7F7F_0000));
    assert_eq!(block_scale(1e-39, E4M3, Dtype::F32, cur), f32::MAX);
    assert_eq!(block_scale(1e-39, E4M3, Dtype::Bf16, p2), pow2(127));
    assert_eq!(block_scale(1e-5, E4M3, Dtype::F16, cur), 448.0 / 1e-5, "finite quotient above f16 max is kept");
    assert_eq!(compute_scale_from_amax(1e-39, 448.0, false, 0.0, 65504.0), 65504.0);
    assert_eq!(compute_scale_from_amax(1e-39, 448.0, true, 0.0, 65504.0), 32768.0);
    // TE's test_quantization_block_tiling_extrema_versus_reference, written out: a tile of bf16
    // max gives scale_inv = 1 / 2^floor(log2(448 / bf16_max)) with power-of-2 scales.
    let bf16_max = bf16::MAX.to_f32();
    let s = block_scale(bf16_max, E4M3, Dtype::Bf16, p2);
    let expected = 1.0 / 2f64.powf((448.0 / f64::from(bf16_max)).log2().floor());
    assert_eq!(f64::from(1.0 / s), expected);
    // scale_inv = 1/scale correctly rounded: 1/448 = 0.0022321428… → 0x3B124925.
    assert_eq!((1.0f32 / 448.0).to_bits(), 0x3B12_4925);
}
#[test]
fn current_scaling_hand_case() {
    // amax 3 → scale 149.33333587646484 (0x43155555); codes of x·scale:
    //   1·s = 149.33 → 144 (1.125·2^7, code 14<<3|1 = 0x71)
    //  -2·s = -298.67 → -288 (1.125·2^8, 0x79 | 0x80 = 0xF9)
    //  0.5·s = 74.67 → 72 (1.125·2^6, 0x69)
    //   3·s = 448.0000076 → f32 448 → 0x7E
    let x = arr2(&[[1.0f32, -2.0], [0.5, 3.0]]);
    let mut quant = CurrentScalingQuantizer::new(E4M3);
    let (row, col) = q(&mut quant, &x, Dtype::Bf16, Usage::BOTH);
    let row = row.unwrap();
    assert_eq!(row.data, arr2(&[[0x71u8, 0xF9], [0x69, 0x7E]]));
    let s = f32::from_bits(0x4315_5555);
    assert_eq!(row.scales, Scales::PerTensor { scale_inv: 1.0 / s });
    let col = col.unwrap();
    assert_eq!(col.data, row.data.t(), "columnwise = the same codes transposed");
    assert_eq!(col.scales, row.scales);
    assert_eq!(quant.columnwise_copy(), ColumnwiseCopy::TransposeOfRowwise);
    assert_eq!(row.value_at(0, 0), 144.0 * f64::from(1.0 / s));
    // An all-zero tensor: amax 0, scale 1.
    let (z, _) = q(&mut quant, &Array2::zeros((2, 3)), Dtype::F32, Usage::ROWWISE);
    assert_eq!(z.unwrap().scales, Scales::PerTensor { scale_inv: 1.0 });
    // NaN elements are not part of the amax; they encode to 0x7F. An inf amax gives scale 1.
    let x = arr2(&[[f32::NAN, 2.0], [-f32::INFINITY, 1.0]]);
    let (r, _) = q(&mut quant, &x, Dtype::F32, Usage::ROWWISE);
    let r = r.unwrap();
    assert_eq!(r.scales, Scales::PerTensor { scale_inv: 1.0 });
    assert_eq!(r.data, arr2(&[[0x7Fu8, 0x40], [0xFE, 0x38]]));
    let x = arr2(&[[f32::NAN, 2.0]]);
    let (r, _) = q(&mut quant, &x, Dtype::F32, Usage::ROWWISE);
    assert_eq!(r.unwrap().scales, Scales::PerTensor { scale_inv: 1.0 / 224.0 }, "NaN ignored: amax 2");
}

#[test]
fn inputs_must_be_values_of_their_dtype() {
    let x = arr2(&[[1.0f32, 0.1]]);
    let err = CurrentScalingQuantizer::new(E4M3).quantize("fc1_input", x.view(), Dtype::Bf16, Usage::BOTH).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("fc1_input") && msg.contains("[0, 1]") && msg.contains("bfloat16"), "{msg}");
    assert!(CurrentScalingQuantizer::new(E4M3).quantize("x", x.view(), Dtype::F32, Usage::BOTH).is_ok());
}

// ---------------------------------------------------------------------------------------------
// Delayed scaling.
// ---------------------------------------------------------------------------------------------

fn step(state: &mut DelayedScaling, x: &[f32]) -> Fp8Tensor {
    let a = Array2::from_shape_vec((1, x.len()), x.to_vec()).unwrap();
    let out = state.quantize("x", a.view(), Dtype::F32, Usage::ROWWISE).unwrap();
    out.rowwise.unwrap()
}

#[test]
fn delayed_scaling_sequence_max() {
    let config = DelayedScalingConfig { margin: 0, amax_history_len: 3, amax_compute_algo: AmaxComputeAlgo::Max };
    let mut s = DelayedScaling::new(E4M3, config).unwrap();
    assert_eq!((s.scale(), s.amax_history()), (1.0, &[0.0f32, 0.0, 0.0][..]));
    // Step 0 quantizes with the initial scale 1 and records amax 2; the update rolls
    // [2,0,0] → [0,0,2] and sets 448/2 = 224.
    let t = step(&mut s, &[2.0, -0.5]);
    assert_eq!(t.data.as_slice().unwrap(), &[0x40, 0xB0]);
    assert_eq!(t.scales, Scales::PerTensor { scale_inv: 1.0 });
    s.update();
    assert_eq!((s.scale(), s.amax_history()), (224.0, &[0.0f32, 0.0, 2.0][..]));
    // Step 1 uses 224: 8·224 saturates to 448 (0x7E), -1·224 = -224 = -1.75·2^7 (0xF6).
    let t = step(&mut s, &[8.0, -1.0]);
    assert_eq!(t.data.as_slice().unwrap(), &[0x7E, 0xF6]);
    assert_eq!(t.scales, Scales::PerTensor { scale_inv: 1.0 / 224.0 });
    s.update(); // [8,0,2] → [0,2,8], max 8 → 56
    assert_eq!((s.scale(), s.amax_history()), (56.0, &[0.0f32, 2.0, 8.0][..]));
    // Two quantizations in one step record their maximum (atomic max into amax_history[0]).
    step(&mut s, &[0.5]);
    step(&mut s, &[-1.0]);
    s.update(); // [1,2,8] → [0,8,1], max 8
    assert_eq!((s.scale(), s.amax_history()), (56.0, &[0.0f32, 8.0, 1.0][..]));
    step(&mut s, &[0.5]);
    s.update(); // [0.5,8,1] → [0,1,0.5], window {8,1,0.5}: still 56
    assert_eq!((s.scale(), s.amax_history()), (56.0, &[0.0f32, 1.0, 0.5][..]));
    step(&mut s, &[0.25]);
    s.update(); // [0.25,1,0.5] → [0,0.5,0.25], max 1 → 448
    assert_eq!((s.scale(), s.amax_history()), (448.0, &[0.0f32, 0.5, 0.25][..]));
    // A step without a (non-zero) amax: no roll, amax 0 → the previous scale.
    step(&mut s, &[0.0, -0.0]);
    s.update();
    assert_eq!((s.scale(), s.amax_history()), (448.0, &[0.0f32, 0.5, 0.25][..]));
    // An infinite amax rolls in but keeps the previous scale.
    step(&mut s, &[f32::NEG_INFINITY]);
    s.update();
    assert_eq!((s.scale(), s.amax_history()), (448.0, &[0.0f32, 0.25, f32::INFINITY][..]));
}

#[test]
fn delayed_scaling_most_recent_margin_and_tiny_amax() {
    let config =
        DelayedScalingConfig { margin: 1, amax_history_len: 4, amax_compute_algo: AmaxComputeAlgo::MostRecent };
    let mut s = DelayedScaling::new(E5M2, config).unwrap();
    assert_eq!(s.scaled_max(), 28672.0, "57344 · 2^-1");
    for (amax, scale) in [(4.0f32, 7168.0f32), (64.0, 448.0), (1.0, 28672.0)] {
        step(&mut s, &[amax]);
        s.update();
        assert_eq!(s.scale(), scale, "most_recent: 28672 / {amax}");
    }
    assert_eq!(s.amax_history(), &[0.0, 4.0, 64.0, 1.0]);
    // 28672 / 1e-40 overflows → f32 max.
    step(&mut s, &[1e-40]);
    s.update();
    assert_eq!(s.scale(), f32::MAX);
    // History length 1: the window is the current amax alone.
    let mut one =
        DelayedScaling::new(E4M3, DelayedScalingConfig { amax_history_len: 1, ..Default::default() }).unwrap();
    for (amax, scale) in [(2.0f32, 224.0f32), (0.5, 896.0)] {
        step(&mut one, &[amax]);
        one.update();
        assert_eq!((one.scale(), one.amax_history()), (scale, &[0.0f32][..]));
    }
    // Margins beyond f32's range: 0 and inf, no panic.
    let far = DelayedScaling::new(E4M3, DelayedScalingConfig { margin: i32::MIN, ..Default::default() }).unwrap();
    assert_eq!(far.scaled_max(), f32::INFINITY);
    let near = DelayedScaling::new(E4M3, DelayedScalingConfig { margin: i32::MAX, ..Default::default() }).unwrap();
    assert_eq!(near.scaled_max(), 0.0);
    let err =
        DelayedScaling::new(E4M3, DelayedScalingConfig { amax_history_len: 0, ..Default::default() }).unwrap_err();
    assert!(err.to_string().contains("amax_history_len"), "{err}");
    assert!(AmaxComputeAlgo::parse("mean").is_err());
    assert_eq!(AmaxComputeAlgo::parse("most_recent").unwrap().name(), "most_recent");
}
