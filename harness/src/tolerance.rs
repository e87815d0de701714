//! The error model: how far an implementation computing in a storage dtype may be from the f64
//! oracle on the same (dtype-representable) inputs.
//!
//! # Model
//!
//! An element passes when
//!
//! ```text
//! |got − exp| ≤ rtol · (S + rms(S_block)) + A + atol
//! ```
//!
//! * `S` is the oracle's **error scale** of the element
//!   ([`moe_reference::layer::ErrorScales`]): a first-order running error bound, i.e. the
//!   magnitude the element's value would move by if every input and every rounded intermediate
//!   on its path moved by one unit of relative error. Sums inside it are sums of absolute values
//!   of the terms, so an element that is the small difference of large GEMM terms (or of a large
//!   GEMM term and a bias) gets the tolerance of those terms. Without an oracle (plain tensor
//!   comparisons) `S = |exp|`.
//! * `rms(S_block)` is the root-mean-square of `S` over the tensor (over the expert block, for
//!   weight gradients): a floor that keeps near-zero elements of a busy tensor from demanding
//!   more than the tensor's precision. Because it is per expert block, an expert with no
//!   tokens has `S = 0` everywhere and its gradients must be exactly zero.
//! * `A` is the oracle's **allowance** for rounding-ambiguous branches: with a GLU clamp, a
//!   pre-activation within rounding distance of `c` may take either side of the mask in a
//!   storage-dtype implementation, switching a gradient term on or off. `A` is the size of
//!   that term (zero without a clamp).
//! * `atol = C_DEPTH · K · η` with `η` the dtype's subnormal spacing: underflow makes absolute,
//!   not relative, errors (matters for f16, whose subnormals start at 6.1e-5).
//!
//! `rtol = C_DEPTH · u_storage + C_ACC · √K · u_f32`:
//!
//! * `u_storage` is the storage dtype's unit roundoff (2⁻⁸ bf16, 2⁻¹¹ f16, 2⁻²⁴ f32). `S`
//!   charges one `u` per input; each rounding point on an element's path adds at most one more
//!   `u·S`, and the longest paths (fc1 weight and bias grads through a GLU: `x`, `a`, the
//!   clamp, `act(g)`, `l + offset`, `z`, `u`, `du`, `dz`, the two GLU product grads, `da`,
//!   `dW1`) have about 13 when their rounding errors line up (a bias-dominated pre-activation
//!   rounds the same way in every row). `C_DEPTH = 32` leaves a 2x margin over that; the
//!   largest error seen for the emulating reference over 4,000 random cases of every dtype and
//!   class was 0.43 of the resulting bound (f16 GLU-gelu fc1 bias grad over 129 tokens).
//! * `√K · u_f32` is the typical growth of f32 accumulation error over a contraction of length
//!   `K` (the largest of `h`, `N1` and the largest expert segment); `C_ACC = 4` covers the
//!   maximum over many elements. It matters only for fp32 storage.
//!
//! Comparisons between two f64 computations (the parallel decomposition of the oracle, padding
//! neutrality) use the same formula with `u = 2⁻⁵³` for both terms.
//!
//! These constants are fixed for the dtype; no test tunes them.

use moe_reference::Dtype;

/// Depth factor: storage roundings on the longest path, with amplification headroom.
pub const C_DEPTH: f64 = 32.0;
/// Accumulation factor on `√K · u`.
pub const C_ACC: f64 = 4.0;

/// A relative tolerance with an rms-scaled floor and an underflow floor (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Tolerance {
    /// The relative factor `rtol`.
    pub rtol: f64,
    /// The absolute underflow floor `atol`.
    pub atol: f64,
}

impl Tolerance {
    /// An implementation computing in `dtype` against the f64 oracle, for contraction length `k`.
    pub fn for_dtype(dtype: Dtype, k: usize) -> Tolerance {
        let u32_ = Dtype::F32.unit_roundoff();
        Tolerance {
            rtol: C_DEPTH * dtype.unit_roundoff() + C_ACC * (k.max(1) as f64).sqrt() * u32_,
            atol: C_DEPTH * k.max(1) as f64 * dtype.subnormal_spacing(),
        }
    }

    /// Two f64 computations of the same function that differ only in summation order.
    pub fn f64_reordering(k: usize) -> Tolerance {
        let u = 2f64.powi(-53);
        Tolerance {
            rtol: C_DEPTH * u + C_ACC * (k.max(1) as f64).sqrt() * u,
            atol: 0.0,
        }
    }

    /// Exact equality.
    pub const EXACT: Tolerance = Tolerance {
        rtol: 0.0,
        atol: 0.0,
    };

    /// The bound for one element of scale `scale` in a block of rms scale `rms`.
    pub fn bound(&self, scale: f64, rms: f64) -> f64 {
        self.rtol * (scale.abs() + rms) + self.atol
    }

    /// The same tolerance scaled by `factor` (for properties that compare two storage-dtype
    /// runs, each within `self` of the oracle: `factor = 2`).
    pub fn times(self, factor: f64) -> Tolerance {
        Tolerance {
            rtol: self.rtol * factor,
            atol: self.atol * factor,
        }
    }
}

impl std::fmt::Display for Tolerance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.atol > 1e-30 {
            write!(f, "rtol {:.2e} atol {:.1e}", self.rtol, self.atol)
        } else {
            write!(f, "rtol {:.2e}", self.rtol)
        }
    }
}
