//! Reading a dump: every key, dtype, shape and metadata value checked, each rejection naming
//! the file and the key.

use super::fp8;
use super::{
    float_dtype, CountDtype, Dump, DumpError, Expectations, EXPECTED_GRAD_INPUT, EXPECTED_GRAD_PREFIX,
    EXPECTED_GRAD_PROBS, EXPECTED_OUTPUT, FORMAT, GRAD_OUTPUT, HIDDEN_STATES, PROBS, TOKENS_PER_EXPERT,
};
use moe_reference::fp8::{Fp8Format, Fp8Tensor};
use moe_reference::layer::{check_finite, check_fp8_splits, validate_inputs};
use moe_reference::{
    from_state_dict, param_specs, single_grouped_specs, unpack_single_grouped, Activation, Dtype, Fp8Config, Fp8Recipe,
    Inputs, LayerClass, LayerConfig, Parallelism, ReferenceError, StateDict, TeFormat,
};
use ndarray::{Array1, Array2, ArrayD, IxDyn};
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::Path;

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
        let glu_interleave_size = match self.meta_opt("glu_interleave_size") {
            None => None,
            Some(s) => Some(s.parse().map_err(|_| {
                self.err(Self::meta_key("glu_interleave_size"), format!("expected a positive integer, got {s:?}"))
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
            fp8: self.fp8_config()?,
            glu_interleave_size,
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

    fn meta_opt_bool(&self, key: &str) -> Result<Option<bool>, DumpError> {
        match self.meta_opt(key) {
            None => Ok(None),
            Some(_) => self.meta_bool(key).map(Some),
        }
    }

    /// The fp8 metadata: `fp8_recipe` (absent or `none`: no fp8), `fp8_format` (default: the
    /// recipe's), and the optional `fp8_power_2_scales`, `fp8_pad_to_alignment`,
    /// `fp8_activation_input_store` (defaults: TE's and Megatron's).
    fn fp8_config(&self) -> Result<Option<Fp8Config>, DumpError> {
        let named = |key: &str, e: ReferenceError| self.reference_err(&Self::meta_key(key), e);
        let Some(name) = self.meta_opt("fp8_recipe") else {
            for key in ["fp8_format", "fp8_power_2_scales", "fp8_pad_to_alignment", "fp8_activation_input_store"] {
                if self.meta_opt(key).is_some() {
                    return Err(self.err(
                        Self::meta_key(key),
                        "set without fp8_recipe; expected fp8_recipe = tensorwise, delayed, blockwise or mxfp8 too",
                    ));
                }
            }
            return Ok(None);
        };
        let recipe = Fp8Recipe::parse(name).map_err(|e| named("fp8_recipe", e))?;
        let mut f = Fp8Config::new(recipe);
        if let Some(s) = self.meta_opt("fp8_format") {
            f.format = TeFormat::parse(s).map_err(|e| named("fp8_format", e))?;
        }
        if let Some(b) = self.meta_opt_bool("fp8_power_2_scales")? {
            f.power_2_scales = b;
        }
        if let Some(b) = self.meta_opt_bool("fp8_pad_to_alignment")? {
            f.pad_to_alignment = b;
        }
        if let Some(b) = self.meta_opt_bool("fp8_activation_input_store")? {
            f.activation_input_store = b;
        }
        Ok(Some(f))
    }

    /// The quantized weights `fp8.<parameter>` (F8_E4M3, the parameter's shape) with their
    /// `fp8.<parameter>.scale_inv` (f32, or E8M0 bytes for MXFP8, in [`fp8::scale_shape`]),
    /// each checked against its parameter: the codes times the scales must be the weight.
    fn fp8_weights(&self, cfg: &LayerConfig, params: &StateDict) -> Result<BTreeMap<String, Fp8Tensor>, DumpError> {
        let mut out = BTreeMap::new();
        // Sorted: the first bad tensor reported is the same on every run.
        let mut names: Vec<&str> = self.st.names().into_iter().filter(|n| n.starts_with(fp8::FP8_PREFIX)).collect();
        names.sort_unstable();
        for &name in &names {
            let Some(f) = cfg.fp8 else {
                return Err(self.err(name, "an fp8 tensor in a dump without __metadata__.fp8_recipe"));
            };
            if let Some(data) = name.strip_suffix(fp8::SCALE_SUFFIX) {
                if !names.contains(&data) {
                    return Err(self.err(name, format!("scales without their codes; expected the tensor {data} too")));
                }
                continue;
            }
            let param = &name[fp8::FP8_PREFIX.len()..];
            let w = params.get(param).filter(|w| w.ndim() == 2 && param.contains("weight")).ok_or_else(|| {
                self.err(
                    name,
                    format!(
                        "{param:?} is not a 2-D weight of this dump; expected fp8.<weight name>, e.g. fp8.{}",
                        param_specs(cfg)[0].name
                    ),
                )
            })?;
            let w = w.view().into_dimensionality::<ndarray::Ix2>().expect("checked 2-D");
            let fmt = fp8::weight_format(&f);
            let v = self.view(name, "the weight's fp8 codes")?;
            let want = match fmt {
                Fp8Format::E4M3 => safetensors::Dtype::F8_E4M3,
                Fp8Format::E5M2 => safetensors::Dtype::F8_E5M2,
            };
            if v.dtype() != want {
                return Err(self.err(
                    name,
                    format!(
                        "dtype {}; expected {want:?} ({} codes of a weight)",
                        describe_st(v.dtype()),
                        fmt.torch_name()
                    ),
                ));
            }
            if v.shape() != w.shape() {
                return Err(self.err(name, format!("shape {:?}; expected the weight's {:?}", v.shape(), w.shape())));
            }
            let codes = Array2::from_shape_vec(w.dim(), v.data().to_vec()).expect("shape checked");
            let scale_key = format!("{name}{}", fp8::SCALE_SUFFIX);
            let grid = fp8::scale_shape(f.recipe, [w.nrows(), w.ncols()]);
            let sv = self.view(&scale_key, &format!("the scales of {name}, shape {grid:?}"))?;
            let shape_ok = sv.shape() == grid.as_slice() || (grid.is_empty() && sv.shape() == [1]);
            if !shape_ok {
                return Err(self
                    .err(&scale_key, format!("shape {:?}; expected {grid:?} under recipe {}", sv.shape(), f.recipe)));
            }
            let scales = match (f.recipe, sv.dtype()) {
                (Fp8Recipe::Mxfp8, safetensors::Dtype::U8 | safetensors::Dtype::F8_E8M0) => {
                    fp8::scales_from(f.recipe, [w.nrows(), w.ncols()], vec![], Some(sv.data().to_vec()))
                }
                (Fp8Recipe::Mxfp8, other) => {
                    return Err(self
                        .err(&scale_key, format!("dtype {}; expected E8M0 bytes (U8 or F8_E8M0)", describe_st(other))))
                }
                (_, safetensors::Dtype::F32) => {
                    let values =
                        sv.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
                    fp8::scales_from(f.recipe, [w.nrows(), w.ncols()], values, None)
                }
                (_, other) => {
                    return Err(self.err(&scale_key, format!("dtype {}; expected float32", describe_st(other))))
                }
            };
            let t = Fp8Tensor { format: fmt, data: codes, scales };
            fp8::check_matches_weight(&t, w).map_err(|why| {
                self.err(
                    &scale_key,
                    format!("the scales do not match the bytes of {name} for the weight {param}: {why}"),
                )
            })?;
            out.insert(param.to_string(), t);
        }
        Ok(out)
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
            if name.starts_with("input.") || name.starts_with("expected.") || name.starts_with(fp8::FP8_PREFIX) {
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
        let fp8_weights = self.fp8_weights(&cfg, &params)?;

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
        let segments = validate_inputs(&cfg, &inputs).map_err(|e| self.reference_err(TOKENS_PER_EXPERT, e))?;
        // The splits TE refuses under the recipe (MXFP8 unpadded: multiples of 32; TE Linear).
        check_fp8_splits(&cfg, &segments).map_err(|e| self.reference_err(TOKENS_PER_EXPERT, e))?;

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
        Ok(Dump { config: cfg, params, inputs, grad_output, expected, count_dtype, fp8_weights })
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
}
