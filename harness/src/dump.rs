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
//! `tp_rank`, `ep_size`, `ep_rank`; optional `clamp_value`, `padding_multiple` and
//! `num_experts` (the global count, which must then equal `num_local_experts · ep_size`).
//! Booleans are `true`|`false`. Unknown metadata keys are ignored; unknown `input.*` or
//! `expected.*` tensors are rejected (a misspelt expectation must not be skipped silently).
//!
//! A single grouped tensor is read as its per-expert tensors
//! ([`moe_reference::unpack_single_grouped`]): the comparison reports `grad.linear_fc1.weight3`
//! for expert 3's block of `linear_fc1.weight`, and [`Dump::write`] writes the per-expert names.
//! A parameter given in both forms is rejected.
//!
//! Every rejection is a [`DumpError`] naming the file, the key and what was expected.

use crate::compare::{compare_tensor, contraction_length, TensorDiff};
use crate::tolerance::Tolerance;
use moe_reference::implementation::LayerError;
use moe_reference::layer::{check_finite, validate_inputs};
use moe_reference::{
    from_state_dict, oracle_with_scales, param_specs, single_grouped_specs, unpack_single_grouped, Activation, Dtype,
    ExpertLayer, Inputs, LayerClass, LayerConfig, Parallelism, Reference, ReferenceError, StateDict, WgradTiming,
};
use ndarray::{Array1, Array2, ArrayD, IxDyn};
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

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
}

// ---------------------------------------------------------------------------------------------
// Reading

/// The tensor dtypes a dump may use, in our terms.
fn float_dtype(d: safetensors::Dtype) -> Option<Dtype> {
    match d {
        safetensors::Dtype::F32 => Some(Dtype::F32),
        safetensors::Dtype::BF16 => Some(Dtype::Bf16),
        safetensors::Dtype::F16 => Some(Dtype::F16),
        _ => None,
    }
}

fn st_dtype(d: Dtype) -> safetensors::Dtype {
    match d {
        Dtype::F32 => safetensors::Dtype::F32,
        Dtype::Bf16 => safetensors::Dtype::BF16,
        Dtype::F16 => safetensors::Dtype::F16,
    }
}

/// The safetensors name of a dtype (`F32`, `BF16`, ...) next to PyTorch's.
fn describe_st(d: safetensors::Dtype) -> String {
    match float_dtype(d) {
        Some(ours) => format!("{ours} ({d:?})"),
        None => match d {
            safetensors::Dtype::I64 => "int64 (I64)".into(),
            safetensors::Dtype::I32 => "int32 (I32)".into(),
            other => format!("{other:?}"),
        },
    }
}

fn join_dtypes(allowed: &[Dtype]) -> String {
    let names: Vec<&str> = allowed.iter().map(|d| d.torch_name()).collect();
    names.join(" or ")
}

/// A reader over one parsed file that attaches the file name to every error.
struct Reader<'a> {
    file: &'a str,
    st: SafeTensors<'a>,
    meta: HashMap<String, String>,
}

impl<'a> Reader<'a> {
    fn err(&self, key: impl Into<String>, message: impl Into<String>) -> DumpError {
        DumpError { file: self.file.to_string(), key: key.into(), message: message.into() }
    }

    /// Wraps a reference error, taking the key from the error where it names one.
    fn reference_err(&self, default_key: &str, e: ReferenceError) -> DumpError {
        let key = match &e {
            ReferenceError::Shape { name, .. }
            | ReferenceError::MissingParameter { name, .. }
            | ReferenceError::UnexpectedParameter { name, .. }
            | ReferenceError::TwoLayouts { name, .. }
            | ReferenceError::NonFinite { name, .. } => name.clone(),
            ReferenceError::TokenCounts(_) => TOKENS_PER_EXPERT.to_string(),
            ReferenceError::Config(_) | ReferenceError::UnknownName { .. } => default_key.to_string(),
        };
        let message = match &e {
            ReferenceError::MissingParameter { name, layer } => {
                format!("missing parameter {name:?}: a {layer} dump must hold it (in the params dtype)")
            }
            other => other.to_string(),
        };
        self.err(key, message)
    }

