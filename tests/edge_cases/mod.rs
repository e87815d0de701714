//! Hand-picked edge cases (style §13 "seeds first"), each with the reason it exists and its
//! source: `bugs-shapes-anchors.md` §A (issue/PR numbers), the spec section, or a Megatron unit
//! test. The table runs through every §10 property against the reference; the cases that pin
//! exact numbers or exact errors have their own tests in the modules below.
//!
//! * [`table`]: the table, through every property.
//! * [`exact`]: exact numbers from Megatron's unit tests and the bug reports (bias scaling,
//!   parameter shapes and counts, TP slices, class conversion, empty experts, T = 0, backward
//!   twice, deferred wgrad).
//! * [`bad_input`]: bad inputs rejected with a clear error naming the tensor or field.
//! * [`large`]: large-magnitude activations and pytorch #172439 at its reported size.
//!
//! This file holds the helpers they share.

mod bad_input;
mod exact;
mod large;
mod table;

use moe_harness::case::Case;
use moe_reference::{
    to_state_dict, ExpertLayer, ExpertSet, Inputs, LayerClass, LayerConfig, Parallelism, Reference, WgradTiming,
};
use ndarray::Array2;

fn cfg(class: LayerClass, e: usize, h: usize, f: usize) -> LayerConfig {
    LayerConfig { class, num_experts: e, hidden_size: h, ffn_hidden_size: f, ..LayerConfig::example() }
}

fn case(cfg: LayerConfig, tokens: &[i64], timing: WgradTiming) -> Case {
    Case { cfg, tokens_per_expert: tokens.to_vec(), seed: 42, timing }
}

fn tp_ep(tp: usize, ep: usize) -> Parallelism {
    Parallelism { tp_size: tp, tp_rank: 0, ep_size: ep, ep_rank: 0 }
}

fn run(
    layer: Reference,
    cfg: &LayerConfig,
    w: &ExpertSet,
    inputs: &Inputs,
    g: &Array2<f64>,
    timing: WgradTiming,
) -> moe_reference::LayerRun {
    layer.forward_backward(cfg, &to_state_dict(cfg, w).unwrap(), inputs, g, timing).unwrap()
}

fn grads(cfg: &LayerConfig, r: &moe_reference::LayerRun) -> ExpertSet {
    moe_reference::from_state_dict(cfg, &r.weight_grads).unwrap()
}

fn problem(c: &LayerConfig, tokens: &[i64]) -> (ExpertSet, Inputs, Array2<f64>) {
    let p =
        Case { cfg: c.clone(), tokens_per_expert: tokens.to_vec(), seed: 5, timing: WgradTiming::Immediate }.problem();
    (p.weights, p.inputs, p.grad_output)
}
