//! Writing a dump: the reference's own results as expectations, the metadata, and the
//! safetensors bytes.

use super::{
    st_dtype, CountDtype, Dump, DumpError, Expectations, EXPECTED_GRAD_INPUT, EXPECTED_GRAD_PREFIX,
    EXPECTED_GRAD_PROBS, EXPECTED_OUTPUT, FORMAT, GRAD_OUTPUT, HIDDEN_STATES, PROBS, TOKENS_PER_EXPERT,
};
use moe_reference::implementation::LayerError;
use moe_reference::{Dtype, ExpertLayer, Inputs, LayerConfig, Reference, StateDict, WgradTiming};
use ndarray::Array2;
use safetensors::tensor::TensorView;
use std::collections::BTreeMap;
use std::path::Path;

impl Dump {
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
        let mut fp8_weights = std::collections::BTreeMap::new();
        if config.fp8.is_some() {
            for (name, w) in &params {
                if w.ndim() == 2 && name.contains("weight") {
                    let w2 = w.view().into_dimensionality::<ndarray::Ix2>().expect("2-D");
                    fp8_weights.insert(name.clone(), super::fp8::reference_weight(config, name, w2)?);
                }
            }
        }
        Ok(Dump {
            config: config.clone(),
            params,
            inputs,
            grad_output,
            expected,
            count_dtype: CountDtype::I64,
            fp8_weights,
        })
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
        if let Some(v) = c.glu_interleave_size {
            put("glu_interleave_size", v.to_string());
        }
        put("tp_size", c.parallel.tp_size.to_string());
        put("tp_rank", c.parallel.tp_rank.to_string());
        put("ep_size", c.parallel.ep_size.to_string());
        put("ep_rank", c.parallel.ep_rank.to_string());
        if let Some(f) = &c.fp8 {
            put("fp8_recipe", f.recipe.name().into());
            put("fp8_format", f.format.name().into());
            put("fp8_power_2_scales", f.power_2_scales.to_string());
            put("fp8_pad_to_alignment", f.pad_to_alignment.to_string());
            put("fp8_activation_input_store", f.activation_input_store.to_string());
        }
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
        for (name, t) in &self.fp8_weights {
            let dtype = match t.format {
                moe_reference::fp8::Fp8Format::E4M3 => safetensors::Dtype::F8_E4M3,
                moe_reference::fp8::Fp8Format::E5M2 => safetensors::Dtype::F8_E5M2,
            };
            tensors.push((
                format!("{}{name}", super::fp8::FP8_PREFIX),
                dtype,
                t.data.shape().to_vec(),
                t.data.iter().copied().collect(),
            ));
            let (shape, values, e8m0) = super::fp8::scale_values(t);
            let (d, bytes) = if e8m0 {
                (safetensors::Dtype::U8, values.iter().map(|&v| v as u8).collect())
            } else {
                (safetensors::Dtype::F32, values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())
            };
            tensors.push((format!("{}{name}{}", super::fp8::FP8_PREFIX, super::fp8::SCALE_SUFFIX), d, shape, bytes));
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
        let bytes = safetensors::serialize(views, Some(self.metadata().into_iter().collect()))?;
        Ok(with_sorted_header(bytes))
    }

    /// Writes the dump to `path`.
    pub fn write(&self, path: &Path) -> Result<(), DumpError> {
        let err = |message: String| DumpError { file: path.display().to_string(), key: String::new(), message };
        let bytes = self.to_bytes().map_err(|e| err(format!("cannot serialize: {e}")))?;
        std::fs::write(path, bytes).map_err(|e| err(format!("cannot write: {e}")))
    }
}

/// `bytes` (a safetensors file) with its JSON header's keys in sorted order: `safetensors`
/// takes the metadata as a `HashMap`, whose order differs from one map to the next, so without
/// this the same dump serialized twice gave different bytes. The data section is unchanged (its
/// offsets are relative to its start); the header is padded with spaces to a multiple of 8
/// bytes, as `safetensors` pads it.
fn with_sorted_header(bytes: Vec<u8>) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("a safetensors length prefix")) as usize;
    // serde_json's `Value` keeps object keys in a BTreeMap: re-serializing sorts them.
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).expect("safetensors wrote valid JSON");
    let mut text = serde_json::to_vec(&header).expect("a JSON value serializes");
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + text.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    out
}
