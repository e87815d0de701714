//! Sampled verification of model-sized layers (the shapes of [`crate::shapes`]: Mixtral 8x7B,
//! DeepSeek-V3 EP slice, Qwen3-30B-A3B, GPT-OSS-120B; GLU silu, bf16, optionally with a
//! row-local fp8 recipe: see [FP8](#fp8)), too large for an f64
//! oracle on every element: the checks, on host data. An implementation runs the layer, hands
//! over the whole layer's rows ([`SampledLayer`]) and each expert's weights, weight gradients and
//! intermediates ([`ExpertSource`]), and [`check_layer`] checks them (`moe_gpu::sampled` does
//! this for the CUDA layers).
//!
//! Every bound here is the harness's error model ([`crate::tolerance`]): an element passes
//! when `|got − exp| ≤ C_SAFETY·(S + A + rms(S_block))`, `C_SAFETY = 2`, `S` the running error
//! bound of the element, `A` the clamp allowance. What differs from a whole-layer comparison is
//! only where `S` and the rms floor come from; nothing below is a tolerance of its own.
//!
//! # Checks and their bounds
//!
//! * **Rows** of the output, dx and dprobs. Rows are independent in these three, so for a sample
//!   of rows of **every** expert (first, last and two random rows) the f64 oracle runs on a
//!   one-expert layer built from that expert's downloaded weights and the sampled rows
//!   (`moe_reference::forward` + `backward` with [`moe_reference::Numerics::Oracle`], what
//!   `moe_reference::oracle_with_scales` runs). Its [`moe_reference::ErrorScales`] give `S` and `A`
//!   of every sampled element exactly as a whole-layer oracle run would (the bound of a row
//!   depends on that row alone). The rms floor is the rms of `S` over the expert's sampled rows
//!   (an estimate of the whole tensor's, from rows of the same distribution). These are compared
//!   by [`crate::compare::compare_tensor`] with the oracle's scales and allowances.
//! * **Intermediates** `U_e = cast(act(gate)·lin·p)` (fc2 input) and `DA_e` (fc1 output grad)
//!   of the GPU on the same rows, against the same math in f64 (the reference's
//!   [`moe_reference::Activation`]); `S` is the oracle's running bound of these intermediates
//!   ([`moe_reference::ErrorScales::fc2_input`], [`moe_reference::ErrorScales::fc1_output_grad`]:
//!   the rounding of `a`, its f32 accumulation and every later rounding, propagated), with the
//!   same rms floor.
//! * **Weight-grad elements**: [`ELEMENT_SAMPLES`] elements of each expert's canonical
//!   `dW2 = G_eᵀ·U_e` and `dW1 = DA_eᵀ·X_e` against their exact dot products over the GPU's own
//!   operands (`U_e` and `DA_e`, checked above; `G_e` and `X_e` are exact inputs). With exact
//!   operands an element `D_jk = Σ_i A_ij·B_ik` over the expert's `n` rows has the bound of one
//!   GEMM element ([`crate::tolerance::gemm_element_scale`]):
//!   `S_jk = u_s·|D_jk| + η + √n·u_f32·Σ_i |A_ij·B_ik|`; its rms floor `R` is bounded below.
//! * **Projections** (Freivalds) of every row `j` of `dW2` and `dW1` on `r` = [`PROJECTIONS`]
//!   = 64 independent random sign vectors `v_r` (`v_rk = ±1` over the row's `K'` columns, drawn
//!   independently of the GPU's results): `P_jr = Σ_k v_rk·got_jk − Σ_i A_ij·(B·v_r)_i`, and
//!   the check compares `‖P_j‖₂ = (Σ_r P_jr²)^½`. With `E_jk = got_jk − D_jk`,
//!   `P_jr = Σ_k v_rk·E_jk` (the f64 evaluation adds about 10⁻¹⁶ of the terms, nothing next to
//!   the bound). Every `|E_jk| ≤ b_jk = C_SAFETY·(S_jk + R)`, the element bound above, so
//!   - worst case, whatever the signs: every `|P_jr| ≤ Σ_k b_jk`, so `‖P_j‖₂ ≤ √r·Σ_k b_jk`;
//!   - random signs: for every `α ∈ ℝʳ`, `E exp(Σ_r α_r·P_jr) = Π_{r,k} cosh(α_r·E_jk) ≤
//!     exp(‖α‖²·‖E_j‖₂²/2)`, so `P_j` is a sub-Gaussian vector with `σ = ‖E_j‖₂ ≤ ‖b_j‖₂`,
//!     and (Hsu, Kakade & Zhang 2012, a tail inequality for quadratic forms of sub-Gaussian
//!     vectors, Theorem 1 with the identity) `P(‖P_j‖₂² > σ²·(r + 2·√(r·x) + 2·x)) ≤ e^{−x}`.
//!
//!   The check uses `min(√r·Σ_k b_jk, √(r + 2√(r·x) + 2x)·‖b_j‖₂)` with `x = t²/2`, `t` =
//!   [`PROJECTION_T`] = 8: `e⁻³² ≈ 1.3·10⁻¹⁴` per row, about 5·10⁻⁸ for the 3.7·10⁶
//!   projected rows of all the shape × class pairs the sampled test runs. A wrong row (error
//!   `E_j`) gives `‖P_j‖₂ ≈ √r·‖E_j‖₂`, against a bound of `1.85·√r·‖b_j‖₂` at `r` = 64: it
//!   fails once `‖E_j‖₂ ≳ 1.85·‖b_j‖₂`. One sign vector (`|P_j| ≤ t·‖b_j‖₂`, Hoeffding) reads
//!   `|⟨v, E_j⟩| = ‖E_j‖₂·|Z|` for a roughly normal `Z`, which is near zero for some rows
//!   whatever the error: a doubled row passed at 0.94 of that bound for the median row and
//!   0.00 for the least visible (fp8 below, `tests::bound_widths`); the norm over `r` vectors
//!   concentrates, and its bound per vector, `√(1 + 2√(x/r) + 2x/r)·‖b_j‖₂`, falls toward
//!   `‖b_j‖₂` as `r` grows (8.7 at `r` = 1, 1.85 at 64, 1.40 at 256). The cost is three
//!   products with `r` columns per weight grad (`B·V`, `Aᵀ·(B·V)`, `got·V`): about 0.5 s of
//!   one host core for a DeepSeek-V3 `dW1` (`n` = 1024, `4096 × 7168`). The worst case alone
//!   is about `√K'/1.85` times looser (65x for Mixtral's `dW2` rows, `K'` = 14336) and would
//!   let a wrong 128-column tile through, which is what the projections are for (the element
//!   samples rarely hit one tile).
//! * **Computable forms.** `S_jk` for every `(j, k)` needs `Σ_i |A_ij|·|B_ik|` in full, a second
//!   GEMM of the checked size. Upper bounds keep every bound valid: `|D_jk|` is taken as
//!   `|got_jk|` (first order: they differ by `E_jk ≤ b_jk`), and
//!   `Σ_k Σ_i |A_ij|·|B_ik| = Σ_i |A_ij|·‖B_i‖₁` (exact),
//!   `‖Σ_i |A_ij|·|B_i|‖₂ ≤ Σ_i |A_ij|·‖B_i‖₂` (Minkowski; nearly tight for non-negative rows).
//!   So with `s_j = u_s·‖got_j‖₂ + √K'·η + √n·u_f32·Σ_i |A_ij|·‖B_i‖₂ ≥ ‖S_j‖₂`:
//!   `Σ_k b_jk ≤ C_SAFETY·(u_s·‖got_j‖₁ + K'·η + √n·u_f32·Σ_i |A_ij|·‖B_i‖₁ + K'·R)`,
//!   `‖b_j‖₂ ≤ C_SAFETY·(s_j + √K'·R)`, and the block's rms floor
//!   `R = rms(S) ≤ R̄ = (Σ_j s_j² / (J·K'))^½`, used for the projections and the element samples
//!   alike.
//! * **Empty experts**: `S = 0`, so their weight grads must be exactly zero.
//!
//! # FP8
//!
//! With `LayerConfig::fp8` set to a **row-local** recipe — blockwise (TE `Float8BlockScaling`,
//! DeepSeek-V3's training recipe: 1×128 tiles for activations and gradients, 128×128 for
//! weights, power-of-2 scales) or MXFP8 (1×32, E8M0) — the same checks run under the fp8 error
//! model ([`crate::tolerance`], FP8):
//!
//! * **Rows.** Every operand of the GEMMs that produce a row of `y`, `dx`, `dp`, `U_e` and `DA_e`
//!   is quantized row by row: `x`, `u`, `G`, `da` rowwise (their tiles lie inside one row) and
//!   the weights (whole, the same downloaded tensors). So the implementation computes a sampled
//!   row from exactly the fp8 values a one-expert layer of the sampled rows quantizes, and the
//!   oracle of that sub-layer with the same fp8 configuration
//!   ([`moe_reference::oracle_with_scales`]'s `ErrorScales`) gives each sampled element its fp8
//!   bound: the storage part `E` and the fp8 channel `R` (`S = E + R`), both row-local. The only
//!   non-local input of `R` is the bound of a block's `scale_inv`, taken from the amax of the
//!   whole operand: over the sub-layer it is the amax of the sampled rows, which bounds the
//!   amax of every block of those rows (and the weights' are the whole weights'), so it is a
//!   valid, tighter bound for them. The sub-layer is padded with zero rows of zero probs to a
//!   multiple of [`SUBLAYER_ROWS`] = 32 (TE `Linear`'s `assert_dim_for_fp8_exec` wants 8,
//!   Megatron's fp8 padding 16, MXFP8 32): padding rows are what Megatron's own quantization
//!   padding appends, they add no tile to a sampled row, change no amax (zeros) and are never
//!   compared.
//! * **GEMM rows** (fp8 only). The last GEMM of each sampled row of `y` (fc2 fprop,
//!   `y = U_e·W2ᵀ`) and of `dx` (fc1 dgrad, `dx = DA_e·W1`) is recomputed from the
//!   implementation's own `U_e` and `DA_e` rows, quantized rowwise as the layer quantizes them
//!   (row-local: the rows alone, zero-padded to [`SUBLAYER_ROWS`], give the same codes), and the
//!   weights' copies the GEMM reads (`W2` rowwise, `W1` columnwise), dequantized. With exact
//!   operands an element is one fp8 GEMM result stored in the storage dtype:
//!   `S = u_s·|C| + η + (√K·u_f32 + 1.5·(√K_acc·2⁻¹³ + 2·u_f32·(⌈K/32⌉ + 1)))·Σ_k |A_k·B_k|`
//!   (`K_acc = min(K, 128)` for blockwise, whose GEMM promotes each 128-wide scale block to f32)
//!   (the weight-grad element bound below, `K` = `N2` or `N1`), with the rms floor over the
//!   expert's sampled rows. These bounds carry no propagated error and no quantization
//!   channel, so they are far tighter than the oracle's rows bounds under fp8 (next-but-one
//!   bullet): a scale 2× off on one 1×128 block of `u` or `da` fails them at `h = f = 256`
//!   (unit tests). Together with the `U_e`/`DA_e` rows against the oracle they check the
//!   same results along the chain. In bf16 the oracle's rows bounds are tight and these checks
//!   do not run.
//! * **Weight grads.** The wgrad GEMMs `dW2 = G_eᵀ·U_e`, `dW1 = DA_eᵀ·X_e` multiply the
//!   *columnwise* copies, re-quantized along the expert's tokens (128-token blocks for
//!   blockwise), which are not row-local. They are rebuilt on the host from the downloaded whole
//!   per-expert operands (padded to the layer's row padding), by the reference quantizer the
//!   device quantizers match bit for bit (`checks::wgrad_operand`), and dequantized. With these as
//!   the exact operands `D_jk` is the exact dot product of dequantized values and the element
//!   and projection bounds above hold with the fp8 GEMM's accumulation term added to the f32
//!   one: `(√n·u_f32 + 1.5·(√n_acc·2⁻¹³ + 2·u_f32·(⌈n/32⌉ + 1)))·Σ_i |A_ij·B_ik|`
//!   ([`crate::tolerance::fp8_accumulation`], the term the oracle adds to every fp8 GEMM).
//!   How much these checks see of a wrong row is set by the row's bound `‖b_j‖₂` against
//!   `‖D_j‖₂`: the accumulation term, the block's rms floor (the rms of the same terms over the
//!   expert's block, so about as large) and the storage rounding (2·2⁻⁸·‖got_j‖₂). Measured
//!   (`tests::bound_widths`, `h = f = 256`, blockwise, median over rows, each term times
//!   `C_SAFETY`): accumulation 0.029 / floor 0.045 of `‖D_j‖₂` for `dW1` and 0.039 / 0.055 for
//!   `dW2` on an expert of `n` = 160 rows, 0.072 / 0.088 and 0.10 / 0.12 at 1024, 0.10 / 0.12 and
//!   0.15 / 0.16 at 2144 (`verify --shape deepseek-v3`'s largest expert; the accumulation term
//!   grows like `√n`: `Σ|terms| ∝ n` against `|D| ∝ √n`). A row of `dW1` or `dW2` multiplied by
//!   2 reads (least visible row / median row) 4.2 / 6.1 and 3.6 / 5.0 of the projection bound
//!   at `n` = 160, 2.1 / 3.0 and 1.8 / 2.3 at 1024, 1.7 / 2.2 and 1.15 / 1.6 at 2144; by 1.25,
//!   1.21 / 1.75 and 1.00 / 1.38 at 160, 0.56 / 0.81 and 0.47 / 0.60 at 1024 (every row seen
//!   from about 1.55x there, extrapolating linearly). A sampled element in the row reads 9.5
//!   (doubled) and 2.8 (1.25x) of its bound at 160 (median). MXFP8's accumulation term runs
//!   over the whole `n` (no promotion), so its bounds grow like `n`: a doubled row reads
//!   0.83 / 1.21 (`dW1`) and 0.69 / 0.89 (`dW2`) at 1024, 0.45 / 0.60 and 0.30 / 0.43 at 2144.
//!   Errors of the size of the fp8 noise (an operand left unquantized, the rowwise copy
//!   multiplied transposed: `≈ 2⁻⁵·|D|`) stay inside the bound even on the unit tests' experts
//!   of 48 and 160 rows; missing block scales (codes multiplied as they are) fail at every
//!   size; a scale 2× off on one 128-token block fails the element samples of its column on
//!   small experts.
//! * **Strength at model sizes.** The bounds are the error model's, and under fp8 they are
//!   wide: `rms(S)/rms(value)` of `y`, `dx`, `U_e`, `DA_e` on a one-expert layer of 32 rows
//!   (the harness's random weights and inputs; `tests::bound_widths`, ignored, prints them) is
//!   0.17, 0.24, 0.02, 0.02 in bf16 and 2.4, 3.4, 0.39, 0.41 under blockwise fp8 at
//!   `h = f = 256`; at DeepSeek-V3's `h = 7168, f = 2048` it is 0.49, 0.71, 0.02, 0.02 in bf16
//!   and **26, 39, 0.96, 1.0** under blockwise fp8. Two terms of the model make it: the fp8
//!   accumulation term `1.5·√K_acc·2⁻¹³·Σ|terms|` (blockwise: `K_acc` = 128), and the storage part
//!   `E` of `U_e` propagated worst case (`Σ_k e_k·|w_k|`) through fc2, which multiplies it by
//!   about `√K`. Sampling changes none of this (a row's bound depends on that row alone; a
//!   whole-layer oracle gives the same). So on DeepSeek-V3 under fp8 the oracle rows checks
//!   catch only errors above about thirty times the values (garbage, NaN, a scale off by 2⁵ or
//!   more). The GEMM rows checks are what sees block scales at model sizes: their bound is about
//!   `2·(2⁻⁸ + 1.5·2⁻¹³·√128·√K·0.64)` times a typical value (the fp8 accumulation term over
//!   `Σ|terms| ≈ 0.64·√K` values), about 0.13 for DeepSeek-V3's `y` (`K = 2048`) and 0.18 for
//!   its `dx` (`K = 4096`): estimated, a scale 2× off on one 1×128 block of `u` (an error of
//!   about `1/√(K/128)` = 0.25 times the value) fails the `y` rows, and on one block of `da`
//!   (0.18) sits at the `dx` rows' bound.
//! * **What no check here sees**: a GEMM run in bf16 instead of fp8 is *more* accurate, so no
//!   comparison with the unquantized oracle can see it (the fp8 module of
//!   [`crate::tolerance`]), and against the fp8 GEMM of its own operands it differs by fp8
//!   noise, which the GEMM-rows bound's fp8 accumulation term covers (0.56 of the bound for the
//!   dx rows at `N1 = 512`, less at larger `K`); the bit-level comparison with the reference's
//!   fp8 emulation (`tests/fp8_layers.rs`, `tests/gpu_fp8.rs`) does.
//! * **Refused**: the per-tensor recipes (tensorwise current scaling, delayed scaling) scale
//!   each expert's operand by its whole amax (or an amax history), so a sampled row does not
//!   quantize as in the full layer and the sub-layer's bound would not be the row's;
//!   GroupedMLP has no fp8 path at all. [`sampled_supported`] refuses both, saying why.
//!
//! The checks are pure functions of host data (`checks::check_expert`), so unit tests feed them
//! synthetic results with errors injected at 1.2× and 0.8× of each bound, and wrong
//! weight-grad rows (2× and 1.25×), without a GPU.

