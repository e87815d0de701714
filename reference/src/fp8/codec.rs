//! E4M3/E5M2 encode and decode, bit-exact.
//!
//! * [`encode`]: TransformerEngine's cast. Every TE quantize kernel computes `x·scale` in f32
//!   and converts with `static_cast<fp8e4m3/fp8e5m2>(float)`, i.e. CUDA's `__nv_fp8_e4m3(float)`
//!   / `__nv_fp8_e5m2(float)` constructors, which call `__nv_cvt_float_to_fp8(x, __NV_SATFINITE,
//!   fmt)` (`cuda_fp8.hpp`; on sm_90+ the `cvt.rn.satfinite.{e4m3,e5m2}x2.f32` instruction, on
//!   Blackwell MXFP8 the same instruction through `ptx::mul_cvt_2x`). Its rules, from the
//!   header's software path: round to nearest, ties to even, with subnormals; a magnitude that
//!   rounds above the largest finite value, and ±infinity, saturate to ±max (448 or 57344); any
//!   NaN becomes the canonical NaN `0x7F` (the input's sign is dropped: the header canonicalises
//!   the float NaN to `0x7FFFFFFF` first); `-0` and negative underflow keep the sign (`0x80`).
//! * [`encode_torch`]: PyTorch's `tensor.to(torch.float8_e4m3fn / float8_e5m2)`
//!   (`c10/util/Float8_e4m3fn.h`, `Float8_e5m2.h`; also what TE's Python reference quantizers
//!   call). Round to nearest even as well, but **not** saturating: E4M3 magnitudes that round
//!   above 448 (anything above 464), ±inf and NaN become NaN `0x7F` *with the input's sign*;
//!   E5M2 magnitudes that round above 57344 (from 61440 up) and ±inf become ±inf (`0x7C`), NaN
//!   becomes `0x7F` with the sign. Observed the same with torch 2.11.0 on this project's CPU
//!   machine (e.g. 465 → `0x7F`, -inf → `0xFF` in E4M3; 61440 → `0x7C` in E5M2). TE's blockwise
//!   reference clamps to ±max before this cast, which makes the two agree on finite inputs.
//! * [`decode`]: exact; E4M3 `S.1111.111` is NaN (no infinities), E5M2 `S.11111.00` is ±inf and
//!   `S.11111.xx` (xx ≠ 0) NaN.

use super::format::Fp8Format;

/// The canonical NaN code of both formats (`0x7F`).
pub const NAN_CODE: u8 = 0x7F;

/// Rounds `|x|` (finite, non-negative, f64 holding an f32 value exactly) to the fp8 grid of
/// `fmt` with round-to-nearest-even and an unbounded exponent range above. Returns the
/// magnitude code (exponent field << mantissa bits | mantissa), which may exceed the largest
/// finite code (and 255) when `a` overflows.
fn round_magnitude(a: f64, fmt: Fp8Format) -> u64 {
    let m = fmt.mantissa_bits() as i32;
    let bias = fmt.exponent_bias();
    if a < fmt.min_normal() {
        // Subnormal range: a multiple of the subnormal spacing, which is exact in f64; a result
        // of 2^m is the smallest normal code, as it should be.
        return (a / fmt.min_subnormal()).round_ties_even() as u64;
    }
    // a = 2^e · s with s in [1, 2); both factors exact in f64.
    let e = ((a.to_bits() >> 52) & 0x7FF) as i32 - 1023;
    let s = a / 2f64.powi(e);
    let t = ((s - 1.0) * f64::from(1u32 << m)).round_ties_even() as u64;
    // A t of 2^m carries into the exponent field, which is RNE's carry.
    (((e + bias) as u64) << m) + t
}

/// Encodes an f32 value as TransformerEngine's kernels do (`__nv_cvt_float_to_fp8` with
/// `__NV_SATFINITE`): RNE with subnormals, saturation of overflow and ±inf to ±max, NaN → `0x7F`.
pub fn encode(x: f32, fmt: Fp8Format) -> u8 {
    if x.is_nan() {
        return NAN_CODE;
    }
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    if x.is_infinite() {
        return sign | fmt.max_finite_code();
    }
    let code = round_magnitude(f64::from(x.abs()), fmt);
    let max = u64::from(fmt.max_finite_code());
    sign | code.min(max) as u8
}

/// Encodes an f32 value as PyTorch's `tensor.to(float8_e4m3fn / float8_e5m2)` does: RNE with
/// subnormals, E4M3 overflow/inf/NaN → NaN with the input's sign, E5M2 overflow/inf → ±inf and
/// NaN → `0x7F` with the input's sign.
pub fn encode_torch(x: f32, fmt: Fp8Format) -> u8 {
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    if x.is_nan() {
        return sign | NAN_CODE;
    }
    let overflow = match fmt {
        Fp8Format::E4M3 => NAN_CODE,
        Fp8Format::E5M2 => 0x7C,
    };
    if x.is_infinite() {
        return sign | overflow;
    }
    let code = round_magnitude(f64::from(x.abs()), fmt);
    if code > u64::from(fmt.max_finite_code()) {
        sign | overflow
    } else {
        sign | code as u8
    }
}

/// True when `code` is a NaN of `fmt`.
pub fn is_nan_code(code: u8, fmt: Fp8Format) -> bool {
    match fmt {
        Fp8Format::E4M3 => code & 0x7F == 0x7F,
        Fp8Format::E5M2 => code & 0x7F > 0x7C,
    }
}

/// Decodes an fp8 code to f64 (exact; NaN codes give NaN, E5M2 `0x7C`/`0xFC` give ±inf).
pub fn decode_f64(code: u8, fmt: Fp8Format) -> f64 {
    let negative = code & 0x80 != 0;
    let magnitude = code & 0x7F;
    let m = fmt.mantissa_bits();
    let value = if is_nan_code(code, fmt) {
        f64::NAN
    } else if fmt == Fp8Format::E5M2 && magnitude == 0x7C {
        f64::INFINITY
    } else {
        let exp_field = i32::from(magnitude >> m);
        let mantissa = f64::from(magnitude & ((1u8 << m) - 1));
        let scale = f64::from(1u32 << m);
        if exp_field == 0 {
            mantissa * fmt.min_subnormal()
        } else {
            (1.0 + mantissa / scale) * 2f64.powi(exp_field - fmt.exponent_bias())
        }
    };
    if negative {
        -value
    } else {
        value
    }
}

/// Decodes an fp8 code to f32 (exact: every fp8 value is an f32 value).
pub fn decode(code: u8, fmt: Fp8Format) -> f32 {
    decode_f64(code, fmt) as f32
}

/// Scales `x` by `scale` in f32 (one rounding, as the kernels' `static_cast<float>(x) * scale`)
/// and encodes the product with [`encode`].
pub fn scale_and_encode(x: f32, scale: f32, fmt: Fp8Format) -> u8 {
    encode(x * scale, fmt)
}
