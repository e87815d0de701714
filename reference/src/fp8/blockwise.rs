//! Block scaling (`Float8BlockScaling`, Megatron `blockwise`): 1×128 and 128×128 tiles with f32
//! scales, power-of-2 by default.
//!
//! The recipe quantizes inputs and output gradients with 1×128 tiles (`x_block_scaling_dim =
//! grad_block_scaling_dim = 1`) and weights with 128×128 tiles (`w_block_scaling_dim = 2`),
//! `QParams(power_2_scale=True, amax_epsilon=0)` unless `NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1`
//! (`common/recipe/__init__.py`). The kernels (`common/transpose/quantize_transpose_vector_
//! blockwise.cu` for 1×128, `quantize_transpose_square_blockwise.cu` for 128×128):
//!
//! * each tile's amax is an `fmaxf` reduction of `|x|` over the tile's elements that exist (a
//!   partial edge tile behaves as if zero-padded, which is how TE's Python reference
//!   `blockwise_quantizer_reference.py` writes it: pad, quantize, slice);
//! * `scale = compute_scale_from_types<IType, OType>(amax, eps, pow_2)`, i.e.
//!   [`scale::block_scale`] with the *input* dtype's largest finite
//!   value for an infinite quotient;
//! * codes `encode(x·scale)`, stored `scale_inv = 1/scale`.
//!
//! Columnwise: for 1×128 the kernel re-quantizes the columns in 128×1 tiles (`Step 3`, own
//! amaxes and scales) and stores them transposed (`[N, M]`, scales `[N, ceil(M/128)]`); for
//! 128×128 it writes the same codes transposed with the transposed scale grid (the Python
//! reference: "Valid because of square block sizes").
//!
//! On Blackwell the recipe is emulated with MXFP8 and requires power-of-2 scales (`NVTE_CHECK`
//! in both kernels' launchers); that is a device restriction and not modelled.

use ndarray::ArrayView2;

use super::format::Fp8Format;
use super::scale::{self, ScaleOptions};
use super::tensor::{
    block_amax, check_input, encode_blocks, ColumnwiseCopy, Fp8Quantizer, Fp8Tensor, Quantized, Scales, Usage,
};
use crate::dtype::Dtype;
use crate::error::ReferenceError;

/// The tile of a block-scaled tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum BlockTile {
    /// 1×128: one scale per 128 consecutive elements of a row (`block_scaling_dim = 1`).
    Row1x128,
    /// 128×128: one scale per square tile (`block_scaling_dim = 2`).
    Square128,
}

impl BlockTile {
    /// The tile edge, 128 (`Float8BlockQuantizer.block_len`).
    pub const LEN: usize = 128;

    /// `[rows, cols]` of the tile.
    pub fn dims(self) -> [usize; 2] {
        match self {
            BlockTile::Row1x128 => [1, Self::LEN],
            BlockTile::Square128 => [Self::LEN, Self::LEN],
        }
    }