use crate::compare::TensorDiff;
use moe_reference::{Fp8Config, Fp8Recipe, LayerClass, LayerConfig, ReferenceError};
use std::fmt;

mod checks;
#[cfg(test)]
mod tests;

/// The `t` of the projection bound `min(√r·Σ_k b_jk, √(r + 2√(r·x) + 2x)·‖b_j‖₂)`, `x = t²/2`,
/// over [`PROJECTIONS`] sign vectors (module doc): a row whose elements are all within their
/// bounds fails with probability at most `exp(−t²/2)`.
pub const PROJECTION_T: f64 = 8.0;

/// Independent random sign vectors each row of each expert's `dW1` and `dW2` is projected on
/// (module doc, "Projections"): the bound of the projections' 2-norm tends to the 2-norm of the
/// row's element bounds as their number grows (`√r` signal against `√(r + 2√(r·x) + 2x)`).
pub const PROJECTIONS: usize = 64;

/// Elements of each expert's `dW1` and `dW2` checked against their exact dot products.
pub const ELEMENT_SAMPLES: usize = 64;

/// Under fp8 the oracle's one-expert sub-layer of the sampled rows is padded with zero rows to
/// a multiple of this (module doc, FP8): TE `Linear`'s `assert_dim_for_fp8_exec` wants a
/// multiple of 8, Megatron pads to 16 (32 for MXFP8).
pub const SUBLAYER_ROWS: usize = 32;

