//! The error model: how far an implementation computing in a storage dtype may be from the f64
//! oracle on the same (dtype-representable) inputs.
//!
//! # Model
//!
//! An element passes when
//!
//! ```text
//! |got − exp| ≤ rtol · (|exp| + rms(exp_block))
//! ```
//!
//! where `rms(exp_block)` is the root-mean-square of the expected tensor (of the expert block,
//! for weight gradients). The `rms` term absorbs cancellation: an output element that is the
//! small difference of large GEMM terms carries the absolute error of those terms, not of its
//! own magnitude. Because it is taken per expert block, an expert with no tokens has
//! `rms = 0` and its gradients must be exactly zero.
//!
//! `rtol = C_DEPTH · u_storage + C_ACC · √K · u_f32`:
//!
//! * `u_storage` is the storage dtype's unit roundoff (2⁻⁸ bf16, 2⁻¹¹ f16, 2⁻²⁴ f32). The
//!   longest chain of storage roundings in the layer (the input gradient: `du`, `dz`, the GLU
//!   product grads, `da`, `dx`) has about 6 rounding points, and the activation derivative can
//!   amplify a relative error by a small factor, so `C_DEPTH = 16`.
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
pub const C_DEPTH: f64 = 16.0;
/// Accumulation factor on `√K · u`.
pub const C_ACC: f64 = 4.0;

/// A relative tolerance with an rms-scaled floor (see the module docs for the formula).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Tolerance {
    /// The relative factor `rtol`.
    pub rtol: f64,
}

impl Tolerance {
    /// An implementation computing in `dtype` against the f64 oracle, for contraction length `k`.
    pub fn for_dtype(dtype: Dtype, k: usize) -> Tolerance {
        let u32_ = Dtype::F32.unit_roundoff();
        Tolerance { rtol: C_DEPTH * dtype.unit_roundoff() + C_ACC * (k.max(1) as f64).sqrt() * u32_ }
    }

    /// Two f64 computations of the same function that differ only in summation order.
    pub fn f64_reordering(k: usize) -> Tolerance {
        let u = 2f64.powi(-53);
        Tolerance { rtol: C_DEPTH * u + C_ACC * (k.max(1) as f64).sqrt() * u }
    }

    /// The bound for one element.
    pub fn bound(&self, expected: f64, rms: f64) -> f64 {
        self.rtol * (expected.abs() + rms)
    }

    /// The same tolerance scaled by `factor` (for properties that compare two storage-dtype
    /// runs, each within `self` of the oracle: `factor = 2`).
    pub fn times(self, factor: f64) -> Tolerance {
        Tolerance { rtol: self.rtol * factor }
    }
}

impl std::fmt::Display for Tolerance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rtol {:.2e}", self.rtol)
    }
}
