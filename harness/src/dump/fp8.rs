//! FP8 in a dump: the recipe metadata and the optional quantized weights (`fp8.<parameter>` and
//! `fp8.<parameter>.scale_inv`), checked against their high-precision parameters.

use moe_reference::fp8::{
    codec, BlockQuantizer, BlockTile, CurrentScalingQuantizer, DelayedScaling, Fp8Format, Fp8Quantizer, Fp8Tensor,
    Mxfp8Quantizer, ScaleOptions, Scales, TensorRole, Usage,
};
use moe_reference::{Fp8Config, Fp8Recipe, LayerConfig, ReferenceError};
use ndarray::{Array2, ArrayView2};

/// Prefix of the quantized weights (`fp8.<parameter name>`).
pub const FP8_PREFIX: &str = "fp8.";
/// Suffix of their scales (`fp8.<parameter name>.scale_inv`).
pub const SCALE_SUFFIX: &str = ".scale_inv";

/// The element format TE gives a weight under `f` (E4M3 under both formats).
pub fn weight_format(f: &Fp8Config) -> Fp8Format {
    f.format.format_for(TensorRole::Weight)
}

/// The shape of a weight's rowwise scales under `recipe`, for a `[rows, cols]` weight: `[]` (one
/// f32) for the per-tensor recipes, the `[⌈rows/128⌉, ⌈cols/128⌉]` grid of 128×128 blocks for
/// blockwise, `[rows, cols/32]` E8M0 bytes for MXFP8.
pub fn scale_shape(recipe: Fp8Recipe, [rows, cols]: [usize; 2]) -> Vec<usize> {
    match recipe {
        Fp8Recipe::Tensorwise | Fp8Recipe::Delayed => vec![],
        Fp8Recipe::Blockwise => vec![rows.div_ceil(BlockTile::LEN), cols.div_ceil(BlockTile::LEN)],
        Fp8Recipe::Mxfp8 => vec![rows, cols / moe_reference::fp8::mxfp8::MXFP8_BLOCK],
    }
}

/// The rowwise quantization TE makes of weight `w` (values of `cfg.params_dtype`) under
/// `cfg.fp8`, from TE's initial state for delayed scaling (scale 1): what a correct fp8 dump's
/// `fp8.<parameter>` and its scales hold.
pub fn reference_weight(cfg: &LayerConfig, name: &str, w: ArrayView2<'_, f64>) -> Result<Fp8Tensor, ReferenceError> {
    let f = cfg.fp8.ok_or_else(|| ReferenceError::Config("no fp8 recipe".into()))?;
    let format = weight_format(&f);
    let x = w.mapv(|v| v as f32);
    let options = ScaleOptions { force_pow_2_scales: f.power_2_scales, amax_epsilon: 0.0 };
    let dt = cfg.params_dtype;
    let q = match f.recipe {
        Fp8Recipe::Tensorwise => {
            CurrentScalingQuantizer { format, options }.quantize(name, x.view(), dt, Usage::ROWWISE)?
        }
        Fp8Recipe::Delayed => DelayedScaling::new(format, f.delayed)?.quantize(name, x.view(), dt, Usage::ROWWISE)?,
        Fp8Recipe::Blockwise => BlockQuantizer { format, tile: BlockTile::Square128, options }.quantize(
            name,
            x.view(),
            dt,
            Usage::ROWWISE,
        )?,
        Fp8Recipe::Mxfp8 => Mxfp8Quantizer::new(format).quantize(name, x.view(), dt, Usage::ROWWISE)?,
    };
    q.rowwise.ok_or_else(|| ReferenceError::Config(format!("tensor {name}: the quantizer returned no rowwise copy")))
}

/// The scales of `t` as the f32 (or E8M0 byte) array a dump stores, with its shape.
pub fn scale_values(t: &Fp8Tensor) -> (Vec<usize>, Vec<f32>, bool) {
    match &t.scales {
        Scales::PerTensor { scale_inv } => (vec![], vec![*scale_inv], false),
        Scales::Block { scale_inv, .. } => (scale_inv.shape().to_vec(), scale_inv.iter().copied().collect(), false),
        Scales::E8m0 { exponents, .. } => {
            (exponents.shape().to_vec(), exponents.iter().map(|&e| f32::from(e)).collect(), true)
        }
    }
}

