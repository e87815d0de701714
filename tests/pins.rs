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
//!   rounding is left out. The expected value is computed by [`eager_chain`], a scalar
//!   transcription of the spec's table in `f32` arithmetic with explicit `half::bf16` rounding
//!   (no `moe_reference` code), and is also written out as a literal.
//!
//! Every test names the planted bug it kills; the mutations were applied to the reference and
//! seen to fail these tests.

use half::bf16;
use moe_reference::{
    from_state_dict, to_state_dict, Activation, Dtype, ExpertLayer, ExpertSet, ExpertWeights, Inputs, LayerClass,
    LayerConfig, LayerRun, Parallelism, Reference, WgradTiming,
};
use ndarray::{arr1, arr2, Array1, Array2};

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

// ---------------------------------------------------------------------------------------------
// Activations on their own.
// ---------------------------------------------------------------------------------------------

/// quick-GELU with Megatron's 1.702 (and its derivative), plus three values computed outside
/// (CPython, `x/(1+exp(-1.702x))`). Kills: any other slope (1.7 moves the values by 1e-4),
/// quick-GELU implemented as exact or tanh GELU.
#[test]
fn quick_gelu_is_x_sigmoid_1_702_x() {
    for x in POINTS {
        assert_close("quick_gelu", x, Activation::QuickGelu.apply(x), quick_gelu(x));
        assert_close("quick_gelu'", x, Activation::QuickGelu.derivative(x), quick_gelu_derivative(x));
    }
    assert_close("quick_gelu", 1.0, Activation::QuickGelu.apply(1.0), 0.8457957659328212);
    assert_close("quick_gelu", -1.0, Activation::QuickGelu.apply(-1.0), -0.1542042340671787);
    assert_close("quick_gelu'", 1.0, Activation::QuickGelu.derivative(1.0), 1.067779606556334);
}

/// Exact-erf GELU and its derivative against the externally computed table. Kills: the tanh
/// approximation (in `apply` or `derivative`), a dropped `x·φ(x)` term in the derivative, a
/// `√2` that became `2` or `1` in `erf(x/√2)`.
#[test]
fn gelu_is_exact_erf() {
    for (x, value, derivative) in GELU_TABLE {
        // An independent check of the table itself: gelu(−x) = gelu(x) − x (Φ(−x) = 1 − Φ(x)).
        let mirror = GELU_TABLE.iter().find(|t| t.0 == -x).expect("table is symmetric");
        assert!((mirror.1 - (value - x)).abs() < 1e-15, "table: gelu({x})");
        assert_close("gelu", x, Activation::Gelu.apply(x), value);
        assert_close("gelu'", x, Activation::Gelu.derivative(x), derivative);
    }
}

/// `relu(x)²` and `2·relu(x)`. Kills: a missing relu (`x²` is 4 at −2), `relu(x)·x`, the
/// derivative written as `2x` or `relu(x)`.
#[test]
fn squared_relu_is_relu_squared() {
    for x in POINTS {
        assert_close("squared_relu", x, Activation::SquaredRelu.apply(x), squared_relu(x));
        assert_close("squared_relu'", x, Activation::SquaredRelu.derivative(x), squared_relu_derivative(x));
    }
    assert_eq!(Activation::SquaredRelu.apply(-2.0), 0.0);
    assert_eq!(Activation::SquaredRelu.apply(3.0), 9.0);
    assert_eq!(Activation::SquaredRelu.derivative(3.0), 6.0);
}

/// `x·σ(x)` and its derivative, plus two values computed outside (CPython). Kills: silu with a
/// slope (`σ(1.702x)`, `σ(2x)`), silu's derivative missing the `x·σ(1−σ)` term.
#[test]
fn silu_is_x_sigmoid_x() {
    for x in POINTS {
        assert_close("silu", x, Activation::Silu.apply(x), silu(x));
        assert_close("silu'", x, Activation::Silu.derivative(x), silu_derivative(x));
    }
    assert_close("silu", 1.0, Activation::Silu.apply(1.0), 0.7310585786300049);
    assert_close("silu'", -1.0, Activation::Silu.derivative(-1.0), 0.07232948812851325);
}

