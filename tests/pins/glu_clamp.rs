//! The GLU clamp against Megatron's formula, forward and gradient, and GroupedMLP ignoring it.

use super::{assert_close, one_expert, quick_gelu, quick_gelu_derivative, run, silu, silu_derivative, tokens};
use moe_reference::{from_state_dict, Activation, ExpertWeights, LayerClass, LayerConfig, LayerRun, Reference};
use ndarray::{arr2, Array1, Array2};

// ---------------------------------------------------------------------------------------------
// The GLU clamp.
// ---------------------------------------------------------------------------------------------

/// A GLU probe: `h = 2`, `f = 1`, `W1 = I` so each token's `(x₀, x₁)` *is* its (gate, linear)
/// pair, `W2 = [[1], [0]]`, `p = 1`, `G = [1, 0]`. Then `y₀ = z`, `dL/dp = z` and
/// `dL/dx = (dz/dgate, dz/dlinear)`.
fn glu_probe(
    class: LayerClass,
    activation: Activation,
    clamp: f64,
    offset: f64,
    pairs: &[(f64, f64)],
) -> (LayerConfig, LayerRun) {
    let cfg = LayerConfig {
        clamp_value: Some(clamp),
        glu_linear_offset: offset,
        ..one_expert(class, 2, 1, true, activation)
    };
    let w = ExpertWeights {
        fc1_weight: arr2(&[[1.0, 0.0], [0.0, 1.0]]),
        fc1_bias: None,
        fc2_weight: arr2(&[[1.0], [0.0]]),
        fc2_bias: None,
    };
    let x = Array2::from_shape_fn((pairs.len(), 2), |(i, j)| if j == 0 { pairs[i].0 } else { pairs[i].1 });
    let g = Array2::from_shape_fn((pairs.len(), 2), |(_, j)| if j == 0 { 1.0 } else { 0.0 });
    let r = run(Reference::ORACLE, &cfg, &w, &tokens(x, Array1::ones(pairs.len())), &g);
    (cfg, r)
}

/// The (gate, linear) pairs of the clamp pins for clamp value `c`: gate below −c, above c and
/// at c; linear below −c, above c and at ±c; both out of range at once; both inside.
fn clamp_pairs(c: f64) -> Vec<(f64, f64)> {
    let (lo, hi, mid) = (-3.0 * c, 3.0 * c, 0.5 * c);
    vec![(lo, mid), (hi, mid), (c, mid), (mid, lo), (mid, hi), (mid, c), (mid, -c), (lo, lo), (hi, hi), (mid, mid)]
}

/// Megatron's clamped GLU for one pair, from the source quoted in the module docs:
/// `z = act(min(g, c))·(clamp(l, −c, c) + offset)`, and its gradient with autograd's inclusive
/// masks (`g ≤ c`, `−c ≤ l ≤ c`), as `(z, dz/dg, dz/dl)`.
fn clamped_glu(act: fn(f64) -> f64, act_d: fn(f64) -> f64, c: f64, offset: f64, g: f64, l: f64) -> (f64, f64, f64) {
    let gc = if g > c { c } else { g }; // x_glu.clamp(min=None, max=c): no lower clamp
    let lc = if l > c {
        c
    } else if l < -c {
        -c
    } else {
        l
    }; // x_linear.clamp(min=-c, max=c)
    let z = act(gc) * (lc + offset);
    let dg = if g <= c { act_d(gc) * (lc + offset) } else { 0.0 };
    let dl = if -c <= l && l <= c { act(gc) } else { 0.0 };
    (z, dg, dl)
}

/// The clamp configurations pinned: SwiGLU and quick-GEGLU with `c = 1`, and GPT-OSS's
/// quick-GEGLU (`c = 7`, `glu_linear_offset = 1`), as (activation, formula, derivative, c, offset).
type ClampCase = (Activation, fn(f64) -> f64, fn(f64) -> f64, f64, f64);
const CLAMP_CASES: [ClampCase; 3] = [
    (Activation::Silu, silu, silu_derivative, 1.0, 0.0),
    (Activation::QuickGelu, quick_gelu, quick_gelu_derivative, 1.0, 0.0),
    (Activation::QuickGelu, quick_gelu, quick_gelu_derivative, 7.0, 1.0),
];

