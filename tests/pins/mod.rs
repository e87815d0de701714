//! Independent pins (issue 11, "verdicts that mean what they say"): values derived by hand or
//! from outside this code base, so that a re-bless of the insta snapshots (`golden/`), which this
//! same code produced, cannot erase them.
//!
//! * Activations (spec §4.3): every formula is written out here with its constants, from
//!   Megatron's source, and the exact-erf GELU is checked against standard-normal values computed
//!   outside this code base (CPython's `math.erf`). Each is pinned on
//!   [`Activation::apply`]/[`Activation::derivative`] and through the f64 oracle layer.
//! * The GLU clamp (spec §4.3): Megatron's `glu()` closure (`megatron/core/transformer/mlp.py`
//!   and `megatron/core/transformer/moe/experts.py`, the GPT-OSS activation) clamps the gate
//!   from above only, `x_glu.clamp(min=None, max=c)`, and the linear half on both sides,
//!   `x_linear.clamp(min=-c, max=c)`; autograd's clamp gradient is masked by the inclusive
//!   range. Pinned through the oracle with gates and linear parts below `−c`, above `c` and at
//!   `c`, forward and gradient separately.
//! * The storage-dtype rounding points of the eager path (spec §4.8): for each one a one-token,
//!   one-expert, `h = f = 1` bf16 case whose result moves by at least one bf16 ulp when that one
//!   rounding is left out. The expected value is computed by [`rounding::eager_chain`], a scalar
//!   transcription of the spec's table in `f32` arithmetic with explicit `half::bf16` rounding
//!   (no `moe_reference` code), and is also written out as a literal.
//!
//! * Megatron HEAD's GLU interleaving (spec §4.10): [`glu_interleave`] works
//!   `_remove_glu_interleaving`'s reshape/transpose by hand on an `h = 2`, `f = 4` expert for
//!   block sizes 1, 2 and 4, forward and gradient, and with the clamp.
//!
//! Every test names the planted bug it kills; the mutations were applied to the reference and
//! seen to fail these tests.
//!
//! [`activations`] holds the activation pins, [`glu_clamp`] the clamp pins, [`rounding`] the
//! rounding-point pins; this file the formulas and the one-expert layer helpers they share.

mod activations;
mod clamp_window;
mod glu_clamp;
mod glu_interleave;
mod rounding;

use moe_reference::{
    to_state_dict, Activation, Dtype, ExpertLayer, ExpertSet, ExpertWeights, Inputs, LayerClass, LayerConfig, LayerRun,
    Parallelism, Reference, WgradTiming,
};
use ndarray::{Array1, Array2};

// ---------------------------------------------------------------------------------------------
// The activation formulas, written out from Megatron's source.
// ---------------------------------------------------------------------------------------------

/// The logistic sigmoid `1 / (1 + e^{-x})`.
fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// `F.silu`: `x·σ(x)`.
fn silu(x: f64) -> f64 {
    x * sigmoid(x)
}

/// `d/dx x·σ(x) = σ(x) + x·σ(x)(1 − σ(x))`.
fn silu_derivative(x: f64) -> f64 {
    sigmoid(x) * (1.0 + x * (1.0 - sigmoid(x)))
}

/// The quick-GELU slope, as written in Megatron's `megatron/core/activations.py`
/// (`quick_gelu(x) = x * torch.sigmoid(1.702 * x)`) and in TE's `ScaledClampedQGeGLU`
/// (`alpha=1.702`).
const QUICK_GELU_ALPHA: f64 = 1.702;

/// `x·σ(1.702x)`.
fn quick_gelu(x: f64) -> f64 {
    x * sigmoid(QUICK_GELU_ALPHA * x)
}

/// `d/dx x·σ(αx) = σ(αx) + αx·σ(αx)(1 − σ(αx))`.
fn quick_gelu_derivative(x: f64) -> f64 {
    let s = sigmoid(QUICK_GELU_ALPHA * x);
    s * (1.0 + QUICK_GELU_ALPHA * x * (1.0 - s))
}