// ---------------------------------------------------------------------------------------------
// The same through the f64 oracle layer.
// ---------------------------------------------------------------------------------------------

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

/// An activation's `(value, derivative)` at a point.
type Formula<'a> = &'a dyn Fn(f64) -> (f64, f64);

/// Non-GLU `h = f = 1`, `W1 = W2 = [[1]]`, `p = 1`, `G = 1`, one token per point: then
/// `y = act(x)`, `dL/dx = act'(x)` and `dL/dp = act(x)`, so the layer's values are the formulas'
/// (every class; GroupedMLP's packed layout too). Kills the same mutations as the function pins
/// when they live in the layer rather than in `Activation` (a layer that calls the wrong
/// activation or derivative).
#[test]
fn activations_through_the_oracle_layer() {
    let x = Array2::from_shape_vec((POINTS.len(), 1), POINTS.to_vec()).unwrap();
    let inputs = tokens(x, Array1::ones(POINTS.len()));
    let g = Array2::ones((POINTS.len(), 1));
    let w = ExpertWeights { fc1_weight: arr2(&[[1.0]]), fc1_bias: None, fc2_weight: arr2(&[[1.0]]), fc2_bias: None };
    let gelu = |x: f64| GELU_TABLE.iter().find(|t| t.0 == x).map(|t| (t.1, t.2)).unwrap_or((0.0, 0.5));
    let formulas: [(Activation, Formula); 4] = [
        (Activation::Silu, &|x| (silu(x), silu_derivative(x))),
        (Activation::Gelu, &gelu),
        (Activation::QuickGelu, &|x| (quick_gelu(x), quick_gelu_derivative(x))),
        (Activation::SquaredRelu, &|x| (squared_relu(x), squared_relu_derivative(x))),
    ];
    for class in LayerClass::ALL {
        for (act, f) in &formulas {
            let cfg = one_expert(class, 1, 1, false, *act);
            let r = run(Reference::ORACLE, &cfg, &w, &inputs, &g);
            for (i, &x) in POINTS.iter().enumerate() {
                let (value, derivative) = f(x);
                assert_close(&format!("{class} {act} output"), x, r.output[[i, 0]], value);
                assert_close(&format!("{class} {act} dL/dp"), x, r.grad_probs[i], value);
                assert_close(&format!("{class} {act} dL/dx"), x, r.grad_input[[i, 0]], derivative);
            }
        }
    }
}

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

// ---------------------------------------------------------------------------------------------
// Storage-dtype rounding points of the eager path (spec §4.8), bf16.
// ---------------------------------------------------------------------------------------------

/// One storage-dtype rounding point of the eager path (spec §4.8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Point {
    /// The fc1 GEMM output, `round(x·W1ᵀ)` (SequentialMLP: before its bias add).
    Fc1,
    /// SequentialMLP's separate fc1 bias add, `round(a + b1)` (TEGroupedMLP adds the bias inside
    /// the GEMM: its one rounding is this one, and [`Point::Fc1`] does not exist there).
    Fc1BiasAdd,
    /// The activation, `round(act(a))` (with GLU `round(act(gate))`).
    Act,
    /// The GLU offset add, `round(linear + offset)`.
    GluOffset,
    /// The GLU product, `round(act(gate)·linear)`.
    GluProduct,
    /// The cast of the probs product, `u = round(z·p)` (fp32 product).
    ProbsProduct,
    /// The fc2 GEMM output, `round(u·W2ᵀ)`.
    Fc2,
    /// The fc2 bias add, `round(y + b2·p)` in fp32, one cast.
    Fc2BiasAdd,
    /// With bf16 probs the bias product `b2·p` is itself a bf16 op.
    Fc2BiasProduct,
}

