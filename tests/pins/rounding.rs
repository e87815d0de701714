//! The storage-dtype rounding points of the eager path (spec §4.8), bf16.

use super::{one_expert, quick_gelu, run, silu, squared_relu, tokens};
use half::bf16;
use moe_reference::{Activation, Dtype, ExpertWeights, LayerClass, LayerConfig, Reference};
use ndarray::{arr1, arr2, Array1, Array2};

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