/// A skewed split of `tokens` rows over `experts` (Zipf-like weights, deterministic in `seed`),
/// with experts 1 and `E − 2` empty when `E ≥ 4`. Counts are multiples of 16 when `tokens` is
/// (rows are handed out in units of 16), as `torch._grouped_mm` comparisons want. The counts
/// for seed 42 are pinned by a test (a change of the split changes what `verify --shape`
/// checks).
pub fn skewed_counts(tokens: usize, experts: usize, seed: u64) -> Vec<i64> {
    let unit: usize = if tokens.is_multiple_of(16) { 16 } else { 1 };
    let units = (tokens / unit) as i64;
    let mut state = seed | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let empty = |e: usize| experts >= 4 && (e == 1 || e == experts - 2);
    let w: Vec<f64> =
        (0..experts).map(|e| if empty(e) { 0.0 } else { (0.5 + next()) / (1.0 + e as f64).powf(0.3) }).collect();
    let total: f64 = w.iter().sum();
    let mut counts: Vec<i64> = w.iter().map(|x| (x / total * units as f64).floor() as i64).collect();
    let mut rest = units - counts.iter().sum::<i64>();
    let mut e = 0;
    while rest > 0 {
        if !empty(e % experts) {
            counts[e % experts] += 1;
            rest -= 1;
        }
        e += 1;
    }
    counts.iter().map(|&c| c * unit as i64).collect()
}

