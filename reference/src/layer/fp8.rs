//! The fp8 GEMMs of the expert layers (issue 12 items 3 and 5), emulated on the quantizers of
//! [`crate::fp8`], and the explicit delayed-scaling state ([`Fp8State`]).
//!
//! # What is quantized
//!
//! Each linear (fc1, fc2) of each expert is a TE `Linear` (SequentialMLP) or one GEMM of a TE
//! `GroupedLinear` (TEGroupedMLP); both give every expert its own quantizers (`num_gemms`
//! quantizers per role in `GroupedLinear`). For `y = x·Wᵀ` (fc1: `x` the padded input rows, fc2:
//! `x = u`, the probs-scaled activation):
//!
//! | GEMM | operands (role, copy) |
//! | --- | --- |
//! | fprop `y = x·Wᵀ` | `x` (input, rowwise), `W` (weight, rowwise) |
//! | dgrad `dx = dy·W` | `dy` (grad output, rowwise), `W` (weight, columnwise) |
//! | wgrad `dW = dyᵀ·x` | `dy` (grad output, columnwise), `x` (input, columnwise) |
//!
//! `x` and `W` are quantized once in the forward (both copies; the columnwise copy of `x` is kept
//! for wgrad), `dy` once in the backward (both copies). Whether a columnwise copy is the rowwise
//! codes transposed or a re-quantization is the recipe's ([`crate::fp8`] module doc). Formats:
//! [`TeFormat::format_for`](crate::fp8::TeFormat::format_for) (HYBRID: E5M2 for `dy`). The bias
//! gradients come from the high-precision `dy` (TE's fused `bgrad`), the GEMM outputs are stored
//! in the storage dtype, and everything outside the GEMMs (activation, probs, bias adds) is the
//! bf16 path unchanged.
//!
//! # The GEMM
//!
//! Operands are decoded fp8 values with their dequantization factors ([`GemmOperand`]); every
//! product of two fp8 values is exact in f32. Per-tensor scales (tensorwise, delayed): one f32
//! accumulation over `K` in index order, then `acc·(s_a·s_b)` in f32 (cuBLASLt's `D =
//! scale_a·scale_b·(A·B)`). Block scales (blockwise, 128-wide K tiles; MXFP8, 32-wide): an f32
//! partial per K tile, then `y = fma(partial·s_a, s_b, y)` (TE's blockwise GEMM reference,
//! split accumulation). Not modelled bit for bit: Hopper's fast (non-split) accumulation that TE
//! uses for fprop with per-tensor recipes, the tensor cores' summation order, MXFP8's in-MMA
//! scaling on Blackwell; the error model bounds them with a coarser accumulation term.
//!
//! # Delayed scaling
//!
//! [`Fp8State`] holds one [`DelayedScaling`] per local expert and operand (`x`, `W`, `dy` of fc1
//! and fc2); a step quantizes with the scales it holds and records amaxes into it; the caller
//! runs [`Fp8State::update`] between steps (TE's `reduce_and_update_fp8_tensors` after the
//! autocast region). There is no hidden state: a [`crate::ExpertLayer`] call without a state
//! starts from [`Fp8State::new`] (scale 1, empty history: TE's first step).

use crate::config::LayerConfig;
use crate::dtype::Dtype;
use crate::error::ReferenceError;
use crate::fp8::tensor::{Fp8Quantizer, Fp8Tensor, Usage};
use crate::fp8::{
    codec, BlockQuantizer, BlockTile, CurrentScalingQuantizer, DelayedScaling, Fp8Config, Fp8Recipe, Mxfp8Quantizer,
    ScaleOptions, TensorRole,
};
use ndarray::{Array2, ArrayView2};

/// One quantized operand of an expert's linears.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fp8Operand {
    /// fc1's input `x` (padded input rows, after the probs with probs-on-input).
    Fc1Input,
    /// fc1's weight `W1`.
    Fc1Weight,
    /// fc1's output gradient `da`.
    Fc1GradOutput,
    /// fc2's input `u`.
    Fc2Input,
    /// fc2's weight `W2`.
    Fc2Weight,
    /// fc2's output gradient (the layer's upstream gradient rows).
    Fc2GradOutput,
}

