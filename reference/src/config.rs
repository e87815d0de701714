//! Layer configuration: the subset of Megatron-Core's `TransformerConfig` that changes what the
//! expert layers compute (spec §2), plus the rank this layer runs on.

use crate::dtype::Dtype;
use crate::error::ReferenceError;
use crate::fp8::Fp8Config;

/// Which Megatron-Core expert class (spec §1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum LayerClass {
    /// `SequentialMLP`: a loop of ordinary `MLP` experts.
    Sequential,
    /// `GroupedMLP`: the legacy grouped-GEMM layer with two packed parameters (OLD revision).
    Grouped,
    /// `TEGroupedMLP`: TransformerEngine `GroupedLinear`, non-fused path.
    TeGrouped,
}

impl LayerClass {
    /// All classes.
    pub const ALL: [LayerClass; 3] = [LayerClass::Sequential, LayerClass::Grouped, LayerClass::TeGrouped];

    /// The dump-metadata name: `sequential`, `grouped` or `te_grouped`.
    pub fn name(self) -> &'static str {
        match self {
            LayerClass::Sequential => "sequential",
            LayerClass::Grouped => "grouped",
            LayerClass::TeGrouped => "te_grouped",
        }
    }

    /// The Megatron-Core Python class name.
    pub fn megatron_name(self) -> &'static str {
        match self {
            LayerClass::Sequential => "SequentialMLP",
            LayerClass::Grouped => "GroupedMLP",
            LayerClass::TeGrouped => "TEGroupedMLP",
        }
    }

    /// Parses `sequential`, `grouped` or `te_grouped` (Megatron class names are accepted too).
    pub fn parse(name: &str) -> Result<LayerClass, ReferenceError> {
        match name.trim() {
            "sequential" | "SequentialMLP" => Ok(LayerClass::Sequential),
            "grouped" | "GroupedMLP" => Ok(LayerClass::Grouped),
            "te_grouped" | "TEGroupedMLP" => Ok(LayerClass::TeGrouped),
            other => Err(ReferenceError::UnknownName {
                what: "layer",
                got: other.to_string(),
                expected: "sequential, grouped or te_grouped",
            }),
        }
    }
}

impl std::fmt::Display for LayerClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The expert activation function (spec §4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum Activation {
    /// `x·σ(x)` (`F.silu`); with GLU this is SwiGLU.
    Silu,
    /// Exact erf GELU `x·Φ(x)` (`F.gelu`, Megatron's default).
    Gelu,
    /// `x·σ(1.702x)`.
    QuickGelu,
    /// `relu(x)²`.
    SquaredRelu,
}

impl Activation {
    /// All activations.
    pub const ALL: [Activation; 4] =
        [Activation::Silu, Activation::Gelu, Activation::QuickGelu, Activation::SquaredRelu];

    /// The dump-metadata name: `silu`, `gelu`, `quick_gelu` or `squared_relu`.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Silu => "silu",
            Activation::Gelu => "gelu",
            Activation::QuickGelu => "quick_gelu",
            Activation::SquaredRelu => "squared_relu",
        }
    }

    /// Parses an activation name.
    pub fn parse(name: &str) -> Result<Activation, ReferenceError> {
        match name.trim() {
            "silu" | "swiglu" => Ok(Activation::Silu),
            "gelu" => Ok(Activation::Gelu),
            "quick_gelu" => Ok(Activation::QuickGelu),
            "squared_relu" => Ok(Activation::SquaredRelu),
            other => Err(ReferenceError::UnknownName {
                what: "activation",
                got: other.to_string(),
                expected: "silu, gelu, quick_gelu or squared_relu",
            }),
        }
    }
}

impl std::fmt::Display for Activation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Expert-parallel and expert-tensor-parallel sizes and this layer's ranks (spec §6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Parallelism {
    /// Expert-tensor-parallel size `t`.
    pub tp_size: usize,
    /// Expert-tensor-parallel rank `r`.
    pub tp_rank: usize,
    /// Expert-parallel size `p_ep`.
    pub ep_size: usize,
    /// Expert-parallel rank `r_ep`.
    pub ep_rank: usize,
}

impl Parallelism {
    /// No parallelism: one rank holds every expert in full.
    pub const SINGLE: Parallelism = Parallelism { tp_size: 1, tp_rank: 0, ep_size: 1, ep_rank: 0 };

    /// The same sizes at another rank.
    pub fn at(self, ep_rank: usize, tp_rank: usize) -> Parallelism {
        Parallelism { ep_rank, tp_rank, ..self }
    }
}

impl Default for Parallelism {
    fn default() -> Self {
        Parallelism::SINGLE
    }
}

