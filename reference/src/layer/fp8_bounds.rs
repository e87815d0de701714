//! The fp8 terms of the error model (oracle only): the quantization error bound of each
//! quantized operand, the accumulation term of an fp8 GEMM, and how both propagate.
//!
//! # One operand
//!
//! Quantizing a value `v` that an implementation holds with error `e_v` (so `|v_impl| ≤ |v| +
//! e_v`) moves it by at most half an fp8 ulp at its scale. With `s⁻¹` the dequantization factor
//! of its block, the half ulp of `v_impl·s` is at most `u_fmt·|v_impl·s|` in the normal range (the
//! top of its binade) and `½·sub_fmt` below it, so per element
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
//! `s⁻¹` is bounded from the amax over the whole operand (which bounds every block's amax, and
//! every shard's under EP/ETP): `amax/max_fmt`, doubled for power-of-2 scales and MXFP8 (their
//! scale is rounded to a power of two), both from the oracle's `|v| + e_v`; delayed scaling uses
//! the state's own `scale_inv`. The bound does not use the block's exact scale because the
//! implementation's scale depends on its layout (a TP shard has its own amax) and, for derived
//! operands, on its own rounding.
//!
//! # Through a GEMM: the fp8 channel
//!
//! Every result's bound is `E + R`. `E` is the storage part of `layer::bounds` (roundings to
//! the storage dtype and f32, worst case over `K` for propagated errors, `√K·u_f32·Σ|terms|` for
//! accumulation). `R`, the fp8 channel, carries the quantization errors and what they become:
//! for `C = A·B` with `A = a + δa`, `B = b + δb`, where the `δ` are the quantization moves of
//! different elements (bounded per element by `qa = q(a)`, `qb = q(b)`) plus the fp8 channel of
//! the operands' own inputs (`ra`, `rb`),
//!
//! ```text
//! C − a·b = Σ_k (δa_ik·b_kj + a_ik·δb_kj) + Σ_k δa_ik·δb_kj
//! R(C)_ij = √(Σ_k ((qa + ra)_ik·|b_kj| + |a_ik|·(qb + rb)_kj)²)         (root sum of squares)
//! E(C)_ij += Σ_k (ea + ra + qa)_ik·(qb + rb)_kj                          (second order, worst case)
//! ```
//!
//! The root sum of squares is to quantization what the `√K` accumulation model is to f32
//! rounding: rounding errors of different elements are not aligned, so their sum over `K` grows
//! like `√K`, not `K`. With `|δ| ≤ q` and independent, zero-mean moves the sum has a standard
//! deviation of at most `R/√3`, so `C_SAFETY·R` is `3.5σ` on the fp8 channel alone (more with the
//! `rms(S)` floor of the comparison). It is a model, not a worst case: a tensor whose elements
//! all round the same way against same-signed weights (constant inputs) can exceed it. The worst
//! case `Σ_k` (the previous model) was 4-5× wider on small layers and only saw a scale 16× off.
//! Elementwise steps (the activation, its backward, the probs product) propagate `R` like `E`
//! (`|f'|·R`), without their roundings, and with each derivative taken at its largest over
//! `a ± R` (the fp8 errors can carry an input across a kink: squared ReLU's `f''` jumps at 0, so
//! a gate just below 0 in the oracle can have `f' > 0` in an implementation); row and column sums (bias and probs gradients) take the
//! root sum of squares too. `activation_func_fp8_input_store`'s unscaled E4M3 cast of the
//! activation input is an fp8 rounding of each element, so it enters `R`.
//!
//! The accumulation term ([`Fp8Bound::accumulation`], [`fp8_accumulation_factor`]) stays in `E`;
//! for blockwise it counts the MMA's reduced-precision run only up to one 128-wide scale block,
//! the GEMM's f32 promotion.
//!
//! # Two runs that quantize alike
//!
//! Padding-neutrality and probs-linearity compare two fp8 runs of one implementation whose
//! input, weights and upstream gradient are the same tensors (padding adds zero rows, which
//! change no amax; doubled probs leave them alone), so both quantize them identically and their
//! quantization cancels. What may still differ are the derived operands (fc2's input `u`, fc1's
//! output gradient `da`): a storage-level difference between the runs can move one across an
//! fp8 rounding boundary (or, with doubled probs and delayed scaling, a subnormal code need not
//! double). [`super::Fp8Channel::Paired`] keeps only those two operands' terms in the fp8
//! channel.

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
    /// [`super::Fp8Channel::Paired`]: the operands both runs quantize alike (the input, the
    /// weights, the upstream gradient) contribute nothing.
    pub(super) paired: bool,
}

impl Fp8Bound<'_> {
    /// `q(v)` of every element of operand `op` whose oracle values are `v` and whose
    /// implementation error bounds are `err` (see the module doc).
    pub(super) fn quantization(&self, op: Fp8Operand, v: &Array2<f64>, err: &Array2<f64>) -> Array2<f64> {
        if self.paired && !matches!(op, Fp8Operand::Fc2Input | Fp8Operand::Fc1GradOutput) {
            return Array2::zeros(v.raw_dim());
        }
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

    /// The accumulation term's factor for a `K`-long fp8 GEMM of this recipe
    /// ([`fp8_accumulation_factor`]).
    pub(super) fn accumulation(&self, k: usize) -> f64 {
        fp8_accumulation_factor(k, self.config.recipe)
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

/// The error model's accumulation term of a `K`-long fp8 GEMM of `recipe`, per unit of
/// `Σ|terms|`: `1.5·(√K_acc·2⁻¹³ + 2·u_f32·(⌈K/32⌉ + 1))` (module doc; what the oracle's running
/// bound adds to every fp8 GEMM result on top of the f32 accumulation term
/// `√K·u_f32·Σ|terms|`), times the bound `(1 + u_a)(1 + u_b) ≤ 1.5` of the dequantized
/// magnitudes over the oracle's. `K_acc` is the run the MMA accumulates before an f32
/// promotion: `K` for the per-tensor recipes (fast accumulation may run the whole `K`) and
/// MXFP8, at most `BLOCK_PROMOTION` = 128 for blockwise, whose GEMM applies each 128-wide K
/// block's scales to that block's partial sum in f32 (DeepSeek's promotion; cuBLASLt's
/// `VEC128_32F`/`BLK128x128_32F` scale modes): the Higham-style `√n·u·Σ|terms|` bound of each
/// block, summed over blocks, is `√128·u·Σ|terms|`. Checks that recompute one fp8 GEMM from its
/// dequantized operands (the sampled checks of `moe_harness::sampled`) take the same term.
pub fn fp8_accumulation_factor(k: usize, recipe: Fp8Recipe) -> f64 {
    let u32_ = Dtype::F32.unit_roundoff();
    let k_acc = match recipe {
        Fp8Recipe::Blockwise => k.min(BLOCK_PROMOTION),
        Fp8Recipe::Tensorwise | Fp8Recipe::Delayed | Fp8Recipe::Mxfp8 => k,
    };
    1.5 * ((k_acc.max(1) as f64).sqrt() * U_FP8_ACCUMULATION + 2.0 * u32_ * (k.div_ceil(32) as f64 + 1.0))
}

/// The K run a blockwise fp8 GEMM accumulates in the MMA before its f32 promotion (one 128-wide
/// scale block).
pub const BLOCK_PROMOTION: usize = 128;