impl Fp8Operand {
    /// All operands, in [`Fp8State`]'s order.
    pub const ALL: [Fp8Operand; 6] = [
        Fp8Operand::Fc1Input,
        Fp8Operand::Fc1Weight,
        Fp8Operand::Fc1GradOutput,
        Fp8Operand::Fc2Input,
        Fp8Operand::Fc2Weight,
        Fp8Operand::Fc2GradOutput,
    ];

    /// The tensor's role (which picks its format and block shape).
    pub fn role(self) -> TensorRole {
        match self {
            Fp8Operand::Fc1Input | Fp8Operand::Fc2Input => TensorRole::Input,
            Fp8Operand::Fc1Weight | Fp8Operand::Fc2Weight => TensorRole::Weight,
            Fp8Operand::Fc1GradOutput | Fp8Operand::Fc2GradOutput => TensorRole::GradOutput,
        }
    }

    /// The name used in errors, e.g. `linear_fc1.input`.
    pub fn name(self) -> &'static str {
        match self {
            Fp8Operand::Fc1Input => "linear_fc1.input",
            Fp8Operand::Fc1Weight => "linear_fc1.weight",
            Fp8Operand::Fc1GradOutput => "linear_fc1.grad_output",
            Fp8Operand::Fc2Input => "linear_fc2.input",
            Fp8Operand::Fc2Weight => "linear_fc2.weight",
            Fp8Operand::Fc2GradOutput => "linear_fc2.grad_output",
        }
    }

    fn index(self) -> usize {
        Fp8Operand::ALL.iter().position(|&o| o == self).unwrap_or(0)
    }
}

/// A deliberate fp8 bug, for the harness's self-tests (planted bugs must fail the properties).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fp8Fault {
    /// The operand is not quantized at all (its storage-dtype values enter the GEMM).
    SkipQuantization(Fp8Operand),
    /// The operand's dequantization factors are multiplied by 16 (a wrong block or tensor scale,
    /// e.g. an E8M0 exponent off by 4).
    WrongScale(Fp8Operand),
    /// The operand's dequantization factors are doubled: one exponent step, e.g. a power-of-2
    /// scale rounded up instead of down or an E8M0 byte off by one. The error model's fp8
    /// channel must see it in the results the operand feeds.
    ScaleOffByTwo(Fp8Operand),
}

/// The delayed-scaling state of a layer: one [`DelayedScaling`] per local expert and operand.
#[derive(Clone, Debug, PartialEq)]
pub struct Fp8State {
    experts: Vec<Vec<DelayedScaling>>,
}

impl Fp8State {
    /// TE's initial state for `cfg` (scale 1, zero amax history); empty unless the recipe is
    /// delayed scaling.
    pub fn new(cfg: &LayerConfig) -> Result<Fp8State, ReferenceError> {
        let Some(f) = cfg.fp8.filter(|f| f.recipe == Fp8Recipe::Delayed) else {
            return Ok(Fp8State { experts: Vec::new() });
        };
        let per_expert = Fp8Operand::ALL
            .iter()
            .map(|o| DelayedScaling::new(f.format.format_for(o.role()), f.delayed))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Fp8State { experts: vec![per_expert; cfg.num_local_experts()] })
    }

    /// The state of one local expert's operand (`None` when not delayed scaling or out of range).
    pub fn get(&self, expert: usize, operand: Fp8Operand) -> Option<&DelayedScaling> {
        self.experts.get(expert).map(|e| &e[operand.index()])
    }

    fn get_mut(&mut self, expert: usize, operand: Fp8Operand) -> Option<&mut DelayedScaling> {
        self.experts.get_mut(expert).map(|e| &mut e[operand.index()])
    }

    /// Local experts the state holds (0 unless delayed scaling).
    pub fn experts(&self) -> usize {
        self.experts.len()
    }

    /// Replaces one tensor's `scale` and amax history (a state read back from another
    /// implementation, e.g. a GPU's); the history must keep its configured length.
    pub fn set(
        &mut self,
        expert: usize,
        operand: Fp8Operand,
        scale: f32,
        amax_history: &[f32],
    ) -> Result<(), ReferenceError> {
        let state = self.get_mut(expert, operand).ok_or_else(|| {
            ReferenceError::Config(format!(
                "tensor {}: no delayed-scaling state for local expert {expert}",
                operand.name()
            ))
        })?;
        state.set(scale, amax_history).map_err(|e| ReferenceError::Config(format!("tensor {}: {e}", operand.name())))
    }

    /// The amax-and-scale update between steps (TE's fused kernel), for every tensor.
    pub fn update(&mut self) {
        self.experts.iter_mut().flatten().for_each(DelayedScaling::update);
    }
}