    fn meta_key(key: &str) -> String {
        format!("__metadata__.{key}")
    }

    fn meta_opt(&self, key: &str) -> Option<&str> {
        self.meta
            .get(key)
            .map(|s| s.trim())
            .filter(|s| !matches!(s.to_ascii_lowercase().as_str(), "" | "none" | "null"))
    }

    fn meta(&self, key: &str, expected: &str) -> Result<&str, DumpError> {
        self.meta
            .get(key)
            .map(|s| s.trim())
            .ok_or_else(|| self.err(Self::meta_key(key), format!("missing metadata key; expected {expected}")))
    }

    fn meta_usize(&self, key: &str) -> Result<usize, DumpError> {
        let s = self.meta(key, "a non-negative integer")?;
        s.parse().map_err(|_| self.err(Self::meta_key(key), format!("expected a non-negative integer, got {s:?}")))
    }

    fn meta_bool(&self, key: &str) -> Result<bool, DumpError> {
        let s = self.meta(key, "true or false")?;
        match s.to_ascii_lowercase().as_str() {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(self.err(Self::meta_key(key), format!("expected true or false, got {s:?}"))),
        }
    }

    fn meta_f64(&self, key: &str, s: &str) -> Result<f64, DumpError> {
        s.parse().map_err(|_| self.err(Self::meta_key(key), format!("expected a number, got {s:?}")))
    }

    fn config(&self) -> Result<LayerConfig, DumpError> {
        let format = self.meta("format", FORMAT)?;
        if format != FORMAT {
            return Err(
                self.err(Self::meta_key("format"), format!("unsupported format {format:?}; expected {FORMAT:?}"))
            );
        }
        let named = |key: &str, e: ReferenceError| self.reference_err(&Self::meta_key(key), e);
        let class = LayerClass::parse(self.meta("layer", "sequential, grouped or te_grouped")?)
            .map_err(|e| named("layer", e))?;
        let activation = Activation::parse(self.meta("activation", "silu, gelu, quick_gelu or squared_relu")?)
            .map_err(|e| named("activation", e))?;
        let params_dtype = Dtype::parse(self.meta("params_dtype", "float32, bfloat16 or float16")?)
            .map_err(|e| named("params_dtype", e))?;
        let num_local_experts = self.meta_usize("num_local_experts")?;
        let parallel = Parallelism {
            tp_size: self.meta_usize("tp_size")?,
            tp_rank: self.meta_usize("tp_rank")?,
            ep_size: self.meta_usize("ep_size")?,
            ep_rank: self.meta_usize("ep_rank")?,
        };
        let num_experts = match self.meta_opt("num_experts") {
            None => num_local_experts * parallel.ep_size,
            Some(s) => s.parse().map_err(|_| {
                self.err(Self::meta_key("num_experts"), format!("expected a non-negative integer, got {s:?}"))
            })?,
        };
        let clamp_value = match self.meta_opt("clamp_value") {
            None => None,
            Some(s) => Some(self.meta_f64("clamp_value", s)?),
        };
        let padding_multiple = match self.meta_opt("padding_multiple") {
            None => None,
            Some(s) => Some(s.parse().map_err(|_| {
                self.err(Self::meta_key("padding_multiple"), format!("expected a positive integer or none, got {s:?}"))
            })?),
        };
        let offset = self.meta("glu_linear_offset", "a number (0.0 unless set)")?;
        let probs_dtype = self.probs_dtype()?;
        let cfg = LayerConfig {
            class,
            num_experts,
            hidden_size: self.meta_usize("hidden_size")?,
            ffn_hidden_size: self.meta_usize("ffn_hidden_size")?,
            gated_linear_unit: self.meta_bool("gated_linear_unit")?,
            activation,
            add_bias: self.meta_bool("add_bias")?,
            clamp_value,
            glu_linear_offset: self.meta_f64("glu_linear_offset", offset)?,
            apply_probs_on_input: self.meta_bool("apply_probs_on_input")?,
            params_dtype,
            probs_dtype,
            padding_multiple,
            parallel,
        };
        cfg.validate().map_err(|e| self.reference_err("__metadata__", e))?;
        if cfg.num_local_experts() != num_local_experts {
            return Err(self.err(
                Self::meta_key("num_experts"),
                format!(
                    "num_experts {num_experts} / ep_size {} = {} local experts, but num_local_experts is {num_local_experts}",
                    parallel.ep_size,
                    cfg.num_local_experts()
                ),
            ));
        }
        Ok(cfg)
    }

