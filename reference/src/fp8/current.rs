//! Per-tensor current scaling (`Float8CurrentScaling`, Megatron `tensorwise`).
//!
//! TE's `Float8CurrentScalingQuantizer::quantize_impl` (`pytorch/csrc/quantizer.cpp`) runs
//! three kernels: `nvte_compute_amax` (amax of the input, NaN ignored, see
//! [`scale::amax`]), `nvte_compute_scale_from_amax` (the scale, see
//! [`scale::current_scale`]) and the cast, which writes
//! `encode(x·scale)` for every element and `scale_inv = 1/scale`. The columnwise copy is the
//! same codes transposed with the same `scale_inv` (`cast_transpose`; on Blackwell no separate
//! transpose is stored at all, `Float8CurrentScalingQuantizer.inner_tensor_specs`).

use ndarray::{Array2, ArrayView2};

use super::codec;
use super::format::Fp8Format;
use super::scale::{self, ScaleOptions};
use super::tensor::{check_input, ColumnwiseCopy, Fp8Quantizer, Fp8Tensor, Quantized, Scales, Usage};
use crate::dtype::Dtype;
use crate::error::ReferenceError;

/// Encodes `x` with one per-tensor scale: codes `encode(x·scale)`, `scale_inv = 1/scale`.
pub fn quantize_with_scale(x: ArrayView2<'_, f32>, scale: f32, format: Fp8Format) -> Fp8Tensor {
    let data: Array2<u8> = x.mapv(|v| codec::scale_and_encode(v, scale, format));
    Fp8Tensor { format, data, scales: Scales::PerTensor { scale_inv: scale::reciprocal(scale) } }
}

/// Builds the requested copies of a per-tensor-scaled tensor (the columnwise one is the
/// rowwise codes transposed).
pub(crate) fn per_tensor_copies(x: ArrayView2<'_, f32>, scale: f32, format: Fp8Format, usage: Usage) -> Quantized {
    let rowwise = quantize_with_scale(x, scale, format);
    let columnwise = usage.columnwise.then(|| rowwise.transposed());
    Quantized { rowwise: usage.rowwise.then_some(rowwise), columnwise }
}

/// The current-scaling quantizer of one tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CurrentScalingQuantizer {
    /// The element format.
    pub format: Fp8Format,
    /// `force_pow_2_scales` and `amax_epsilon`.
    pub options: ScaleOptions,
}

impl CurrentScalingQuantizer {
    /// A quantizer with the recipe's default options (f32 scales, epsilon 0).
    pub fn new(format: Fp8Format) -> Self {
        CurrentScalingQuantizer { format, options: ScaleOptions::CURRENT_SCALING_DEFAULT }
    }

    /// The amax TE computes for `x` and the scale it derives from it.
    pub fn amax_and_scale(&self, x: ArrayView2<'_, f32>) -> (f32, f32) {
        let amax = scale::amax(x.iter().copied());
        (amax, scale::current_scale(amax, self.format, self.options))
    }
}

impl Fp8Quantizer for CurrentScalingQuantizer {
    fn format(&self) -> Fp8Format {
        self.format
    }

    fn columnwise_copy(&self) -> ColumnwiseCopy {
        ColumnwiseCopy::TransposeOfRowwise
    }

    fn quantize(
        &mut self,
        name: &str,
        x: ArrayView2<'_, f32>,
        dtype: Dtype,
        usage: Usage,
    ) -> Result<Quantized, ReferenceError> {
        check_input(name, x, dtype)?;
        let (_, scale) = self.amax_and_scale(x);
        Ok(per_tensor_copies(x, scale, self.format, usage))
    }
}
