//! The width of the clamp-ambiguity window of the error model (`reference/src/layer/bounds.rs`,
//! `clamp_ambiguity`): a clamped GLU's mask may flip only for a pre-activation within rounding
//! distance of the boundary, `8·u·(|x|·|W1|ᵀ + |b1|) + u·c`, and only there may the oracle add an
//! allowance. The tight-bound tests recompute bounds from the oracle's own allowances, so they
//! cannot see a window that is too wide; this pin can: with `W1 = I` the magnitude term is
//! `|x|`, so a gate (or linear part) half a unit beyond `c = 1` is hundreds of bf16 ulps outside
//! the window and must get no allowance at all, while one two ulps beyond `c` must get one.
//! Kills `8.0 * u * a_mag` → `8.0 * u + a_mag` (a window of `|a|`, so every element within its
//! own magnitude of `c` would be "ambiguous", inflating input- and fc1-grad bounds).

use super::{one_expert, tokens};
use moe_reference::{oracle_with_scales, to_state_dict, Activation, ExpertSet, ExpertWeights, LayerClass, LayerConfig};
use ndarray::{arr2, Array1, Array2};

/// The oracle's allowances (input grad, probs grad, every weight grad) for one token whose
/// (gate, linear) pre-activations are `pair`, clamp `c = 1`, bf16, through the `W1 = I` probe.
fn allowances(pair: (f64, f64)) -> Vec<(String, f64)> {
    let cfg =
        LayerConfig { clamp_value: Some(1.0), ..one_expert(LayerClass::Sequential, 2, 1, true, Activation::Silu) };
    let w = ExpertWeights {
        fc1_weight: arr2(&[[1.0, 0.0], [0.0, 1.0]]),
        fc1_bias: None,
        fc2_weight: arr2(&[[1.0], [0.0]]),
        fc2_bias: None,
    };
    let sd = to_state_dict(&cfg, &ExpertSet { experts: vec![w] }).expect("valid weights");
    let x = arr2(&[[pair.0, pair.1]]);
    let g = Array2::from_shape_fn((1, 2), |(_, j)| if j == 0 { 1.0 } else { 0.0 });
    let o = oracle_with_scales(&cfg, &sd, &tokens(x, Array1::ones(1)), &g).expect("oracle runs");
    let a = &o.allowance;
    let mut out = vec![
        ("grad_input".to_string(), a.grad_input.iter().map(|v| v.abs()).fold(0.0, f64::max)),
        ("grad_probs".to_string(), a.grad_probs.iter().map(|v| v.abs()).fold(0.0, f64::max)),
    ];
    for (name, t) in &a.weight_grads {
        out.push((name.clone(), t.iter().map(|v| v.abs()).fold(0.0, f64::max)));
    }
    out
}

/// Largest allowance over every tensor.
fn largest(a: &[(String, f64)]) -> f64 {
    a.iter().map(|(_, v)| *v).fold(0.0, f64::max)
}

#[test]
fn clamp_allowance_only_within_rounding_distance_of_the_boundary() {
    let ulp = 2f64.powi(-7); // one bf16 ulp at 1.0 (u = 2^-8)
                             // Gate half a unit above c (the gate is clamped from above only), linear well inside.
    let far_gate = allowances((1.5, 0.25));
    assert_eq!(largest(&far_gate), 0.0, "gate 1.5 with c = 1 is far outside the window: {far_gate:?}");
    // Linear part half a unit beyond ±c, gate well inside.
    for lin in [1.5, -1.5] {
        let far_linear = allowances((0.25, lin));
        assert_eq!(largest(&far_linear), 0.0, "linear {lin} with c = 1 is far outside the window: {far_linear:?}");
    }
    // Controls: two ulps beyond the boundary the mask is ambiguous and an allowance appears, so
    // the zeros above are the window's width, not an allowance that never exists.
    for pair in [(1.0 + 2.0 * ulp, 0.25), (0.25, 1.0 + 2.0 * ulp), (0.25, -1.0 - 2.0 * ulp)] {
        let near = allowances(pair);
        assert!(largest(&near) > 0.0, "{pair:?} is within rounding distance of c = 1: {near:?}");
    }
}
