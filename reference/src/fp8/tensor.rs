//! Quantized tensors ([`Fp8Tensor`]), their scales ([`Scales`]), the rowwise/columnwise
//! request ([`Usage`], [`Quantized`]), the [`Fp8Quantizer`] trait every recipe implements, and
//! the block helpers the recipes share.

use ndarray::{Array2, ArrayView2};

use super::codec;
use super::format::Fp8Format;
use super::mxfp8::e8m0_to_f32;
use crate::dtype::Dtype;
use crate::error::ReferenceError;

/// The dequantization factors of an [`Fp8Tensor`].
#[derive(Clone, Debug, PartialEq)]
pub enum Scales {
    /// One f32 `scale_inv` for the whole tensor (current and delayed scaling).
    PerTensor {
        /// `1/scale`, the factor that dequantizes every element.
        scale_inv: f32,
    },
    /// One f32 `scale_inv` per `rows × cols` block of this tensor (block scaling); the grid is
    /// `[ceil(R/rows), ceil(C/cols)]` (logical layout, without TE's GEMM padding), edge blocks
    /// partial.
    Block {
        /// Block height in this tensor's rows.
        rows: usize,
        /// Block width in this tensor's columns.
        cols: usize,
        /// `1/scale` of every block.
        scale_inv: Array2<f32>,
    },
    /// One E8M0 exponent byte per `rows × cols` block (MXFP8): the block's dequantization factor
    /// is `2^(e - 127)` (`0xFF` is NaN). Grid `[R/rows, C/cols]`, logical layout (TE stores it
    /// padded and, for GEMMs, swizzled).
    E8m0 {
        /// Block height in this tensor's rows.
        rows: usize,
        /// Block width in this tensor's columns.
        cols: usize,
        /// The biased exponents.
        exponents: Array2<u8>,
    },
}

impl Scales {
    /// The dequantization factor of element `(i, j)` of the tensor these scales belong to.
    pub fn scale_inv_at(&self, i: usize, j: usize) -> f32 {
        match self {
            Scales::PerTensor { scale_inv } => *scale_inv,
            Scales::Block { rows, cols, scale_inv } => scale_inv[[i / rows, j / cols]],
            Scales::E8m0 { rows, cols, exponents } => e8m0_to_f32(exponents[[i / rows, j / cols]]),
        }
    }

    /// The same scales for the transposed tensor (block shape and grid transposed).
    pub fn transposed(&self) -> Scales {
        match self {
            Scales::PerTensor { scale_inv } => Scales::PerTensor { scale_inv: *scale_inv },
            Scales::Block { rows, cols, scale_inv } => {
                Scales::Block { rows: *cols, cols: *rows, scale_inv: scale_inv.t().to_owned() }
            }
            Scales::E8m0 { rows, cols, exponents } => {
                Scales::E8m0 { rows: *cols, cols: *rows, exponents: exponents.t().to_owned() }
            }
        }
    }
}

/// An fp8 tensor: codes plus the scales that dequantize them.
#[derive(Clone, Debug, PartialEq)]
pub struct Fp8Tensor {
    /// The element format of `data`.
    pub format: Fp8Format,
    /// The fp8 codes, row-major, in this tensor's own shape (a columnwise copy of an `[M, N]`
    /// tensor has shape `[N, M]`).
    pub data: Array2<u8>,
    /// The dequantization factors.
    pub scales: Scales,
}

impl Fp8Tensor {
    /// `[rows, cols]` of the codes.
    pub fn shape(&self) -> [usize; 2] {
        [self.data.nrows(), self.data.ncols()]
    }

    /// The value of element `(i, j)`: its code decoded times its `scale_inv`, in f64 (exact: a
    /// 4-bit fp8 significand times a 24-bit scale fits 53 bits).
    pub fn value_at(&self, i: usize, j: usize) -> f64 {
        codec::decode_f64(self.data[[i, j]], self.format) * f64::from(self.scales.scale_inv_at(i, j))
    }

    /// Dequantizes exactly, in f64.
    pub fn dequantize(&self) -> Array2<f64> {
        Array2::from_shape_fn(self.data.raw_dim(), |(i, j)| self.value_at(i, j))
    }

    /// Dequantizes as TE's dequantize kernels do: the decoded value times `scale_inv`, rounded
    /// once to f32.
    pub fn dequantize_f32(&self) -> Array2<f32> {
        Array2::from_shape_fn(self.data.raw_dim(), |(i, j)| {
            codec::decode(self.data[[i, j]], self.format) * self.scales.scale_inv_at(i, j)
        })
    }