    fn view(&self, key: &str, what: &str) -> Result<TensorView<'a>, DumpError> {
        self.st.tensor(key).map_err(|_| self.err(key, format!("missing tensor; expected {what}")))
    }

    fn probs_dtype(&self) -> Result<Dtype, DumpError> {
        let v = self.view(PROBS, "the routing probs [T] in float32 or bfloat16")?;
        float_dtype(v.dtype())
            .ok_or_else(|| self.err(PROBS, format!("dtype {}; expected float32 or bfloat16", describe_st(v.dtype()))))
    }

    /// Reads a float tensor that must have one of the `allowed` dtypes.
    fn floats(&self, key: &str, what: &str, allowed: &[Dtype]) -> Result<ArrayD<f64>, DumpError> {
        let v = self.view(key, what)?;
        let dtype = float_dtype(v.dtype()).filter(|d| allowed.contains(d)).ok_or_else(|| {
            self.err(key, format!("dtype {}; expected {}", describe_st(v.dtype()), join_dtypes(allowed)))
        })?;
        let values = moe_reference::codec::from_bytes(dtype, v.data());
        Ok(ArrayD::from_shape_vec(IxDyn(v.shape()), values).expect("safetensors checked the length"))
    }

    fn floats_shaped(
        &self,
        key: &str,
        what: &str,
        allowed: &[Dtype],
        shape: &[usize],
    ) -> Result<ArrayD<f64>, DumpError> {
        let a = self.floats(key, what, allowed)?;
        if a.shape() != shape {
            return Err(self.err(key, format!("shape {:?}; expected {:?} ({what})", a.shape(), shape)));
        }
        Ok(a)
    }

    fn counts(&self, el: usize) -> Result<(Vec<i64>, CountDtype), DumpError> {
        let what = format!("the token count of each of the {el} local experts, [E_l] int64 or int32");
        let v = self.view(TOKENS_PER_EXPERT, &what)?;
        let (values, dtype): (Vec<i64>, _) = match v.dtype() {
            safetensors::Dtype::I64 => (
                v.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect(),
                CountDtype::I64,
            ),
            safetensors::Dtype::I32 => (
                v.data()
                    .chunks_exact(4)
                    .map(|c| i64::from(i32::from_le_bytes(c.try_into().expect("4 bytes"))))
                    .collect(),
                CountDtype::I32,
            ),
            other => {
                return Err(
                    self.err(TOKENS_PER_EXPERT, format!("dtype {}; expected int64 or int32", describe_st(other)))
                )
            }
        };
        if v.shape() != [el] {
            return Err(self.err(TOKENS_PER_EXPERT, format!("shape {:?}; expected [{el}] ({what})", v.shape())));
        }
        Ok((values, dtype))
    }

    fn read(&self) -> Result<Dump, DumpError> {
        let cfg = self.config()?;
        let pd = cfg.params_dtype;
        let h = cfg.hidden_size;

        // Every key outside input.* / expected.* is a parameter.
        let mut params = StateDict::new();
        for name in self.st.names() {
            if name.starts_with("input.") || name.starts_with("expected.") {
                continue;
            }
            let what = format!("a {} parameter in the params dtype {pd}", cfg.class.megatron_name());
            let a = self.floats(name, &what, &[pd])?;
            check_finite(name, &a).map_err(|e| self.reference_err(name, e))?;
            params.insert(name.to_string(), a);
        }
        // Megatron HEAD's single grouped TEGroupedMLP tensors read as their per-expert names.
        let params = unpack_single_grouped(&cfg, params).map_err(|e| self.reference_err("__metadata__", e))?;
        from_state_dict(&cfg, &params).map_err(|e| self.reference_err("__metadata__", e))?;

        // Inputs.
        let x = self.floats(HIDDEN_STATES, "the permuted hidden states [T, h]", &[pd])?;
        if x.ndim() != 2 || x.shape()[1] != h {
            return Err(self.err(HIDDEN_STATES, format!("shape {:?}; expected [T, {h}]", x.shape())));
        }
        let t = x.shape()[0];
        let hidden_states: Array2<f64> = x.into_dimensionality().expect("checked 2-D");
        let probs = self.floats_shaped(PROBS, "one prob per row", &[cfg.probs_dtype], &[t])?;
        let probs: Array1<f64> = probs.into_dimensionality().expect("checked 1-D");
        let (tokens_per_expert, count_dtype) = self.counts(cfg.num_local_experts())?;
        let inputs = Inputs { hidden_states, tokens_per_expert, probs };
        validate_inputs(&cfg, &inputs).map_err(|e| self.reference_err(TOKENS_PER_EXPERT, e))?;

        let grad_output = if self.st.names().contains(&GRAD_OUTPUT) {
            let g = self.floats_shaped(GRAD_OUTPUT, "the upstream gradient [T, h]", &[pd], &[t, h])?;
            check_finite(GRAD_OUTPUT, &g).map_err(|e| self.reference_err(GRAD_OUTPUT, e))?;
            Some(g.into_dimensionality().expect("checked 2-D"))
        } else {
            None
        };

        // Expectations; values may be float32 even for a half-precision layer (e.g. fp32 main_grad).
        let mut expected = Expectations::default();
        let act = [pd, Dtype::F32];
        let probs_dt = [cfg.probs_dtype, Dtype::F32];
        let specs = param_specs(&cfg);
        let packed_specs = single_grouped_specs(&cfg);
        for name in self.st.names() {
            match name {
                HIDDEN_STATES | TOKENS_PER_EXPERT | PROBS | GRAD_OUTPUT => {}
                EXPECTED_OUTPUT => {
                    let a = self.floats_shaped(name, "the layer output [T, h]", &act, &[t, h])?;
                    expected.output = Some(a.into_dimensionality().expect("2-D"));
                }
                EXPECTED_GRAD_INPUT => {
                    let a = self.floats_shaped(name, "the input gradient [T, h]", &act, &[t, h])?;
                    expected.grad_input = Some(a.into_dimensionality().expect("2-D"));
                }
                EXPECTED_GRAD_PROBS => {
                    let a = self.floats_shaped(name, "the probs gradient [T]", &probs_dt, &[t])?;
                    expected.grad_probs = Some(a.into_dimensionality().expect("1-D"));
                }
                _ if name.starts_with(EXPECTED_GRAD_PREFIX) => {
                    let param = &name[EXPECTED_GRAD_PREFIX.len()..];
                    let spec = specs.iter().chain(&packed_specs).find(|s| s.name == param).ok_or_else(|| {
                        self.err(
                            name,
                            format!(
                                "{param:?} is not a parameter of this {} (expected expected.grad.<parameter>, e.g. expected.grad.{}, or expected.grad.permuted_local_hidden_states / permuted_probs)",
                                cfg.class.megatron_name(),
                                specs[0].name
                            ),
                        )
                    })?;
                    let a = self.floats_shaped(name, "the parameter's gradient", &act, &spec.shape)?;
                    expected.weight_grads.insert(param.to_string(), a);
                }
                _ if name.starts_with("input.") || name.starts_with("expected.") => {
                    return Err(self.err(
                        name,
                        format!(
                            "unknown key; expected {HIDDEN_STATES}, {TOKENS_PER_EXPERT}, {PROBS}, {GRAD_OUTPUT}, \
                             {EXPECTED_OUTPUT}, {EXPECTED_GRAD_INPUT}, {EXPECTED_GRAD_PROBS} or expected.grad.<parameter>"
                        ),
                    ))
                }
                _ => {}
            }
        }
        // Gradients of single grouped parameters, split like the parameters (either layout, per
        // parameter, independently of the parameters' own).
        expected.weight_grads =
            unpack_single_grouped(&cfg, std::mem::take(&mut expected.weight_grads)).map_err(|e| {
                let mut err = self.reference_err("", e);
                err.key = format!("{EXPECTED_GRAD_PREFIX}{}", err.key);
                err
            })?;
        if expected.needs_backward() && grad_output.is_none() {
            return Err(self.err(
                GRAD_OUTPUT,
                format!("missing tensor; the dump expects gradients (expected.grad.*), so it must hold the upstream gradient [{t}, {h}] in {pd}"),
            ));
        }
        Ok(Dump { config: cfg, params, inputs, grad_output, expected, count_dtype })
    }
}