/// A GEMM operand `[rows, K]`: decoded values and a dequantization factor per K tile.
#[derive(Clone, Debug, PartialEq)]
pub struct GemmOperand {
    /// Decoded fp8 values (or, under [`Fp8Fault::SkipQuantization`], the raw values).
    pub data: Array2<f32>,
    /// `scale_inv` of each row and K tile `[rows, ceil(K/tile)]`.
    pub scale_inv: Array2<f32>,
    /// The K-tile width (K itself for per-tensor scales).
    pub tile: usize,
    /// True for per-tensor scales (one accumulation, then scaled).
    pub per_tensor: bool,
}

impl GemmOperand {
    /// The operand a quantized tensor gives: its codes decoded and its scales per K tile.
    pub fn from_fp8(t: &Fp8Tensor, recipe: Fp8Recipe) -> GemmOperand {
        let (rows, k) = t.data.dim();
        let data = t.data.mapv(|c| codec::decode(c, t.format));
        let tile = match recipe {
            Fp8Recipe::Tensorwise | Fp8Recipe::Delayed => k.max(1),
            Fp8Recipe::Blockwise => BlockTile::LEN,
            Fp8Recipe::Mxfp8 => crate::fp8::mxfp8::MXFP8_BLOCK,
        };
        let scale_inv = Array2::from_shape_fn((rows, k.div_ceil(tile)), |(i, j)| t.scales.scale_inv_at(i, j * tile));
        GemmOperand { data, scale_inv, tile, per_tensor: matches!(recipe, Fp8Recipe::Tensorwise | Fp8Recipe::Delayed) }
    }

    /// The values the GEMM multiplies, in f64: every decoded value times its K tile's
    /// dequantization factor (`[rows, K]`; the products are exact in f64).
    pub fn dequantized(&self) -> Array2<f64> {
        let tile = self.tile.max(1);
        Array2::from_shape_fn(self.data.dim(), |(i, k)| {
            f64::from(self.data[[i, k]]) * f64::from(self.scale_inv[[i, k / tile]])
        })
    }

    /// Unquantized values with unit scales (a planted bug).
    fn raw(x: ArrayView2<'_, f32>, like: &GemmOperand) -> GemmOperand {
        let scale_inv = Array2::ones((x.nrows(), x.ncols().div_ceil(like.tile.max(1))));
        GemmOperand { data: x.to_owned(), scale_inv, tile: like.tile, per_tensor: like.per_tensor }
    }
}

/// `a·bᵀ` for `a: [M, K]`, `b: [N, K]` (see the module doc), in f32, returned as f64.
pub fn fp8_gemm(a: &GemmOperand, b: &GemmOperand) -> Array2<f64> {
    let (m, k) = a.data.dim();
    let n = b.data.nrows();
    let tile = a.tile.max(1);
    Array2::from_shape_fn((m, n), |(i, j)| {
        let (ra, rb) = (a.data.row(i), b.data.row(j));
        if a.per_tensor {
            let acc = (0..k).fold(0f32, |acc, kk| acc + ra[kk] * rb[kk]);
            let s = a.scale_inv.get((i, 0)).copied().unwrap_or(1.0) * b.scale_inv.get((j, 0)).copied().unwrap_or(1.0);
            return f64::from(acc * s);
        }
        let mut y = 0f32;
        for t in 0..k.div_ceil(tile) {
            let partial = (t * tile..((t + 1) * tile).min(k)).fold(0f32, |acc, kk| acc + ra[kk] * rb[kk]);
            y = (partial * a.scale_inv[[i, t]]).mul_add(b.scale_inv[[j, t]], y);
        }
        f64::from(y)
    })
}

/// The rowwise and columnwise GEMM operands of one quantized tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedOperand {
    /// The `[M, N]` copy.
    pub rowwise: GemmOperand,
    /// The `[N, M]` copy.
    pub columnwise: GemmOperand,
}

/// The fp8 side of one layer call: the configuration, the delayed-scaling state and a planted
/// fault (none in every production path).
#[derive(Clone, Debug)]
pub struct Fp8Run {
    /// The layer's fp8 configuration.
    pub config: Fp8Config,
    /// The delayed-scaling state (read for the scales, amaxes recorded into it).
    pub state: Fp8State,
    /// A planted bug (self-tests only).
    pub fault: Option<Fp8Fault>,
}

