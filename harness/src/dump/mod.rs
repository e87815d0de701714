//! `moe-expert-dump/1`: one safetensors file holding an expert layer's parameters, one call's
//! inputs and, optionally, what PyTorch computed for them — and the comparison of those
//! expectations with the reference ([`compare_dump`]).
//!
//! # Format
//!
//! | key | shape | dtype |
//! |---|---|---|
//! | the layer's own state-dict names (`local_experts.0.linear_fc1.weight`, `weight1`, `linear_fc2.weight3`, ...) | per-rank parameter shape (spec §3) | `params_dtype` |
//! | or, for TEGroupedMLP, Megatron HEAD's single grouped names (`linear_fc1.weight` `[E_l, N1, h]`, `linear_fc2.bias` `[E_l, h]`, ...), per parameter | the per-expert tensors stacked on a leading `E_l` axis | `params_dtype` |
//! | `input.permuted_local_hidden_states` | `[T, h]` | `params_dtype` |
//! | `input.tokens_per_expert` | `[E_l]` | int64 or int32 |
//! | `input.permuted_probs` | `[T]` | float32, bfloat16 (float16 for a float16 model); sets the probs dtype |
//! | `input.grad_output` (optional; required when a gradient is expected) | `[T, h]` | `params_dtype` |
//! | `expected.output` (optional) | `[T, h]` | `params_dtype` or float32 |
//! | `expected.grad.permuted_local_hidden_states` (optional) | `[T, h]` | `params_dtype` or float32 |
//! | `expected.grad.permuted_probs` (optional) | `[T]` | the probs dtype or float32 |
//! | `expected.grad.<parameter name>` (optional; either name form of a single grouped parameter) | the parameter's shape | `params_dtype` or float32 |
//!
//! String metadata (`__metadata__`): `format` = `moe-expert-dump/1`, `layer`
//! (`sequential`|`grouped`|`te_grouped`), `num_local_experts`, `hidden_size`, `ffn_hidden_size`
//! (the unsplit `moe_ffn_hidden_size`), `gated_linear_unit`, `activation`
//! (`silu`|`gelu`|`quick_gelu`|`squared_relu`), `add_bias`, `params_dtype`
//! (`float32`|`bfloat16`|`float16`), `apply_probs_on_input`, `glu_linear_offset`, `tp_size`,
//! `tp_rank`, `ep_size`, `ep_rank`; optional `clamp_value`, `padding_multiple`,
//! `glu_interleave_size` (Megatron HEAD's `moe_mlp_glu_interleave_size`; the parameters and
//! their grads are then in the module's interleaved fc1 row order) and `num_experts` (the
//! global count, which must then equal `num_local_experts · ep_size`).
//!
//! FP8 (`docs/spec/fp8-recipes.md`): `fp8_recipe` (`tensorwise`|`delayed`|`blockwise`|`mxfp8`,
//! TE class names accepted; absent or `none` = no fp8), `fp8_format` (`e4m3`|`hybrid`, default
//! the recipe's), optional `fp8_power_2_scales`, `fp8_pad_to_alignment` (false: the router
//! padded, `moe_router_padding_for_quantization`), `fp8_activation_input_store`. The reference
//! then runs TE's fp8 GEMMs from the initial state (delayed scaling: scale 1, a first step). A
//! dump may hold a weight as its implementation quantized it: `fp8.<parameter>` (`F8_E4M3`, the
//! parameter's shape) and `fp8.<parameter>.scale_inv` (`F32`, shape `[]` per tensor or the
//! `[⌈R/128⌉, ⌈C/128⌉]` grid of 128×128 blocks; MXFP8: E8M0 bytes `U8`/`F8_E8M0` `[R, C/32]`);
//! codes whose scales do not reproduce the parameter are rejected, and the codes are compared
//! bit for bit with the reference's quantization (row `fp8.<parameter>`).
//!
//! Booleans are `true`|`false`. Unknown metadata keys are ignored; unknown `input.*` or
//! `expected.*` tensors are rejected (a misspelt expectation must not be skipped silently).
//!
//! A single grouped tensor is read as its per-expert tensors
//! ([`moe_reference::unpack_single_grouped`]): the comparison reports `grad.linear_fc1.weight3`
//! for expert 3's block of `linear_fc1.weight`, and [`Dump::write`] writes the per-expert names.
//! A parameter given in both forms is rejected.
//!
//! Every rejection is a [`DumpError`] naming the file, the key and what was expected.
//!
//! Submodules: `read` (parsing and validation), `write` (dumps of the reference's own
//! results, serialization) and `compare` ([`compare_dump`] and its report).