/// One kind of check and its worst error.
#[derive(Clone, Debug)]
pub struct CheckStat {
    /// What was compared.
    pub name: String,
    /// How many values were compared.
    pub count: usize,
    /// Worst `|got − exp| / bound` (≤ 1 passes).
    pub worst_ratio: f64,
    /// Where the worst value was.
    pub worst_at: String,
}

impl CheckStat {
    fn new(name: &str) -> CheckStat {
        CheckStat { name: name.into(), count: 0, worst_ratio: 0.0, worst_at: String::new() }
    }

    /// Counts one value with error `err` and bound `bound` (a zero bound admits only a zero
    /// error; NaN never passes).
    fn record(&mut self, err: f64, bound: f64, at: impl FnOnce() -> String) {
        self.count += 1;
        let ratio = if err.is_nan() {
            f64::INFINITY
        } else if err == 0.0 {
            0.0
        } else if bound > 0.0 {
            err / bound
        } else {
            f64::INFINITY
        };
        if ratio > self.worst_ratio {
            self.worst_ratio = ratio;
            self.worst_at = at();
        }
    }

    /// Counts the elements of a tensor comparison and keeps its worst element when worse;
    /// `at(index)` names the element at `index` of the compared tensor.
    fn record_diff(&mut self, diff: &TensorDiff, at: impl FnOnce(&[usize]) -> String) {
        self.count += diff.shape.iter().product::<usize>();
        if diff.worst_ratio > self.worst_ratio {
            self.worst_ratio = diff.worst_ratio;
            let (gv, ev) = (diff.worst_got, diff.worst_expected);
            self.worst_at = format!("{}: got {gv:e} exp {ev:e}", at(&diff.worst_index));
        }
    }