impl Dump {
    /// Reads and validates a dump file.
    pub fn read(path: &Path) -> Result<Dump, DumpError> {
        let file = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| DumpError {
            file: file.clone(),
            key: String::new(),
            message: format!("cannot read the file: {e}"),
        })?;
        Dump::from_bytes(&bytes, &file)
    }

    /// Parses and validates a dump held in memory; `file` labels the errors.
    pub fn from_bytes(bytes: &[u8], file: &str) -> Result<Dump, DumpError> {
        let bad = |message: String| DumpError { file: file.to_string(), key: String::new(), message };
        let st = SafeTensors::deserialize(bytes).map_err(|e| {
            bad(format!(
                "not a readable safetensors file ({e}); expected an 8-byte header length, a JSON header and the tensor data ({} bytes here)",
                bytes.len()
            ))
        })?;
        let (_, header) =
            SafeTensors::read_metadata(bytes).map_err(|e| bad(format!("unreadable safetensors header: {e}")))?;
        let meta = header.metadata().clone().ok_or_else(|| DumpError {
            file: file.to_string(),
            key: "__metadata__".into(),
            message: format!("missing; expected string metadata with format = {FORMAT}, layer, hidden_size, ..."),
        })?;
        Reader { file, st, meta }.read()
    }

    /// A dump of `config` and these inputs whose expectations are the `reference`'s own results:
    /// the output, and with `grad_output` also every gradient.
    pub fn from_reference(
        config: &LayerConfig,
        params: StateDict,
        inputs: Inputs,
        grad_output: Option<Array2<f64>>,
        reference: Reference,
    ) -> Result<Dump, LayerError> {
        let expected = match &grad_output {
            Some(g) => {
                let run = reference.forward_backward(config, &params, &inputs, g, WgradTiming::Immediate)?;
                Expectations {
                    output: Some(run.output),
                    grad_input: Some(run.grad_input),
                    grad_probs: Some(run.grad_probs),
                    weight_grads: run.weight_grads,
                }
            }
            None => Expectations { output: Some(reference.forward(config, &params, &inputs)?), ..Default::default() },
        };
        Ok(Dump { config: config.clone(), params, inputs, grad_output, expected, count_dtype: CountDtype::I64 })
    }

    /// The string metadata this dump is written with.
    pub fn metadata(&self) -> BTreeMap<String, String> {
        let c = &self.config;
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            m.insert(k.to_string(), v);
        };
        put("format", FORMAT.into());
        put("layer", c.class.name().into());
        put("num_local_experts", c.num_local_experts().to_string());
        put("num_experts", c.num_experts.to_string());
        put("hidden_size", c.hidden_size.to_string());
        put("ffn_hidden_size", c.ffn_hidden_size.to_string());
        put("gated_linear_unit", c.gated_linear_unit.to_string());
        put("activation", c.activation.name().into());
        put("add_bias", c.add_bias.to_string());
        put("params_dtype", c.params_dtype.torch_name().into());
        put("apply_probs_on_input", c.apply_probs_on_input.to_string());
        put("glu_linear_offset", format!("{:?}", c.glu_linear_offset));
        if let Some(v) = c.clamp_value {
            put("clamp_value", format!("{v:?}"));
        }
        if let Some(v) = c.padding_multiple {
            put("padding_multiple", v.to_string());
        }
        put("tp_size", c.parallel.tp_size.to_string());
        put("tp_rank", c.parallel.tp_rank.to_string());
        put("ep_size", c.parallel.ep_size.to_string());
        put("ep_rank", c.parallel.ep_rank.to_string());
        m
    }

    /// Serializes the dump. Values are rounded to the dtype they are stored in
    /// ([`moe_reference::codec`]; a no-op for values that are already representable, as every
    /// value the reference produces is).
    pub fn to_bytes(&self) -> Result<Vec<u8>, safetensors::SafeTensorError> {
        let (pd, probs) = (self.config.params_dtype, self.config.probs_dtype);
        let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut float = |name: String, a: ndarray::ArrayViewD<f64>, d: Dtype| {
            tensors.push((name, st_dtype(d), a.shape().to_vec(), moe_reference::codec::to_bytes(d, a.iter().copied())));
        };
        for (name, a) in &self.params {
            float(name.clone(), a.view(), pd);
        }
        float(HIDDEN_STATES.into(), self.inputs.hidden_states.view().into_dyn(), pd);
        float(PROBS.into(), self.inputs.probs.view().into_dyn(), probs);
        if let Some(g) = &self.grad_output {
            float(GRAD_OUTPUT.into(), g.view().into_dyn(), pd);
        }
        if let Some(a) = &self.expected.output {
            float(EXPECTED_OUTPUT.into(), a.view().into_dyn(), pd);
        }
        if let Some(a) = &self.expected.grad_input {
            float(EXPECTED_GRAD_INPUT.into(), a.view().into_dyn(), pd);
        }
        if let Some(a) = &self.expected.grad_probs {
            float(EXPECTED_GRAD_PROBS.into(), a.view().into_dyn(), probs);
        }
        for (name, a) in &self.expected.weight_grads {
            float(format!("{EXPECTED_GRAD_PREFIX}{name}"), a.view(), pd);
        }
        let counts = &self.inputs.tokens_per_expert;
        let (dtype, bytes) = match self.count_dtype {
            CountDtype::I64 => (safetensors::Dtype::I64, counts.iter().flat_map(|n| n.to_le_bytes()).collect()),
            CountDtype::I32 => {
                (safetensors::Dtype::I32, counts.iter().flat_map(|&n| (n as i32).to_le_bytes()).collect::<Vec<u8>>())
            }
        };
        tensors.push((TOKENS_PER_EXPERT.into(), dtype, vec![counts.len()], bytes));
        let views = tensors
            .iter()
            .map(|(name, d, shape, bytes)| Ok((name.clone(), TensorView::new(*d, shape.clone(), bytes)?)))
            .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
        safetensors::serialize(views, Some(self.metadata().into_iter().collect()))
    }

    /// Writes the dump to `path`.
    pub fn write(&self, path: &Path) -> Result<(), DumpError> {
        let err = |message: String| DumpError { file: path.display().to_string(), key: String::new(), message };
        let bytes = self.to_bytes().map_err(|e| err(format!("cannot serialize: {e}")))?;
        std::fs::write(path, bytes).map_err(|e| err(format!("cannot write: {e}")))
    }
}

