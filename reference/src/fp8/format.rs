//! The names: fp8 element formats ([`Fp8Format`]), TransformerEngine's recipe-level `Format`
//! ([`TeFormat`]), the scaling recipes ([`Fp8Recipe`]) and the tensor roles that pick a format
//! ([`TensorRole`]).
//!
//! Sources (TransformerEngine at [`TE_COMMIT`](super::TE_COMMIT)):
//! `transformer_engine/common/recipe/__init__.py` (`Format`, `DelayedScaling`,
//! `Float8CurrentScaling`, `Float8BlockScaling`, `MXFP8BlockScaling`; every recipe's
//! `__post_init__` asserts `fp8_format != Format.E5M2`, "Pure E5M2 training is not supported")
//! and `transformer_engine/pytorch/quantization.py` (`get_fp8_te_dtype`: E4M3, or HYBRID for a
//! forward tensor, gives E4M3; everything else E5M2).

use crate::error::ReferenceError;

/// An 8-bit floating-point element format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum Fp8Format {
    /// `float8_e4m3fn`: 4 exponent bits (bias 7), 3 mantissa bits, no infinity, one NaN pattern
    /// per sign (`S.1111.111`), largest finite value 448.
    E4M3,
    /// `float8_e5m2`: 5 exponent bits (bias 15), 2 mantissa bits, IEEE-style infinities
    /// (`S.11111.00`) and NaNs, largest finite value 57344.
    E5M2,
}

impl Fp8Format {
    /// Both formats, in a fixed order.
    pub const ALL: [Fp8Format; 2] = [Fp8Format::E4M3, Fp8Format::E5M2];

    /// The PyTorch dtype name: `float8_e4m3fn` or `float8_e5m2`.
    pub fn torch_name(self) -> &'static str {
        match self {
            Fp8Format::E4M3 => "float8_e4m3fn",
            Fp8Format::E5M2 => "float8_e5m2",
        }
    }

    /// The short name: `e4m3` or `e5m2`.
    pub fn name(self) -> &'static str {
        match self {
            Fp8Format::E4M3 => "e4m3",
            Fp8Format::E5M2 => "e5m2",
        }
    }

    /// Parses `e4m3`, `e4m3fn`, `float8_e4m3fn`, `e5m2` or `float8_e5m2` (case-insensitive,
    /// optional `torch.` prefix).
    pub fn parse(name: &str) -> Result<Fp8Format, ReferenceError> {
        let lower = name.trim().to_ascii_lowercase();
        match lower.trim_start_matches("torch.") {
            "e4m3" | "e4m3fn" | "float8_e4m3fn" | "fp8e4m3" | "kfloat8e4m3" => Ok(Fp8Format::E4M3),
            "e5m2" | "float8_e5m2" | "fp8e5m2" | "kfloat8e5m2" => Ok(Fp8Format::E5M2),
            _ => Err(ReferenceError::UnknownName {
                what: "fp8 element format",
                got: name.to_string(),
                expected: "e4m3 (float8_e4m3fn) or e5m2 (float8_e5m2)",
            }),
        }
    }

    /// The largest finite value: 448 (E4M3) or 57344 (E5M2); TE's `Quantized_Limits::max_norm`
    /// and `torch.finfo(dtype).max`.
    pub fn max_finite(self) -> f32 {
        match self {
            Fp8Format::E4M3 => 448.0,
            Fp8Format::E5M2 => 57344.0,
        }
    }

    /// The code of the largest finite positive value: `0x7E` (E4M3) or `0x7B` (E5M2).
    pub fn max_finite_code(self) -> u8 {
        match self {
            Fp8Format::E4M3 => 0x7E,
            Fp8Format::E5M2 => 0x7B,
        }
    }

    /// Number of explicit mantissa bits: 3 (E4M3) or 2 (E5M2).
    pub fn mantissa_bits(self) -> u32 {
        match self {
            Fp8Format::E4M3 => 3,
            Fp8Format::E5M2 => 2,
        }
    }

    /// The exponent bias: 7 (E4M3) or 15 (E5M2).
    pub fn exponent_bias(self) -> i32 {
        match self {
            Fp8Format::E4M3 => 7,
            Fp8Format::E5M2 => 15,
        }
    }

    /// The smallest positive normal value: 2^-6 (E4M3) or 2^-14 (E5M2).
    pub fn min_normal(self) -> f64 {
        2f64.powi(1 - self.exponent_bias())
    }

    /// The smallest positive subnormal value (the spacing of the subnormals): 2^-9 (E4M3) or
    /// 2^-16 (E5M2).
    pub fn min_subnormal(self) -> f64 {
        2f64.powi(1 - self.exponent_bias() - self.mantissa_bits() as i32)
    }
}