    /// Adds `other`'s counts and keeps the worse of the two worst values.
    fn merge(&mut self, other: CheckStat) {
        self.count += other.count;
        if other.worst_ratio > self.worst_ratio {
            self.worst_ratio = other.worst_ratio;
            self.worst_at = other.worst_at;
        }
    }

    /// True when every value was within its bound.
    pub fn passed(&self) -> bool {
        self.worst_ratio <= 1.0
    }
}

/// The checks of one sampled verification (module doc: what each compares, and its bound).
#[derive(Clone, Debug)]
pub struct SampledChecks {
    /// Sampled output rows against the oracle.
    pub output_rows: CheckStat,
    /// Sampled input-grad rows against the oracle.
    pub grad_input_rows: CheckStat,
    /// Sampled probs grads against the oracle.
    pub grad_probs_rows: CheckStat,
    /// The GPU's fc2 input `U_e` on the sampled rows.
    pub fc2_input_rows: CheckStat,
    /// The GPU's fc1 output grad `DA_e` on the sampled rows.
    pub fc1_output_grad_rows: CheckStat,
    /// fp8 only: the sampled output rows against the fc2 GEMM of the implementation's own
    /// `U_e` rows (quantized) and `W2`.
    pub output_gemm_rows: CheckStat,
    /// fp8 only: the sampled input-grad rows against the fc1 dgrad GEMM of the implementation's
    /// own `DA_e` rows (quantized) and `W1`'s columnwise copy.
    pub grad_input_gemm_rows: CheckStat,
    /// Projections `dW2·v` of every row of every expert's `dW2`.
    pub dw2_projections: CheckStat,
    /// Projections `dW1·v` of every row of every expert's `dW1`.
    pub dw1_projections: CheckStat,
    /// Sampled elements of `dW2` against their exact dot products.
    pub dw2_elements: CheckStat,
    /// Sampled elements of `dW1` against their exact dot products.
    pub dw1_elements: CheckStat,
    /// Every weight-grad element of the experts without rows (must be exactly zero).
    pub empty_expert_grads: CheckStat,
}