// ---------------------------------------------------------------------------------------------
// Comparing

/// One compared tensor: the [`TensorDiff`] plus its verdict.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct CompareRow {
    /// The comparison (name without the `expected.` prefix: `output`, `grad.<parameter>`, ...).
    #[serde(flatten)]
    pub diff: TensorDiff,
    /// True when every element is within tolerance.
    pub passed: bool,
}

/// The result of [`compare_dump`]: one row per expected tensor.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct CompareReport {
    /// The dump file.
    pub file: String,
    /// The layer class (`sequential`, `grouped`, `te_grouped`).
    pub layer: String,
    /// The params dtype.
    pub params_dtype: String,
    /// The probs dtype.
    pub probs_dtype: String,
    /// Number of token rows `T`.
    pub tokens: usize,
    /// `tokens_per_expert`.
    pub tokens_per_expert: Vec<i64>,
    /// What the expectations were recomputed with: `reference` (emulating the params dtype) or
    /// `reference-f64` (the oracle).
    pub reference: String,
    /// The contraction length `K` of the error model.
    pub contraction_length: usize,
    /// The factor applied to [`Tolerance::error_model`] (2 against the emulating reference, 1
    /// against the oracle).
    pub tolerance_factor: f64,
    /// The tolerance applied to every tensor.
    pub tolerance: Tolerance,
    /// One row per expected tensor.
    pub rows: Vec<CompareRow>,
    /// True when every row passed.
    pub passed: bool,
}