impl Fp8Run {
    /// Quantizes local expert `expert`'s operand `x` (`[M, N]`, values of `dtype`) into both
    /// copies, as TE's quantizer of that operand does.
    pub fn quantize(
        &mut self,
        expert: usize,
        operand: Fp8Operand,
        x: &Array2<f64>,
        dtype: Dtype,
    ) -> Result<QuantizedOperand, ReferenceError> {
        let f = self.config;
        let format = f.format.format_for(operand.role());
        let x32 = x.mapv(|v| v as f32);
        let name = operand.name();
        let options = ScaleOptions { force_pow_2_scales: f.power_2_scales, amax_epsilon: 0.0 };
        let q = match f.recipe {
            Fp8Recipe::Tensorwise => {
                CurrentScalingQuantizer { format, options }.quantize(name, x32.view(), dtype, Usage::BOTH)?
            }
            Fp8Recipe::Delayed => {
                let state = self.state.get_mut(expert, operand).ok_or_else(|| {
                    ReferenceError::Config(format!("tensor {name}: no delayed-scaling state for local expert {expert}"))
                })?;
                state.quantize(name, x32.view(), dtype, Usage::BOTH)?
            }
            Fp8Recipe::Blockwise => BlockQuantizer { format, tile: BlockTile::for_role(operand.role()), options }
                .quantize(name, x32.view(), dtype, Usage::BOTH)?,
            Fp8Recipe::Mxfp8 => Mxfp8Quantizer::new(format).quantize(name, x32.view(), dtype, Usage::BOTH)?,
        };
        let missing = || ReferenceError::Config(format!("tensor {name}: the quantizer returned no copy"));
        let mut out = QuantizedOperand {
            rowwise: GemmOperand::from_fp8(q.rowwise.as_ref().ok_or_else(missing)?, f.recipe),
            columnwise: GemmOperand::from_fp8(q.columnwise.as_ref().ok_or_else(missing)?, f.recipe),
        };
        match self.fault {
            Some(Fp8Fault::SkipQuantization(o)) if o == operand => {
                out.rowwise = GemmOperand::raw(x32.view(), &out.rowwise);
                out.columnwise = GemmOperand::raw(x32.t(), &out.columnwise);
            }
            Some(Fp8Fault::WrongScale(o)) if o == operand => {
                out.rowwise.scale_inv.mapv_inplace(|s| 16.0 * s);
                out.columnwise.scale_inv.mapv_inplace(|s| 16.0 * s);
            }
            Some(Fp8Fault::ScaleOffByTwo(o)) if o == operand => {
                out.rowwise.scale_inv.mapv_inplace(|s| 2.0 * s);
                out.columnwise.scale_inv.mapv_inplace(|s| 2.0 * s);
            }
            _ => {}
        }
        Ok(out)
    }
}

/// TE's `assert_dim_for_fp8_exec`, which TE's `Linear` (SequentialMLP's experts) applies to its
/// input and weight under every recipe: the product of the leading dims divisible by 8, the last
/// dim by 16 (`pytorch/utils.py`). `GroupedLinear` does not call it.
pub fn check_dim_for_fp8_exec(name: &str, shape: [usize; 2]) -> Result<(), ReferenceError> {
    if !shape[0].is_multiple_of(8) || !shape[1].is_multiple_of(16) {
        return Err(ReferenceError::Config(format!(
            "tensor {name}: FP8 execution requires the product of all dimensions except the last to be divisible \
             by 8 and the last dimension to be divisible by 16, but got tensor with dims={shape:?} \
             (TransformerEngine Linear, assert_dim_for_fp8_exec)"
        )));
    }
    Ok(())
}

/// `activation_func_fp8_input_store`: `a.to(torch.float8_e4m3fn)` (PyTorch's unscaled,
/// non-saturating cast: magnitudes above 464 become NaN) and back.
pub fn fp8_input_store(a: &Array2<f64>) -> Array2<f64> {
    a.mapv(|v| {
        codec::decode_f64(codec::encode_torch(v as f32, crate::fp8::Fp8Format::E4M3), crate::fp8::Fp8Format::E4M3)
    })
}
