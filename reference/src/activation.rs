//! Elementwise activation functions and their derivatives (spec §4.3), in f64.

use crate::config::Activation;

/// The logistic sigmoid `σ(x) = 1 / (1 + e^{-x})`.
pub fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Standard normal CDF `Φ(x) = (1 + erf(x/√2)) / 2`.
fn normal_cdf(x: f64) -> f64 {
    0.5 * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2))
}

/// Standard normal density `φ(x)`.
fn normal_pdf(x: f64) -> f64 {
    (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

/// The quick-GELU slope 1.702.
pub const QUICK_GELU_ALPHA: f64 = 1.702;

impl Activation {
    /// `act(x)`.
    pub fn apply(self, x: f64) -> f64 {
        match self {
            Activation::Silu => x * sigmoid(x),
            Activation::Gelu => x * normal_cdf(x),
            Activation::QuickGelu => x * sigmoid(QUICK_GELU_ALPHA * x),
            Activation::SquaredRelu => {
                let r = x.max(0.0);
                r * r
            }
        }
    }

    /// `act''(x)`, by a central difference of [`Activation::derivative`] (used only for error
    /// magnitudes, where a relative accuracy of 1e-6 is plenty).
    pub fn second_derivative(self, x: f64) -> f64 {
        let h = 1e-5 * x.abs().max(1.0);
        (self.derivative(x + h) - self.derivative(x - h)) / (2.0 * h)
    }

    /// `act'(x)`.
    pub fn derivative(self, x: f64) -> f64 {
        match self {
            Activation::Silu => {
                let s = sigmoid(x);
                s * (1.0 + x * (1.0 - s))
            }
            Activation::Gelu => normal_cdf(x) + x * normal_pdf(x),
            Activation::QuickGelu => {
                let s = sigmoid(QUICK_GELU_ALPHA * x);
                s * (1.0 + QUICK_GELU_ALPHA * x * (1.0 - s))
            }
            Activation::SquaredRelu => 2.0 * x.max(0.0),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn second_derivatives_match_the_closed_forms() {
        // The error model propagates rounding through act'' (the GLU and activation terms), so
        // its value matters: closed forms written out, at points on both sides of 0.
        use super::Activation;
        let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
        let silu2 = |x: f64| {
            let s = sigmoid(x);
            s * (1.0 - s) * (2.0 + x * (1.0 - 2.0 * s))
        };
        let quick2 = |x: f64| 1.702 * silu2(1.702 * x);
        let pdf = |x: f64| (-x * x / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
        let gelu2 = |x: f64| pdf(x) * (2.0 - x * x);
        for x in [-3.0, -0.7, 0.4, 1.3, 5.0] {
            for (act, want) in [
                (Activation::Silu, silu2(x)),
                (Activation::QuickGelu, quick2(x)),
                (Activation::Gelu, gelu2(x)),
                (Activation::SquaredRelu, if x > 0.0 { 2.0 } else { 0.0 }),
            ] {
                let got = act.second_derivative(x);
                assert!((got - want).abs() <= 1e-6 * want.abs().max(1e-3), "{act:?}''({x}) = {got}, want {want}");
            }
        }
    }

    use super::*;

    #[test]
    fn derivatives_match_central_differences() {
        for act in Activation::ALL {
            for &x in &[-3.1, -0.7, -1e-3, 0.3, 1.0, 2.5, 6.0] {
                let h = 1e-6;
                let fd = (act.apply(x + h) - act.apply(x - h)) / (2.0 * h);
                assert!((fd - act.derivative(x)).abs() < 1e-7, "{act} at {x}: {fd} vs {}", act.derivative(x));
            }
        }
    }

    #[test]
    fn known_values() {
        // gelu(1) = Φ(1) = 0.8413447460685429 (exact erf, not the tanh approximation 0.8411919906).
        assert!((Activation::Gelu.apply(1.0) - 0.841_344_746_068_542_9).abs() < 1e-15);
        assert_eq!(Activation::SquaredRelu.apply(-2.0), 0.0);
        assert_eq!(Activation::SquaredRelu.apply(3.0), 9.0);
        assert!((Activation::Silu.apply(1.0) - 0.731_058_578_630_004_9).abs() < 1e-15);
    }
}