impl CompareReport {
    /// The names of the tensors that differ.
    pub fn failures(&self) -> Vec<&str> {
        self.rows.iter().filter(|r| !r.passed).map(|r| r.diff.name.as_str()).collect()
    }
}

/// Recomputes every tensor the dump has an expectation for, with the reference in the dump's
/// dtype (`oracle == false`, [`Reference::EMULATED`]) or the f64 oracle, and compares them.
///
/// # Tolerance
///
/// [`Tolerance::error_model`] with the oracle's running error bounds for `params_dtype` bounds
/// the distance of *one* storage-dtype computation from the f64 oracle. Against the emulating reference both sides carry
/// storage-dtype rounding (PyTorch's and the emulation's, at possibly different points and
/// in a different summation order), so each may be that far from the oracle in its own
/// direction and the bound is doubled. Against the oracle only the dump is rounded, so the
/// bound is applied as is.
pub fn compare_dump(dump: &Dump, file: &str, oracle: bool) -> Result<CompareReport, DumpError> {
    let err = |key: &str, message: String| DumpError { file: file.to_string(), key: key.to_string(), message };
    let cfg = &dump.config;
    let exp = &dump.expected;
    if exp.is_empty() {
        return Err(err(
            "expected.*",
            "nothing to compare: the dump holds no expected.output or expected.grad.* tensor".into(),
        ));
    }
    let reference = if oracle { Reference::ORACLE } else { Reference::EMULATED };
    let k = contraction_length(cfg, &dump.inputs.tokens_per_expert);
    let factor = if oracle { 1.0 } else { 2.0 };
    let tol = Tolerance::error_model().times(factor);
    let run_err = |e: LayerError| err("", format!("the reference rejected the dump: {e}"));
    let mut diffs = Vec::new();
    // The error model's scales and allowances come from the f64 oracle (the output's scales do
    // not depend on the upstream gradient, so a forward-only dump uses zeros there).
    let zeros = ndarray::Array2::zeros(dump.inputs.hidden_states.raw_dim());
    let model = oracle_with_scales(cfg, &dump.params, &dump.inputs, dump.grad_output.as_ref().unwrap_or(&zeros))
        .map_err(run_err)?;
    let bounds = |f: fn(&moe_reference::LayerRun) -> ndarray::ArrayViewD<f64>| crate::compare::Bounds {
        scale: Some(f(&model.scales)),
        allowance: Some(f(&model.allowance)),
    };
    // The reference is the `expected` side of `compare_tensor`; the dump's values are what is
    // being checked.
    let one = |name: &str,
               reference: ndarray::ArrayViewD<f64>,
               dump: ndarray::ArrayViewD<f64>,
               b: crate::compare::Bounds| compare_tensor(name, dump, reference, b, 1, tol);
    match (&dump.grad_output, exp.needs_backward()) {
        (Some(g), true) => {
            let run = reference
                .forward_backward(cfg, &dump.params, &dump.inputs, g, WgradTiming::Immediate)
                .map_err(run_err)?;
            if let Some(e) = &exp.output {
                diffs.push(one(
                    "output",
                    run.output.view().into_dyn(),
                    e.view().into_dyn(),
                    bounds(|r| r.output.view().into_dyn()),
                ));
            }
            if let Some(e) = &exp.grad_input {
                diffs.push(one(
                    "grad.permuted_local_hidden_states",
                    run.grad_input.view().into_dyn(),
                    e.view().into_dyn(),
                    bounds(|r| r.grad_input.view().into_dyn()),
                ));
            }
            if let Some(e) = &exp.grad_probs {
                diffs.push(one(
                    "grad.permuted_probs",
                    run.grad_probs.view().into_dyn(),
                    e.view().into_dyn(),
                    bounds(|r| r.grad_probs.view().into_dyn()),
                ));
            }
            for spec in param_specs(cfg) {
                if let (Some(e), Some(got)) = (exp.weight_grads.get(&spec.name), run.weight_grads.get(&spec.name)) {
                    // Packed GroupedMLP weights get one rms scale per expert block.
                    let name = format!("grad.{}", spec.name);
                    let b = crate::compare::Bounds {
                        scale: model.scales.weight_grads.get(&spec.name).map(|s| s.view()),
                        allowance: model.allowance.weight_grads.get(&spec.name).map(|a| a.view()),
                    };
                    diffs.push(compare_tensor(&name, e.view(), got.view(), b, spec.expert_blocks, tol));
                }
            }
        }
        (None, true) => {
            return Err(err(
                GRAD_OUTPUT,
                "missing tensor; gradients are expected, so the upstream gradient is needed".into(),
            ))
        }
        (_, false) => {
            let out = reference.forward(cfg, &dump.params, &dump.inputs).map_err(run_err)?;
            if let Some(e) = &exp.output {
                diffs.push(one(
                    "output",
                    out.view().into_dyn(),
                    e.view().into_dyn(),
                    bounds(|r| r.output.view().into_dyn()),
                ));
            }
        }
    }
    let rows: Vec<CompareRow> = diffs.into_iter().map(|d| CompareRow { passed: d.passed(), diff: d }).collect();
    Ok(CompareReport {
        file: file.to_string(),
        layer: cfg.class.name().to_string(),
        params_dtype: cfg.params_dtype.torch_name().to_string(),
        probs_dtype: cfg.probs_dtype.torch_name().to_string(),
        tokens: dump.inputs.num_tokens(),
        tokens_per_expert: dump.inputs.tokens_per_expert.clone(),
        reference: reference.name(),
        contraction_length: k,
        tolerance_factor: factor,
        tolerance: tol,
        passed: rows.iter().all(|r| r.passed),
        rows,
    })
}

