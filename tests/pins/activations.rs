//! The activation formulas, on their own and through the f64 oracle layer.

use super::{
    assert_close, one_expert, quick_gelu, quick_gelu_derivative, run, silu, silu_derivative, squared_relu,
    squared_relu_derivative, tokens, GELU_TABLE, POINTS,
};
use moe_reference::{Activation, ExpertWeights, LayerClass, Reference};
use ndarray::{arr2, Array1, Array2};

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
