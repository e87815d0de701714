//! The fp8 codec (all 256 codes, ties to even, saturation, NaN, a brute-force search) and the recipe and format names.

use super::{pow2, E4M3, E5M2};

use moe_reference::fp8::{
    blockwise::BlockTile,
    codec::{decode, decode_f64, encode, encode_torch},
    Fp8Format, Fp8Recipe, TeFormat, TensorRole,
};
use moe_reference::ReferenceError;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

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
