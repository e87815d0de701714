//! Per-tensor delayed scaling (`DelayedScaling`, Megatron `delayed`): a quantizer that keeps
//! state across steps.
//!
//! TE's recipe state (`DelayedScalingRecipeState`, `pytorch/quantization.py`) starts every
//! tensor with `scale = 1` and an amax history of `amax_history_len` zeros. In each step:
//!
//! 1. **Quantize** (`Float8Quantizer::quantize`, `pytorch/csrc/quantizer.cpp`, →
//!    `nvte_quantize_v2`): the cast uses the *current* `scale` (the one the previous update
//!    computed), writes `scale_inv = 1/scale`, and folds the input's amax (NaN ignored) into
//!    `amax_history[0]` with an atomic max, so several quantizations within one step record
//!    their maximum.
//! 2. **Update** after the autocast region (`FP8GlobalStateManager.reduce_and_update_fp8_tensors`
//!    → `tex.fused_amax_and_scale_update_after_reduction` → the `kernel_bulk` of
//!    `common/recipe/delayed_scaling.cu`; the all-reduce of the amaxes is a no-op on one rank),
//!    with `last_amax = amax_history[0]`:
//!    * if `last_amax != 0`: roll the history (`h[i] ← h[i+1]` for `i < L−1`, `h[L−1] ←
//!      last_amax`, then `h[0] ← 0`) and take `amax = fmaxf` over the pre-roll window
//!      (`h[1..L]` and `last_amax`); if `last_amax == 0` the history is left as it is and the
//!      `max` amax is 0;
//!    * `most_recent` uses `amax = last_amax` instead;
//!    * `scale = scaled_max / amax` (f32 division) when `amax` is finite and positive, else the
//!      previous scale; an infinite quotient becomes f32 max; `scaled_max = fp8_max ·
//!      2^(−margin)` in f32.
//!
//! The unfused Python path (`NVTE_UNFUSED_FP8_UPDATE=1`, or a callable algorithm;
//! `_default_get_amax_and_update_history` and `_default_sf_compute` in `pytorch/quantization.py`)
//! is [`DelayedScaling::update_unfused`]. It differs from the fused kernel: it always rolls (also
//! when the step's amax is 0), `torch.max` propagates a NaN amax, and its scale `(fp8_max /
//! amax) / 2^margin` is evaluated by eager PyTorch as `reciprocal(amax) · fp8_max` (a Python
//! number divided by a tensor is `Tensor.__rtruediv__` = `self.reciprocal() * other`): two
//! roundings instead of one, so the scale can differ from the fused kernel's by one ulp (seen on
//! TE's own function, `tests/data/fp8/delayed.json`). Under TE's default `torch.compile` of
//! `_default_sf_compute` (`jit_fuser`) the generated code is not verified here.

use ndarray::ArrayView2;

use super::current::per_tensor_copies;
use super::format::Fp8Format;
use super::scale;
use super::tensor::{check_input, ColumnwiseCopy, Fp8Quantizer, Quantized, Usage};
use crate::dtype::Dtype;
use crate::error::ReferenceError;

/// `DelayedScaling.amax_compute_algo` (the two built-in choices).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum AmaxComputeAlgo {
    /// The largest amax in the history window (`"max"`, TE's default).
    Max,
    /// The amax of the step just finished (`"most_recent"`).
    MostRecent,
}

impl AmaxComputeAlgo {
    /// TE's name: `max` or `most_recent`.
    pub fn name(self) -> &'static str {
        match self {
            AmaxComputeAlgo::Max => "max",
            AmaxComputeAlgo::MostRecent => "most_recent",
        }
    }

    /// Parses `max` or `most_recent` (TE's kernel errors on anything else: "Unsupported amax
    /// compute algorithm").
    pub fn parse(name: &str) -> Result<Self, ReferenceError> {
        match name.trim() {
            "max" => Ok(AmaxComputeAlgo::Max),
            "most_recent" => Ok(AmaxComputeAlgo::MostRecent),
            _ => Err(ReferenceError::UnknownName {
                what: "amax compute algorithm",
                got: name.to_string(),
                expected: "max or most_recent",
            }),
        }
    }
}

/// The `DelayedScaling` fields that drive the scale update.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DelayedScalingConfig {
    /// `margin` (TE default 0): the scale aims at `fp8_max / 2^margin`.
    pub margin: i32,
    /// `amax_history_len` (TE default 1024), at least 1.
    pub amax_history_len: usize,
    /// `amax_compute_algo` (TE default `max`).
    pub amax_compute_algo: AmaxComputeAlgo,
}

impl Default for DelayedScalingConfig {
    fn default() -> Self {
        DelayedScalingConfig { margin: 0, amax_history_len: 1024, amax_compute_algo: AmaxComputeAlgo::Max }
    }
}

/// The delayed-scaling state of one tensor (its `scale` and `amax_history` column).
#[derive(Clone, Debug, PartialEq)]
pub struct DelayedScaling {
    format: Fp8Format,
    config: DelayedScalingConfig,
    scale: f32,
    amax_history: Vec<f32>,
}