/// A one-token, one-expert, `h = f = 1` bf16 case; all weights, inputs and (f32 or bf16) probs
/// exactly representable.
#[derive(Clone, Copy, Debug)]
struct Scalar {
    /// The token's one input value.
    x: f32,
    /// fc1 weight of the gate (or the only row without GLU).
    w_gate: f32,
    /// fc1 weight of the linear half (GLU only).
    w_linear: Option<f32>,
    /// fc1 bias (non-GLU cases only).
    b1: Option<f32>,
    /// fc2 weight.
    w2: f32,
    /// fc2 bias.
    b2: Option<f32>,
    /// The token's prob.
    p: f32,
    /// The activation and its formula as written in this file.
    act: (Activation, fn(f64) -> f64),
    /// `glu_linear_offset`.
    offset: f32,
    /// Probs in bf16 (the default router dtype) instead of fp32.
    probs_bf16: bool,
}

impl Scalar {
    fn new(x: f32, w_gate: f32, w2: f32, p: f32, act: (Activation, fn(f64) -> f64)) -> Scalar {
        Scalar { x, w_gate, w_linear: None, b1: None, w2, b2: None, p, act, offset: 0.0, probs_bf16: false }
    }
}

/// Round-to-nearest-even to bf16 (the `half` crate, not the reference's `Dtype`).
fn bf(v: f32) -> f32 {
    bf16::from_f32(v).to_f32()
}

/// One bf16 ulp at `v`.
fn ulp(v: f32) -> f32 {
    let b = bf16::from_f32(v.abs());
    (f32::from(bf16::from_bits(b.to_bits() + 1)) - f32::from(b)).abs()
}

/// The eager chain of spec §4.8 for a [`Scalar`] case, written out independently of the layer:
/// every op computes in f32 (Rust `f32` arithmetic; the activation as the f32 value nearest the
/// formula's) and rounds its result to bf16, except the points in `skip`, which keep f32.
fn eager_chain(s: &Scalar, skip: &[Point]) -> f32 {
    let r = |point: Point, v: f32| if skip.contains(&point) { v } else { bf(v) };
    let act = |v: f32| (s.act.1)(f64::from(v)) as f32;
    // fc1: the product of two bf16 values is exact in f32 (16 significant bits).
    let mut a = r(Point::Fc1, s.x * s.w_gate);
    if let Some(b1) = s.b1 {
        a = r(Point::Fc1BiasAdd, a + b1);
    }
    let z = match s.w_linear {
        None => r(Point::Act, act(a)),
        Some(wl) => {
            let linear = r(Point::Fc1, s.x * wl);
            let linear = if s.offset != 0.0 { r(Point::GluOffset, linear + s.offset) } else { linear };
            r(Point::GluProduct, r(Point::Act, act(a)) * linear)
        }
    };
    let u = r(Point::ProbsProduct, z * s.p);
    let mut y = r(Point::Fc2, u * s.w2);
    if let Some(b2) = s.b2 {
        let bias = if s.probs_bf16 { r(Point::Fc2BiasProduct, b2 * s.p) } else { b2 * s.p };
        y = r(Point::Fc2BiasAdd, y + bias);
    }
    y
}

/// Runs the bf16-emulating reference on a [`Scalar`] case for `class` and returns its output.
fn emulated_output(class: LayerClass, s: &Scalar) -> f32 {
    let glu = s.w_linear.is_some();
    let cfg = LayerConfig {
        add_bias: s.b1.is_some() || s.b2.is_some(),
        glu_linear_offset: f64::from(s.offset),
        probs_dtype: if s.probs_bf16 { Dtype::Bf16 } else { Dtype::F32 },
        ..one_expert(class, 1, 1, glu, s.act.0)
    };
    let fc1 = match s.w_linear {
        None => arr2(&[[f64::from(s.w_gate)]]),
        Some(wl) => arr2(&[[f64::from(s.w_gate)], [f64::from(wl)]]),
    };
    let w = ExpertWeights {
        fc1_bias: cfg.add_bias.then(|| Array1::from_elem(fc1.nrows(), f64::from(s.b1.unwrap_or(0.0)))),
        fc1_weight: fc1,
        fc2_weight: arr2(&[[f64::from(s.w2)]]),
        fc2_bias: cfg.add_bias.then(|| arr1(&[f64::from(s.b2.unwrap_or(0.0))])),
    };
    let inputs = tokens(arr2(&[[f64::from(s.x)]]), arr1(&[f64::from(s.p)]));
    let y = run(Reference::EMULATED, &cfg, &w, &inputs, &Array2::ones((1, 1))).output[[0, 0]];
    let y32 = y as f32;
    assert_eq!(f64::from(y32), y, "{class}: output {y} is not an f32 value");
    y32
}

