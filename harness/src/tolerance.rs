//! The error model: how far an implementation computing in a storage dtype may be from the f64
//! oracle on the same (dtype-representable) inputs.
//!
//! # Model
//!
//! An element passes when
//!
//! ```text
//! |got − exp| ≤ C_SAFETY · (S + A + rms(S_block))
//! ```
//!
//! * `S` is the oracle's **running error bound** of the element
//!   ([`moe_reference::layer::ErrorScales`]), in absolute units, computed for the configured
//!   storage dtype along the eager rounding points of spec §4.8: every operation that rounds a
//!   value `v` to the storage dtype contributes `u·|v| + η` (unit roundoff `u` = 2⁻⁸ bf16,
//!   2⁻¹¹ f16, 2⁻²⁴ f32; subnormal spacing `η`), every f32 accumulation over `K` terms
//!   contributes `√K·u_f32·Σ|terms|`, and these are propagated to first order through every
//!   later GEMM (`err(A)·|B|`), activation (`|f'|·err`) and product. Sums are over absolute
//!   values, so an element that is the small difference of large terms gets the error of those
//!   terms. Inputs, weights, probs and the upstream gradient carry no error: both sides see the
//!   same values. An expert without tokens has `S = 0`: its gradients must be exactly zero.
//! * `A` is the oracle's **allowance** for rounding-ambiguous branches: with a GLU clamp, a
//!   pre-activation within rounding distance of `±c` may fall on either side of the mask in a
//!   storage-dtype implementation, switching a gradient term of size `A` on or off.
//! * `rms(S_block)` (the root-mean-square of `S` over the tensor, or over one expert's block of
//!   a weight gradient) is a floor so that an element whose own bound is tiny is held to the
//!   precision of its tensor.
//! * `C_SAFETY = 2`: the first-order bound with the `√K` accumulation model was reached to
//!   within 0.99 by the emulating reference over 6,000 random cases of every dtype and class
//!   (f16 GLU fc1 weight grads); 2 leaves a margin for implementations that accumulate in
//!   another order.
//!
//! The constants are fixed; no test tunes them. The sharded layer (`parallel-decomposition`)
//! adds the ETP reduction's rounding to `S` (see `properties/parallel.rs`); every GPU check
//! derives its bound from the same per-element terms ([`rounding`], [`f32_accumulation`],
//! [`gemm_element_scale`]).
//!
//! # FP8
//!
//! With `LayerConfig::fp8` set the oracle stays unquantized and `S` gains the quantization of
//! every operand TE quantizes (`moe_reference::layer` fp8 module doc: `x`, `W` in fprop, `dy`,
//! `Wᵀ` in dgrad, `dyᵀ`, `xᵀ` in wgrad, for fc1 and fc2). An operand held by the implementation
//! with error `e_v` moves by at most half an fp8 ulp at its scale, `q(v) = u_fmt·(|v| + e_v) +
//! 2·u_f32·|v| + ½·sub_fmt·s⁻¹ (+ saturation for delayed scaling)`, `u_fmt` = 2⁻⁴ (E4M3) or 2⁻³
//! (E5M2), `s⁻¹` bounded from the operand's amax (doubled for power-of-2 and E8M0 scales) or
//! taken from the delayed-scaling state. These moves form an fp8 channel `R` of the bound beside
//! the storage part `E` (`S = E + R`): each GEMM `A·B` adds to `R` the root sum of squares over
//! `K` of `(q_A + r_A)·|B| + |A|·(q_B + r_B)` (quantization errors of different elements add like
//! the √K accumulation model's roundings, not in line), to `E` the second-order
//! `(e_A + r_A + q_A)·(q_B + r_B)` and an accumulation term `1.5·(√K_acc·2⁻¹³ + 2·u_f32·(⌈K/32⌉ +
//! 1))·Σ|terms|` (Hopper's fast accumulation is not modelled bit for bit; 2⁻¹³ stands for its ~14
//! bits; `K_acc` is the run accumulated before an f32 promotion: `K` for the per-tensor recipes
//! and MXFP8, at most 128 for blockwise, whose GEMM scales and promotes each 128-wide K block).
//! `R` goes through the activation like `E` (without roundings).
//! `activation_func_fp8_input_store` adds PyTorch's unscaled e4m3 cast (`|a|/16 + 2⁻¹⁰`, infinite
//! from 464 where the cast gives NaN) to `R` of the backward's activation input. A clamped GLU's
//! ambiguity window widens by the fp8 units. The derivation is the module doc of
//! `moe_reference::layer`'s `fp8_bounds`.
//!
//! The fp8 channel is a statistical model, like the `√K` accumulation term (not a worst case:
//! constant inputs against same-signed weights can exceed it). It is tight enough that a scale 2×
//! off in any one operand (one exponent step) fails `matches-oracle` under every recipe
//! (`tests/fp8_layers.rs`); a 20% scale error is at the level of the fp8 noise itself and is left
//! to aggregate measures (`calc_diff`, reported) or to the comparison with the reference's fp8
//! emulation. A skipped quantization makes the result *more* accurate, so no comparison with the
//! unquantized oracle can see it; the bit-exact comparison with the fp8 emulation does
//! (`tests/fp8_layers.rs`).
//!
//! Padding-neutrality and probs-linearity compare two fp8 runs of the backend that quantize
//! their input, weights and upstream gradient alike (zero rows change no amax; doubled probs
//! leave them alone), so their bound's fp8 channel counts only the derived operands, fc2's input
//! and fc1's output gradient, which a storage-level difference between the runs can move across
//! an fp8 rounding boundary (`oracle_with_scales_paired`, `Fp8Channel::Paired`). The sharded
//! property's shards quantize differently and carry the whole channel, about a quarter of the
//! largest output on a layer with `h = f = 32`: a doubled ETP partial stays inside it there
//! (`tests/self_test.rs`, fp8 verdict matrix).
//!
//! # Checks without a whole-layer oracle run
//!
//! Where the oracle cannot be run on the whole problem (model-sized layers sampled by
//! `moe_gpu::sampled`, one grouped GEMM in `tests/gpu_grouped.rs`), the same model is written
//! out for the one operation checked, with the terms below ([`rounding`], [`f32_accumulation`],
//! [`gemm_element_scale`]: the terms the oracle's running bound adds at each rounding point),
//! and the element passes under the same [`Tolerance::error_model`]. The module doc of
//! `moe_harness::sampled` derives its sampled-row, intermediate, weight-grad-element and
//! projection bounds from these; under a row-local fp8 recipe (blockwise, MXFP8) its GEMM-rows
//! and weight-grad checks take the dequantized fp8 operands as exact and add
//! [`fp8_accumulation`].