impl Default for SampledChecks {
    fn default() -> Self {
        SampledChecks {
            output_rows: CheckStat::new("output rows"),
            grad_input_rows: CheckStat::new("grad_input rows"),
            grad_probs_rows: CheckStat::new("grad_probs rows"),
            fc2_input_rows: CheckStat::new("U_e rows (fc2 input)"),
            fc1_output_grad_rows: CheckStat::new("DA_e rows (fc1 out grad)"),
            output_gemm_rows: CheckStat::new("y rows = fp8 U_e·W2ᵀ"),
            grad_input_gemm_rows: CheckStat::new("dx rows = fp8 DA_e·W1"),
            dw2_projections: CheckStat::new("dW2·v (Freivalds)"),
            dw1_projections: CheckStat::new("dW1·v (Freivalds)"),
            dw2_elements: CheckStat::new("dW2 sampled elements"),
            dw1_elements: CheckStat::new("dW1 sampled elements"),
            empty_expert_grads: CheckStat::new("empty-expert grads == 0"),
        }
    }
}

impl SampledChecks {
    /// Every check, in report order.
    pub fn all(&self) -> [&CheckStat; 12] {
        [
            &self.output_rows,
            &self.grad_input_rows,
            &self.grad_probs_rows,
            &self.fc2_input_rows,
            &self.fc1_output_grad_rows,
            &self.output_gemm_rows,
            &self.grad_input_gemm_rows,
            &self.dw2_projections,
            &self.dw1_projections,
            &self.dw2_elements,
            &self.dw1_elements,
            &self.empty_expert_grads,
        ]
    }

    fn all_mut(&mut self) -> [&mut CheckStat; 12] {
        [
            &mut self.output_rows,
            &mut self.grad_input_rows,
            &mut self.grad_probs_rows,
            &mut self.fc2_input_rows,
            &mut self.fc1_output_grad_rows,
            &mut self.output_gemm_rows,
            &mut self.grad_input_gemm_rows,
            &mut self.dw2_projections,
            &mut self.dw1_projections,
            &mut self.dw2_elements,
            &mut self.dw1_elements,
            &mut self.empty_expert_grads,
        ]
    }

    /// Adds the counts of `other` (checks of other experts) and keeps the worst values.
    pub fn merge(&mut self, other: SampledChecks) {
        let SampledChecks {
            output_rows,
            grad_input_rows,
            grad_probs_rows,
            fc2_input_rows,
            fc1_output_grad_rows,
            output_gemm_rows,
            grad_input_gemm_rows,
            dw2_projections,
            dw1_projections,
            dw2_elements,
            dw1_elements,
            empty_expert_grads,
        } = other;
        let others = [
            output_rows,
            grad_input_rows,
            grad_probs_rows,
            fc2_input_rows,
            fc1_output_grad_rows,
            output_gemm_rows,
            grad_input_gemm_rows,
            dw2_projections,
            dw1_projections,
            dw2_elements,
            dw1_elements,
            empty_expert_grads,
        ];
        for (mine, theirs) in self.all_mut().into_iter().zip(others) {
            mine.merge(theirs);
        }
    }