/// Everything that determines what one rank's expert layer computes.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayerConfig {
    /// The expert class.
    pub class: LayerClass,
    /// Global number of experts `E` (`num_moe_experts`); this rank holds `E / ep_size`.
    pub num_experts: usize,
    /// `hidden_size` `h`.
    pub hidden_size: usize,
    /// The unsplit `moe_ffn_hidden_size` `f`.
    pub ffn_hidden_size: usize,
    /// `gated_linear_unit`: fc1 is `[gate; linear]`, `z = act(gate)·(linear + offset)`.
    pub gated_linear_unit: bool,
    /// The activation function.
    pub activation: Activation,
    /// `add_bias_linear`: fc1 and fc2 biases.
    pub add_bias: bool,
    /// `activation_func_clamp_value` `c` (GLU only): `gate ← min(gate, c)`, `linear ← clamp(linear, -c, c)`.
    pub clamp_value: Option<f64>,
    /// `glu_linear_offset`, added to the linear half of a GLU.
    pub glu_linear_offset: f64,
    /// `moe_apply_probs_on_input`: scale the input by the probs instead of the activation.
    pub apply_probs_on_input: bool,
    /// `params_dtype` (also the activation dtype).
    pub params_dtype: Dtype,
    /// The dtype of `permuted_probs` (fp32 with `moe_router_dtype='fp32'`, else the activation dtype).
    pub probs_dtype: Dtype,
    /// Quantization padding (spec §4.5/§4.6): every expert segment padded with zero rows and zero
    /// probs to a multiple of this (16, 32, 128, 256). `None` when not quantizing.
    pub padding_multiple: Option<usize>,
    /// EP/ETP sizes and this layer's ranks.
    pub parallel: Parallelism,
    /// FP8 GEMMs through TransformerEngine (`None`: no quantization, every GEMM in the storage
    /// dtype). With a recipe, each expert's rows are padded to its alignment (unless
    /// [`Fp8Config::pad_to_alignment`] is off) and the reference quantizes what TE quantizes
    /// (`crate::layer` module doc, `docs/spec/fp8-recipes.md` §11). Missing in serialised
    /// configurations = `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fp8: Option<Fp8Config>,
    /// `moe_mlp_glu_interleave_size` (Megatron-Core HEAD, TEGroupedMLP with GLU only, spec
    /// §4.10): each rank's fc1 rows are alternating blocks of this many gate and linear units,
    /// un-interleaved ([`crate::glu`]) before the activation. `None`: the halves `[gate; linear]`.
    /// Missing in serialised configurations = `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub glu_interleave_size: Option<usize>,
}

impl LayerConfig {
    /// A small valid configuration to start from (SequentialMLP, bf16, GLU silu, 4 experts).
    pub fn example() -> LayerConfig {
        LayerConfig {
            class: LayerClass::Sequential,
            num_experts: 4,
            hidden_size: 16,
            ffn_hidden_size: 32,
            gated_linear_unit: true,
            activation: Activation::Silu,
            add_bias: false,
            clamp_value: None,
            glu_linear_offset: 0.0,
            apply_probs_on_input: false,
            params_dtype: Dtype::Bf16,
            probs_dtype: Dtype::F32,
            padding_multiple: None,
            parallel: Parallelism::SINGLE,
            fp8: None,
            glu_interleave_size: None,
        }
    }

    /// The row multiple every expert segment is padded to (zero rows, zero probs): the explicit
    /// [`LayerConfig::padding_multiple`], else with fp8 the recipe's alignment (16, 32 for MXFP8;
    /// Megatron's `get_fp8_align_size`) unless [`Fp8Config::pad_to_alignment`] is off.
    pub fn row_padding(&self) -> Option<usize> {
        self.padding_multiple.or(self.fp8.filter(|f| f.pad_to_alignment).map(|f| f.align_size()))
    }

    /// `E_l = E / p_ep`.
    pub fn num_local_experts(&self) -> usize {
        self.num_experts / self.parallel.ep_size.max(1)
    }

    /// `N2 = f / t`: this rank's fc2 input width (and GLU half width).
    pub fn n2(&self) -> usize {
        self.ffn_hidden_size / self.parallel.tp_size.max(1)
    }

    /// `N1`: this rank's fc1 output width, `2f/t` with GLU and `f/t` without.
    pub fn n1(&self) -> usize {
        if self.gated_linear_unit {
            2 * self.n2()
        } else {
            self.n2()
        }
    }

    /// Global index `g = r_ep·E_l + e` of local expert `e`.
    pub fn global_expert(&self, local: usize) -> usize {
        self.parallel.ep_rank * self.num_local_experts() + local
    }

    /// The same configuration for a single unsharded rank (t = p_ep = 1).
    pub fn unsharded(&self) -> LayerConfig {
        LayerConfig { parallel: Parallelism::SINGLE, ..self.clone() }
    }

    /// The same configuration at another (ep_rank, tp_rank).
    pub fn at_rank(&self, ep_rank: usize, tp_rank: usize) -> LayerConfig {
        LayerConfig { parallel: self.parallel.at(ep_rank, tp_rank), ..self.clone() }
    }

