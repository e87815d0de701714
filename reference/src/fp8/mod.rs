//! FP8 quantizers of TransformerEngine's recipes, bit-exact (issue 12, items 1 and 2).
//!
//! The layers use it through [`LayerConfig::fp8`](crate::LayerConfig::fp8) ([`Fp8Config`]) and
//! the fp8 GEMMs of [`crate::layer`] (`docs/spec/fp8-recipes.md` §11).
//! The rules, each with its TransformerEngine (TE) or Megatron-LM source, are collected in
//! `docs/spec/fp8-recipes.md`; every source path below is at TE commit [`TE_COMMIT`] or
//! Megatron-LM commit [`MEGATRON_COMMIT`].
//!
//! * [`format`](mod@format): [`Fp8Format`] (E4M3/E5M2), TE's [`TeFormat`] (E4M3/HYBRID), [`Fp8Recipe`]
//!   (tensorwise, delayed, blockwise, mxfp8), [`TensorRole`].
//! * [`codec`]: encode (TE's satfinite cast, and PyTorch's cast) and decode.
//! * [`scale`]: TE's `compute_scale_from_amax` (epsilon, zero/inf/NaN amax, power-of-2 scales)
//!   and the NaN-ignoring amax.
//! * [`current`]: per-tensor current scaling; [`delayed`]: delayed scaling with its amax
//!   history, a state kept across steps; [`blockwise`]: 1×128 and 128×128 block scaling;
//!   [`mxfp8`]: MXFP8 with E8M0 exponents.
//! * [`tensor`]: [`Fp8Tensor`] (codes + [`Scales`]), the [`Fp8Quantizer`] trait, rowwise and
//!   columnwise copies ([`Usage`], [`Quantized`]).
//!
//! # Rowwise and columnwise copies
//!
//! A GEMM consumes each fp8 operand along its reduction dimension. TE's `Linear` and
//! `GroupedLinear` (`pytorch/module/linear.py`, `grouped_linear.py`, `set_usage` calls) use,
//! for `y = x·Wᵀ` with `x: [tokens, in]`, `W: [out, in]`, `dy: [tokens, out]`:
//!
//! | GEMM | operands | copies |
//! | --- | --- | --- |
//! | fprop `y = x·Wᵀ` | x, W | x rowwise, W rowwise |
//! | dgrad `dx = dy·W` | dy, Wᵀ | dy rowwise, W columnwise |
//! | wgrad `dW = dyᵀ·x` | dyᵀ, xᵀ | dy columnwise, x columnwise |
//!
//! The columnwise copy of an `[M, N]` tensor is given here as the `[N, M]` tensor the GEMM
//! reads (TE's GEMM-ready `columnwise_data`/`_transpose`). Whether it is the rowwise codes
//! transposed or a second quantization ([`ColumnwiseCopy`]):
//!
//! | recipe | columnwise copy | source |
//! | --- | --- | --- |
//! | tensorwise (current) | same codes transposed, same `scale_inv` | `cast_transpose`; `Float8CurrentScalingQuantizer.inner_tensor_specs` (`pytorch/tensor/float8_tensor.py`: on Blackwell one `_data` serves both) |
//! | delayed | same codes transposed, same `scale_inv` | `Float8Quantizer` → `nvte_quantize_v2` with a transpose output |
//! | blockwise 1×128 | re-quantized in 128×1 tiles (own amax and scale per 128 rows of a column) | `quantize_transpose_vector_blockwise.cu` Step 3; `blockwise_quantizer_reference.py::_quantize_vector_tiling` |
//! | blockwise 128×128 | same codes transposed, scale grid transposed | `quantize_transpose_square_blockwise.cu`; reference: "Valid because of square block sizes" |
//! | mxfp8 1×32 | re-quantized in 32×1 blocks | `MXFP8BlockScaling` docstring; `quantize_mxfp8.cuh` colwise pass |
//! | mxfp8 32×32 (2-D, weights) | same codes, one E8M0 per block for both | `quantize_mxfp8.cuh` (`block_scales_2d`) |
//!
//! # Non-finite inputs
//!
//! TE's quantizers do not reject NaN or infinite inputs, so neither does this module: the amax
//! ignores NaN, an infinite amax makes the per-tensor/block scale 1 (E8M0 `0xFE` for MXFP8),
//! ±inf encode to ±max and NaN to `0x7F`. Inputs must be values of their declared dtype, block
//! tiles must be TE's, MXFP8 dims multiples of 32 and a delayed-scaling history at least one
//! long; anything else is a [`ReferenceError`](crate::ReferenceError), never a panic.

pub mod blockwise;
pub mod codec;
pub mod current;
pub mod delayed;
pub mod format;
pub mod layer_config;
pub mod mxfp8;
pub mod scale;
pub mod tensor;

pub use blockwise::{BlockQuantizer, BlockTile};
pub use codec::{decode, decode_f64, encode, encode_torch};
pub use current::CurrentScalingQuantizer;
pub use delayed::{AmaxComputeAlgo, DelayedScaling, DelayedScalingConfig};
pub use format::{Fp8Format, Fp8Recipe, TeFormat, TensorRole};
pub use layer_config::Fp8Config;
pub use mxfp8::{MxBlock, Mxfp8Quantizer};
pub use scale::ScaleOptions;
pub use tensor::{ColumnwiseCopy, Fp8Quantizer, Fp8Tensor, Quantized, Scales, Usage};

/// The TransformerEngine commit whose sources these rules were read from
/// (github.com/NVIDIA/TransformerEngine).
pub const TE_COMMIT: &str = "d0067d0da6cb01811b8072a7d304f0e00344ce2b";

/// The Megatron-LM commit whose sources the alignment rules were read from
/// (github.com/NVIDIA/Megatron-LM).
pub const MEGATRON_COMMIT: &str = "d98e8a64ddf34856e74b24714e3bedb2f5a39553";