/// The pin of one rounding point: the hand-derived `expected` is what [`eager_chain`] gives;
/// leaving out `point` alone moves the result by ≥ 1 bf16 ulp (for the final rounding, which
/// cannot, leaves a value that is not bf16) so the case can see that rounding; and every class
/// in `classes` produces `expected` exactly.
fn pin_rounding_point(point: Point, s: &Scalar, expected: f32, classes: &[LayerClass]) {
    assert_eq!(eager_chain(s, &[]), expected, "{point:?}: the hand derivation and the chain disagree");
    let skipped = eager_chain(s, &[point]);
    if point == Point::Fc2BiasAdd {
        assert_ne!(bf(skipped), skipped, "{point:?}: without the final rounding the output must not be bf16");
    } else {
        assert!(
            (skipped - expected).abs() >= ulp(expected),
            "{point:?}: leaving this rounding out gives {skipped}, less than one ulp from {expected}: the case cannot see it"
        );
    }
    for &class in classes {
        let got = emulated_output(class, s);
        assert_eq!(
            got, expected,
            "{class} {point:?}: got {got}, expected {expected} (without this rounding: {skipped})"
        );
    }
}

const SILU: (Activation, fn(f64) -> f64) = (Activation::Silu, silu);
const QUICK_GELU: (Activation, fn(f64) -> f64) = (Activation::QuickGelu, quick_gelu);
const SQUARED_RELU: (Activation, fn(f64) -> f64) = (Activation::SquaredRelu, squared_relu);
const EAGER: [LayerClass; 2] = [LayerClass::Sequential, LayerClass::TeGrouped];

/// fc1 output rounding. squared ReLU, x = 1.7734375, W1 = 1.2578125, p = 0.8125, W2 = 1:
/// `x·W1 = 2.23065185546875` rounds to `a = 2.234375`; `a² = 4.99243…` → 5.0; `·p = 4.0625`
/// (exact) → y = 4.0625. Without the rounding, `(x·W1)² = 4.97580…` → 4.96875, `·p = 4.0371…` →
/// 4.03125: one ulp lower. Kills: an fc1 GEMM whose output stays in f32.
#[test]
fn pin_fc1_output_rounding() {
    let s = Scalar::new(1.7734375, 1.2578125, 1.0, 0.8125, SQUARED_RELU);
    pin_rounding_point(Point::Fc1, &s, 4.0625, &EAGER);
}

/// SequentialMLP rounds the fc1 GEMM output *before* its separate bias add (spec §4.2, §4.8);
/// TEGroupedMLP adds the bias inside the GEMM and rounds once. squared ReLU, x = W1 = 1.5625,
/// b1 = −1.5, p = 0.6875, W2 = 0.625: `x·W1 = 2.44140625` → 2.4375, `+ b1 = 0.9375`; without the
/// first rounding `0.94140625` → 0.94140625 (bf16): the squares differ by ~0.8%, y = 0.37890625
/// (Sequential) vs 0.380859375 (TEGroupedMLP's single rounding). Kills: SequentialMLP adding
/// b1 inside the GEMM, TEGroupedMLP rounding before its bias.
#[test]
fn pin_sequential_fc1_rounds_before_the_bias_add() {
    let s = Scalar { b1: Some(-1.5), ..Scalar::new(1.5625, 1.5625, 0.625, 0.6875, SQUARED_RELU) };
    pin_rounding_point(Point::Fc1, &s, 0.37890625, &[LayerClass::Sequential]);
    let te = eager_chain(&s, &[Point::Fc1]);
    assert_eq!(te, 195.0 / 512.0); // 0.380859375
    assert_eq!(emulated_output(LayerClass::TeGrouped, &s), te, "TEGroupedMLP: bias inside the fc1 GEMM");
}

