//! Storage dtypes and the two ways the reference computes: the f64 oracle and the emulation of
//! a storage dtype at Megatron's rounding points (spec §4.8).

use crate::error::ReferenceError;
use half::{bf16, f16};

/// A floating-point storage dtype of parameters, activations or probs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum Dtype {
    /// IEEE binary32 (`torch.float32`).
    F32,
    /// bfloat16 (`torch.bfloat16`): 8 exponent bits, 8 significand bits.
    Bf16,
    /// IEEE binary16 (`torch.float16`, "half").
    F16,
}

impl Dtype {
    /// All storage dtypes, in a fixed order.
    pub const ALL: [Dtype; 3] = [Dtype::F32, Dtype::Bf16, Dtype::F16];

    /// The PyTorch name used in dump metadata: `float32`, `bfloat16` or `float16`.
    pub fn torch_name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::Bf16 => "bfloat16",
            Dtype::F16 => "float16",
        }
    }

    /// Parses a PyTorch dtype name (`float32`/`fp32`, `bfloat16`/`bf16`, `float16`/`fp16`/`half`,
    /// with or without a `torch.` prefix).
    pub fn parse(name: &str) -> Result<Dtype, ReferenceError> {
        match name.trim().trim_start_matches("torch.") {
            "float32" | "fp32" | "f32" | "float" => Ok(Dtype::F32),
            "bfloat16" | "bf16" => Ok(Dtype::Bf16),
            "float16" | "fp16" | "f16" | "half" => Ok(Dtype::F16),
            other => Err(ReferenceError::UnknownName {
                what: "dtype",
                got: other.to_string(),
                expected: "float32, bfloat16 or float16",
            }),
        }
    }

    /// Unit roundoff `u = 2^-p` (half an ulp at 1.0): 2^-24 for f32, 2^-8 for bf16, 2^-11 for f16.
    pub fn unit_roundoff(self) -> f64 {
        match self {
            Dtype::F32 => 2f64.powi(-24),
            Dtype::Bf16 => 2f64.powi(-8),
            Dtype::F16 => 2f64.powi(-11),
        }
    }

    /// The spacing of the subnormal numbers (the absolute rounding error floor): 2^-24 for f16,
    /// 2^-133 for bf16, 2^-149 for f32.
    pub fn subnormal_spacing(self) -> f64 {
        match self {
            Dtype::F32 => 2f64.powi(-149),
            Dtype::Bf16 => 2f64.powi(-133),
            Dtype::F16 => 2f64.powi(-24),
        }
    }

    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
        }
    }

    /// Rounds an f32 value to this dtype, round-to-nearest-even (what a CUDA/PyTorch op does when
    /// it computes in f32 and stores the result).
    pub fn round_f32(self, x: f32) -> f32 {
        match self {
            Dtype::F32 => x,
            Dtype::Bf16 => bf16::from_f32(x).to_f32(),
            Dtype::F16 => f16::from_f32(x).to_f32(),
        }
    }

    /// Rounds an f64 value first to f32 (the op's internal precision) and then to this dtype.
    pub fn round(self, x: f64) -> f64 {
        f64::from(self.round_f32(x as f32))
    }

    /// True when `x` is exactly representable in this dtype.
    pub fn represents(self, x: f64) -> bool {
        self.round(x) == x || x.is_nan()
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.torch_name())
    }
}

/// How the reference evaluates a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Numerics {
    /// Every operation in f64 with no intermediate rounding: the oracle every implementation
    /// (the emulating reference included) is diffed against.
    Oracle,
    /// Emulates eager Megatron/PyTorch in a storage dtype: GEMMs take storage-dtype operands,
    /// accumulate in f32 and round their output once; every eager elementwise op computes in f32
    /// and rounds its result to the storage dtype; products with fp32 probs stay in f32 until the
    /// explicit cast (spec §4.8).
    Emulated(Dtype),
}

impl Numerics {
    /// Rounds `x` to the storage dtype (identity for the oracle).
    pub fn store(self, x: f64) -> f64 {
        match self {
            Numerics::Oracle => x,
            Numerics::Emulated(d) => d.round(x),
        }
    }

    /// Rounds `x` to f32, the precision of mixed storage×fp32 products (identity for the oracle).
    pub fn fp32(self, x: f64) -> f64 {
        match self {
            Numerics::Oracle => x,
            Numerics::Emulated(_) => f64::from(x as f32),
        }
    }

    /// Rounds `x` to the given dtype (identity for the oracle); used for probs and their grads.
    pub fn to(self, dtype: Dtype, x: f64) -> f64 {
        match self {
            Numerics::Oracle => x,
            Numerics::Emulated(_) => dtype.round(x),
        }
    }

    /// A short label: `f64-oracle` or the emulated dtype's name.
    pub fn label(self) -> String {
        match self {
            Numerics::Oracle => "f64-oracle".to_string(),
            Numerics::Emulated(d) => d.torch_name().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_round_to_nearest_even() {
        // 1 + 2^-8 is exactly half way between bf16 neighbours 1 and 1 + 2^-7: ties go to even (1).
        assert_eq!(Dtype::Bf16.round(1.0 + 2f64.powi(-8)), 1.0);
        assert_eq!(Dtype::Bf16.round(1.0 + 3.0 * 2f64.powi(-8)), 1.0 + 2.0 * 2f64.powi(-7));
        assert_eq!(Dtype::F16.round(1.0 + 2f64.powi(-11)), 1.0);
        assert!(Dtype::F32.represents(0.1f32 as f64));
        assert!(!Dtype::Bf16.represents(0.1f32 as f64));
    }

    #[test]
    fn parse_names() {
        assert_eq!(Dtype::parse("torch.bfloat16").unwrap(), Dtype::Bf16);
        assert_eq!(Dtype::parse("half").unwrap(), Dtype::F16);
        let err = Dtype::parse("float8").unwrap_err().to_string();
        assert!(err.contains("float8") && err.contains("bfloat16"), "{err}");
    }
}