    /// `1x128` or `128x128`.
    pub fn name(self) -> &'static str {
        match self {
            BlockTile::Row1x128 => "1x128",
            BlockTile::Square128 => "128x128",
        }
    }

    /// The tile of the given `[rows, cols]`; anything but 1×128 and 128×128 is refused (TE's
    /// reference asserts `quant_tile_shape in ((1, 128), (128, 128))`, the recipe
    /// `block_scaling_dim in [1, 2]`).
    pub fn from_dims(rows: usize, cols: usize) -> Result<Self, ReferenceError> {
        match (rows, cols) {
            (1, 128) => Ok(BlockTile::Row1x128),
            (128, 128) => Ok(BlockTile::Square128),
            _ => Err(ReferenceError::Config(format!(
                "fp8 block scaling: tile {rows}x{cols} is not supported; TransformerEngine's Float8BlockScaling \
                 has 1x128 (block_scaling_dim=1) and 128x128 (block_scaling_dim=2) tiles only"
            ))),
        }
    }

    /// The tile of TE's `block_scaling_dim` (1 or 2).
    pub fn from_scaling_dim(dim: usize) -> Result<Self, ReferenceError> {
        match dim {
            1 => Ok(BlockTile::Row1x128),
            2 => Ok(BlockTile::Square128),
            _ => Err(ReferenceError::Config(format!(
                "fp8 block scaling: block_scaling_dim={dim}; only 1D or 2D blocks are supported"
            ))),
        }
    }

    /// Parses `1x128` or `128x128` (a `×` is accepted for the `x`).
    pub fn parse(name: &str) -> Result<Self, ReferenceError> {
        let lower = name.trim().to_ascii_lowercase().replace('×', "x");
        let parsed = lower.split_once('x').and_then(|(r, c)| Some((r.trim().parse().ok()?, c.trim().parse().ok()?)));
        match parsed {
            Some((r, c)) => Self::from_dims(r, c),
            None => Err(ReferenceError::UnknownName {
                what: "fp8 block tile",
                got: name.to_string(),
                expected: "1x128 or 128x128",
            }),
        }
    }

    /// The tile the `Float8BlockScaling` recipe uses for a tensor role: 128×128 for weights,
    /// 1×128 for inputs and output gradients.
    pub fn for_role(role: super::format::TensorRole) -> Self {
        match role {
            super::format::TensorRole::Weight => BlockTile::Square128,
            _ => BlockTile::Row1x128,
        }
    }

    /// The shape of TE's scale tensor for a `[M, N]` tensor, GEMM-ready layout with padding
    /// (`Float8BlockQuantizer.get_scale_shape`): 128×128 rowwise `(ceil(M/128),
    /// roundup(ceil(N/128), 4))`, columnwise `(ceil(N/128), roundup(ceil(M/128), 4))`; 1×128
    /// rowwise `(ceil(N/128), roundup(M, 4))`, columnwise `(ceil(M/128), roundup(N, 4))`. The
    /// [`Scales::Block`] grid here is the logical one, without padding or transposition.
    pub fn te_scale_shape(self, shape: [usize; 2], columnwise: bool) -> [usize; 2] {
        let [m, n] = shape;
        let len = Self::LEN;
        match (self, columnwise) {
            (BlockTile::Square128, false) => [m.div_ceil(len), n.div_ceil(len).next_multiple_of(4)],
            (BlockTile::Square128, true) => [n.div_ceil(len), m.div_ceil(len).next_multiple_of(4)],
            (BlockTile::Row1x128, false) => [n.div_ceil(len), m.next_multiple_of(4)],
            (BlockTile::Row1x128, true) => [m.div_ceil(len), n.next_multiple_of(4)],
        }
    }
}

/// A block-scaling quantizer (`Float8BlockQuantizer`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQuantizer {
    /// The element format.
    pub format: Fp8Format,
    /// The tile.
    pub tile: BlockTile,
    /// `force_pow_2_scales` (default true) and `amax_epsilon` (default 0).
    pub options: ScaleOptions,
}

impl BlockQuantizer {
    /// A quantizer with the recipe's defaults (power-of-2 scales, epsilon 0).
    pub fn new(format: Fp8Format, tile: BlockTile) -> Self {
        BlockQuantizer { format, tile, options: ScaleOptions::BLOCKWISE_DEFAULT }
    }

    /// Quantizes `x` with this quantizer's tile laid along its rows (no input check).
    fn quantize_tiles(&self, x: ArrayView2<'_, f32>, dtype: Dtype) -> Fp8Tensor {
        let block = self.tile.dims();
        let scales = block_amax(x, block).mapv(|a| scale::block_scale(a, self.format, dtype, self.options));
        let data = encode_blocks(x, block, &scales, self.format);
        let scale_inv = scales.mapv(scale::reciprocal);
        Fp8Tensor { format: self.format, data, scales: Scales::Block { rows: block[0], cols: block[1], scale_inv } }
    }
}

impl Fp8Quantizer for BlockQuantizer {
    fn format(&self) -> Fp8Format {
        self.format
    }

    fn columnwise_copy(&self) -> ColumnwiseCopy {
        match self.tile {
            BlockTile::Row1x128 => ColumnwiseCopy::Requantized,
            BlockTile::Square128 => ColumnwiseCopy::TransposeOfRowwise,
        }
    }

    fn quantize(
        &mut self,
        name: &str,
        x: ArrayView2<'_, f32>,
        dtype: Dtype,
        usage: Usage,
    ) -> Result<Quantized, ReferenceError> {
        check_input(name, x, dtype)?;
        let rowwise = (usage.rowwise || self.tile == BlockTile::Square128).then(|| self.quantize_tiles(x, dtype));
        let columnwise = if !usage.columnwise {
            None
        } else {
            match self.tile {
                BlockTile::Row1x128 => Some(self.quantize_tiles(x.t(), dtype)),
                BlockTile::Square128 => rowwise.as_ref().map(Fp8Tensor::transposed),
            }
        };
        Ok(Quantized { rowwise: if usage.rowwise { rowwise } else { None }, columnwise })
    }
}