use moe_reference::Dtype;

/// Safety factor on the oracle's first-order running error bound.
pub const C_SAFETY: f64 = 2.0;

/// The model's term for one rounding of a value `v` to `dtype`: `u·|v| + η` (unit roundoff `u`,
/// subnormal spacing `η`).
pub fn rounding(dtype: Dtype, v: f64) -> f64 {
    dtype.unit_roundoff() * v.abs() + dtype.subnormal_spacing()
}

/// The model's term for an f32 accumulation of `k` terms whose absolute values sum to
/// `sum_abs`: `√K·u_f32·Σ|terms|` (`K` at least 1).
pub fn f32_accumulation(k: usize, sum_abs: f64) -> f64 {
    (k.max(1) as f64).sqrt() * Dtype::F32.unit_roundoff() * sum_abs.abs()
}

/// The running error bound `S` of one GEMM output element whose operands are exact (both sides
/// see the same values): the f32 accumulation of its `k` products, whose absolute values sum to
/// `sum_abs`, and the rounding of the result `value` to the output dtype `dtype`:
/// `u·|value| + η + √K·u_f32·Σ|a_k·b_k|`.
pub fn gemm_element_scale(dtype: Dtype, value: f64, k: usize, sum_abs: f64) -> f64 {
    rounding(dtype, value) + f32_accumulation(k, sum_abs)
}

/// The model's accumulation term of a `k`-long fp8 GEMM of `recipe` whose products' absolute
/// values sum to `sum_abs`, on top of [`f32_accumulation`]:
/// `1.5·(√K_acc·2⁻¹³ + 2·u_f32·(⌈K/32⌉ + 1))·Σ|terms|`, `K_acc` = `K`, or at most 128 for
/// blockwise (`moe_reference::layer::fp8_accumulation_factor`, the term the oracle adds to every
/// fp8 GEMM result).
pub fn fp8_accumulation(k: usize, sum_abs: f64, recipe: moe_reference::Fp8Recipe) -> f64 {
    moe_reference::layer::fp8_accumulation_factor(k, recipe) * sum_abs.abs()
}

/// A tolerance: `bound = rtol·(scale + rms(scale_block)) + atol`, where `scale` is the oracle's
/// error bound (then `rtol` is a safety factor) or `|exp|` (then `rtol` is relative).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Tolerance {
    /// The factor on the scale.
    pub rtol: f64,
    /// An absolute floor.
    pub atol: f64,
}

impl Tolerance {
    /// Exact equality.
    pub const EXACT: Tolerance = Tolerance { rtol: 0.0, atol: 0.0 };

    /// Against the f64 oracle's running error bounds (which carry the dtype and the contraction
    /// lengths): `C_SAFETY·(S + A + rms(S))`.
    pub fn error_model() -> Tolerance {
        Tolerance { rtol: C_SAFETY, atol: 0.0 }
    }

    /// The bound for one element of scale `scale` in a block of rms scale `rms`.
    pub fn bound(&self, scale: f64, rms: f64) -> f64 {
        self.rtol * (scale.abs() + rms) + self.atol
    }