impl DelayedScaling {
    /// The initial state: `scale = 1`, a zero history. A zero `amax_history_len` is refused
    /// (TE's quantizer indexes `amax_history[0]`, which does not exist then).
    pub fn new(format: Fp8Format, config: DelayedScalingConfig) -> Result<Self, ReferenceError> {
        if config.amax_history_len == 0 {
            return Err(ReferenceError::Config(
                "delayed scaling: amax_history_len must be at least 1 (TE's Float8Quantizer records the \
                 current amax in amax_history[0])"
                    .to_string(),
            ));
        }
        Ok(DelayedScaling { format, config, scale: 1.0, amax_history: vec![0.0; config.amax_history_len] })
    }

    /// The element format.
    pub fn format(&self) -> Fp8Format {
        self.format
    }

    /// The configuration.
    pub fn config(&self) -> DelayedScalingConfig {
        self.config
    }

    /// The scale the next quantization uses.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// The `scale_inv` the next quantization stores (`1/scale`).
    pub fn scale_inv(&self) -> f32 {
        scale::reciprocal(self.scale)
    }

    /// The amax history, `[0]` being the slot the current step records into.
    pub fn amax_history(&self) -> &[f32] {
        &self.amax_history
    }

    /// `fp8_max · 2^(−margin)` in f32 (TE: `fp8_dtype_max(dtype) * std::pow(2.f, -margin)`;
    /// exact for integer margins, 0 or inf beyond f32's range).
    pub fn scaled_max(&self) -> f32 {
        // Beyond ±300 the f32 factor is 0 or inf either way; the clamp keeps the negation safe.
        let factor = 2f64.powi(-self.config.margin.clamp(-300, 300)) as f32;
        self.format.max_finite() * factor
    }

    /// Replaces the `scale` and the amax history (same length as configured).
    pub fn set(&mut self, scale: f32, amax_history: &[f32]) -> Result<(), String> {
        if amax_history.len() != self.amax_history.len() {
            return Err(format!(
                "delayed scaling: amax history of {} entries, expected amax_history_len = {}",
                amax_history.len(),
                self.amax_history.len()
            ));
        }
        self.scale = scale;
        self.amax_history.copy_from_slice(amax_history);
        Ok(())
    }

    /// Records an amax into `amax_history[0]` (an atomic max in TE's cast kernel).
    pub fn record_amax(&mut self, amax: f32) {
        self.amax_history[0] = self.amax_history[0].max(amax);
    }

    /// The amax-and-scale update run after each step (the fused `kernel_bulk`), see the module
    /// documentation.
    pub fn update(&mut self) {
        let last_amax = self.amax_history[0];
        let len = self.amax_history.len();
        let mut window_max = 0.0f32;
        if last_amax != 0.0 {
            let old = self.amax_history.clone();
            for i in 0..len {
                let a = if i < len - 1 { old[i + 1] } else { last_amax };
                window_max = window_max.max(a);
                self.amax_history[i] = if i > 0 { a } else { 0.0 };
            }
        }
        let amax = match self.config.amax_compute_algo {
            AmaxComputeAlgo::Max => window_max,
            AmaxComputeAlgo::MostRecent => last_amax,
        };
        let mut scale = if amax.is_finite() && amax > 0.0 { self.scaled_max() / amax } else { self.scale };
        if scale.is_infinite() {
            scale = f32::MAX;
        }
        self.scale = scale;
    }
}

impl DelayedScaling {
    /// The unfused Python update, as eager PyTorch evaluates it (see the module documentation):
    /// `amax` = `torch.max` over the whole history (NaN propagates) or `history[0]`; the history
    /// rolls unconditionally; `sf = f32(f32(1/amax)·fp8_max) / 2^margin`, kept where `amax > 0` and
    /// finite, f32 max where infinite.
    pub fn update_unfused(&mut self) {
        let amax = match self.config.amax_compute_algo {
            AmaxComputeAlgo::Max => self.amax_history.iter().fold(f32::NEG_INFINITY, |m, &a| {
                if m.is_nan() || a.is_nan() {
                    f32::NAN
                } else {
                    m.max(a)
                }
            }),
            AmaxComputeAlgo::MostRecent => self.amax_history[0],
        };
        self.amax_history.rotate_left(1);
        self.amax_history[0] = 0.0;
        let divisor = 2f64.powi(self.config.margin.clamp(-300, 300)) as f32;
        let mut sf = (1.0 / amax) * self.format.max_finite() / divisor;
        if !(amax > 0.0 && amax.is_finite()) {
            sf = self.scale;
        }
        if sf.is_infinite() {
            sf = f32::MAX;
        }
        self.scale = sf;
    }
}

impl Fp8Quantizer for DelayedScaling {
    fn format(&self) -> Fp8Format {
        self.format
    }

    fn columnwise_copy(&self) -> ColumnwiseCopy {
        ColumnwiseCopy::TransposeOfRowwise
    }

    /// Quantizes with the current scale and records the amax of `x` (both copies come from one
    /// cast, so the amax is recorded once).
    fn quantize(
        &mut self,
        name: &str,
        x: ArrayView2<'_, f32>,
        dtype: Dtype,
        usage: Usage,
    ) -> Result<Quantized, ReferenceError> {
        check_input(name, x, dtype)?;
        self.record_amax(scale::amax(x.iter().copied()));
        Ok(per_tensor_copies(x, self.scale, self.format, usage))
    }
}