impl std::fmt::Display for Fp8Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which side of training a quantized tensor belongs to; TE picks its fp8 format from this.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum TensorRole {
    /// The GEMM input (activation) `x`: a forward (fprop) tensor.
    Input,
    /// The weight `W`: a forward (fprop) tensor.
    Weight,
    /// The output gradient `dy`: a backward tensor.
    GradOutput,
}

impl TensorRole {
    /// True for the tensors TE calls `fprop_tensor` (input and weight).
    pub fn is_forward(self) -> bool {
        !matches!(self, TensorRole::GradOutput)
    }
}

/// TransformerEngine's recipe-level `Format` (the `fp8_format` field of every fp8 recipe).
///
/// TE also defines `Format.E5M2` (and `E2M1` for fp4), but every fp8 recipe's `__post_init__`
/// rejects E5M2 ("Pure E5M2 training is not supported"), so only these two exist here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum TeFormat {
    /// Every fp8 tensor in E4M3 (`Format.E4M3`).
    E4M3,
    /// E4M3 for forward tensors (input, weight), E5M2 for backward tensors (the output
    /// gradient) (`Format.HYBRID`).
    Hybrid,
}

impl TeFormat {
    /// Both formats, in a fixed order.
    pub const ALL: [TeFormat; 2] = [TeFormat::E4M3, TeFormat::Hybrid];

    /// The name used on the command line and in reports: `e4m3` or `hybrid`.
    pub fn name(self) -> &'static str {
        match self {
            TeFormat::E4M3 => "e4m3",
            TeFormat::Hybrid => "hybrid",
        }
    }

    /// Parses `e4m3` or `hybrid` (case-insensitive, optional `Format.` prefix). `e5m2` is
    /// refused with TE's reason.
    pub fn parse(name: &str) -> Result<TeFormat, ReferenceError> {
        let lower = name.trim().to_ascii_lowercase();
        match lower.trim_start_matches("format.") {
            "e4m3" => Ok(TeFormat::E4M3),
            "hybrid" => Ok(TeFormat::Hybrid),
            "e5m2" => Err(ReferenceError::Config(
                "fp8 format e5m2: TransformerEngine refuses Format.E5M2 for every fp8 recipe (\"Pure E5M2 \
                 training is not supported\"); use hybrid (E4M3 forward, E5M2 backward)"
                    .to_string(),
            )),
            _ => Err(ReferenceError::UnknownName {
                what: "fp8 format",
                got: name.to_string(),
                expected: "e4m3 or hybrid",
            }),
        }
    }

    /// The element format of a tensor of the given role (TE's `get_fp8_te_dtype`).
    pub fn format_for(self, role: TensorRole) -> Fp8Format {
        match (self, role.is_forward()) {
            (TeFormat::E4M3, _) | (TeFormat::Hybrid, true) => Fp8Format::E4M3,
            (TeFormat::Hybrid, false) => Fp8Format::E5M2,
        }
    }
}

