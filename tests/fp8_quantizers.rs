//! The fp8 quantizers of `moe_reference::fp8` (issue 12, item 2), bit for bit.
//!
//! * Exhaustive codec checks: all 256 codes of each format round-trip decode → encode; every
//!   midpoint between neighbouring codes (every binade boundary, the subnormal/normal boundary
//!   and the overflow boundary) rounds to the even code; saturation, NaN and signed zero; and a
//!   brute-force nearest-code search over a million seeded random f32 values as an independent
//!   oracle.
//! * Scales derived by hand from TE's `compute_scale_from_amax` (each expected value written
//!   out with its derivation), per-tensor and block quantization of small hand-built tensors,
//!   delayed-scaling sequences over several steps, block tiles with partial edges, MXFP8 E8M0
//!   rounding cases, bad inputs.
//! * Golden fixtures (`tests/data/fp8/*.json`, written by `tools/fp8_fixtures.py` from
//!   TransformerEngine's own Python reference quantizers): codes and scales must be equal bit for
//!   bit. A missing fixture file prints one `SKIP` line, or fails under
//!   `MOE_REQUIRE_FP8_FIXTURES=1`.

use std::io::Write;
use std::path::PathBuf;

use half::bf16;
use moe_reference::fp8::{
    blockwise::BlockTile,
    codec::{decode, decode_f64, encode, encode_torch},
    delayed::{AmaxComputeAlgo, DelayedScaling, DelayedScalingConfig},
    mxfp8::{self, block_exponent, e8m0_to_f32, exp2f_rcp, float_to_e8m0, MxBlock, Mxfp8Quantizer},
    scale::{block_scale, compute_scale_from_amax, current_scale, ScaleOptions},
    BlockQuantizer, ColumnwiseCopy, CurrentScalingQuantizer, Fp8Format, Fp8Quantizer, Fp8Recipe, Fp8Tensor, Scales,
    TeFormat, TensorRole, Usage,
};
use moe_reference::{Dtype, ReferenceError};
use ndarray::{arr2, Array2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

const E4M3: Fp8Format = Fp8Format::E4M3;
const E5M2: Fp8Format = Fp8Format::E5M2;

fn pow2(e: i32) -> f32 {
    2f64.powi(e) as f32
}

// ---------------------------------------------------------------------------------------------
// Codec.
// ---------------------------------------------------------------------------------------------

/// Every finite code of a format with its value, independently of the codec: the value is
/// built from the bit fields here.
fn finite_codes(fmt: Fp8Format) -> Vec<(u8, f64)> {
    let (m, bias) = match fmt {
        Fp8Format::E4M3 => (3u32, 7i32),
        Fp8Format::E5M2 => (2, 15),
    };
    (0u8..=255)
        .filter_map(|c| {
            let mag = c & 0x7F;
            let exp = i32::from(mag >> m);
            let man = f64::from(mag & ((1 << m) - 1));
            let special = match fmt {
                Fp8Format::E4M3 => mag == 0x7F,
                Fp8Format::E5M2 => exp == 31,
            };
            if special {
                return None;
            }
            let v = if exp == 0 {
                man * 2f64.powi(1 - bias - m as i32)
            } else {
                (1.0 + man / f64::from(1u32 << m)) * 2f64.powi(exp - bias)
            };
            Some((c, if c & 0x80 != 0 { -v } else { v }))
        })
        .collect()
}

#[test]
fn all_256_codes_round_trip_decode_encode() {
    for fmt in Fp8Format::ALL {
        let finite = finite_codes(fmt);
        for &(c, v) in &finite {
            assert_eq!(decode_f64(c, fmt), v, "{fmt} code {c:#04x}");
            assert_eq!(encode(decode(c, fmt), fmt), c, "{fmt} code {c:#04x} satfinite");
            assert_eq!(encode_torch(decode(c, fmt), fmt), c, "{fmt} code {c:#04x} torch");
        }
        let finite_set: Vec<u8> = finite.iter().map(|&(c, _)| c).collect();
        for c in (0u8..=255).filter(|c| !finite_set.contains(c)) {
            let d = decode(c, fmt);
            let sign = c & 0x80;
            if fmt == E5M2 && c & 0x7F == 0x7C {
                assert_eq!(d, if sign != 0 { f32::NEG_INFINITY } else { f32::INFINITY });
                assert_eq!(encode(d, fmt), sign | 0x7B, "E5M2 inf saturates to max");
                assert_eq!(encode_torch(d, fmt), c, "torch keeps E5M2 inf");
            } else {
                assert!(d.is_nan(), "{fmt} code {c:#04x} is NaN");
                assert_eq!(encode(d, fmt), 0x7F, "{fmt} NaN code {c:#04x}: canonical NaN, sign dropped");
                assert_eq!(encode_torch(d, fmt), sign | 0x7F, "{fmt} NaN code {c:#04x}: torch keeps the sign");
            }
        }
        assert_eq!(finite.len(), if fmt == E4M3 { 254 } else { 248 });
    }
    // Landmarks.
    assert_eq!(decode(0x7E, E4M3), 448.0);
    assert_eq!(decode(0x38, E4M3), 1.0);
    assert_eq!(decode(0x08, E4M3), pow2(-6));
    assert_eq!(decode(0x01, E4M3), pow2(-9));
    assert_eq!(decode(0x7B, E5M2), 57344.0);
    assert_eq!(decode(0x3C, E5M2), 1.0);
    assert_eq!(decode(0x04, E5M2), pow2(-14));
    assert_eq!(decode(0x01, E5M2), pow2(-16));
}

#[test]
fn rne_ties_at_every_midpoint_and_binade_boundary() {
    for fmt in Fp8Format::ALL {
        let mut pos: Vec<(u8, f64)> = finite_codes(fmt).into_iter().filter(|&(c, _)| c & 0x80 == 0).collect();
        pos.sort_by(|a, b| a.1.total_cmp(&b.1));
        for w in pos.windows(2) {
            let ((lo, vlo), (hi, vhi)) = (w[0], w[1]);
            let mid = ((vlo + vhi) / 2.0) as f32;
            assert_eq!(f64::from(mid), (vlo + vhi) / 2.0, "midpoints are f32 values");
            let even = if lo & 1 == 0 { lo } else { hi };
            for (x, want) in
                [(mid, even), (f32::from_bits(mid.to_bits() - 1), lo), (f32::from_bits(mid.to_bits() + 1), hi)]
            {
                assert_eq!(encode(x, fmt), want, "{fmt}: {x:e} between {vlo} and {vhi}");
                assert_eq!(encode(-x, fmt), want | 0x80, "{fmt}: -{x:e}");
                assert_eq!(encode_torch(x, fmt), want, "{fmt} torch: {x:e}");
            }
        }
        // Half the smallest subnormal is a tie with zero: zero (even) wins, sign kept.
        let half_min = (fmt.min_subnormal() / 2.0) as f32;
        assert_eq!(encode(half_min, fmt), 0x00);
        assert_eq!(encode(-half_min, fmt), 0x80);
        assert_eq!(encode(f32::from_bits(half_min.to_bits() + 1), fmt), 0x01);
        assert_eq!(encode(-0.0, fmt), 0x80);
        assert_eq!(encode(f32::from_bits(1), fmt), 0x00, "f32 subnormals underflow");
    }
}

#[test]
fn saturation_and_nan() {
    // E4M3: 448 is the largest value; the midpoint to the next (unrepresentable) 480 is 464.
    for x in [448.0f32, 450.0, 464.0, 464.00003, 480.0, 1e4, f32::MAX, f32::INFINITY] {
        assert_eq!(encode(x, E4M3), 0x7E, "satfinite {x}");
        assert_eq!(encode(-x, E4M3), 0xFE, "satfinite -{x}");
    }
    // torch's cast does not saturate: above 464 (and inf) is NaN with the sign.
    assert_eq!(encode_torch(464.0, E4M3), 0x7E);
    for x in [464.00003f32, 479.0, 480.0, 1e4, f32::INFINITY] {
        assert_eq!(encode_torch(x, E4M3), 0x7F, "torch {x}");
        assert_eq!(encode_torch(-x, E4M3), 0xFF, "torch -{x}");
    }
    // E5M2: 57344 is the largest finite value; 61440 is the tie with 65536 (= inf code).
    for x in [57344.0f32, 61439.996, 61440.0, 65536.0, 1e30, f32::INFINITY] {
        assert_eq!(encode(x, E5M2), 0x7B, "satfinite {x}");
        assert_eq!(encode(-x, E5M2), 0xFB, "satfinite -{x}");
    }
    assert_eq!(encode_torch(61439.996, E5M2), 0x7B);
    for x in [61440.0f32, 65536.0, f32::INFINITY] {
        assert_eq!(encode_torch(x, E5M2), 0x7C, "torch {x}: inf");
        assert_eq!(encode_torch(-x, E5M2), 0xFC);
    }
    for fmt in Fp8Format::ALL {
        for bits in [0x7FC0_0000u32, 0xFFC0_0000, 0x7F80_0001, 0xFFFF_FFFF] {
            let nan = f32::from_bits(bits);
            assert_eq!(encode(nan, fmt), 0x7F, "{fmt} NaN {bits:#x}");
            assert_eq!(encode_torch(nan, fmt), if bits >> 31 == 1 { 0xFF } else { 0x7F });
        }
    }
}

/// The nearest finite code by brute force (ties to the even code), saturating.
fn brute_force_satfinite(x: f32, fmt: Fp8Format, codes: &[(u8, f64)]) -> u8 {
    if x.is_nan() {
        return 0x7F;
    }
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = f64::from(x.abs());
    let max = f64::from(fmt.max_finite());
    if a >= max {
        return sign | fmt.max_finite_code();
    }
    let mut best: Option<(u8, f64)> = None;
    for &(c, v) in codes {
        let d = (v - a).abs();
        best = match best {
            Some((bc, bd)) if bd < d || (bd == d && bc & 1 == 0) => Some((bc, bd)),
            _ => Some((c, d)),
        };
    }
    // Above the largest code the only candidate is max (saturation).
    sign | best.expect("codes").0
}

#[test]
fn encode_matches_a_brute_force_nearest_search() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x00f8_e4a3);
    for fmt in Fp8Format::ALL {
        let codes: Vec<(u8, f64)> = finite_codes(fmt).into_iter().filter(|&(c, _)| c & 0x80 == 0).collect();
        for i in 0..500_000 {
            // Half the draws near the format's range, half arbitrary bit patterns.
            let x = if i % 2 == 0 {
                let e = rng.random_range(-20i32..18);
                let m: f32 = rng.random_range(-2.0..2.0);
                m * pow2(e)
            } else {
                f32::from_bits(rng.random())
            };
            assert_eq!(encode(x, fmt), brute_force_satfinite(x, fmt, &codes), "{fmt}: {x:e} ({:#010x})", x.to_bits());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Names.
// ---------------------------------------------------------------------------------------------

#[test]
fn recipe_and_format_names() {
    for r in Fp8Recipe::ALL {
        assert_eq!(Fp8Recipe::parse(r.name()).unwrap(), r);
        assert_eq!(Fp8Recipe::parse(r.te_class()).unwrap(), r);
    }
    assert_eq!(Fp8Recipe::parse("Current-Scaling").unwrap(), Fp8Recipe::Tensorwise);
    let err = Fp8Recipe::parse("nvfp4").unwrap_err().to_string();
    assert!(err.contains("tensorwise, delayed, blockwise or mxfp8") && err.contains("nvfp4"), "{err}");
    for f in TeFormat::ALL {
        assert_eq!(TeFormat::parse(f.name()).unwrap(), f);
    }
    assert_eq!(TeFormat::parse("Format.HYBRID").unwrap(), TeFormat::Hybrid);
    let err = TeFormat::parse("e5m2").unwrap_err().to_string();
    assert!(err.contains("Pure E5M2 training is not supported"), "{err}");
    assert!(matches!(TeFormat::parse("fp8"), Err(ReferenceError::UnknownName { .. })));
    for f in Fp8Format::ALL {
        assert_eq!(Fp8Format::parse(f.torch_name()).unwrap(), f);
        assert_eq!(Fp8Format::parse(f.name()).unwrap(), f);
    }
    // get_fp8_te_dtype: HYBRID is E4M3 forward, E5M2 backward.
    assert_eq!(TeFormat::Hybrid.format_for(TensorRole::Input), E4M3);
    assert_eq!(TeFormat::Hybrid.format_for(TensorRole::Weight), E4M3);
    assert_eq!(TeFormat::Hybrid.format_for(TensorRole::GradOutput), E5M2);
    assert_eq!(TeFormat::E4M3.format_for(TensorRole::GradOutput), E4M3);
    // get_fp8_align_size: 32 for MXFP8, else 16.
    let aligns: Vec<usize> = Fp8Recipe::ALL.iter().map(|r| r.align_size()).collect();
    assert_eq!(aligns, [16, 16, 16, 32]);
    assert_eq!(Fp8Recipe::Delayed.default_format(), TeFormat::Hybrid);
    assert_eq!(Fp8Recipe::Blockwise.default_format(), TeFormat::E4M3);
    assert_eq!(BlockTile::for_role(TensorRole::Weight), BlockTile::Square128);
    assert_eq!(BlockTile::for_role(TensorRole::GradOutput), BlockTile::Row1x128);
}

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

fn q(
    quant: &mut dyn Fp8Quantizer,
    x: &Array2<f32>,
    dtype: Dtype,
    usage: Usage,
) -> (Option<Fp8Tensor>, Option<Fp8Tensor>) {
    let out = quant.quantize("x", x.view(), dtype, usage).expect("quantize");
    (out.rowwise, out.columnwise)
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

// ---------------------------------------------------------------------------------------------
// Block scaling.
// ---------------------------------------------------------------------------------------------

#[test]
fn blockwise_1x128_partial_tiles_hand_case() {
    // Row 0: 1.0 except x[0][5] = 3; the partial tile (columns 128, 129) holds 0.25 and -0.125.
    // Row 1: zeros.
    let mut x = Array2::<f32>::zeros((2, 130));
    x.row_mut(0).fill(1.0);
    x[[0, 5]] = 3.0;
    x[[0, 128]] = 0.25;
    x[[0, 129]] = -0.125;
    let mut quant = BlockQuantizer::new(E4M3, BlockTile::Row1x128);
    let (row, col) = q(&mut quant, &x, Dtype::Bf16, Usage::BOTH);
    let row = row.unwrap();
    // Tile (0,0): amax 3 → 149.33 → power of 2: 128. 1·128 = 0x70, 3·128 = 384 = 1.5·2^8 = 0x7C.
    // Tile (0,1): amax 0.25 → 1792 → 1024. 0.25·1024 = 256 = 0x78, -0.125·1024 = 0xF0.
    // Row 1: amax 0 → scale 1, codes 0.
    let Scales::Block { rows: 1, cols: 128, scale_inv } = &row.scales else { panic!("{:?}", row.scales) };
    assert_eq!(scale_inv, &arr2(&[[1.0 / 128.0, 1.0 / 1024.0], [1.0, 1.0]]));
    assert_eq!(row.data[[0, 0]], 0x70);
    assert_eq!(row.data[[0, 5]], 0x7C);
    assert_eq!((row.data[[0, 128]], row.data[[0, 129]]), (0x78, 0xF0));
    assert!(row.data.row(1).iter().all(|&c| c == 0));
    // Columnwise: re-quantized per column (128×1 tiles of x, partial: 2 rows), shape [130, 2].
    let col = col.unwrap();
    assert_eq!(col.shape(), [130, 2]);
    let Scales::Block { rows: 1, cols: 128, scale_inv } = &col.scales else { panic!("{:?}", col.scales) };
    assert_eq!(scale_inv.shape(), &[130, 1]);
    // Column 0: [1, 0] → 448 → 256; column 5: [3, 0] → 128; column 129: [-0.125, 0] → 3584 → 2048.
    assert_eq!((scale_inv[[0, 0]], scale_inv[[5, 0]], scale_inv[[129, 0]]), (1.0 / 256.0, 1.0 / 128.0, 1.0 / 2048.0));
    assert_eq!(col.data[[0, 0]], 0x78, "1·256 = 2^8");
    assert_eq!(col.data[[129, 0]], 0xF8, "-0.125·2048 = -256");
    assert_ne!(col.data.t(), row.data, "1×128: the columnwise copy is a re-quantization");
    assert_eq!(quant.columnwise_copy(), ColumnwiseCopy::Requantized);
    // f32 scales (NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1): tile (0,0) scale 448/3.
    quant.options.force_pow_2_scales = false;
    let (row, _) = q(&mut quant, &x, Dtype::Bf16, Usage::ROWWISE);
    assert_eq!(row.unwrap().scales.scale_inv_at(0, 0), 1.0 / f32::from_bits(0x4315_5555));
}

#[test]
fn blockwise_128x128_partial_tiles_and_transpose() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let x = Array2::from_shape_fn((130, 129), |(i, j)| {
        let tile_mag = pow2(((i / 128) * 2 + j / 128) as i32 * 3 - 4);
        bf16::from_f32(rng.random_range(-1.0f32..1.0) * tile_mag).to_f32()
    });
    let mut quant = BlockQuantizer::new(E4M3, BlockTile::Square128);
    let (row, col) = q(&mut quant, &x, Dtype::Bf16, Usage::BOTH);
    let (row, col) = (row.unwrap(), col.unwrap());
    let Scales::Block { rows: 128, cols: 128, scale_inv } = &row.scales else { panic!() };
    assert_eq!(scale_inv.shape(), &[2, 2]);
    // Each tile's scale from its own amax (the partial tiles 128×1, 2×128 and 2×1 included).
    for (ti, tj) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
        let tile = x.slice(ndarray::s![ti * 128..(ti * 128 + 128).min(130), tj * 128..(tj * 128 + 128).min(129)]);
        let amax = tile.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let s = f32::from_bits((448.0 / amax).to_bits() & 0xFF80_0000);
        assert_eq!(scale_inv[[ti, tj]], 1.0 / s, "tile ({ti},{tj})");
        for ((i, j), &v) in tile.indexed_iter() {
            assert_eq!(row.data[[ti * 128 + i, tj * 128 + j]], encode(v * s, E4M3));
        }
    }
    assert_eq!(col, row.transposed(), "128×128: the columnwise copy is the same codes transposed");
    assert_eq!(quant.columnwise_copy(), ColumnwiseCopy::TransposeOfRowwise);
    // Only the columnwise copy requested: still the transpose of the rowwise codes.
    let (none, col_only) = q(&mut quant, &x, Dtype::Bf16, Usage::COLUMNWISE);
    assert!(none.is_none());
    assert_eq!(col_only.unwrap(), col);
}

#[test]
fn block_tiles_and_te_scale_shapes() {
    assert_eq!(BlockTile::parse("1x128").unwrap(), BlockTile::Row1x128);
    assert_eq!(BlockTile::parse("128×128").unwrap(), BlockTile::Square128);
    for bad in ["1x64", "128x1", "32x32"] {
        let err = BlockTile::parse(bad).unwrap_err().to_string();
        assert!(err.contains("1x128") && err.contains("128x128"), "{bad}: {err}");
    }
    assert!(matches!(BlockTile::parse("blocks"), Err(ReferenceError::UnknownName { .. })));
    assert!(BlockTile::from_scaling_dim(3).is_err());
    assert_eq!(BlockTile::from_scaling_dim(2).unwrap(), BlockTile::Square128);
    // Float8BlockQuantizer.get_scale_shape for a [130, 136] tensor.
    assert_eq!(BlockTile::Square128.te_scale_shape([130, 136], false), [2, 4]);
    assert_eq!(BlockTile::Square128.te_scale_shape([130, 136], true), [2, 4]);
    assert_eq!(BlockTile::Row1x128.te_scale_shape([130, 136], false), [2, 132]);
    assert_eq!(BlockTile::Row1x128.te_scale_shape([130, 136], true), [2, 136]);
    // Empty tensors quantize to empty tensors.
    let (r, c) =
        q(&mut BlockQuantizer::new(E4M3, BlockTile::Row1x128), &Array2::zeros((0, 5)), Dtype::F32, Usage::BOTH);
    assert_eq!((r.unwrap().shape(), c.unwrap().shape()), ([0, 5], [5, 0]));
}

// ---------------------------------------------------------------------------------------------
// MXFP8.
// ---------------------------------------------------------------------------------------------

#[test]
fn e8m0_rounding_cases() {
    // float_to_e8m0: the biased exponent, +1 unless a power of two.
    assert_eq!(float_to_e8m0(1.0), 127);
    assert_eq!(float_to_e8m0(f32::from_bits(0x3F80_0001)), 128, "just above 1 rounds up");
    assert_eq!(float_to_e8m0(0.75), 127, "2^-1·1.5 → 2^0");
    assert_eq!(float_to_e8m0(0.5), 126);
    assert_eq!(float_to_e8m0(0.0), 0);
    assert_eq!(float_to_e8m0(f32::from_bits(0x0040_0000)), 0, "2^-127 (subnormal) is e8m0 0");
    assert_eq!(float_to_e8m0(f32::from_bits(0x0040_0001)), 1, "above 2^-127 → 2^-126");
    assert_eq!(float_to_e8m0(f32::from_bits(1)), 0, "smallest subnormal");
    assert_eq!(float_to_e8m0(pow2(127)), 254);
    assert_eq!(float_to_e8m0(f32::MAX), 254, "satfinite at exponent 0xFE");
    assert_eq!(float_to_e8m0(f32::INFINITY), 254);
    assert_eq!(float_to_e8m0(f32::NAN), 255);
    // Block exponents: amax · (1/448 as f32); 448·2^k is exactly 2^k (no round-up).
    assert_eq!(mxfp8::max_norm_rcp(E4M3).to_bits(), 0x3B12_4925);
    for k in -20..=20 {
        assert_eq!(block_exponent(448.0 * pow2(k), E4M3), (127 + k) as u8, "448·2^{k}");
        assert_eq!(block_exponent(57344.0 * pow2(k), E5M2), (127 + k) as u8, "57344·2^{k}");
    }
    assert_eq!(block_exponent(449.0, E4M3), 128);
    assert_eq!(block_exponent(447.0, E4M3), 127);
    assert_eq!(block_exponent(0.0, E4M3), 0);
    // The multiplier 2^(127-e) and the dequantization factor 2^(e-127).
    assert_eq!(exp2f_rcp(127), 1.0);
    assert_eq!(exp2f_rcp(0), pow2(127));
    assert_eq!(exp2f_rcp(254), f32::from_bits(0x0040_0000));
    assert!(exp2f_rcp(255).is_nan() && e8m0_to_f32(255).is_nan());
    assert_eq!(e8m0_to_f32(0), f32::from_bits(0x0040_0000));
    assert_eq!(e8m0_to_f32(254), pow2(127));
    for e in 1..=253u8 {
        assert_eq!(e8m0_to_f32(e) * exp2f_rcp(e), 1.0, "e8m0 {e}");
    }
}

#[test]
fn e8m0_multiply_equals_divide_for_every_bf16_amax() {
    // TE's kernel multiplies by (float)(1/max); TE's Python reference (test_mxfp8_2d_quantize.py,
    // `_float_to_e8m0`) divides by max. They agree on every bf16 amax and on 10^6 random f32 ones.
    let mut rng = ChaCha8Rng::seed_from_u64(32);
    for fmt in Fp8Format::ALL {
        let max = fmt.max_finite();
        let bf16_amaxes = (0u16..0x7F80).map(|b| bf16::from_bits(b).to_f32());
        let f32_amaxes = (0..1_000_000).map(|_| f32::from_bits(rng.random_range(0u32..0x7F80_0000)));
        for amax in bf16_amaxes.chain(f32_amaxes) {
            assert_eq!(block_exponent(amax, fmt), float_to_e8m0(amax / max), "{fmt}: amax {amax:e}");
        }
    }
}

#[test]
fn mxfp8_rowwise_columnwise_and_shapes() {
    // A 32×64 tensor: row i holds 2^(i-16) in its first block and 3·2^(i-16) in its second, so
    // the rowwise exponents differ per row and block; every column's 32 rows span all of them.
    let x =
        Array2::from_shape_fn((32, 64), |(i, j)| if j < 32 { pow2(i as i32 - 16) } else { 3.0 * pow2(i as i32 - 16) });
    let mut quant = Mxfp8Quantizer::new(E4M3);
    let (row, col) = q(&mut quant, &x, Dtype::F32, Usage::BOTH);
    let (row, col) = (row.unwrap(), col.unwrap());
    let Scales::E8m0 { rows: 1, cols: 32, exponents } = &row.scales else { panic!() };
    assert_eq!(exponents.shape(), &[32, 2]);
    for i in 0..32 {
        // amax 2^(i-16) → 2^(i-16)/448 → exponent ceil(i-16-log2 448) = i-16-8 → 127+i-24.
        assert_eq!(exponents[[i, 0]], (127 + i - 24) as u8);
        // amax 3·2^(i-16): 3/448 = 2^-7.22 → ceil → i-16-7.
        assert_eq!(exponents[[i, 1]], (127 + i - 23) as u8);
        // Codes: 2^(i-16)·2^(24-i) = 2^8 = 256 (0x78); 3·2^(i-16)·2^(23-i) = 384 (0x7C).
        assert_eq!((row.data[[i, 0]], row.data[[i, 40]]), (0x78, 0x7C));
    }
    // Columnwise: 32×1 blocks, amax of a column = its row 31 value.
    let Scales::E8m0 { rows: 1, cols: 32, exponents } = &col.scales else { panic!() };
    assert_eq!(exponents.shape(), &[64, 1]);
    assert_eq!((exponents[[0, 0]], exponents[[63, 0]]), (127 + 31 - 24, 127 + 31 - 23));
    assert_eq!(col.data[[0, 0]], encode(pow2(-16) * exp2f_rcp(134), E4M3), "row 0 in column 0: 2^-16·2^-7 = 2^-23 → 0");
    assert_eq!(col.data[[0, 31]], 0x78);
    assert_eq!(quant.columnwise_copy(), ColumnwiseCopy::Requantized);
    // 2-D (32×32) blocks: one exponent for both directions, columnwise = transpose.
    let mut q2 = Mxfp8Quantizer { format: E4M3, block: MxBlock::Square32 };
    let (r2, c2) = q(&mut q2, &x, Dtype::F32, Usage::BOTH);
    let (r2, c2) = (r2.unwrap(), c2.unwrap());
    assert_eq!(r2.scales, Scales::E8m0 { rows: 32, cols: 32, exponents: arr2(&[[127 + 31 - 24, 127 + 31 - 23]]) });
    assert_eq!(c2, r2.transposed());
    // Dims must be multiples of 32 (TE: "MXFP8 requires tensor dims that are divisible by 32").
    for shape in [(33, 32), (32, 48), (16, 64)] {
        let err = quant.quantize("fc2_input", Array2::zeros(shape).view(), Dtype::Bf16, Usage::BOTH).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("fc2_input") && msg.contains("divisible by 32"), "{msg}");
    }
    // Non-finite: an inf amax gives e8m0 254 (multiplier 2^-127); inf saturates, NaN → 0x7F.
    let mut y = Array2::<f32>::ones((32, 32));
    y[[0, 0]] = f32::INFINITY;
    y[[1, 0]] = f32::NAN;
    let (r, _) = q(&mut quant, &y, Dtype::F32, Usage::ROWWISE);
    let r = r.unwrap();
    assert_eq!(r.scales.scale_inv_at(0, 0), pow2(127));
    assert_eq!((r.data[[0, 0]], r.data[[0, 1]], r.data[[1, 0]], r.data[[1, 1]]), (0x7E, 0x00, 0x7F, 0x78));
}

