//! MXFP8 (`MXFP8BlockScaling`, Megatron `mxfp8`): 32 consecutive elements share one E8M0
//! (power-of-2) scale.
//!
//! The kernel (`common/cast/mxfp8/quantize_mxfp8.cuh`), per block of 32 elements along a row
//! (rowwise) or along a column (columnwise):
//!
//! * `amax` = max of `|x|` over the block (`fmaxf`/`__hmax`/`max.xorsign.abs`: NaN ignored);
//! * `e = float_to_e8m0(amax · max_norm_rcp)` with `max_norm_rcp = (float)(1.0 / max_norm)`
//!   (`Quantized_Limits`, `common/utils.cuh`) and the product in f32 ([`float_to_e8m0`]: the
//!   exponent of the f32 value, rounded *up* unless the value is a power of two; this is the
//!   software path of `ptx::float_to_e8m0` in `common/util/ptx_arch_spec.cuh`, which the
//!   Blackwell instruction `cvt.rp.satfinite.ue8m0x2.f32` replaces);
//! * the codes `encode(x · exp2f_rcp(e))` with `exp2f_rcp(e) = 2^(127−e)` ([`exp2f_rcp`],
//!   `common/util/ptx.cuh`), product in f32 (`mul.f32x2` then `cvt.rn.satfinite`);
//! * the stored scale byte is `e`; dequantization multiplies by `2^(e−127)`.
//!
//! The columnwise copy is a re-quantization in 32×1 blocks (the recipe's docstring: "both
//! versions are computed from the high precision input to avoid double quantization errors");
//! TE stores it untransposed (`[M, N]` codes, `[M/32, N]` scales), here it is the `[N, M]`
//! transpose like every other columnwise copy. With `enable_2d_quantization` (weights only),
//! one E8M0 per 32×32 block serves both directions, so the columnwise copy is the rowwise codes
//! transposed.
//!
//! TE refuses tensors whose flattened dims are not multiples of 32: `MXFP8Quantizer::
//! create_tensor` and `get_scale_shape` (`pytorch/csrc/quantizer.cpp`, "MXFP8 requires tensor
//! dims that are divisible by 32"); so does [`Mxfp8Quantizer`].

use ndarray::ArrayView2;

use super::format::Fp8Format;
use super::tensor::{
    block_amax, check_input, encode_blocks, ColumnwiseCopy, Fp8Quantizer, Fp8Tensor, Quantized, Scales, Usage,
};
use crate::dtype::Dtype;
use crate::error::ReferenceError;

/// The MXFP8 block length, 32 (`MXFP8_BLOCK_SCALING_SIZE`).
pub const MXFP8_BLOCK: usize = 32;

/// TE's `ptx::float_to_e8m0` (software path): NaN → `0xFF`, inf → `0xFE`, 0 → `0`; otherwise the
/// biased f32 exponent, plus one when the mantissa is non-zero (round up to the next power of
/// two) except at exponent `0xFE` (saturation) and for subnormals up to `2^-127` (which stay 0,
/// i.e. `2^-127`).
pub fn float_to_e8m0(value: f32) -> u8 {
    if value.is_nan() {
        return 0xFF;
    }
    if value.is_infinite() {
        return 0xFE;
    }
    if value == 0.0 {
        return 0x00;
    }
    let bits = value.to_bits();
    let exponent = ((bits >> 23) & 0xFF) as u8;
    let mantissa = bits & 0x7F_FFFF;
    if mantissa > 0 && exponent != 0xFE && !(exponent == 0 && mantissa <= 0x40_0000) {
        exponent + 1
    } else {
        exponent
    }
}

/// TE's `ptx::exp2f_rcp<float>`: the multiplier `2^(127−e)` the cast applies (`e = 255` → NaN,
/// `e = 254` → `2^-127`, a subnormal).
pub fn exp2f_rcp(e: u8) -> f32 {
    match e {
        255 => f32::NAN,
        254 => f32::from_bits(0x0040_0000),
        _ => f32::from_bits(u32::from(254 - e) << 23),
    }
}

