//! Seeded problems: a [`Case`] is a small, printable description (configuration, token counts,
//! seed, wgrad timing) from which the full [`Problem`] (weights, inputs, upstream gradient) is
//! generated deterministically. A failing case prints as Rust that can be pasted into a
//! regression test.

use moe_reference::{Dtype, ExpertSet, Fp8Config, Inputs, LayerConfig, WgradTiming};
use ndarray::{Array1, Array2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One differential test case. `cfg.parallel` gives the EP/ETP sizes to simulate (its ranks are
/// ignored); `tokens_per_expert` has one count per *global* expert.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Case {
    /// Layer configuration (global sizes; `parallel` = the layout to simulate).
    pub cfg: LayerConfig,
    /// Token count of each of the `E` global experts.
    pub tokens_per_expert: Vec<i64>,
    /// Seed of weights, inputs and upstream gradient.
    pub seed: u64,
    /// Immediate or deferred weight gradients.
    pub timing: WgradTiming,
}

/// The tensors of a [`Case`].
#[derive(Clone, Debug)]
pub struct Problem {
    /// All `E` experts, unsharded, representable in the params dtype.
    pub weights: ExpertSet,
    /// Global inputs (rows sorted by global expert).
    pub inputs: Inputs,
    /// Upstream gradient `[T, h]`.
    pub grad_output: Array2<f64>,
}

impl Case {
    /// Total token rows `T`.
    pub fn num_tokens(&self) -> usize {
        self.tokens_per_expert.iter().map(|&n| n.max(0) as usize).sum()
    }

    /// Generates the tensors: weights ~ U(-1,1)/√fan_in (biases U(-½,½)), inputs ~ U(-1,1),
    /// probs ~ U(0,1), upstream gradient ~ U(-1,1), each rounded to its dtype.
    pub fn problem(&self) -> Problem {
        let global = self.cfg.unsharded();
        let weights = ExpertSet::random(&global, self.seed);
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x9E37_79B9_7F4A_7C15);
        let (t, h) = (self.num_tokens(), self.cfg.hidden_size);
        let dt = self.cfg.params_dtype;
        let mut uniform = |lo: f64, hi: f64, dtype: Dtype| dtype.round(rng.random_range(lo..hi));
        let hidden_states = Array2::from_shape_simple_fn((t, h), || uniform(-1.0, 1.0, dt));
        let probs = Array1::from_shape_simple_fn(t, || uniform(0.0, 1.0, self.cfg.probs_dtype));
        let grad_output = Array2::from_shape_simple_fn((t, h), || uniform(-1.0, 1.0, dt));
        Problem {
            weights,
            inputs: Inputs { hidden_states, tokens_per_expert: self.tokens_per_expert.clone(), probs },
            grad_output,
        }
    }

    /// A one-line summary: class, dtype, activation, sizes, layout and token counts.
    pub fn summary(&self) -> String {
        let c = &self.cfg;
        format!(
            "{} {} {}{}{} E={} h={} f={} tp={} ep={} tokens={:?}{}{}",
            c.class,
            c.params_dtype,
            if c.gated_linear_unit { "glu-" } else { "" },
            c.activation,
            if c.add_bias { " bias" } else { "" },
            c.num_experts,
            c.hidden_size,
            c.ffn_hidden_size,
            c.parallel.tp_size,
            c.parallel.ep_size,
            self.tokens_per_expert,
            if self.timing == WgradTiming::Deferred { " deferred-wgrad" } else { "" },
            c.fp8.map(|f| format!(" fp8={}", f.label())).unwrap_or_default()
        )
    }

    /// Rust source that rebuilds this case, for pasting into a regression test.
    pub fn to_rust(&self) -> String {
        let c = &self.cfg;
        let dtype = |d: Dtype| match d {
            Dtype::F32 => "Dtype::F32",
            Dtype::Bf16 => "Dtype::Bf16",
            Dtype::F16 => "Dtype::F16",
        };
        format!(
            "Case {{\n    cfg: LayerConfig {{\n        class: LayerClass::{:?},\n        num_experts: {},\n        hidden_size: {},\n        ffn_hidden_size: {},\n        gated_linear_unit: {},\n        activation: Activation::{:?},\n        add_bias: {},\n        clamp_value: {:?},\n        glu_linear_offset: {:?},\n        apply_probs_on_input: {},\n        params_dtype: {},\n        probs_dtype: {},\n        padding_multiple: {:?},\n        parallel: Parallelism {{ tp_size: {}, tp_rank: 0, ep_size: {}, ep_rank: 0 }},\n        fp8: {},\n        glu_interleave_size: {:?},\n    }},\n    tokens_per_expert: vec!{:?},\n    seed: {},\n    timing: WgradTiming::{:?},\n}}",
            c.class,
            c.num_experts,
            c.hidden_size,
            c.ffn_hidden_size,
            c.gated_linear_unit,
            c.activation,
            c.add_bias,
            c.clamp_value,
            c.glu_linear_offset,
            c.apply_probs_on_input,
            dtype(c.params_dtype),
            dtype(c.probs_dtype),
            c.padding_multiple,
            c.parallel.tp_size,
            c.parallel.ep_size,
            fp8_to_rust(c.fp8.as_ref()),
            c.glu_interleave_size,
            self.tokens_per_expert,
            self.seed,
            self.timing
        )
    }
}