/// Megatron's `squared_relu(x) = torch.pow(F.relu(x), 2)`.
fn squared_relu(x: f64) -> f64 {
    x.max(0.0).powi(2)
}

/// `d/dx relu(x)² = 2·relu(x)`.
fn squared_relu_derivative(x: f64) -> f64 {
    2.0 * x.max(0.0)
}

/// Exact-erf GELU `gelu(x) = x·Φ(x) = 0.5·x·(1 + erf(x/√2))` (`torch.nn.functional.gelu` with
/// the default `approximate='none'`, Megatron's default `activation_func`) and its derivative
/// `Φ(x) + x·φ(x)`, at `x`, as `(x, gelu(x), gelu'(x))`. Computed outside this code base with
/// CPython's `math.erf` (`x*0.5*(1+erf(x/sqrt(2)))`, `Φ + x*exp(-x*x/2)/sqrt(2π)`); Φ(1) =
/// 0.8413447460685429 and Φ(2) = 0.9772498680518208 are the textbook normal-table values. The
/// tanh approximation (`0.5x(1 + tanh(0.7978845608(x + 0.044715x³)))`, TE's GELU) is off by
/// 1.7e-5 to 4.1e-4 at these points.
const GELU_TABLE: [(f64, f64, f64); 8] = [
    (-3.0, -0.00404969409489031, -0.01194564720418392),
    (-2.0, -0.04550026389635842, -0.08523180107819692),
    (-1.0, -0.15865525393145707, -0.08331547058768629),
    (-0.5, -0.15426876936299344, 0.13250487534383712),
    (0.5, 0.34573123063700656, 0.8674951246561629),
    (1.0, 0.8413447460685429, 1.0833154705876864),
    (2.0, 1.9544997361036416, 1.085231801078197),
    (3.0, 2.99595030590511, 1.011945647204184),
];

/// Points at which the activations are pinned: both signs, the saturating tails, the kink of
/// squared ReLU (0) and values in between.
const POINTS: [f64; 9] = [-3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0];

/// `|got − want| ≤ 4e-16·max(1, |want|)`: a few f64 ulps, far below any formula change (the
/// smallest below, α = 1.7 instead of 1.702, moves quick-GELU by 1e-4).
fn assert_close(what: &str, x: f64, got: f64, want: f64) {
    assert!((got - want).abs() <= 4e-16 * want.abs().max(1.0), "{what}({x}) = {got:e}, pinned {want:e}");
}

/// A one-expert layer configuration of `class` with `h = hidden`, `f = ffn`.
fn one_expert(class: LayerClass, hidden: usize, ffn: usize, glu: bool, activation: Activation) -> LayerConfig {
    LayerConfig {
        class,
        num_experts: 1,
        hidden_size: hidden,
        ffn_hidden_size: ffn,
        gated_linear_unit: glu,
        activation,
        add_bias: false,
        clamp_value: None,
        glu_linear_offset: 0.0,
        apply_probs_on_input: false,
        // GroupedMLP only accepts bf16; the oracle computes in f64 whatever the dtype.
        params_dtype: Dtype::Bf16,
        probs_dtype: Dtype::F32,
        padding_multiple: None,
        parallel: Parallelism::SINGLE,
        fp8: None,
        glu_interleave_size: None,
    }
}

/// Forward and backward of `cfg` (immediate weight grads) with the given reference.
fn run(reference: Reference, cfg: &LayerConfig, w: &ExpertWeights, inputs: &Inputs, g: &Array2<f64>) -> LayerRun {
    let sd = to_state_dict(cfg, &ExpertSet { experts: vec![w.clone()] }).expect("valid weights");
    reference.forward_backward(cfg, &sd, inputs, g, WgradTiming::Immediate).expect("valid case")
}

/// The inputs of `x.len()` tokens for one expert, probs `p`.
fn tokens(x: Array2<f64>, p: Array1<f64>) -> Inputs {
    Inputs { tokens_per_expert: vec![x.nrows() as i64], hidden_states: x, probs: p }
}
