//! The fp8 part of a layer configuration ([`Fp8Config`], `LayerConfig::fp8`): which recipe, which
//! format, the recipe's options, and Megatron's per-expert padding to the recipe's alignment.
//!
//! Sources: TE `common/recipe/__init__.py` (recipes, defaults), Megatron-LM
//! `megatron/core/fp8_utils.py::get_fp8_align_size`, `transformer/moe/experts.py`
//! (`SequentialMLP._pad_tensor_for_quantization`, `TEGroupedMLP`'s `Fp8Padding`),
//! `transformer/moe/moe_utils.py::get_align_size_for_quantization`; rules in
//! `docs/spec/fp8-recipes.md` §9 and §11.

use super::delayed::DelayedScalingConfig;
use super::format::{Fp8Recipe, TeFormat};
use crate::error::ReferenceError;

/// The fp8 configuration of an expert layer (Megatron's `--fp8-format`/`--fp8-recipe` and the
/// TE recipe fields that change the numerics).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Fp8Config {
    /// The scaling recipe.
    pub recipe: Fp8Recipe,
    /// E4M3 everywhere, or HYBRID (E4M3 forward tensors, E5M2 output gradients).
    pub format: TeFormat,
    /// Power-of-2 scales: `Float8CurrentScaling` with `NVTE_FP8_CURRENT_SCALING_POWER_2_SCALES=1`
    /// (default false), `Float8BlockScaling` unless `NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1`
    /// (default true). Delayed scaling ignores it; MXFP8's E8M0 scales are powers of 2 anyway.
    pub power_2_scales: bool,
    /// Delayed scaling's margin, history length and amax algorithm (ignored by other recipes).
    pub delayed: DelayedScalingConfig,
    /// Megatron pads each expert's rows to the recipe's alignment before the fp8 GEMMs (true, the
    /// default: `SequentialMLP._pad_tensor_for_quantization`, `TEGroupedMLP`'s `Fp8Padding`).
    /// False models `moe_router_padding_for_quantization` (the router claims to have padded), so
    /// TE sees the splits as they come and refuses the unaligned ones where it does (MXFP8).
    pub pad_to_alignment: bool,
    /// `activation_func_fp8_input_store`: the activation's input is saved for backward as
    /// `input.to(torch.float8_e4m3fn)` (unscaled PyTorch cast) and cast back for the backward
    /// (Megatron's fused `bias_swiglu_impl`/`weighted_bias_swiglu_impl`: GLU silu only).
    pub activation_input_store: bool,
}

impl Fp8Config {
    /// The recipe with TE's defaults: its default format, its default scale mode, delayed
    /// scaling's defaults (margin 0, history 1024, `max`), padding on, no fp8 activation store.
    pub fn new(recipe: Fp8Recipe) -> Fp8Config {
        Fp8Config {
            recipe,
            format: recipe.default_format(),
            power_2_scales: matches!(recipe, Fp8Recipe::Blockwise | Fp8Recipe::Mxfp8),
            delayed: DelayedScalingConfig::default(),
            pad_to_alignment: true,
            activation_input_store: false,
        }
    }

    /// The same configuration with another format.
    pub fn with_format(self, format: TeFormat) -> Fp8Config {
        Fp8Config { format, ..self }
    }

    /// The row alignment of each expert's tokens (Megatron's `get_fp8_align_size`): 32 for
    /// MXFP8, 16 for the other recipes.
    pub fn align_size(&self) -> usize {
        self.recipe.align_size()
    }

    /// A short label, e.g. `blockwise/e4m3` (`+pow2`, `+nopad`, `+actstore` when set off the
    /// recipe's default).
    pub fn label(&self) -> String {
        let mut s = format!("{}/{}", self.recipe, self.format);
        if self.power_2_scales != Fp8Config::new(self.recipe).power_2_scales {
            s.push_str(if self.power_2_scales { "+pow2" } else { "+f32scales" });
        }
        if !self.pad_to_alignment {
            s.push_str("+nopad");
        }
        if self.activation_input_store {
            s.push_str("+actstore");
        }
        s
    }

    /// Checks the recipe options (TE's own checks: a delayed-scaling history of at least one;
    /// MXFP8 has no f32-scale mode).
    pub fn validate(&self) -> Result<(), ReferenceError> {
        if self.recipe == Fp8Recipe::Delayed && self.delayed.amax_history_len == 0 {
            return Err(ReferenceError::Config(
                "fp8 delayed scaling: amax_history_len must be at least 1 (TE records the current amax in \
                 amax_history[0])"
                    .into(),
            ));
        }
        if self.recipe == Fp8Recipe::Mxfp8 && !self.power_2_scales {
            return Err(ReferenceError::Config(
                "fp8 mxfp8: E8M0 block scales are powers of 2; power_2_scales = false has no meaning here".into(),
            ));
        }
        Ok(())
    }
}