impl std::fmt::Display for TeFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An fp8 scaling recipe of TransformerEngine (and Megatron's `--fp8-recipe`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Fp8Recipe {
    /// Per-tensor current scaling (`Float8CurrentScaling`; Megatron `tensorwise`): the scale is
    /// computed from this tensor's own amax just before the cast.
    Tensorwise,
    /// Per-tensor delayed scaling (`DelayedScaling`; Megatron `delayed`): the cast uses the scale
    /// computed from the amax history after the previous step.
    Delayed,
    /// Block scaling (`Float8BlockScaling`; Megatron `blockwise`): 1×128 tiles for inputs and
    /// output gradients, 128×128 tiles for weights, power-of-2 f32 scales by default.
    Blockwise,
    /// MXFP8 (`MXFP8BlockScaling`; Megatron `mxfp8`): 32 consecutive elements share an E8M0
    /// (power-of-2) scale.
    Mxfp8,
}

impl Fp8Recipe {
    /// All recipes, in a fixed order.
    pub const ALL: [Fp8Recipe; 4] = [Fp8Recipe::Tensorwise, Fp8Recipe::Delayed, Fp8Recipe::Blockwise, Fp8Recipe::Mxfp8];

    /// Megatron's `--fp8-recipe` name: `tensorwise`, `delayed`, `blockwise` or `mxfp8`.
    pub fn name(self) -> &'static str {
        match self {
            Fp8Recipe::Tensorwise => "tensorwise",
            Fp8Recipe::Delayed => "delayed",
            Fp8Recipe::Blockwise => "blockwise",
            Fp8Recipe::Mxfp8 => "mxfp8",
        }
    }

    /// TransformerEngine's recipe class name.
    pub fn te_class(self) -> &'static str {
        match self {
            Fp8Recipe::Tensorwise => "Float8CurrentScaling",
            Fp8Recipe::Delayed => "DelayedScaling",
            Fp8Recipe::Blockwise => "Float8BlockScaling",
            Fp8Recipe::Mxfp8 => "MXFP8BlockScaling",
        }
    }

    /// Parses a Megatron recipe name (`tensorwise`, `delayed`, `blockwise`, `mxfp8`), the
    /// aliases `current`/`current_scaling`/`per_tensor`/`block`, or a TE class name
    /// (case-insensitive).
    pub fn parse(name: &str) -> Result<Fp8Recipe, ReferenceError> {
        let lower = name.trim().to_ascii_lowercase().replace('-', "_");
        match lower.as_str() {
            "tensorwise" | "current" | "current_scaling" | "per_tensor" | "float8currentscaling" => {
                Ok(Fp8Recipe::Tensorwise)
            }
            "delayed" | "delayed_scaling" | "delayedscaling" => Ok(Fp8Recipe::Delayed),
            "blockwise" | "block" | "block_scaling" | "float8blockscaling" => Ok(Fp8Recipe::Blockwise),
            "mxfp8" | "mxfp8blockscaling" => Ok(Fp8Recipe::Mxfp8),
            _ => Err(ReferenceError::UnknownName {
                what: "fp8 recipe",
                got: name.to_string(),
                expected: "tensorwise, delayed, blockwise or mxfp8",
            }),
        }
    }

    /// The default [`TeFormat`] of the TE recipe class: HYBRID for `DelayedScaling` and
    /// `Float8CurrentScaling`, E4M3 for `Float8BlockScaling` and `MXFP8BlockScaling`.
    pub fn default_format(self) -> TeFormat {
        match self {
            Fp8Recipe::Tensorwise | Fp8Recipe::Delayed => TeFormat::Hybrid,
            Fp8Recipe::Blockwise | Fp8Recipe::Mxfp8 => TeFormat::E4M3,
        }
    }

    /// The row alignment Megatron pads each expert's tokens to before the fp8 GEMMs
    /// (`megatron/core/fp8_utils.py::get_fp8_align_size`): 32 for MXFP8, 16 otherwise.
    pub fn align_size(self) -> usize {
        match self {
            Fp8Recipe::Mxfp8 => 32,
            _ => 16,
        }
    }
}

impl std::fmt::Display for Fp8Recipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