mod compare;
pub mod fp8;
mod read;
mod write;

pub use compare::{compare_dump, CompareReport, CompareRow};

use moe_reference::{Dtype, Inputs, LayerConfig, StateDict};
use ndarray::{Array1, Array2};

/// The value of the `format` metadata key.
pub const FORMAT: &str = "moe-expert-dump/1";

/// Key of the input hidden states.
pub const HIDDEN_STATES: &str = "input.permuted_local_hidden_states";
/// Key of the token counts.
pub const TOKENS_PER_EXPERT: &str = "input.tokens_per_expert";
/// Key of the routing probs.
pub const PROBS: &str = "input.permuted_probs";
/// Key of the upstream gradient.
pub const GRAD_OUTPUT: &str = "input.grad_output";
/// Key of the expected layer output.
pub const EXPECTED_OUTPUT: &str = "expected.output";
/// Key of the expected input gradient.
pub const EXPECTED_GRAD_INPUT: &str = "expected.grad.permuted_local_hidden_states";
/// Key of the expected probs gradient.
pub const EXPECTED_GRAD_PROBS: &str = "expected.grad.permuted_probs";
/// Prefix of the expected parameter gradients (`expected.grad.<parameter name>`).
pub const EXPECTED_GRAD_PREFIX: &str = "expected.grad.";

/// A rejected dump: which file, which key (a tensor name or `__metadata__.<key>`; empty for
/// the file as a whole) and what was wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DumpError {
    /// The file (as given on the command line, or a label for in-memory bytes).
    pub file: String,
    /// The offending key; empty when the file itself is unreadable.
    pub key: String,
    /// What was wrong and what was expected.
    pub message: String,
}

impl std::fmt::Display for DumpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}: {}: {}", self.file, self.key, self.message)
        }
    }
}

impl std::error::Error for DumpError {}

/// The integer dtype of `input.tokens_per_expert`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum CountDtype {
    /// `torch.int64` (what the dispatchers produce).
    I64,
    /// `torch.int32`.
    I32,
}

/// The tensors PyTorch computed for the dump's inputs; each one present is compared.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Expectations {
    /// `expected.output` `[T, h]`.
    pub output: Option<Array2<f64>>,
    /// `expected.grad.permuted_local_hidden_states` `[T, h]`.
    pub grad_input: Option<Array2<f64>>,
    /// `expected.grad.permuted_probs` `[T]`.
    pub grad_probs: Option<Array1<f64>>,
    /// `expected.grad.<parameter name>`, by parameter name (without the prefix).
    pub weight_grads: StateDict,
}

impl Expectations {
    /// True when any gradient is expected (so `input.grad_output` is needed).
    pub fn needs_backward(&self) -> bool {
        self.grad_input.is_some() || self.grad_probs.is_some() || !self.weight_grads.is_empty()
    }

    /// Number of expected tensors.
    pub fn len(&self) -> usize {
        usize::from(self.output.is_some())
            + usize::from(self.grad_input.is_some())
            + usize::from(self.grad_probs.is_some())
            + self.weight_grads.len()
    }

