//! Storage-dtype values as bytes: `f64` values to and from the little-endian bytes of f32,
//! bf16 or f16 — the one codec behind dumps, checkpoints and device uploads.
//!
//! # Rounding
//!
//! Decoding is exact (every storage dtype embeds in f64). Encoding a value the dtype cannot
//! hold rounds it **once, to nearest with ties to even, directly from the f64 value**. Rounding
//! through f32 first would round twice: a value just above a bf16 tie, `1 + 2^-8 + 2^-30`,
//! becomes the tie `1 + 2^-8` in f32 and then `1` (ties to even) in bf16, where the correctly
//! rounded result is `1 + 2^-7`.
//!
//! `half`'s `from_f64` is not that rule either: its bf16 conversion (and its f16 one without
//! the F16C instructions) drops the low 32 mantissa bits before rounding, and its f16 one with
//! F16C goes through f32 — both round the value above to `1`. The codec therefore rounds to
//! f32 *to odd* (truncate, then set the last bit when the truncation was inexact) and from there
//! to nearest-even with `half`'s exact f32 conversions: with at least two more significand bits
//! in the intermediate format (f32 has 24, bf16 8 and f16 11; f32's subnormals keep 16 more
//! than bf16's) round-to-odd followed by round-to-nearest equals one direct rounding (Boldo and
//! Melquiond, *Emulation of FMA and correctly rounded sums: proved algorithms using rounding
//! to odd*, IEEE TC 2008).
//!
//! This is not [`Dtype::round`](crate::Dtype::round), the emulation's rounding point, which
//! models a GPU op that computes in f32 and then stores: that one rounds through f32 on purpose.

use crate::dtype::Dtype;
use half::{bf16, f16};

/// `x` rounded to f32 *to odd*: exact values unchanged, inexact ones truncated toward zero with
/// the last significand bit set (values beyond f32's range become `±f32::MAX`).
fn f32_round_to_odd(x: f64) -> f32 {
    let nearest = x as f32;
    if x.is_nan() || f64::from(nearest) == x {
        return nearest;
    }
    // Inexact: the value toward zero is `nearest` or, when `nearest` rounded away from zero
    // (infinity included), its predecessor in magnitude (sign-magnitude bits: one less).
    let bits = nearest.to_bits();
    let toward_zero = if f64::from(nearest).abs() > x.abs() { bits - 1 } else { bits };
    f32::from_bits(toward_zero | 1)
}

/// The bytes of `x` in `dtype`, rounded to nearest-even directly from f64 (see the module docs).
fn encode_one(dtype: Dtype, x: f64) -> ([u8; 4], usize) {
    match dtype {
        Dtype::F32 => ((x as f32).to_le_bytes(), 4),
        Dtype::Bf16 => {
            let [a, b] = bf16::from_f32(f32_round_to_odd(x)).to_le_bytes();
            ([a, b, 0, 0], 2)
        }
        Dtype::F16 => {
            let [a, b] = f16::from_f32(f32_round_to_odd(x)).to_le_bytes();
            ([a, b, 0, 0], 2)
        }
    }
}

/// Encodes `values` as the little-endian bytes of `dtype`, each rounded once to nearest-even
/// (exact for values the dtype holds).
pub fn to_bytes(dtype: Dtype, values: impl IntoIterator<Item = f64>) -> Vec<u8> {
    let values = values.into_iter();
    let mut out = Vec::with_capacity(values.size_hint().0 * dtype.size_bytes());
    for x in values {
        let (bytes, n) = encode_one(dtype, x);
        out.extend_from_slice(&bytes[..n]);
    }
    out
}

/// Decodes little-endian `dtype` bytes to f64 (exact). A trailing partial element is ignored.
pub fn from_bytes(dtype: Dtype, bytes: &[u8]) -> Vec<f64> {
    match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect(),
        Dtype::Bf16 => bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
    }
}