impl std::fmt::Display for CompareReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "dump      {}", self.file)?;
        writeln!(
            f,
            "layer     {} (params {}, probs {}), T = {}, tokens_per_expert {:?}",
            self.layer, self.params_dtype, self.probs_dtype, self.tokens, self.tokens_per_expert
        )?;
        writeln!(
            f,
            "against   {}; tolerance {} x error model ({} running error bound, K = {}) = {}",
            self.reference, self.tolerance_factor, self.params_dtype, self.contraction_length, self.tolerance
        )?;
        let name_w = self.rows.iter().map(|r| r.diff.name.len()).max().unwrap_or(0).max("tensor".len());
        let shape_w =
            self.rows.iter().map(|r| format!("{:?}", r.diff.shape).len()).max().unwrap_or(0).max("shape".len());
        writeln!(
            f,
            "{:<name_w$}  {:<shape_w$}  {:>10}  {:>10}  {:>10}  {:>9}  {:>9}  result",
            "tensor", "shape", "max abs", "max rel", "rel fro", "tol x", "err/bound"
        )?;
        for r in &self.rows {
            let d = &r.diff;
            writeln!(
                f,
                "{:<name_w$}  {:<shape_w$}  {:>10.3e}  {:>10.3e}  {:>10.3e}  {:>9.2e}  {:>9.3}  {}",
                d.name,
                format!("{:?}", d.shape),
                d.max_abs,
                d.max_rel,
                d.rel_frobenius,
                d.tolerance.rtol,
                d.worst_ratio,
                if r.passed { "pass" } else { "FAIL" }
            )?;
            if !r.passed {
                writeln!(
                    f,
                    "{:name_w$}    {} violation(s); worst at {:?}: dump {:.6e}, reference {:.6e} ({:.2}x the bound)",
                    "", d.violations, d.worst_index, d.worst_got, d.worst_expected, d.worst_ratio
                )?;
            }
        }
        let failures = self.failures();
        if failures.is_empty() {
            write!(f, "PASS: all {} tensor(s) within tolerance", self.rows.len())
        } else {
            write!(f, "FAIL: {} of {} tensor(s) differ: {}", failures.len(), self.rows.len(), failures.join(", "))
        }
    }
}