    /// True when every check passed.
    pub fn passed(&self) -> bool {
        self.all().iter().all(|c| c.passed())
    }
}

/// The result of a sampled verification of one layer.
#[derive(Clone, Debug)]
pub struct SampledReport {
    /// Shape name.
    pub shape: String,
    /// Class verified.
    pub class: LayerClass,
    /// The GPU.
    pub device: String,
    /// Token rows `T`.
    pub tokens: usize,
    /// Local experts.
    pub experts: usize,
    /// Experts with zero rows.
    pub empty_experts: usize,
    /// Rows checked against the oracle.
    pub rows_checked: usize,
    /// Forward + backward GPU time (ms, one call, synchronized).
    pub gpu_ms: f64,
    /// The fp8 configuration verified (`None`: bf16).
    pub fp8: Option<Fp8Config>,
    /// Checks and their worst ratios.
    pub checks: SampledChecks,
}

impl SampledReport {
    /// True when every check's worst ratio is ≤ 1.
    pub fn passed(&self) -> bool {
        self.checks.passed()
    }
}

impl fmt::Display for SampledReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} {} {} on {}: T={} E_l={} ({} empty), {} rows checked, fwd+bwd {:.2} ms: {}",
            self.shape,
            self.class.megatron_name(),
            self.fp8.map_or("bf16".to_string(), |f| format!("fp8 {}", f.label())),
            self.device,
            self.tokens,
            self.experts,
            self.empty_experts,
            self.rows_checked,
            self.gpu_ms,
            if self.passed() { "PASS" } else { "FAIL" }
        )?;
        for c in self.checks.all() {
            writeln!(f, "  {:<28} n={:<9} worst err/bound {:.3}  {}", c.name, c.count, c.worst_ratio, c.worst_at)?;
        }
        Ok(())
    }
}

#[cfg(test)]
fn rms(v: impl IntoIterator<Item = f64>) -> f64 {
    let (mut sum, mut n) = (0.0, 0usize);
    for x in v {
        sum += x * x;
        n += 1;
    }
    if n == 0 {
        0.0
    } else {
        (sum / n as f64).sqrt()
    }
}

/// Why a sampled verification could not run.
#[derive(Debug, thiserror::Error)]
pub enum SampledError {
    /// The configuration is one the checks do not cover (see [`sampled_supported`]).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The f64 oracle refused the sampled rows, or returned no error scales.
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    /// A checker thread panicked.
    #[error("a checker thread panicked")]
    Panicked,
}

/// The whole layer's host data every expert's checks read: its configuration, the `[T, h]`
/// input, upstream gradient, output and input grad, and the `[T]` probs and probs grad, all
/// with rows sorted by expert (expert `e`'s rows start at its [`ExpertTensors::start`]), and
/// the seed of the sampled rows, signs and elements.
#[derive(Clone, Copy, Debug)]
pub struct SampledLayer<'a> {
    /// The layer's configuration (one rank, a GLU without clamp, offset, bias or probs on the
    /// input, no fp8 or a row-local recipe: [`sampled_supported`]).
    pub cfg: &'a LayerConfig,
    /// Input `[T, h]`.
    pub x: &'a [f64],
    /// Upstream gradient `[T, h]`.
    pub g: &'a [f64],
    /// Output `[T, h]`.
    pub y: &'a [f64],
    /// Input gradient `[T, h]`.
    pub dx: &'a [f64],
    /// Probs `[T]`.
    pub p: &'a [f64],
    /// Probs gradient `[T]`.
    pub dp: &'a [f64],
    /// Seed of the samples.
    pub seed: u64,
}

impl SampledLayer<'_> {
    fn grouped(&self) -> bool {
        self.cfg.class == LayerClass::Grouped
    }
}

/// One expert's data in f64: weights and weight grads in the class's layout (GroupedMLP:
/// `[in, out]`, the others `[out, in]`), `u` `[n, N2]` and `da` `[n, N1]` row-major.
#[derive(Clone, Debug, Default)]
pub struct ExpertTensors {
    /// Local expert index.
    pub e: usize,
    /// Its first row in the layer's rows.
    pub start: usize,
    /// Its row count.
    pub n: usize,
    /// fc1 weight.
    pub w1: Vec<f64>,
    /// fc2 weight.
    pub w2: Vec<f64>,
    /// fc1 weight gradient.
    pub dw1: Vec<f64>,
    /// fc2 weight gradient.
    pub dw2: Vec<f64>,
    /// The implementation's fc2 input `U_e` on the expert's rows.
    pub u: Vec<f64>,
    /// The implementation's fc1 output gradient `DA_e` on the expert's rows.
    pub da: Vec<f64>,
}

