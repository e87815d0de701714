//! Scale computation shared by the per-tensor and block recipes, and the amax reduction.
//!
//! [`compute_scale_from_amax`] transcribes TE's device function of the same name
//! (`transformer_engine/common/recipe/recipe_common.cuh`), used by current scaling
//! (`nvte_compute_scale_from_amax` in `common/recipe/current_scaling.cu`, with
//! `value_for_inf = FLT_MAX`) and by both block kernels (`compute_scale_from_types<IType,
//! OType>`, with `value_for_inf` = the largest finite value of the *input* dtype):
//!
//! 1. `amax < epsilon` → `amax = epsilon` (a NaN amax compares false and stays NaN);
//! 2. `amax` infinite, zero or NaN → scale `1.0` (nothing else applies);
//! 3. `scale = fp8_max / amax`, correctly rounded f32 division (`__fdiv_rn`);
//! 4. an infinite quotient (amax tiny) → `value_for_inf`;
//! 5. `force_pow_2_scales` → keep only sign and exponent bits (`bits & 0xFF800000`), i.e. round
//!    the scale *down* to a power of two (f32 max → 2^127).
//!
//! The stored dequantization factor is `scale_inv = 1/scale`, correctly rounded in f32 (TE:
//! `reciprocal<float>` = `__frcp_rn` for per-tensor scaling, `1.0f / scale` or `1.0 / scale`
//! in double then narrowed in the block kernels; the double path equals the f32 one because a
//! 53-bit quotient of two 24-bit values is never an f32 rounding midpoint).
//!
//! TE's Python reference (`tests/pytorch/references/quantize_scale_calc.py`) agrees on finite,
//! non-zero amax and on amax = 0, but not on an infinite amax (it gives scale 0, `scale_inv` =
//! inf) nor on NaN (it propagates): the kernels are the behaviour implemented here.
//!
//! The amax of a tensor or block ([`amax`]) is a `fmaxf`/`__hmax`/PTX `max` reduction starting
//! from 0: NaN elements are ignored (those instructions return the non-NaN operand), ±inf give
//! inf, an empty or all-NaN tensor gives 0.

use super::format::Fp8Format;
use crate::dtype::Dtype;

/// The options TE's current-scaling and block quantizers take (`force_pow_2_scales`,
/// `amax_epsilon`; recipe field `QParams(power_2_scale, amax_epsilon)`).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScaleOptions {
    /// Round every scale down to a power of two.
    pub force_pow_2_scales: bool,
    /// A floor for the amax (f32, as TE's `QuantizationConfig::amax_epsilon`).
    pub amax_epsilon: f32,
}

impl ScaleOptions {
    /// `Float8CurrentScaling`'s default: f32 scales, epsilon 0 (unless
    /// `NVTE_FP8_CURRENT_SCALING_POWER_2_SCALES=1`).
    pub const CURRENT_SCALING_DEFAULT: ScaleOptions = ScaleOptions { force_pow_2_scales: false, amax_epsilon: 0.0 };
    /// `Float8BlockScaling`'s default: power-of-2 scales, epsilon 0 (unless
    /// `NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1`); also `Float8BlockQuantizer`'s constructor default.
    pub const BLOCKWISE_DEFAULT: ScaleOptions = ScaleOptions { force_pow_2_scales: true, amax_epsilon: 0.0 };
}

/// TE's `compute_scale_from_amax(amax, max_fp8, force_pow_2_scales, epsilon, value_for_inf)`;
/// see the module documentation for the five steps.
pub fn compute_scale_from_amax(
    amax: f32,
    fp8_max: f32,
    force_pow_2_scales: bool,
    epsilon: f32,
    value_for_inf: f32,
) -> f32 {
    let mut amax = amax;
    if amax < epsilon {
        amax = epsilon;
    }
    if amax.is_infinite() || amax == 0.0 || amax.is_nan() {
        return 1.0;
    }
    let mut scale = fp8_max / amax;
    if scale.is_infinite() {
        scale = value_for_inf;
    }
    if force_pow_2_scales {
        scale = f32::from_bits(scale.to_bits() & 0xFF80_0000);
    }
    scale
}

/// The largest finite value of an input dtype, TE's `TypeInfo<IType>::max_finite_value`
/// (the block kernels' `value_for_inf`): f32 max, bf16 max (`0x7F7F`, about 3.3895e38) or 65504.
pub fn max_finite_of(dtype: Dtype) -> f32 {
    match dtype {
        Dtype::F32 => f32::MAX,
        Dtype::Bf16 => half::bf16::MAX.to_f32(),
        Dtype::F16 => half::f16::MAX.to_f32(),
    }
}

/// The per-tensor current-scaling scale (`nvte_compute_scale_from_amax`: `value_for_inf` is
/// f32 max whatever the input dtype).
pub fn current_scale(amax: f32, fmt: Fp8Format, options: ScaleOptions) -> f32 {
    compute_scale_from_amax(amax, fmt.max_finite(), options.force_pow_2_scales, options.amax_epsilon, f32::MAX)
}

/// The block scale (`compute_scale_from_types<IType, OType>`: `value_for_inf` is the input
/// dtype's largest finite value).
pub fn block_scale(amax: f32, fmt: Fp8Format, input: Dtype, options: ScaleOptions) -> f32 {
    compute_scale_from_amax(
        amax,
        fmt.max_finite(),
        options.force_pow_2_scales,
        options.amax_epsilon,
        max_finite_of(input),
    )
}

/// `scale_inv = 1/scale`, correctly rounded in f32 (`__frcp_rn`).
pub fn reciprocal(scale: f32) -> f32 {
    1.0 / scale
}

/// The amax of some values the way TE's kernels reduce it: `max(|x|)` from 0 with NaN ignored.
pub fn amax<I: IntoIterator<Item = f32>>(values: I) -> f32 {
    values.into_iter().fold(0.0f32, |acc, v| acc.max(v.abs()))
}