/// The dequantization factor of an E8M0 byte, `2^(e−127)` (`e = 255` is NaN; `e = 0` is the
/// subnormal `2^-127`).
pub fn e8m0_to_f32(e: u8) -> f32 {
    match e {
        255 => f32::NAN,
        0 => f32::from_bits(0x0040_0000),
        _ => f32::from_bits(u32::from(e) << 23),
    }
}

/// `max_norm_rcp` of TE's `Quantized_Limits`: `1.0 / max_norm` in double, narrowed to f32.
pub fn max_norm_rcp(format: Fp8Format) -> f32 {
    (1.0f64 / f64::from(format.max_finite())) as f32
}

/// The E8M0 exponent TE computes for a block amax: `float_to_e8m0(amax · max_norm_rcp)`.
pub fn block_exponent(amax: f32, format: Fp8Format) -> u8 {
    float_to_e8m0(amax * max_norm_rcp(format))
}

/// The shape of an MXFP8 block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum MxBlock {
    /// 32 consecutive elements of a row (the recipe's default, every tensor).
    Row1x32,
    /// 32×32 (`MXFP8BlockScaling(enable_2d_quantization=True)`, forward weights only).
    Square32,
}

impl MxBlock {
    /// `[rows, cols]` of the block.
    pub fn dims(self) -> [usize; 2] {
        match self {
            MxBlock::Row1x32 => [1, MXFP8_BLOCK],
            MxBlock::Square32 => [MXFP8_BLOCK, MXFP8_BLOCK],
        }
    }
}

/// An MXFP8 quantizer (`MXFP8Quantizer`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mxfp8Quantizer {
    /// The element format.
    pub format: Fp8Format,
    /// The block shape.
    pub block: MxBlock,
}

impl Mxfp8Quantizer {
    /// A quantizer with 1×32 blocks.
    pub fn new(format: Fp8Format) -> Self {
        Mxfp8Quantizer { format, block: MxBlock::Row1x32 }
    }

    /// Quantizes `x` with blocks laid along its rows (no checks).
    fn quantize_blocks(&self, x: ArrayView2<'_, f32>) -> Fp8Tensor {
        let block = self.block.dims();
        let exponents = block_amax(x, block).mapv(|a| block_exponent(a, self.format));
        let multipliers = exponents.mapv(exp2f_rcp);
        let data = encode_blocks(x, block, &multipliers, self.format);
        Fp8Tensor { format: self.format, data, scales: Scales::E8m0 { rows: block[0], cols: block[1], exponents } }
    }
}

/// Fails unless both dims of `shape` are multiples of 32, as TE's MXFP8 quantizer does.
pub fn check_mxfp8_shape(name: &str, shape: [usize; 2]) -> Result<(), ReferenceError> {
    if !shape[0].is_multiple_of(MXFP8_BLOCK) || !shape[1].is_multiple_of(MXFP8_BLOCK) {
        return Err(ReferenceError::Config(format!(
            "tensor {name}: MXFP8 requires tensor dims that are divisible by {MXFP8_BLOCK} (got shape {shape:?}); \
             Megatron pads each expert's tokens to a multiple of 32 (get_fp8_align_size)"
        )));
    }
    Ok(())
}

impl Fp8Quantizer for Mxfp8Quantizer {
    fn format(&self) -> Fp8Format {
        self.format
    }

    fn columnwise_copy(&self) -> ColumnwiseCopy {
        match self.block {
            MxBlock::Row1x32 => ColumnwiseCopy::Requantized,
            MxBlock::Square32 => ColumnwiseCopy::TransposeOfRowwise,
        }
    }

    fn quantize(
        &mut self,
        name: &str,
        x: ArrayView2<'_, f32>,
        dtype: Dtype,
        usage: Usage,
    ) -> Result<Quantized, ReferenceError> {
        check_mxfp8_shape(name, [x.nrows(), x.ncols()])?;
        check_input(name, x, dtype)?;
        let rowwise = (usage.rowwise || self.block == MxBlock::Square32).then(|| self.quantize_blocks(x));
        let columnwise = if !usage.columnwise {
            None
        } else {
            match self.block {
                MxBlock::Row1x32 => Some(self.quantize_blocks(x.t())),
                MxBlock::Square32 => rowwise.as_ref().map(Fp8Tensor::transposed),
            }
        };
        Ok(Quantized { rowwise: if usage.rowwise { rowwise } else { None }, columnwise })
    }
}