/// One expert's data as the implementation produced it (raw device bytes, say), turned into
/// [`ExpertTensors`] when its checks run: one expert at a time per checker thread, which
/// bounds host memory at model sizes.
pub trait ExpertSource: Send + Sync {
    /// The expert's data in f64.
    fn tensors(&self) -> ExpertTensors;
}

impl ExpertSource for ExpertTensors {
    fn tensors(&self) -> ExpertTensors {
        self.clone()
    }
}

/// `items` dealt over `n` chunks in turn (item i to chunk i mod n): every item in exactly one
/// chunk, chunk sizes differing by at most one, each chunk in the items' order.
fn round_robin<E>(items: Vec<E>, n: usize) -> Vec<Vec<E>> {
    let n = n.max(1);
    let mut chunks: Vec<Vec<E>> = (0..n).map(|_| Vec::new()).collect();
    for (i, item) in items.into_iter().enumerate() {
        chunks[i % n].push(item);
    }
    chunks
}

/// Checks every expert of `layer` (module doc), in parallel over up to 16 host threads.
/// Returns the checks and the number of rows checked against the oracle.
pub fn check_layer<E: ExpertSource>(
    layer: &SampledLayer,
    experts: Vec<E>,
) -> Result<(SampledChecks, usize), SampledError> {
    sampled_supported(layer.cfg)?;
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(4).min(16);
    let chunks = round_robin(experts, threads);
    let results: Vec<Result<(SampledChecks, usize), SampledError>> = std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .iter()
            .map(|chunk| {
                s.spawn(move || {
                    let mut st = SampledChecks::default();
                    let mut rows_checked = 0;
                    for source in chunk {
                        rows_checked += checks::check_expert(layer, &source.tensors(), &mut st)?;
                    }
                    Ok((st, rows_checked))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(Err(SampledError::Panicked))).collect()
    });
    let mut checks = SampledChecks::default();
    let mut rows_checked = 0;
    for r in results {
        let (stats, rows) = r?;
        rows_checked += rows;
        checks.merge(stats);
    }
    Ok((checks, rows_checked))
}

/// The intermediates check recomputes `U_e` and `DA_e` for a GLU without clamp, linear offset,
/// bias, probs on the input or GLU interleaving (what [`crate::shapes::ShapeDims::config`]
/// builds); anything else is refused.
pub fn intermediates_supported(cfg: &LayerConfig) -> Result<(), SampledError> {
    if cfg.gated_linear_unit
        && cfg.clamp_value.is_none()
        && cfg.glu_linear_offset == 0.0
        && !cfg.add_bias
        && !cfg.apply_probs_on_input
        && cfg.glu_interleave_size.is_none()
    {
        Ok(())
    } else {
        Err(SampledError::Unsupported(
            "sampled verification recomputes U_e and DA_e for a GLU without clamp, offset, bias, probs on the \
             input or GLU interleaving"
                .into(),
        ))
    }
}

/// What the sampled checks cover: [`intermediates_supported`], and no fp8 or a row-local fp8
/// recipe (blockwise, MXFP8) on a class with an fp8 path (module doc, FP8). The per-tensor
/// recipes and GroupedMLP with fp8 are refused, saying why.
pub fn sampled_supported(cfg: &LayerConfig) -> Result<(), SampledError> {
    intermediates_supported(cfg)?;
    let Some(f) = cfg.fp8 else { return Ok(()) };
    if cfg.class == LayerClass::Grouped {
        return Err(SampledError::Unsupported(crate::properties::grouped_fp8_skip(&f)));
    }
    match f.recipe {
        Fp8Recipe::Blockwise | Fp8Recipe::Mxfp8 => Ok(()),
        Fp8Recipe::Tensorwise | Fp8Recipe::Delayed => Err(SampledError::Unsupported(format!(
            "sampled verification of fp8 {}: a per-tensor recipe scales each expert's operands by their whole \
             amax (delayed: an amax history), so sampled rows do not quantize as in the full layer; the sampled \
             checks run the row-local recipes (blockwise, mxfp8)",
            f.label()
        ))),
    }
}