/// Forward of the clamped GLU (SequentialMLP and TEGroupedMLP, the classes that honour the
/// clamp, spec §4.9) against Megatron's formula, gates and linear parts on both sides of ±c.
/// Kills: a gate clamped from below too (`g.clamp(-c, c)`: the rows with `g = −3c` then see
/// `act(−c)` instead of `act(−3c)`), a linear part clamped from one side only, a gate clamped
/// with `max(g, c)`, the clamp applied after the activation, the offset added before the clamp.
#[test]
fn glu_clamp_forward_matches_megatron() {
    for class in [LayerClass::Sequential, LayerClass::TeGrouped] {
        for (act, f, fd, c, offset) in CLAMP_CASES {
            let pairs = clamp_pairs(c);
            let (_, r) = glu_probe(class, act, c, offset, &pairs);
            for (i, &(g, l)) in pairs.iter().enumerate() {
                let (z, _, _) = clamped_glu(f, fd, c, offset, g, l);
                let what = format!("{class} {act} c={c} offset={offset} gate={g} linear={l}: z");
                assert_close(&what, g, r.output[[i, 0]], z);
                assert_close(&format!("{what} (dL/dp)"), g, r.grad_probs[i], z);
            }
        }
    }
}

/// Gradient of the clamped GLU, same probes: the gate's gradient flows for every `g ≤ c`
/// (including far below −c and exactly at c) and is zero above c; the linear part's flows
/// exactly for `−c ≤ l ≤ c`. Kills: a gate clamped from below too, forward and backward
/// consistently (the gate gradient of the `g = −3c` rows becomes 0) — the mutation the
/// differential suite and the gradient check cannot see, since the f64 oracle and the
/// emulation move together and the function stays self-consistent; strict masks (`g < c`,
/// `−c < l < c`) at the boundary rows; a missing mask above c.
#[test]
fn glu_clamp_gradient_matches_megatron() {
    for class in [LayerClass::Sequential, LayerClass::TeGrouped] {
        for (act, f, fd, c, offset) in CLAMP_CASES {
            let pairs = clamp_pairs(c);
            let (cfg, r) = glu_probe(class, act, c, offset, &pairs);
            for (i, &(g, l)) in pairs.iter().enumerate() {
                let (_, dg, dl) = clamped_glu(f, fd, c, offset, g, l);
                let what = format!("{class} {act} c={c} offset={offset} gate={g} linear={l}");
                assert_close(&format!("{what}: dL/dgate"), g, r.grad_input[[i, 0]], dg);
                assert_close(&format!("{what}: dL/dlinear"), l, r.grad_input[[i, 1]], dl);
            }
            // The fc1 weight grad is Σ_tokens (dz/dgate, dz/dlinear)ᵀ·x: the same numbers summed.
            let grads = from_state_dict(&cfg, &r.weight_grads).unwrap();
            let (mut w_gate, mut w_lin) = ([0.0; 2], [0.0; 2]);
            for &(g, l) in &pairs {
                let (_, dg, dl) = clamped_glu(f, fd, c, offset, g, l);
                for (j, xj) in [g, l].into_iter().enumerate() {
                    w_gate[j] += dg * xj;
                    w_lin[j] += dl * xj;
                }
            }
            let dw1 = &grads.experts[0].fc1_weight;
            for j in 0..2 {
                let tol = 1e-14 * c * c * pairs.len() as f64;
                assert!((dw1[[0, j]] - w_gate[j]).abs() <= tol, "{class} {act} c={c}: dW1[gate, {j}]");
                assert!((dw1[[1, j]] - w_lin[j]).abs() <= tol, "{class} {act} c={c}: dW1[linear, {j}]");
            }
        }
    }
}

/// GroupedMLP ignores `activation_func_clamp_value` (spec §4.4, §4.9): the same probes give the
/// unclamped SwiGLU. Kills: a clamp that leaks into GroupedMLP.
#[test]
fn grouped_mlp_ignores_the_clamp() {
    let pairs = clamp_pairs(1.0);
    let (_, r) = glu_probe(LayerClass::Grouped, Activation::Silu, 1.0, 0.0, &pairs);
    for (i, &(g, l)) in pairs.iter().enumerate() {
        assert_close("grouped z", g, r.output[[i, 0]], silu(g) * l);
        assert_close("grouped dL/dgate", g, r.grad_input[[i, 0]], silu_derivative(g) * l);
        assert_close("grouped dL/dlinear", l, r.grad_input[[i, 1]], silu(g));
    }
}
