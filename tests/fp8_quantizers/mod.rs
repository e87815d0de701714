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
//!   bit. The fixtures are committed; a missing one fails, naming the file and the command
//!   that regenerates it.
//!
//! [`codec`] holds the codec and name checks, [`scaling`] the per-tensor scales and delayed
//! scaling, [`blocks`] the 1×128/128×128 blocks and MXFP8, [`fixtures`] the golden fixtures;
//! this file the format constants they share.

mod blocks;
mod codec;
mod fixtures;
mod scaling;

use moe_reference::fp8::{Fp8Format, Fp8Quantizer, Fp8Tensor, Usage};
use moe_reference::Dtype;
use ndarray::Array2;

const E4M3: Fp8Format = Fp8Format::E4M3;
const E5M2: Fp8Format = Fp8Format::E5M2;

fn pow2(e: i32) -> f32 {
    2f64.powi(e) as f32
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