// ---------------------------------------------------------------------------------------------
// Golden fixtures from TransformerEngine's reference quantizers.
// ---------------------------------------------------------------------------------------------

const FIXTURE_COMMAND: &str = "python3 tools/fp8_fixtures.py --te-references $TE/tests/pytorch/references \
     --te-mxfp8-test $TE/tests/pytorch/test_mxfp8_2d_quantize.py --te-quantization \
     $TE/transformer_engine/pytorch/quantization.py --te-commit <sha> --out tests/data/fp8";

/// The parsed fixture, or `None` after one SKIP line; a failure when the file is missing and
/// `MOE_REQUIRE_FP8_FIXTURES=1`.
fn fixture(test: &str, file: &str) -> Option<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/fp8").join(file);
    match std::fs::read_to_string(&path) {
        Ok(text) => Some(serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))),
        Err(e) => {
            assert!(
                !std::env::var("MOE_REQUIRE_FP8_FIXTURES").is_ok_and(|v| v == "1"),
                "fp8_quantizers::{test}: fixture {} is missing ({e}) and MOE_REQUIRE_FP8_FIXTURES=1; generate it with \
                 {FIXTURE_COMMAND}",
                path.display()
            );
            let _ = writeln!(
                std::io::stderr(),
                "SKIP fp8_quantizers::{test}: fixture tests/data/fp8/{file} not found; generate it with {FIXTURE_COMMAND}"
            );
            None
        }
    }
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
    let Some(doc) = fixture("fixture_per_tensor_current_scaling", "per_tensor.json") else { return };
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
    let Some(doc) = fixture("fixture_blockwise", "blockwise.json") else { return };
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
    let Some(doc) = fixture("fixture_mxfp8", "mxfp8.json") else { return };
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
    let Some(doc) = fixture("fixture_delayed_scaling", "delayed.json") else { return };
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
    let Some(doc) = fixture("fixture_torch_cast", "torch_cast.json") else { return };
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