/// The value [`to_bytes`] stores for `x`: `x` rounded once to nearest-even in `dtype`.
pub fn round(dtype: Dtype, x: f64) -> f64 {
    let (bytes, n) = encode_one(dtype, x);
    from_bytes(dtype, &bytes[..n])[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (significand bits, smallest normal exponent, largest exponent) of `dtype`.
    fn format(dtype: Dtype) -> (i32, i32, i32) {
        match dtype {
            Dtype::F32 => (24, -126, 127),
            Dtype::Bf16 => (8, -126, 127),
            Dtype::F16 => (11, -14, 15),
        }
    }

    /// The spacing of `dtype`'s values at the (normal, non-zero f64) `x`: the subnormal spacing
    /// below the normal range.
    fn ulp_at(dtype: Dtype, x: f64) -> f64 {
        let (bits, min_exp, _) = format(dtype);
        let e = (((x.to_bits() >> 52) & 0x7FF) as i32 - 1023).max(min_exp);
        2f64.powi(e - (bits - 1))
    }

    /// Direct rounding to nearest-even by exact arithmetic: the two neighbours of `x` in
    /// `dtype` and their midpoint are all exact in f64.
    fn exact_round(dtype: Dtype, x: f64) -> f64 {
        let (bits, _, max_exp) = format(dtype);
        if x.abs() >= (2.0 - 2f64.powi(-bits)) * 2f64.powi(max_exp) {
            return f64::INFINITY.copysign(x); // at or past max + half an ulp
        }
        let ulp = ulp_at(dtype, x);
        let lo = (x / ulp).floor() * ulp;
        let (hi, mid) = (lo + ulp, lo + ulp / 2.0);
        let lo_is_even = (x / ulp).floor().rem_euclid(2.0) == 0.0;
        if x < mid || (x == mid && lo_is_even) {
            lo
        } else {
            hi
        }
    }

    /// The rule, pinned where it matters: a value just above a tie of the target dtype that
    /// rounding through f32 first turns into the tie (and then to even). Direct rounding must
    /// round it up; the through-f32 path, shown here, rounds it down.
    #[test]
    fn rounding_is_direct_from_f64_not_through_f32() {
        let above_tie = |bits: i32| 1.0 + 2f64.powi(-bits) + 2f64.powi(-30);
        for (dtype, bits, through_f32) in [
            (Dtype::Bf16, 8, bf16::from_f32(above_tie(8) as f32).to_f64()),
            (Dtype::F16, 11, f16::from_f32(above_tie(11) as f32).to_f64()),
        ] {
            let x = above_tie(bits);
            let up = 1.0 + 2f64.powi(1 - bits);
            assert_eq!(through_f32, 1.0, "{dtype}: through f32 is a double rounding");
            assert_eq!(round(dtype, x), up, "{dtype}: one rounding, directly from f64");
            assert_eq!(from_bytes(dtype, &to_bytes(dtype, [x, -x])), vec![up, -up], "{dtype}");
            // The same value just below the tie, and the tie itself, round down (to even).
            assert_eq!(round(dtype, 1.0 + 2f64.powi(-bits) - 2f64.powi(-30)), 1.0, "{dtype}");
            assert_eq!(round(dtype, 1.0 + 2f64.powi(-bits)), 1.0, "{dtype}");
        }
        // f32 itself: the cast is one rounding.
        let x = 1.0 + 2f64.powi(-24) + 2f64.powi(-50);
        assert_eq!(round(Dtype::F32, x), 1.0 + 2f64.powi(-23));
    }

    #[test]
    fn rounding_matches_exact_round_to_nearest_even() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for dtype in Dtype::ALL {
            for _ in 0..10_000 {
                // A random f64 over a wide exponent range (subnormals and overflow of every
                // dtype included), and the values just below, at and just above the tie next
                // to it, where a second rounding would show.
                let r = next();
                let sign = if r >> 63 == 1 { -1.0 } else { 1.0 };
                let x = sign
                    * (1.0 + (r & ((1 << 52) - 1)) as f64 / (1u64 << 52) as f64)
                    * 2f64.powi((r >> 52) as i32 % 300 - 160);
                let tie = (x / ulp_at(dtype, x)).floor() * ulp_at(dtype, x) + ulp_at(dtype, x) / 2.0;
                for v in [x, tie, tie * (1.0 + 2f64.powi(-40)), tie * (1.0 - 2f64.powi(-40))] {
                    let (got, want) = (round(dtype, v), exact_round(dtype, v));
                    assert_eq!(got, want, "{dtype}: {v:e} -> {got:e}, expected {want:e}");
                }
            }
        }
    }

    #[test]
    fn the_sticky_bit_survives_when_the_truncated_f32_is_already_odd() {
        // 1 + 2^-8 is the bf16 midpoint between 1 and 1 + 2^-7. One f32 ulp above it plus a
        // little more truncates to an f32 whose last bit is already 1; round-to-odd must keep
        // it (an XOR would clear it and land on the midpoint, which ties down to 1).
        let x = 1.0 + 2f64.powi(-8) + 2f64.powi(-23) + 2f64.powi(-40);
        assert_eq!(round(Dtype::Bf16, x), 1.0 + 2f64.powi(-7));
        assert_eq!(round(Dtype::Bf16, -x), -(1.0 + 2f64.powi(-7)));
        // The same for f16 (spacing 2^-10 at 1, midpoint 1 + 2^-11).
        let y = 1.0 + 2f64.powi(-11) + 2f64.powi(-23) + 2f64.powi(-40);
        assert_eq!(round(Dtype::F16, y), 1.0 + 2f64.powi(-10));
    }

    #[test]
    fn values_the_dtype_holds_round_trip() {
        for dtype in Dtype::ALL {
            let values = [0.0, -0.0, 1.0, -2.5, 0.1f32 as f64, 65504.0, 2f64.powi(-24), f64::INFINITY];
            let held: Vec<f64> = values.iter().map(|&v| dtype.round(v)).collect();
            assert_eq!(from_bytes(dtype, &to_bytes(dtype, held.iter().copied())), held, "{dtype}");
            assert!(round(dtype, f64::NAN).is_nan());
        }
    }
}