/// SequentialMLP's fc1 bias add rounds (a separate bf16 op). squared ReLU, x = 1.75, W1 = 1.25,
/// b1 = 0.01953125, p = 0.3125, W2 = 1: `a + b1 = 2.20703125` → 2.203125; `a² = 4.8537…` → 4.84375,
/// `·p` → 1.515625. Unrounded: `4.8710…` → 4.875, `·p` → 1.5234375, one ulp up. Kills: a bias
/// add kept in f32.
#[test]
fn pin_fc1_bias_add_rounding() {
    let s = Scalar { b1: Some(0.01953125), ..Scalar::new(1.75, 1.25, 1.0, 0.3125, SQUARED_RELU) };
    pin_rounding_point(Point::Fc1BiasAdd, &s, 1.515625, &EAGER);
}

/// The activation rounds before the probs product (eager, non-GLU). silu, x = 1.4453125,
/// W1 = W2 = 1, p = 0.8125: `silu(x) = 1.16965…` → 1.171875, `·p = 0.95214…` → 0.953125.
/// Unrounded: `1.16965·p = 0.95034…` → 0.94921875, one ulp lower — which is GroupedMLP's value:
/// its compiled `act·p` chain rounds only once (spec §4.8). Kills: an eager activation kept in
/// f32; GroupedMLP rounding the activation eagerly.
#[test]
fn pin_activation_rounding() {
    let s = Scalar::new(1.4453125, 1.0, 1.0, 0.8125, SILU);
    pin_rounding_point(Point::Act, &s, 0.953125, &EAGER);
    assert_eq!(emulated_output(LayerClass::Grouped, &s), eager_chain(&s, &[Point::Act]), "GroupedMLP");
}

/// The GLU gate's activation rounds on its own (eager SwiGLU). x = 1.8984375, W1 = (1, 1.234375),
/// p = 0.75, W2 = 1: gate 1.8984375, linear `2.3433…` → 2.34375; `silu(gate) = 1.65109…` →
/// 1.6484375, `·linear = 3.8635…` → 3.859375, `·p` → 2.890625. Without the act rounding:
/// `3.8697…` → 3.875, `·p` → 2.90625 (one ulp up). GroupedMLP's fused chain (no act, no
/// product rounding) gives 2.90625 too. Kills: the GLU `act(gate)` kept in f32; GroupedMLP's
/// chain rounded eagerly.
#[test]
fn pin_glu_activation_rounding() {
    let s = Scalar { w_linear: Some(1.234375), ..Scalar::new(1.8984375, 1.0, 1.0, 0.75, SILU) };
    pin_rounding_point(Point::Act, &s, 2.890625, &EAGER);
    let grouped = eager_chain(&s, &[Point::Act, Point::GluProduct]);
    assert_eq!(emulated_output(LayerClass::Grouped, &s), grouped, "GroupedMLP");
}

/// The GLU product rounds before the probs product (eager quick-GEGLU). x = 1.15625,
/// W1 = (1, 1), p = 0.6875, W2 = 1: `quick_gelu(1.15625) = 1.01448…` → 1.015625, `·1.15625 =
/// 1.17431…` → 1.171875, `·p = 0.80566…` → 0.8046875. Without the product rounding: `1.17431·p =
/// 0.80734…` → 0.80859375, one ulp up. Kills: the GLU product kept in f32.
#[test]
fn pin_glu_product_rounding() {
    let s = Scalar { w_linear: Some(1.0), ..Scalar::new(1.15625, 1.0, 1.0, 0.6875, QUICK_GELU) };
    pin_rounding_point(Point::GluProduct, &s, 0.8046875, &EAGER);
}