/// Rust source for an optional [`Fp8Config`] (`None`, or `Some(Fp8Config { .. })` with every
/// field spelled out).
fn fp8_to_rust(fp8: Option<&Fp8Config>) -> String {
    let Some(f) = fp8 else { return "None".into() };
    let d = &f.delayed;
    format!(
        "Some(Fp8Config {{ recipe: Fp8Recipe::{:?}, format: TeFormat::{:?}, power_2_scales: {}, delayed: \
         DelayedScalingConfig {{ margin: {}, amax_history_len: {}, amax_compute_algo: AmaxComputeAlgo::{:?} }}, \
         pad_to_alignment: {}, activation_input_store: {} }})",
        f.recipe,
        f.format,
        f.power_2_scales,
        d.margin,
        d.amax_history_len,
        d.amax_compute_algo,
        f.pad_to_alignment,
        f.activation_input_store
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_reference::fp8::{AmaxComputeAlgo, DelayedScalingConfig};
    use moe_reference::{Activation, Fp8Recipe, LayerClass, Parallelism, TeFormat};

    /// Evaluates the tokens as an expression and also returns them as text, so a test can
    /// check that printed Rust is exactly what, pasted, rebuilds the value.
    macro_rules! pasted {
        ($($t:tt)*) => {
            ($($t)*, stringify!($($t)*))
        };
    }

    fn without_whitespace(s: &str) -> String {
        s.chars().filter(|c| !c.is_whitespace()).collect()
    }

    #[test]
    fn the_printed_regression_case_is_rust_that_rebuilds_the_case() {
        // A shrunk failure prints `to_rust()` for pasting into a regression test: the text must
        // be that Rust, with every field of the case (non-default values everywhere).
        let (case, text) = pasted!(Case {
            cfg: LayerConfig {
                class: LayerClass::TeGrouped,
                num_experts: 4,
                hidden_size: 17,
                ffn_hidden_size: 24,
                gated_linear_unit: true,
                activation: Activation::QuickGelu,
                add_bias: false,
                clamp_value: Some(7.0),
                glu_linear_offset: 1.0,
                apply_probs_on_input: true,
                params_dtype: Dtype::F16,
                probs_dtype: Dtype::F32,
                padding_multiple: Some(16),
                parallel: Parallelism { tp_size: 2, tp_rank: 0, ep_size: 4, ep_rank: 0 },
                fp8: Some(Fp8Config {
                    recipe: Fp8Recipe::Delayed,
                    format: TeFormat::E4M3,
                    power_2_scales: true,
                    delayed: DelayedScalingConfig {
                        margin: 2,
                        amax_history_len: 16,
                        amax_compute_algo: AmaxComputeAlgo::MostRecent
                    },
                    pad_to_alignment: false,
                    activation_input_store: true
                }),
                glu_interleave_size: Some(4),
            },
            tokens_per_expert: vec![3, 0, 40, 1],
            seed: 1234,
            timing: WgradTiming::Deferred,
        });
        assert_eq!(without_whitespace(&case.to_rust()), without_whitespace(text));
        let (bf16, text) = pasted!(Case {
            cfg: LayerConfig {
                class: LayerClass::Grouped,
                num_experts: 1,
                hidden_size: 1,
                ffn_hidden_size: 2,
                gated_linear_unit: false,
                activation: Activation::Gelu,
                add_bias: true,
                clamp_value: None,
                glu_linear_offset: 0.0,
                apply_probs_on_input: false,
                params_dtype: Dtype::Bf16,
                probs_dtype: Dtype::Bf16,
                padding_multiple: None,
                parallel: Parallelism { tp_size: 1, tp_rank: 0, ep_size: 1, ep_rank: 0 },
                fp8: None,
                glu_interleave_size: None,
            },
            tokens_per_expert: vec![],
            seed: 0,
            timing: WgradTiming::Immediate,
        });
        assert_eq!(without_whitespace(&bf16.to_rust()), without_whitespace(text));
    }

    #[test]
    fn the_summary_names_every_varying_setting() {
        let case = Case {
            cfg: LayerConfig {
                add_bias: true,
                parallel: Parallelism { tp_size: 1, tp_rank: 0, ep_size: 2, ep_rank: 0 },
                ..LayerConfig::example()
            },
            tokens_per_expert: vec![1, 2, 0, 3],
            seed: 1,
            timing: WgradTiming::Deferred,
        };
        assert_eq!(
            case.summary(),
            "sequential bfloat16 glu-silu bias E=4 h=16 f=32 tp=1 ep=2 tokens=[1, 2, 0, 3] deferred-wgrad"
        );
        assert_eq!(case.num_tokens(), 6);
    }
}
