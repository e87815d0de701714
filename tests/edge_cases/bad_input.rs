//! Bad inputs: a clear error naming the tensor or field, never a panic.

use super::{cfg, problem, tp_ep};
use moe_harness::case::Case;
use moe_harness::properties::{check, Property, PropertyFailure, ReferenceBackend};
use moe_reference::parallel::{run_parallel, EtpReduction};
use moe_reference::{
    to_state_dict, Activation, Dtype, ExpertLayer, ExpertSet, Inputs, LayerClass, LayerConfig, LayerError, Reference,
    ReferenceError, WgradTiming,
};
use ndarray::{Array1, Array2};

// ---------------------------------------------------------------------------------------------
// Bad inputs: a clear error naming the tensor or field, never a panic.

/// Runs the reference (both numerics) through the `ExpertLayer` API and returns the error text.
fn layer_error(c: &LayerConfig, w: &ExpertSet, inputs: &Inputs, g: &Array2<f64>) -> String {
    let sd = to_state_dict(&c.unsharded(), w).unwrap();
    let mut msg = None;
    for layer in [Reference::EMULATED, Reference::ORACLE] {
        let err = layer.forward_backward(c, &sd, inputs, g, WgradTiming::Immediate).expect_err("bad input accepted");
        assert!(matches!(err, LayerError::Invalid(_)), "{err:?}");
        // Forward alone fails the same way unless only the upstream gradient is bad.
        if let Err(fwd) = layer.forward(c, &sd, inputs) {
            assert_eq!(fwd.to_string(), err.to_string());
        }
        msg = Some(err.to_string());
    }
    msg.unwrap()
}

fn assert_mentions(msg: &str, words: &[&str]) {
    for w in words {
        assert!(msg.contains(w), "error {msg:?} does not mention {w:?}");
    }
}

/// `tokens_per_expert` must sum to T (spec §0 call contract).
#[test]
fn tokens_not_summing_to_rows_are_rejected() {
    let c = cfg(LayerClass::TeGrouped, 3, 16, 8);
    let (w, mut inputs, g) = problem(&c, &[2, 3, 1]);
    inputs.tokens_per_expert = vec![2, 3, 2];
    let msg = layer_error(&c, &w, &inputs, &g);
    assert_mentions(&msg, &["tokens_per_expert", "[2, 3, 2]", "sum to 7", "6 rows"]);
    // The same through the harness: an error verdict, not a panic.
    let bad = Case { cfg: c.clone(), tokens_per_expert: vec![2, -3, 1], seed: 0, timing: WgradTiming::Immediate };
    for property in Property::ALL {
        match check(&ReferenceBackend, property, &bad) {
            Err(PropertyFailure::Error(m)) => assert!(m.contains("negative"), "{m}"),
            other => panic!("{}: expected an error, got {other:?}", property.name()),
        }
    }
}

/// Negative counts are rejected, naming the expert.
#[test]
fn negative_token_counts_are_rejected() {
    let c = cfg(LayerClass::Sequential, 3, 16, 8);
    let (w, mut inputs, g) = problem(&c, &[2, 3, 1]);
    inputs.tokens_per_expert = vec![2, 5, -1];
    let msg = layer_error(&c, &w, &inputs, &g);
    assert_mentions(&msg, &["tokens_per_expert", "expert 2", "negative", "-1"]);
}

/// Wrong shapes of every input and of a parameter name the tensor and both shapes.
#[test]
fn wrong_shapes_are_rejected_naming_the_tensor() {
    let c = cfg(LayerClass::TeGrouped, 2, 16, 8);
    let (w, inputs, g) = problem(&c, &[2, 3]);
    let mut x = inputs.clone();
    x.hidden_states = Array2::zeros((5, 17));
    assert_mentions(&layer_error(&c, &w, &x, &g), &["input.permuted_local_hidden_states", "[5, 16]", "[5, 17]"]);
    let mut x = inputs.clone();
    x.probs = Array1::zeros(4);
    assert_mentions(&layer_error(&c, &w, &x, &g), &["input.permuted_probs", "[5]", "[4]"]);
    let mut x = inputs.clone();
    x.tokens_per_expert = vec![5];
    assert_mentions(&layer_error(&c, &w, &x, &g), &["input.tokens_per_expert", "[2]", "[1]"]);
    assert_mentions(&layer_error(&c, &w, &inputs, &Array2::zeros((5, 3))), &["input.grad_output", "[5, 16]", "[5, 3]"]);
    // A parameter of the wrong shape, a missing one and an unexpected one.
    let mut sd = to_state_dict(&c, &w).unwrap();
    sd.insert("linear_fc2.weight1".into(), ndarray::ArrayD::zeros(vec![8, 16]));
    let err = Reference::EMULATED.forward(&c, &sd, &inputs).unwrap_err().to_string();
    assert_mentions(&err, &["linear_fc2.weight1", "[16, 8]", "[8, 16]"]);
    sd.remove("linear_fc2.weight1");
    let err = Reference::EMULATED.forward(&c, &sd, &inputs).unwrap_err().to_string();
    assert_mentions(&err, &["missing", "linear_fc2.weight1", "TEGroupedMLP"]);
    let mut sd = to_state_dict(&c, &w).unwrap();
    sd.insert("linear_fc1.weight7".into(), ndarray::ArrayD::zeros(vec![16, 16]));
    let err = Reference::EMULATED.forward(&c, &sd, &inputs).unwrap_err().to_string();
    assert_mentions(&err, &["unexpected", "linear_fc1.weight7"]);
}