    /// True when nothing is expected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The contents of one `moe-expert-dump/1` file, values in f64 (exactly representable in the
/// dtype they were stored in).
#[derive(Clone, Debug, PartialEq)]
pub struct Dump {
    /// The layer configuration (`num_experts` is global: `num_local_experts · ep_size`;
    /// `probs_dtype` is the dtype of `input.permuted_probs`).
    pub config: LayerConfig,
    /// The parameters under the class's own state-dict names.
    pub params: StateDict,
    /// The call's inputs.
    pub inputs: Inputs,
    /// `input.grad_output` `[T, h]`, the upstream gradient of the backward.
    pub grad_output: Option<Array2<f64>>,
    /// What PyTorch computed.
    pub expected: Expectations,
    /// The dtype `input.tokens_per_expert` is (or will be) stored in.
    pub count_dtype: CountDtype,
    /// The quantized weights the dump holds (`fp8.<parameter>` with its scales), by parameter
    /// name; each checked to match its parameter when read, and compared bit for bit with the
    /// reference's quantization by [`compare_dump`].
    pub fp8_weights: std::collections::BTreeMap<String, moe_reference::fp8::Fp8Tensor>,
}

/// The tensor dtypes a dump may use, in our terms.
pub(super) fn float_dtype(d: safetensors::Dtype) -> Option<Dtype> {
    match d {
        safetensors::Dtype::F32 => Some(Dtype::F32),
        safetensors::Dtype::BF16 => Some(Dtype::Bf16),
        safetensors::Dtype::F16 => Some(Dtype::F16),
        _ => None,
    }
}

pub(super) fn st_dtype(d: Dtype) -> safetensors::Dtype {
    match d {
        Dtype::F32 => safetensors::Dtype::F32,
        Dtype::Bf16 => safetensors::Dtype::BF16,
        Dtype::F16 => safetensors::Dtype::F16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn};

    #[test]
    fn only_expected_gradients_need_the_upstream_gradient() {
        // A forward-only dump carries no `input.grad_output`; any expected gradient needs it.
        let rows = Some(Array2::zeros((2, 3)));
        let forward = Expectations { output: rows.clone(), ..Default::default() };
        assert!(!forward.needs_backward());
        assert_eq!((forward.len(), forward.is_empty()), (1, false));
        let dx = Expectations { grad_input: rows.clone(), ..Default::default() };
        let dp = Expectations { grad_probs: Some(Array1::zeros(2)), ..Default::default() };
        let mut weight_grads = StateDict::new();
        weight_grads.insert("linear_fc1.weight0".into(), ArrayD::zeros(IxDyn(&[4, 3])));
        weight_grads.insert("linear_fc2.weight0".into(), ArrayD::zeros(IxDyn(&[3, 2])));
        let dw = Expectations { weight_grads: weight_grads.clone(), ..Default::default() };
        for (name, e) in [("grad_input", &dx), ("grad_probs", &dp), ("weight grads", &dw)] {
            assert!(e.needs_backward(), "{name} alone needs the upstream gradient");
        }
        let all =
            Expectations { output: rows.clone(), grad_input: rows, grad_probs: Some(Array1::zeros(2)), weight_grads };
        assert_eq!((dx.len(), dp.len(), dw.len(), all.len()), (1, 1, 2, 5));
        assert!(Expectations::default().is_empty() && !Expectations::default().needs_backward());
    }

    #[test]
    fn a_forward_only_dump_from_the_reference_expects_the_reference_output() {
        use moe_reference::{ExpertLayer, Reference};
        let case = crate::case::Case {
            cfg: LayerConfig { num_experts: 2, hidden_size: 4, ffn_hidden_size: 4, ..LayerConfig::example() },
            tokens_per_expert: vec![2, 1],
            seed: 3,
            timing: moe_reference::WgradTiming::Immediate,
        };
        let p = case.problem();
        let params = moe_reference::to_state_dict(&case.cfg, &p.weights).unwrap();
        let dump =
            Dump::from_reference(&case.cfg, params.clone(), p.inputs.clone(), None, Reference::EMULATED).unwrap();
        let want = Reference::EMULATED.forward(&case.cfg, &params, &p.inputs).unwrap();
        assert_eq!(dump.expected.output.as_ref(), Some(&want));
        assert!(!dump.expected.needs_backward() && dump.grad_output.is_none());
    }
}