/// The GLU offset add is a bf16 op (spec §4.3: the offset is a tensor of the input dtype).
/// silu, x = 1, W1 = (1, 0.365234375), offset 1, p = 0.9375, W2 = 1.75: `linear + 1 = 1.365234375`
/// → 1.3671875; `silu(1) = 0.7310…` → 0.73046875, product `0.99868…` → 1.0, `·p = 0.9375`,
/// `·W2 = 1.640625`. Unrounded: `0.99725…` → 0.99609375, → 0.93359375 → 1.6328125, one ulp
/// down. Kills: the offset add kept in f32.
#[test]
fn pin_glu_offset_rounding() {
    // w_linear = 187/512 = 0.365234375 (8 significant bits: a bf16 value).
    let s = Scalar { w_linear: Some(187.0 / 512.0), offset: 1.0, ..Scalar::new(1.0, 1.0, 1.75, 0.9375, SILU) };
    pin_rounding_point(Point::GluOffset, &s, 1.640625, &EAGER);
}

/// `u = z·p` is computed in fp32 and cast to bf16 before fc2 (every class). squared ReLU,
/// x = 1.375, W1 = 1.0234375, p = 0.5625, W2 = 1.375: `x·W1 = 1.40722…` → 1.40625, `z = 1.9775…` → 1.9765625,
/// `·p = 1.11181…` → 1.109375, `·W2 = 1.52539…` → 1.5234375. Unrounded u: `1.11181·1.375 =
/// 1.52874…` → 1.53125, one ulp up. Kills: fc2 fed the f32 product (the cast dropped).
#[test]
fn pin_probs_product_rounding() {
    let s = Scalar::new(1.375, 1.0234375, 1.375, 0.5625, SQUARED_RELU);
    pin_rounding_point(Point::ProbsProduct, &s, 1.5234375, &LayerClass::ALL);
}

/// The fc2 GEMM output rounds before the probs-scaled bias is added (spec §4.5.1 step 7,
/// §4.6). squared ReLU, x = 0.75, W1 = 2, p = 0.6875, W2 = 0.6875, b2 = −1.625: `u = 1.546875`,
/// `u·W2 = 1.06347…` → 1.0625, `+ b2·p (= −1.1171875)` → −0.0546875. Unrounded: −0.0537109375,
/// four ulps away (the cancellation magnifies the first rounding). Kills: fc2 output and bias
/// summed before any rounding (one rounding instead of two).
#[test]
fn pin_fc2_output_rounding() {
    let s = Scalar { b2: Some(-1.625), ..Scalar::new(0.75, 2.0, 0.6875, 0.6875, SQUARED_RELU) };
    pin_rounding_point(Point::Fc2, &s, -0.0546875, &EAGER);
}

/// The fc2 bias add `round(y + b2·p)`, the last rounding of the output. squared ReLU, x = 0.5,
/// W1 = 0.5, p = 0.8125, W2 = 0.875, b2 = 1.375: `u = 0.05078125`, `y = 0.04443359375`,
/// `+ b2·p (= 1.1171875) = 1.16162109375` → 1.1640625. Leaving the rounding out returns the f32
/// value 1.16162109375, not a bf16 number (0.31 ulp off). Kills: a bias add whose result is not
/// cast back to bf16.
#[test]
fn pin_fc2_bias_add_rounding() {
    let s = Scalar { b2: Some(1.375), ..Scalar::new(0.5, 0.5, 0.875, 0.8125, SQUARED_RELU) };
    pin_rounding_point(Point::Fc2BiasAdd, &s, 1.1640625, &EAGER);
}

/// With bf16 probs (the default router dtype), `b2·p` is a bf16 op (spec §4.8). squared ReLU,
/// x = 1.5, W1 = 1.25, p = 0.56640625, W2 = 0.5, b2 = −1.890625: `u = 1.9921875`, `y =
/// 0.99609375`, `b2·p = −1.07086…` → −1.0703125, sum → −0.07421875. Unrounded product: sum
/// `−0.07477…` → −0.07470703125, one ulp away. Kills: the bias product kept in fp32 with bf16
/// probs.
#[test]
fn pin_fc2_bias_product_rounding_with_bf16_probs() {
    let s = Scalar { b2: Some(-1.890625), probs_bf16: true, ..Scalar::new(1.5, 1.25, 0.5, 0.56640625, SQUARED_RELU) };
    pin_rounding_point(Point::Fc2BiasProduct, &s, -0.07421875, &EAGER);
}