    /// Checks the configuration against the rules Megatron-Core enforces (spec §2, §4.4, §4.9,
    /// §6.3), returning the first violation.
    pub fn validate(&self) -> Result<(), ReferenceError> {
        let bad = |msg: String| Err(ReferenceError::Config(msg));
        let p = self.parallel;
        if self.num_experts == 0 || self.hidden_size == 0 || self.ffn_hidden_size == 0 {
            return bad(format!(
                "num_experts ({}), hidden_size ({}) and ffn_hidden_size ({}) must all be positive",
                self.num_experts, self.hidden_size, self.ffn_hidden_size
            ));
        }
        if p.tp_size == 0 || p.ep_size == 0 {
            return bad(format!("tp_size ({}) and ep_size ({}) must be positive", p.tp_size, p.ep_size));
        }
        if p.tp_rank >= p.tp_size || p.ep_rank >= p.ep_size {
            return bad(format!(
                "rank out of range: tp_rank {} of tp_size {}, ep_rank {} of ep_size {}",
                p.tp_rank, p.tp_size, p.ep_rank, p.ep_size
            ));
        }
        if !self.num_experts.is_multiple_of(p.ep_size) {
            return bad(format!(
                "num_experts ({}) is not divisible by the expert-parallel size ({})",
                self.num_experts, p.ep_size
            ));
        }
        if !self.ffn_hidden_size.is_multiple_of(p.tp_size) {
            return bad(format!(
                "ffn_hidden_size ({}) is not divisible by the expert-tensor-parallel size ({})",
                self.ffn_hidden_size, p.tp_size
            ));
        }
        if self.add_bias && p.tp_size > 1 {
            return bad(format!(
                "add_bias_linear with expert_tensor_parallel_size {} > 1: Megatron-Core asserts \
                 expert_tensor_parallel_size == 1 for MoE with bias (fc2's bias would be added on every rank)",
                p.tp_size
            ));
        }
        if let Some(c) = self.clamp_value {
            if !(c.is_finite() && c > 0.0) {
                return bad(format!("activation_func_clamp_value must be finite and > 0, got {c}"));
            }
        }
        if !self.glu_linear_offset.is_finite() {
            return bad(format!("glu_linear_offset must be finite, got {}", self.glu_linear_offset));
        }
        if let Some(m) = self.padding_multiple {
            if m == 0 {
                return bad("padding_multiple must be positive (use None for no padding)".into());
            }
        }
        if self.probs_dtype == Dtype::F16 && self.params_dtype != Dtype::F16 {
            return bad("float16 probs are only produced by a float16 model".into());
        }
        if self.class == LayerClass::Grouped {
            if self.add_bias {
                return bad("GroupedMLP does not support add_bias_linear (Megatron asserts it is False)".into());
            }
            if self.gated_linear_unit && !matches!(self.activation, Activation::Silu | Activation::Gelu) {
                return bad(format!("GroupedMLP supports GLU only with silu or gelu, not {}", self.activation));
            }
            if self.params_dtype != Dtype::Bf16 {
                return bad(format!(
                    "GroupedMLP runs only in bfloat16 (Megatron asserts config.bf16), not {}",
                    self.params_dtype
                ));
            }
            if self.padding_multiple.is_some() {
                return bad("GroupedMLP has no quantization padding (it does not run fp8/fp4)".into());
            }
            if let Some(f) = &self.fp8 {
                return bad(format!(
                    "GroupedMLP has no fp8 path: its GEMMs are grouped_gemm's bf16 gmm (Megatron \
                     experts.py GroupedMLP: no TE linears, no quantizers, no Fp8Padding), so fp8 recipe {} \
                     cannot apply to it; use te_grouped or sequential",
                    f.recipe
                ));
            }
        }
        if let Some(s) = self.glu_interleave_size {
            if !self.gated_linear_unit {
                return bad(format!(
                    "glu_interleave_size {s} without gated_linear_unit: Megatron-Core applies \
                     moe_mlp_glu_interleave_size only to a GLU's gate and linear halves"
                ));
            }
            if self.class != LayerClass::TeGrouped {
                return bad(format!(
                    "glu_interleave_size {s} with {}: Megatron-Core HEAD applies moe_mlp_glu_interleave_size \
                     in TEGroupedMLP only (SequentialMLP's MLP experts ignore it, the legacy GroupedMLP \
                     was removed before it existed); use te_grouped",
                    self.class.megatron_name()
                ));
            }
            crate::glu::check_interleave(
                &format!("linear_fc1 at expert_tensor_parallel_size {}", p.tp_size),
                self.n1(),
                s,
            )?;
        }
        if let Some(f) = &self.fp8 {
            f.validate()?;
            if f.activation_input_store && !(self.gated_linear_unit && self.activation == Activation::Silu) {
                return bad(format!(
                    "activation_func_fp8_input_store applies to Megatron's fused SwiGLU only \
                     (bias_swiglu_impl, weighted_bias_swiglu_impl), not to {}{}",
                    if self.gated_linear_unit { "GLU " } else { "" },
                    self.activation
                ));
            }
        }
        Ok(())
    }
}