/// Builds the [`Scales`] of a `[rows, cols]` weight under `recipe` from a dump's scale values
/// (`f32` values, or E8M0 bytes for MXFP8) in the shape [`scale_shape`] gives.
pub fn scales_from(recipe: Fp8Recipe, shape: [usize; 2], values: Vec<f32>, bytes: Option<Vec<u8>>) -> Scales {
    let grid = scale_shape(recipe, shape);
    match recipe {
        Fp8Recipe::Tensorwise | Fp8Recipe::Delayed => {
            Scales::PerTensor { scale_inv: values.first().copied().unwrap_or(f32::NAN) }
        }
        Fp8Recipe::Blockwise => Scales::Block {
            rows: BlockTile::LEN,
            cols: BlockTile::LEN,
            scale_inv: Array2::from_shape_vec((grid[0], grid[1]), values)
                .unwrap_or_else(|_| Array2::zeros((grid[0], grid[1]))),
        },
        Fp8Recipe::Mxfp8 => Scales::E8m0 {
            rows: 1,
            cols: moe_reference::fp8::mxfp8::MXFP8_BLOCK,
            exponents: Array2::from_shape_vec((grid[0], grid[1]), bytes.unwrap_or_default())
                .unwrap_or_else(|_| Array2::zeros((grid[0], grid[1]))),
        },
    }
}

/// Checks that the codes of `t` times their scales are the weight `w`: every element within half
/// an fp8 ulp (of its code's binade, at its scale) of `w`, or saturated at the format's largest
/// value where `w·scale` is beyond it. Returns the first element that is not, as a message.
pub fn check_matches_weight(t: &Fp8Tensor, w: ArrayView2<'_, f64>) -> Result<(), String> {
    let fmt = t.format;
    let max = f64::from(fmt.max_finite());
    for ((i, j), &wv) in w.indexed_iter() {
        let s_inv = f64::from(t.scales.scale_inv_at(i, j));
        let code = t.data[[i, j]];
        let c = codec::decode_f64(code, fmt);
        let deq = c * s_inv;
        if !(s_inv.is_finite() && s_inv > 0.0) || c.is_nan() {
            return Err(format!("element [{i}, {j}]: scale_inv {s_inv:e} or code {code:#04x} is not a finite positive scale / finite value"));
        }
        let binade = c.abs().max((wv / s_inv).abs()).max(fmt.min_normal());
        let half_ulp = 0.5 * 2f64.powi(binade.log2().floor() as i32 - fmt.mantissa_bits() as i32) * s_inv;
        let saturated = c.abs() == max && (wv / s_inv).abs() >= max && c.signum() == wv.signum();
        // f32 slack: the product `w·scale` and `scale_inv = 1/scale` are f32 roundings.
        if !saturated && (deq - wv).abs() > half_ulp * (1.0 + 1e-6) + 4.0 * f64::from(f32::EPSILON) * wv.abs() {
            return Err(format!(
                "element [{i}, {j}]: code {code:#04x} ({c}) × scale_inv {s_inv:e} = {deq:e}, but the weight is {wv:e} \
                 (more than half an fp8 ulp, {half_ulp:e}, away)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    /// A weight beyond the fp8 range at its scale matches the code that saturated toward it
    /// (TE's delayed scaling saturates) and not the opposite saturated code; a weight inside the
    /// range is held to half an ulp. Why: the saturation rule must keep the weight's sign, or a
    /// sign-flipped saturated code in a user's checkpoint would pass.
    #[test]
    fn a_saturated_code_matches_only_a_weight_of_its_sign() {
        let fmt = Fp8Format::E4M3;
        let max = f64::from(fmt.max_finite());
        let tensor = |codes: [f32; 2]| Fp8Tensor {
            format: fmt,
            data: array![[codec::encode(codes[0], fmt), codec::encode(codes[1], fmt)]],
            scales: Scales::PerTensor { scale_inv: 1.0 },
        };
        let w = array![[3.0 * max, -2.0 * max]];
        assert_eq!(check_matches_weight(&tensor([448.0, -448.0]), w.view()), Ok(()));
        assert!(check_matches_weight(&tensor([-448.0, -448.0]), w.view()).is_err(), "a sign-flipped saturated code");
        assert!(check_matches_weight(&tensor([448.0, 448.0]), w.view()).is_err(), "a sign-flipped saturated code");
        let inside = array![[1.0, -2.5]];
        assert_eq!(check_matches_weight(&tensor([1.0, -2.5]), inside.view()), Ok(()));
        assert!(check_matches_weight(&tensor([1.0, -3.0]), inside.view()).is_err(), "more than half an ulp off");
    }
}