    /// The same tolerance scaled by `factor` (for properties that compare two storage-dtype
    /// runs, each within the bound of the oracle: `factor = 2`).
    pub fn times(self, factor: f64) -> Tolerance {
        Tolerance { rtol: self.rtol * factor, atol: self.atol * factor }
    }
}

impl std::fmt::Display for Tolerance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.atol > 1e-30 {
            write!(f, "{:.2e}x, atol {:.1e}", self.rtol, self.atol)
        } else {
            write!(f, "{:.2e}x", self.rtol)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The terms are the oracle's: `u·|v| + η` per rounding, `√K·u_f32·Σ|terms|` per f32 sum.
    #[test]
    fn gemm_element_scale_is_one_rounding_plus_an_f32_accumulation() {
        let s = gemm_element_scale(Dtype::Bf16, -1.5, 16, 10.0);
        assert_eq!(s, 2f64.powi(-8) * 1.5 + 2f64.powi(-133) + 4.0 * 2f64.powi(-24) * 10.0);
        assert_eq!(rounding(Dtype::F16, 0.0), 2f64.powi(-24));
        assert_eq!(f32_accumulation(0, 3.0), 3.0 * 2f64.powi(-24));
    }

    /// A dot product of `a`, `b` accumulated in f32 whose running sum keeps only 13 fraction bits
    /// (truncated after every add: an accumulator of Hopper's fast-accumulation precision, which
    /// the model's 2⁻¹³ stands for), promoted to an exact sum every `promote` terms.
    fn reduced_precision_dot(a: &[f32], b: &[f32], promote: usize) -> f64 {
        let keep = |v: f32| f32::from_bits(v.to_bits() & !((1u32 << 10) - 1));
        let mut total = 0f64;
        for (ca, cb) in a.chunks(promote).zip(b.chunks(promote)) {
            let partial = ca.iter().zip(cb).fold(0f32, |acc, (&x, &y)| keep(acc + x * y));
            total += f64::from(partial);
        }
        total
    }

    /// Why the fp8 GEMM term exists and why blockwise's stops at one 128-wide block: dot products
    /// of K = 2048 random fp8-sized products accumulated at 13 fraction bits stay within
    /// `C_SAFETY·(f32 term + fp8 term)` of the exact sum, for the whole K in one run under the
    /// per-tensor term and for 128-term runs (blockwise's promotion) under the blockwise term;
    /// without the fp8 term (the f32 one alone) they do not, nor do whole-K runs under the
    /// blockwise term. A model that dropped the fp8 term, or took `K_acc = 128` for a GEMM that
    /// does not promote, fails here.
    #[test]
    fn the_fp8_accumulation_term_covers_a_reduced_precision_accumulator() {
        use moe_reference::Fp8Recipe;
        let k = 2048;
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut uniform = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let (mut worst_whole, mut worst_block, mut worst_block_model_on_whole, mut worst_f32_only) =
            (0f64, 0f64, 0f64, 0f64);
        for _ in 0..200 {
            let a: Vec<f32> = (0..k).map(|_| uniform()).collect();
            let b: Vec<f32> = (0..k).map(|_| uniform()).collect();
            let exact: f64 = a.iter().zip(&b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum();
            let sum_abs: f64 = a.iter().zip(&b).map(|(&x, &y)| (f64::from(x) * f64::from(y)).abs()).sum();
            let bound = |fp8: f64| C_SAFETY * (f32_accumulation(k, sum_abs) + fp8);
            let (whole, block) = (reduced_precision_dot(&a, &b, k), reduced_precision_dot(&a, &b, 128));
            let tensorwise = bound(fp8_accumulation(k, sum_abs, Fp8Recipe::Tensorwise));
            let blockwise = bound(fp8_accumulation(k, sum_abs, Fp8Recipe::Blockwise));
            worst_whole = worst_whole.max((whole - exact).abs() / tensorwise);
            worst_block = worst_block.max((block - exact).abs() / blockwise);
            worst_block_model_on_whole = worst_block_model_on_whole.max((whole - exact).abs() / blockwise);
            worst_f32_only = worst_f32_only.max((whole - exact).abs() / bound(0.0));
        }
        eprintln!(
            "fast-accumulation emulation, K = {k}: whole run / per-tensor bound {worst_whole:.3}, 128-runs / blockwise {worst_block:.3}, whole run / blockwise {worst_block_model_on_whole:.3}, whole run / f32 term alone {worst_f32_only:.3}"
        );
        assert!(worst_whole <= 1.0, "whole-K run against the per-tensor term: {worst_whole}");
        assert!(worst_block <= 1.0, "128-term runs against the blockwise term: {worst_block}");
        assert!(worst_f32_only > 1.0, "the f32 term alone must not cover it: {worst_f32_only}");
        assert!(
            worst_block_model_on_whole > 1.0,
            "a whole-K run must exceed the blockwise term: {worst_block_model_on_whole}"
        );
    }
}
