//! The fp8 terms of the error model (oracle only): the quantization error bound of each
//! quantized operand and the accumulation term of an fp8 GEMM.
//!
//! Quantizing a value `v` that an implementation holds with error `e_v` (so `|v_impl| ≤ |v| +
//! e_v`) gives, with `s⁻¹` the dequantization factor of its block:
//!
//! ```text
//! q(v) = u_fmt·(|v| + e_v) + 2·u_f32·|v| + ½·sub_fmt·s⁻¹ + max(0, |v| + e_v − max_fmt·s⁻¹)
//! ```
//!
//! * `u_fmt` = 2⁻⁴ (E4M3) or 2⁻³ (E5M2): half an fp8 ulp, relative (round to nearest);
//! * `2·u_f32`: the f32 product `v·scale` before the cast and the f32 `scale_inv = 1/scale`;
//! * `½·sub_fmt·s⁻¹`: the subnormal floor at the scale (`sub` = 2⁻⁹ E4M3, 2⁻¹⁶ E5M2);
//! * the last term, saturation, is non-zero only for delayed scaling, whose scale comes from
//!   the history rather than from the tensor itself.
//!
//! `s⁻¹` is bounded from the amax over the whole operand (which bounds every block's amax):
//! `amax/max_fmt`, doubled for power-of-2 scales and MXFP8 (their scale is rounded to a power of
//! two), both from the oracle's `|v| + e_v`; delayed scaling uses the state's own `scale_inv`.

use super::fp8::{Fp8Operand, Fp8State};
use crate::dtype::Dtype;
use crate::fp8::{Fp8Config, Fp8Recipe};
use ndarray::Array2;

/// The accumulation unit of an fp8 GEMM: Hopper's fast accumulation (TE's fprop default for
/// the per-tensor recipes) keeps fewer bits than f32 before promotion; 2⁻¹³ per `√K` is taken
/// as its bound (not measured here; DeepGEMM reports about 14 bits).
pub(super) const U_FP8_ACCUMULATION: f64 = 1.0 / 8192.0;

/// The fp8 side of one segment's error model.
pub(super) struct Fp8Bound<'a> {
    /// The layer's fp8 configuration.
    pub(super) config: Fp8Config,
    /// The delayed-scaling state the run started from (delayed recipe only).
    pub(super) state: Option<&'a Fp8State>,
    /// The local expert.
    pub(super) expert: usize,
}

impl Fp8Bound<'_> {
    /// `q(v)` of every element of operand `op` whose oracle values are `v` and whose
    /// implementation error bounds are `err` (see the module doc).
    pub(super) fn quantization(&self, op: Fp8Operand, v: &Array2<f64>, err: &Array2<f64>) -> Array2<f64> {
        let fmt = self.config.format.format_for(op.role());
        let u = 2f64.powi(-(fmt.mantissa_bits() as i32) - 1);
        let u32_ = Dtype::F32.unit_roundoff();
        let max = f64::from(fmt.max_finite());
        let amax = v.iter().zip(err).fold(0f64, |m, (&a, &e)| m.max(a.abs() + e));
        let delayed =
            self.state.and_then(|s| s.get(self.expert, op)).filter(|_| self.config.recipe == Fp8Recipe::Delayed);
        let scale_inv = match delayed {
            Some(d) => f64::from(d.scale_inv()) * (1.0 + 2.0 * u32_),
            None => {
                let pow2 = self.config.power_2_scales || self.config.recipe == Fp8Recipe::Mxfp8;
                amax / max * if pow2 { 2.0 } else { 1.0 } * (1.0 + 4.0 * u32_)
            }
        };
        let floor = 0.5 * fmt.min_subnormal() * scale_inv;
        ndarray::Zip::from(v).and(err).map_collect(|&x, &e| {
            let mag = x.abs() + e;
            let sat = if delayed.is_some() { (mag - max * scale_inv).max(0.0) } else { 0.0 };
            u * mag + 2.0 * u32_ * x.abs() + floor + sat
        })
    }

    /// The accumulation term's factor for a `K`-long fp8 GEMM: `√K·u_acc` plus two f32 roundings
    /// per K tile (split accumulation) and two for the final scaling, times the bound
    /// `(1 + u_a)(1 + u_b) ≤ 1.5` of the dequantized magnitudes over the oracle's.
    pub(super) fn accumulation(k: usize) -> f64 {
        let u32_ = Dtype::F32.unit_roundoff();
        1.5 * ((k.max(1) as f64).sqrt() * U_FP8_ACCUMULATION + 2.0 * u32_ * (k.div_ceil(32) as f64 + 1.0))
    }

    /// The bound of `activation_func_fp8_input_store` on a value `a` held with error `e`:
    /// PyTorch's unscaled E4M3 cast (`u = 2⁻⁴`, floor 2⁻¹⁰); a magnitude that can reach 464
    /// becomes NaN in the implementation, so its bound is infinite.
    pub(super) fn input_store(a: f64, e: f64) -> f64 {
        let mag = a.abs() + e;
        if mag >= 464.0 {
            f64::INFINITY
        } else {
            mag / 16.0 + 2f64.powi(-10)
        }
    }
}