    /// The same bytes and scales, transposed (what per-tensor and square-block recipes store as
    /// their columnwise copy).
    pub fn transposed(&self) -> Fp8Tensor {
        Fp8Tensor { format: self.format, data: self.data.t().to_owned(), scales: self.scales.transposed() }
    }
}

/// Which copies of a tensor to produce (TE's `Quantizer.set_usage(rowwise, columnwise)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Usage {
    /// The tensor as it is (`[M, N]`).
    pub rowwise: bool,
    /// The tensor for a GEMM that consumes its transpose (`[N, M]`).
    pub columnwise: bool,
}

impl Usage {
    /// Rowwise only.
    pub const ROWWISE: Usage = Usage { rowwise: true, columnwise: false };
    /// Columnwise only.
    pub const COLUMNWISE: Usage = Usage { rowwise: false, columnwise: true };
    /// Both copies.
    pub const BOTH: Usage = Usage { rowwise: true, columnwise: true };
}

/// How a recipe makes the columnwise copy of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ColumnwiseCopy {
    /// The rowwise codes transposed, with the same (transposed) scales: per-tensor current and
    /// delayed scaling, 128×128 blocks, MXFP8 with 32×32 blocks.
    TransposeOfRowwise,
    /// A second quantization of the high-precision tensor along the other direction (its own
    /// amaxes and scales): 1×128 blocks, MXFP8 with 1×32 blocks.
    Requantized,
}

/// The copies a quantizer produced for one high-precision `[M, N]` tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Quantized {
    /// The `[M, N]` copy, when requested.
    pub rowwise: Option<Fp8Tensor>,
    /// The `[N, M]` copy (the transpose, as TE's GEMM-ready `columnwise_data`), when requested.
    pub columnwise: Option<Fp8Tensor>,
}

/// A recipe's quantizer for one tensor.
pub trait Fp8Quantizer {
    /// The element format it produces.
    fn format(&self) -> Fp8Format;

    /// How its columnwise copy relates to the rowwise one.
    fn columnwise_copy(&self) -> ColumnwiseCopy;

    /// Quantizes the `[M, N]` tensor `x`, whose values are `dtype` values (checked), into the
    /// requested copies. `name` names the tensor in errors. Stateful recipes (delayed scaling)
    /// record the amax of `x` here.
    fn quantize(
        &mut self,
        name: &str,
        x: ArrayView2<'_, f32>,
        dtype: Dtype,
        usage: Usage,
    ) -> Result<Quantized, ReferenceError>;
}

/// Fails unless every element of `x` is a value of `dtype` (NaN and ±inf pass: TE quantizes
/// them, see the recipes' documentation).
pub(crate) fn check_input(name: &str, x: ArrayView2<'_, f32>, dtype: Dtype) -> Result<(), ReferenceError> {
    for ((i, j), &v) in x.indexed_iter() {
        if !v.is_nan() && dtype.round_f32(v) != v {
            return Err(ReferenceError::Config(format!(
                "tensor {name}: element [{i}, {j}] = {v:e} is not a {dtype} value; an fp8 quantizer takes the \
                 high-precision tensor exactly as stored in its dtype"
            )));
        }
    }
    Ok(())
}

/// The amax of every `block[0] × block[1]` block of `x` (edge blocks partial), NaN ignored.
pub(crate) fn block_amax(x: ArrayView2<'_, f32>, block: [usize; 2]) -> Array2<f32> {
    let (m, n) = x.dim();
    let mut out = Array2::<f32>::zeros((m.div_ceil(block[0]), n.div_ceil(block[1])));
    for ((i, j), &v) in x.indexed_iter() {
        let slot = &mut out[[i / block[0], j / block[1]]];
        *slot = slot.max(v.abs());
    }
    out
}

/// Encodes `x` with one f32 multiplier per block: `encode(x·multiplier)`.
pub(crate) fn encode_blocks(
    x: ArrayView2<'_, f32>,
    block: [usize; 2],
    multipliers: &Array2<f32>,
    fmt: Fp8Format,
) -> Array2<u8> {
    Array2::from_shape_fn(x.raw_dim(), |(i, j)| {
        codec::scale_and_encode(x[[i, j]], multipliers[[i / block[0], j / block[1]]], fmt)
    })
}