/// Unknown dtype, activation and class names are rejected, quoting the name and the choices.
#[test]
fn unknown_names_are_rejected_with_the_accepted_names() {
    let e = Dtype::parse("float8_e4m3").unwrap_err().to_string();
    assert_mentions(&e, &["dtype", "float8_e4m3", "bfloat16"]);
    let e = Activation::parse("relu").unwrap_err().to_string();
    assert_mentions(&e, &["activation", "relu", "squared_relu"]);
    let e = LayerClass::parse("InferenceGroupedMLP").unwrap_err().to_string();
    assert_mentions(&e, &["layer", "InferenceGroupedMLP", "te_grouped"]);
}

/// NaN/Inf in the inputs, the probs or the upstream gradient: the error names the tensor and
/// the index of the first bad element (huggingface/transformers PR #45621: NaN rows defeat zero
/// routing weights, so they must never be silently accepted).
#[test]
fn non_finite_inputs_are_rejected_naming_tensor_and_index() {
    let c = cfg(LayerClass::Sequential, 2, 16, 8);
    let (w, inputs, g) = problem(&c, &[2, 3]);
    let mut x = inputs.clone();
    x.hidden_states[[3, 7]] = f64::NAN;
    assert_mentions(&layer_error(&c, &w, &x, &g), &["input.permuted_local_hidden_states", "[3, 7]", "NaN"]);
    let mut x = inputs.clone();
    x.probs[1] = f64::INFINITY;
    assert_mentions(&layer_error(&c, &w, &x, &g), &["input.permuted_probs", "[1]", "inf"]);
    let mut bad_g = g.clone();
    bad_g[[4, 0]] = f64::NEG_INFINITY;
    assert_mentions(&layer_error(&c, &w, &inputs, &bad_g), &["input.grad_output", "[4, 0]", "-inf"]);
}

/// Configurations Megatron rejects are rejected here with the field in the message: ffn not
/// divisible by the ETP size, experts not divisible by the EP size, bias with ETP > 1 (spec
/// §6.3), GroupedMLP with bias or outside bf16 (spec §4.4), GroupedMLP GLU with quick_gelu.
#[test]
fn invalid_configurations_are_rejected_naming_the_field() {
    let base = cfg(LayerClass::TeGrouped, 4, 16, 8);
    let cases: Vec<(LayerConfig, &[&str])> = vec![
        (
            LayerConfig { ffn_hidden_size: 9, parallel: tp_ep(2, 1), ..base.clone() },
            &["ffn_hidden_size (9)", "expert-tensor-parallel size (2)"],
        ),
        (
            LayerConfig { num_experts: 6, parallel: tp_ep(1, 4), ..base.clone() },
            &["num_experts (6)", "expert-parallel size (4)"],
        ),
        (
            LayerConfig { add_bias: true, parallel: tp_ep(2, 1), ..base.clone() },
            &["add_bias_linear", "expert_tensor_parallel_size 2"],
        ),
        (
            LayerConfig { class: LayerClass::Grouped, add_bias: true, ..base.clone() },
            &["GroupedMLP", "add_bias_linear"],
        ),
        (
            LayerConfig { class: LayerClass::Grouped, params_dtype: Dtype::F32, ..base.clone() },
            &["GroupedMLP", "bfloat16", "float32"],
        ),
        (
            LayerConfig { class: LayerClass::Grouped, activation: Activation::QuickGelu, ..base.clone() },
            &["GroupedMLP", "quick_gelu"],
        ),
        (LayerConfig { clamp_value: Some(f64::INFINITY), ..base.clone() }, &["activation_func_clamp_value", "inf"]),
    ];
    for (c, words) in cases {
        let msg = c.validate().unwrap_err().to_string();
        assert_mentions(&msg, words);
        // Through every entry point: the trait, the parallel simulation and the harness.
        let err = Reference::EMULATED.supports(&c).unwrap_err();
        assert!(matches!(err, LayerError::Invalid(ReferenceError::Config(_))));
        let case =
            Case { cfg: c.clone(), tokens_per_expert: vec![1; c.num_experts], seed: 0, timing: WgradTiming::Immediate };
        let p = Case { cfg: c.unsharded(), ..case.clone() };
        if c.unsharded().validate().is_ok() {
            let pr = p.problem();
            let e = run_parallel(
                &Reference::EMULATED,
                &c,
                &pr.weights,
                &pr.inputs,
                &pr.grad_output,
                WgradTiming::Immediate,
                EtpReduction::megatron(&c),
            )
            .unwrap_err();
            assert_mentions(&e.to_string(), words);
        }
        for property in Property::ALL {
            assert!(
                matches!(check(&ReferenceBackend, property, &case), Err(PropertyFailure::Error(m)) if m.contains(words[0])),
                "{}: {}",
                property.name(),
                case.summary()
            );
        }
    }
}
