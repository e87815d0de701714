//! Sampled verification of model-sized shapes (Mixtral 8x7B, DeepSeek-V3 EP slice,
//! Qwen3-30B-A3B, GPT-OSS-120B; GLU silu, bf16), too large for an f64 oracle on every element.
//!
//! Every bound here is the harness's error model (`moe_harness::tolerance`): an element passes
//! when `|got − exp| ≤ C_SAFETY·(S + A + rms(S_block))`, `C_SAFETY = 2`, `S` the running error
//! bound of the element, `A` the clamp allowance. What differs from a whole-layer comparison is
//! only where `S` and the rms floor come from; nothing below is a tolerance of its own.
//!
//! # Checks and their bounds
//!
//! * **Rows** of the output, dx and dprobs. Rows are independent in these three, so for a sample
//!   of rows of **every** expert (first, last and two random rows) the f64 oracle runs on a
//!   one-expert layer built from that expert's downloaded weights and the sampled rows
//!   (`moe_reference::forward` + `backward` with [`Numerics::Oracle`], what
//!   `moe_reference::oracle_with_scales` runs). Its [`moe_reference::ErrorScales`] give `S` and `A`
//!   of every sampled element exactly as a whole-layer oracle run would (the bound of a row
//!   depends on that row alone). The rms floor is the rms of `S` over the expert's sampled rows
//!   (an estimate of the whole tensor's, from rows of the same distribution).
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
//!   GEMM element ([`moe_harness::tolerance::gemm_element_scale`]):
//!   `S_jk = u_s·|D_jk| + η + √n·u_f32·Σ_i |A_ij·B_ik|`; its rms floor `R` is bounded below.
//! * **Projections** (Freivalds) of every row `j` of `dW2` and `dW1`:
//!   `P_j = Σ_k v_k·got_jk − Σ_i A_ij·(B·v)_i` with random signs `v_k = ±1` over the row's `K'`
//!   columns, drawn independently of the GPU's results. With `E_jk = got_jk − D_jk`,
//!   `P_j = Σ_k v_k·E_jk` (the f64 evaluation adds about 10⁻¹⁶ of the terms, nothing next to
//!   the bound). Every `|E_jk| ≤ b_jk = C_SAFETY·(S_jk + R)`, the element bound above, so
//!   - worst case, whatever the signs: `|P_j| ≤ Σ_k b_jk`;
//!   - random signs (Hoeffding: the `v_k·E_jk` are independent, mean 0, in `[−b_jk, b_jk]`):
//!     `P(|P_j| ≥ t·‖b_j‖₂) ≤ 2·exp(−t²/2)`.
//!
//!   The check uses `min(Σ_k b_jk, t·‖b_j‖₂)` with `t` = [`PROJECTION_T`] = 8: `2·e⁻³² ≈
//!   2.5·10⁻¹⁴` per row, about 10⁻⁷ for the 3.7·10⁶ projected rows of all the shape × class
//!   pairs the sampled test runs. The worst case alone is `√K'/t` times looser (15x for
//!   Mixtral's `dW2` rows, `K'` = 14336) and would let a wrong 128-column tile through, which is
//!   what the projections are for (the element samples rarely hit one tile).
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
//! The checks are pure functions of host data (`check_expert`), so unit tests feed them
//! synthetic results with errors injected at 1.2× and 0.8× of each bound, without a GPU.

use crate::error::GpuError;
use crate::kernels::engine;
use crate::layer::{from_bytes, segments};
use moe_harness::tolerance::{gemm_element_scale, Tolerance, C_SAFETY};
use moe_reference::layer::forward as ref_forward;
use moe_reference::{
    Activation, Dtype, ExpertSet, ExpertWeights, Inputs, LayerClass, LayerConfig, Numerics, Parallelism, WgradTiming,
};
use ndarray::{Array1, Array2, ArrayView2, Axis};
use std::fmt;
use std::time::Instant;

/// The `t` of the projection bound `min(Σ_k b_jk, t·‖b_j‖₂)` (module doc): a row whose
/// elements are all within their bounds fails with probability at most `2·exp(−t²/2)`.
pub const PROJECTION_T: f64 = 8.0;

/// Elements of each expert's `dW1` and `dW2` checked against their exact dot products.
pub const ELEMENT_SAMPLES: usize = 64;

/// A model's expert shape (bugs-shapes-anchors §C) and a default token count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelShape {
    /// CLI name.
    pub name: &'static str,
    /// hidden size `h`.
    pub hidden: usize,
    /// moe ffn hidden size `f` (fc1 is `2f` wide: SwiGLU).
    pub ffn: usize,
    /// Local experts `E_l`.
    pub experts: usize,
    /// Default number of permuted token rows `T`.
    pub tokens: usize,
}

/// The four model shapes (all GLU silu, bf16).
pub const SHAPES: [ModelShape; 4] = [
    ModelShape { name: "mixtral", hidden: 4096, ffn: 14336, experts: 8, tokens: 16384 },
    ModelShape { name: "deepseek-v3", hidden: 7168, ffn: 2048, experts: 32, tokens: 32768 },
    ModelShape { name: "qwen3-30b-a3b", hidden: 2048, ffn: 768, experts: 128, tokens: 65536 },
    ModelShape { name: "gpt-oss-120b", hidden: 2880, ffn: 2880, experts: 128, tokens: 32768 },
];

/// Looks a shape up by name.
pub fn shape(name: &str) -> Result<ModelShape, GpuError> {
    SHAPES.iter().copied().find(|s| s.name == name).ok_or_else(|| {
        GpuError::Unsupported(format!("unknown shape {name:?}; expected one of {:?}", SHAPES.map(|s| s.name)))
    })
}

/// The layer configuration of a model shape for `class`.
/// GLU silu, bf16 parameters, fp32 probs, no bias.
pub fn shape_config(shape: &ModelShape, class: LayerClass) -> LayerConfig {
    LayerConfig {
        class,
        num_experts: shape.experts,
        hidden_size: shape.hidden,
        ffn_hidden_size: shape.ffn,
        gated_linear_unit: true,
        activation: Activation::Silu,
        add_bias: false,
        clamp_value: None,
        glu_linear_offset: 0.0,
        apply_probs_on_input: false,
        params_dtype: Dtype::Bf16,
        probs_dtype: Dtype::F32,
        padding_multiple: None,
        parallel: Parallelism::SINGLE,
        fp8: None,
    }
}

/// A skewed split of `tokens` rows over `experts` (Zipf-like weights, deterministic in `seed`),
/// with experts 1 and `E − 2` empty when `E ≥ 4`. Counts are multiples of 16 when `tokens` is
/// (rows are handed out in units of 16), as `torch._grouped_mm` comparisons want.
/// `scripts/torch_experts_bench.py` reimplements this exactly.
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
    pub fn all(&self) -> [&CheckStat; 10] {
        [
            &self.output_rows,
            &self.grad_input_rows,
            &self.grad_probs_rows,
            &self.fc2_input_rows,
            &self.fc1_output_grad_rows,
            &self.dw2_projections,
            &self.dw1_projections,
            &self.dw2_elements,
            &self.dw1_elements,
            &self.empty_expert_grads,
        ]
    }

    fn all_mut(&mut self) -> [&mut CheckStat; 10] {
        [
            &mut self.output_rows,
            &mut self.grad_input_rows,
            &mut self.grad_probs_rows,
            &mut self.fc2_input_rows,
            &mut self.fc1_output_grad_rows,
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

/// The result of [`verify_large_shape`].
#[derive(Clone, Debug)]
pub struct LargeShapeReport {
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
    /// Checks and their worst ratios.
    pub checks: SampledChecks,
}

impl LargeShapeReport {
    /// True when every check's worst ratio is ≤ 1.
    pub fn passed(&self) -> bool {
        self.checks.passed()
    }
}

impl fmt::Display for LargeShapeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} {} on {}: T={} E_l={} ({} empty), {} rows checked, fwd+bwd {:.2} ms: {}",
            self.shape,
            self.class.megatron_name(),
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

/// Sampled verification of `shape_name` with `tokens` rows (0: the shape's default) on the
/// GPU for TEGroupedMLP (the class Megatron uses for grouped GEMM today).
pub fn verify_large_shape(shape_name: &str, tokens: usize, seed: u64) -> Result<LargeShapeReport, GpuError> {
    verify_large_shape_class(LayerClass::TeGrouped, shape_name, tokens, seed)
}

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

/// Everything downloaded for one expert, as raw storage-dtype bytes (converted to f64 inside the
/// checker thread, one expert at a time, to bound host memory).
struct ExpertData {
    e: usize,
    start: usize,
    n: usize,
    w1: Vec<u8>,
    w2: Vec<u8>,
    dw1: Vec<u8>,
    dw2: Vec<u8>,
    u: Vec<u8>,
    da: Vec<u8>,
}

/// One expert's data in f64, weights and weight grads in the class's layout (GroupedMLP:
/// `[in, out]`, the others `[out, in]`), `u` `[n, N2]` and `da` `[n, N1]` row-major.
#[derive(Clone, Debug)]
struct Expert {
    e: usize,
    start: usize,
    n: usize,
    w1: Vec<f64>,
    w2: Vec<f64>,
    dw1: Vec<f64>,
    dw2: Vec<f64>,
    u: Vec<f64>,
    da: Vec<f64>,
}

/// [`verify_large_shape`] for any of the three classes.
pub fn verify_large_shape_class(
    class: LayerClass,
    shape_name: &str,
    tokens: usize,
    seed: u64,
) -> Result<LargeShapeReport, GpuError> {
    let sh = shape(shape_name)?;
    let cfg = shape_config(&sh, class);
    cfg.validate()?;
    intermediates_supported(&cfg)?;
    let t = if tokens == 0 { sh.tokens } else { tokens };
    let counts_i = skewed_counts(t, sh.experts, seed);
    let counts = segments(&cfg, &counts_i, t)?;
    let (h, n1, n2, dt) = (cfg.hidden_size, cfg.n1(), cfg.n2(), cfg.params_dtype);
    let ds = dt.size_bytes();
    let grouped = class == LayerClass::Grouped;

    let mut eng = engine()?;
    let device = eng.device_name().to_string();
    let w = eng.prepare_random(&cfg, seed)?;
    let mut ws = eng.workspace(&cfg, &counts, false)?;
    eng.random_inputs(&cfg, &mut ws, seed)?;
    eng.synchronize()?;
    let t0 = Instant::now();
    eng.forward(&cfg, &w, &mut ws)?;
    eng.backward(&cfg, &w, &mut ws, true)?;
    eng.synchronize()?;
    let gpu_ms = t0.elapsed().as_secs_f64() * 1e3;

    let x = from_bytes(dt, &eng.download(&ws.x)?);
    let g = from_bytes(dt, &eng.download(&ws.g)?);
    let y = from_bytes(dt, &eng.download(&ws.y)?);
    let dx = from_bytes(dt, &eng.download(&ws.dx)?);
    let p = from_bytes(Dtype::F32, &eng.download(&ws.p)?);
    let dp = from_bytes(Dtype::F32, &eng.download(&ws.dp)?);
    let mut experts = Vec::with_capacity(sh.experts);
    for (e, &n) in counts.iter().enumerate() {
        let start = ws.offsets[e];
        let wb1 = e * n1 * h * ds;
        let wb2 = e * h * n2 * ds;
        experts.push(ExpertData {
            e,
            start,
            n,
            w1: eng.download_range(&w.w1, wb1, n1 * h * ds)?,
            w2: eng.download_range(&w.w2, wb2, h * n2 * ds)?,
            dw1: eng.download_range(&ws.grads.w1, wb1, n1 * h * ds)?,
            dw2: eng.download_range(&ws.grads.w2, wb2, h * n2 * ds)?,
            u: eng.download_range(&ws.u, start * n2 * ds, n * n2 * ds)?,
            da: eng.download_range(&ws.da, start * n1 * ds, n * n1 * ds)?,
        });
    }
    drop(eng);

    // Per-expert checks in parallel on the host.
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(4).min(16);
    let chunks: Vec<Vec<ExpertData>> = {
        let mut c: Vec<Vec<ExpertData>> = (0..threads).map(|_| Vec::new()).collect();
        for (i, ed) in experts.into_iter().enumerate() {
            c[i % threads].push(ed);
        }
        c
    };
    let shared = Shared { cfg: &cfg, x: &x, g: &g, y: &y, dx: &dx, p: &p, dp: &dp, grouped, seed };
    let results: Vec<Result<(SampledChecks, usize), GpuError>> = std::thread::scope(|s| {
        let handles: Vec<_> = chunks.iter().map(|chunk| s.spawn(|| check_experts(&shared, chunk))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(GpuError::Shape("a checker thread panicked".into()))))
            .collect()
    });
    let mut checks = SampledChecks::default();
    let mut rows_checked = 0;
    for r in results {
        let (stats, rows) = r?;
        rows_checked += rows;
        checks.merge(stats);
    }
    Ok(LargeShapeReport {
        shape: sh.name.into(),
        class,
        device,
        tokens: t,
        experts: sh.experts,
        empty_experts: counts.iter().filter(|&&c| c == 0).count(),
        rows_checked,
        gpu_ms,
        checks,
    })
}

/// The host copies every expert's checks read: the whole layer's `[T, h]` inputs, upstream
/// gradient, output and input grad, and `[T]` probs and probs grad, rows sorted by expert.
struct Shared<'a> {
    cfg: &'a LayerConfig,
    x: &'a [f64],
    g: &'a [f64],
    y: &'a [f64],
    dx: &'a [f64],
    p: &'a [f64],
    dp: &'a [f64],
    grouped: bool,
    seed: u64,
}

fn check_experts(sh: &Shared, chunk: &[ExpertData]) -> Result<(SampledChecks, usize), GpuError> {
    let mut st = SampledChecks::default();
    let mut rows_checked = 0;
    let dt = sh.cfg.params_dtype;
    for raw in chunk {
        let ed = Expert {
            e: raw.e,
            start: raw.start,
            n: raw.n,
            w1: from_bytes(dt, &raw.w1),
            w2: from_bytes(dt, &raw.w2),
            dw1: from_bytes(dt, &raw.dw1),
            dw2: from_bytes(dt, &raw.dw2),
            u: from_bytes(dt, &raw.u),
            da: from_bytes(dt, &raw.da),
        };
        rows_checked += check_expert(sh, &ed, &mut st)?;
    }
    Ok((st, rows_checked))
}

/// The intermediates check recomputes `U_e` and `DA_e` for a GLU without clamp, linear offset,
/// bias or probs on the input (what [`shape_config`] builds); anything else is refused.
fn intermediates_supported(cfg: &LayerConfig) -> Result<(), GpuError> {
    if cfg.gated_linear_unit
        && cfg.clamp_value.is_none()
        && cfg.glu_linear_offset == 0.0
        && !cfg.add_bias
        && !cfg.apply_probs_on_input
    {
        Ok(())
    } else {
        Err(GpuError::Unsupported(
            "sampled verification recomputes U_e and DA_e for a GLU without clamp, offset, bias or probs on the input"
                .into(),
        ))
    }
}

/// A 64-bit LCG (Knuth's MMIX constants): the sampled rows, signs and elements, deterministic in
/// the seed and the expert.
struct Lcg(u64);

impl Lcg {
    fn new(seed: u64, expert: usize, stream: u64) -> Lcg {
        Lcg(seed ^ (expert as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ stream.wrapping_mul(0xd1b5_4a32_d192_ed03))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() >> 33) as usize % n.max(1)
    }

    fn sign(&mut self) -> f64 {
        if self.next() >> 63 == 0 {
            1.0
        } else {
            -1.0
        }
    }
}

/// The rows of expert `e` (of `n > 0`) checked against the oracle: first, last and two
/// pseudo-random ones, sorted, without duplicates.
fn sample_rows(seed: u64, e: usize, n: usize) -> Vec<usize> {
    let mut rng = Lcg::new(seed, e, 1);
    let mut rows = vec![0, n - 1, rng.below(n), rng.below(n)];
    rows.sort_unstable();
    rows.dedup();
    rows
}

/// The random signs `v` of the projections of expert `e`'s `dW2` (`which = 2`) or `dW1` (1).
fn projection_signs(seed: u64, e: usize, which: u64, len: usize) -> Vec<f64> {
    let mut rng = Lcg::new(seed, e, 10 + which);
    (0..len).map(|_| rng.sign()).collect()
}

/// The [`ELEMENT_SAMPLES`] canonical positions `(j, k)` of expert `e`'s `dW2` (`which = 2`) or
/// `dW1` (1) checked element by element.
fn sample_elements(seed: u64, e: usize, which: u64, rows: usize, cols: usize) -> Vec<(usize, usize)> {
    let mut rng = Lcg::new(seed, e, 20 + which);
    (0..ELEMENT_SAMPLES).map(|_| (rng.below(rows), rng.below(cols))).collect()
}

/// Records `got` against `exp` element by element under the error model: the bound is
/// `C_SAFETY·(S + A + rms(S))` with `S` = `scale`, `A` = `allowance` (zero when `None`) and the
/// rms over all of `scale` (the expert's sampled rows). `at(i, j)` names element `(i, j)`.
fn check_sampled(
    stat: &mut CheckStat,
    got: ArrayView2<f64>,
    exp: ArrayView2<f64>,
    scale: ArrayView2<f64>,
    allowance: Option<ArrayView2<f64>>,
    at: impl Fn(usize, usize) -> String,
) {
    let tol = Tolerance::error_model();
    let floor = rms(scale.iter().copied());
    for ((i, j), &ev) in exp.indexed_iter() {
        let gv = got[[i, j]];
        let a = allowance.map_or(0.0, |a| a[[i, j]].abs());
        let bound = tol.bound(scale[[i, j]].abs() + a, floor);
        stat.record((gv - ev).abs(), bound, || format!("{}: got {gv:e} exp {ev:e}", at(i, j)));
    }
}

/// `U = act(gate)·lin·p` `[m, N2]` and `DA = [dz·lin·act'(gate), dz·act(gate)]` `[m, N1]` with
/// `dz = (G·W2)·p`, in f64, for the rows `xs`, `gs`, `ps` of one expert with canonical weights
/// `w1` `[N1, h]`, `w2` `[h, N2]` (a GLU without clamp, offset, bias or probs on the input:
/// [`intermediates_supported`]).
fn intermediates(
    act: Activation,
    xs: &Array2<f64>,
    gs: &Array2<f64>,
    ps: &Array1<f64>,
    w1: &Array2<f64>,
    w2: &Array2<f64>,
) -> (Array2<f64>, Array2<f64>) {
    let a = xs.dot(&w1.t());
    let du = gs.dot(w2);
    let (m, n2) = du.dim();
    let mut u = Array2::zeros((m, n2));
    let mut da = Array2::zeros((m, 2 * n2));
    for i in 0..m {
        for j in 0..n2 {
            let (gate, lin) = (a[[i, j]], a[[i, n2 + j]]);
            u[[i, j]] = act.apply(gate) * lin * ps[i];
            let dz = du[[i, j]] * ps[i];
            da[[i, j]] = dz * lin * act.derivative(gate);
            da[[i, n2 + j]] = dz * act.apply(gate);
        }
    }
    (u, da)
}

/// Checks one expert's canonical weight grad `D = Aᵀ·B` `[J, K']` (`dims = (n, J, K')`), given
/// the operands the GPU used (`a(i, j)` of `A` `[n, J]`, `b(i, k)` of `B` `[n, K']`) and the
/// GPU's result `got(j, k)`: the projection of every row on `signs` into `projections`, and the
/// `samples` elements against their exact dot products into `elements`, with the bounds the
/// module doc derives. `label` names the matrix in reports.
#[allow(clippy::too_many_arguments)]
fn check_wgrad(
    dt: Dtype,
    dims: (usize, usize, usize),
    a: impl Fn(usize, usize) -> f64,
    b: impl Fn(usize, usize) -> f64,
    got: impl Fn(usize, usize) -> f64,
    signs: &[f64],
    samples: &[(usize, usize)],
    projections: &mut CheckStat,
    elements: &mut CheckStat,
    label: &str,
) {
    let (n, rows, cols) = dims;
    if rows == 0 || cols == 0 {
        return;
    }
    let (us, eta) = (dt.unit_roundoff(), dt.subnormal_spacing());
    let acc = (n.max(1) as f64).sqrt() * Dtype::F32.unit_roundoff();
    // B·v and the 1- and 2-norms of B's rows.
    let mut bv = vec![0.0; n];
    let mut b1 = vec![0.0; n];
    let mut b2 = vec![0.0; n];
    for i in 0..n {
        for (k, &v) in signs.iter().enumerate().take(cols) {
            let x = b(i, k);
            bv[i] += x * v;
            b1[i] += x.abs();
            b2[i] += x * x;
        }
        b2[i] = b2[i].sqrt();
    }
    // Per row j of D: Aᵀ·(B·v), Σ_i |A_ij|·‖B_i‖₁ and Σ_i |A_ij|·‖B_i‖₂ (A's rows are contiguous).
    let mut rhs = vec![0.0; rows];
    let mut acc1 = vec![0.0; rows];
    let mut acc2 = vec![0.0; rows];
    for i in 0..n {
        for j in 0..rows {
            let x = a(i, j);
            rhs[j] += x * bv[i];
            acc1[j] += x.abs() * b1[i];
            acc2[j] += x.abs() * b2[i];
        }
    }
    // The GPU's rows: projection, ‖got_j‖₁, ‖got_j‖₂.
    let mut lhs = vec![0.0; rows];
    let mut g1 = vec![0.0; rows];
    let mut g2 = vec![0.0; rows];
    for j in 0..rows {
        for (k, &v) in signs.iter().enumerate().take(cols) {
            let x = got(j, k);
            lhs[j] += x * v;
            g1[j] += x.abs();
            g2[j] += x * x;
        }
    }
    let kf = cols as f64;
    // s_j ≥ ‖S_j‖₂, and the block's rms floor R̄ ≥ rms(S).
    let s2: Vec<f64> = (0..rows).map(|j| us * g2[j].sqrt() + kf.sqrt() * eta + acc * acc2[j]).collect();
    let r_bar = (s2.iter().map(|s| s * s).sum::<f64>() / (rows as f64 * kf)).sqrt();
    for j in 0..rows {
        let worst = C_SAFETY * (us * g1[j] + kf * eta + acc * acc1[j] + kf * r_bar);
        let random = PROJECTION_T * C_SAFETY * (s2[j] + kf.sqrt() * r_bar);
        let (l, r) = (lhs[j], rhs[j]);
        projections.record((l - r).abs(), worst.min(random), || format!("{label} row {j}: {l:e} vs {r:e}"));
    }
    let tol = Tolerance::error_model();
    for &(j, k) in samples {
        let (mut exact, mut sum_abs) = (0.0, 0.0);
        for i in 0..n {
            let t = a(i, j) * b(i, k);
            exact += t;
            sum_abs += t.abs();
        }
        let gv = got(j, k);
        let bound = tol.bound(gemm_element_scale(dt, exact, n, sum_abs), r_bar);
        elements.record((gv - exact).abs(), bound, || format!("{label}[{j},{k}]: {gv:e} vs {exact:e}"));
    }
}

/// Checks one expert (module doc); returns the number of rows checked against the oracle.
fn check_expert(sh: &Shared, ed: &Expert, st: &mut SampledChecks) -> Result<usize, GpuError> {
    let cfg = sh.cfg;
    intermediates_supported(cfg)?;
    let (h, n1, n2, dt) = (cfg.hidden_size, cfg.n1(), cfg.n2(), cfg.params_dtype);
    let e = ed.e;
    if ed.n == 0 {
        for (name, v) in [("dW1", &ed.dw1), ("dW2", &ed.dw2)] {
            for (i, &x) in v.iter().enumerate() {
                st.empty_expert_grads.record(x.abs(), 0.0, || format!("expert {e} {name}[{i}] = {x}"));
            }
        }
        return Ok(0);
    }
    // Canonical [out, in] weights of this expert.
    let w1c: Array2<f64> = if sh.grouped {
        Array2::from_shape_vec((h, n1), ed.w1.clone()).expect("size").t().to_owned()
    } else {
        Array2::from_shape_vec((n1, h), ed.w1.clone()).expect("size")
    };
    let w2c: Array2<f64> = if sh.grouped {
        Array2::from_shape_vec((n2, h), ed.w2.clone()).expect("size").t().to_owned()
    } else {
        Array2::from_shape_vec((h, n2), ed.w2.clone()).expect("size")
    };
    let rows = sample_rows(sh.seed, e, ed.n);
    let m = rows.len();
    let global = |i: usize| ed.start + rows[i];
    let xs = Array2::from_shape_fn((m, h), |(i, j)| sh.x[global(i) * h + j]);
    let gs = Array2::from_shape_fn((m, h), |(i, j)| sh.g[global(i) * h + j]);
    let ps = Array1::from_shape_fn(m, |i| sh.p[global(i)]);
    // The f64 oracle with its running error bounds on a one-expert layer of the sampled rows.
    let cfg1 = LayerConfig { num_experts: 1, parallel: Parallelism::SINGLE, ..cfg.clone() };
    let set = ExpertSet {
        experts: vec![ExpertWeights {
            fc1_weight: w1c.clone(),
            fc1_bias: None,
            fc2_weight: w2c.clone(),
            fc2_bias: None,
        }],
    };
    let inp = Inputs { hidden_states: xs.clone(), tokens_per_expert: vec![m as i64], probs: ps.clone() };
    let fwd = ref_forward(&cfg1, &set, &inp, Numerics::Oracle)?;
    let bwd = fwd.backward(&gs, WgradTiming::Immediate)?;
    let sc = bwd.scales.as_ref().ok_or_else(|| GpuError::Shape("the f64 oracle returned no error scales".into()))?;
    let sampled = &rows;
    let at = |what: &'static str| move |i: usize, j: usize| format!("expert {e} row {} col {j} ({what})", sampled[i]);
    let rows_of = |v: &[f64], width: usize| Array2::from_shape_fn((m, width), |(i, j)| v[global(i) * width + j]);
    check_sampled(&mut st.output_rows, rows_of(sh.y, h).view(), fwd.output().view(), sc.output.view(), None, at("y"));
    check_sampled(
        &mut st.grad_input_rows,
        rows_of(sh.dx, h).view(),
        bwd.grad_input.view(),
        sc.grad_input.view(),
        Some(sc.allowance_grad_input.view()),
        at("dx"),
    );
    let column = |v: &Array1<f64>| v.view().insert_axis(Axis(1)).to_owned();
    check_sampled(
        &mut st.grad_probs_rows,
        rows_of(sh.dp, 1).view(),
        column(&bwd.grad_probs).view(),
        column(&sc.grad_probs).view(),
        Some(column(&sc.allowance_grad_probs).view()),
        at("dp"),
    );
    // The GPU's intermediates on the same rows against the same math in f64.
    let (u_exp, da_exp) = intermediates(cfg.activation, &xs, &gs, &ps, &w1c, &w2c);
    let local = |v: &[f64], width: usize| Array2::from_shape_fn((m, width), |(i, j)| v[rows[i] * width + j]);
    check_sampled(&mut st.fc2_input_rows, local(&ed.u, n2).view(), u_exp.view(), sc.fc2_input.view(), None, at("u"));
    check_sampled(
        &mut st.fc1_output_grad_rows,
        local(&ed.da, n1).view(),
        da_exp.view(),
        sc.fc1_output_grad.view(),
        None,
        at("da"),
    );

    // Weight grads, canonical: dW2 [h, N2] = G_eᵀ·U_e, dW1 [N1, h] = DA_eᵀ·X_e.
    let dw2 = |j: usize, k: usize| if sh.grouped { ed.dw2[k * h + j] } else { ed.dw2[j * n2 + k] };
    let dw1 = |j: usize, k: usize| if sh.grouped { ed.dw1[k * n1 + j] } else { ed.dw1[j * h + k] };
    let (n, start) = (ed.n, ed.start);
    check_wgrad(
        dt,
        (n, h, n2),
        |i, j| sh.g[(start + i) * h + j],
        |i, k| ed.u[i * n2 + k],
        dw2,
        &projection_signs(sh.seed, e, 2, n2),
        &sample_elements(sh.seed, e, 2, h, n2),
        &mut st.dw2_projections,
        &mut st.dw2_elements,
        &format!("expert {e} dW2"),
    );
    check_wgrad(
        dt,
        (n, n1, h),
        |i, j| ed.da[i * n1 + j],
        |i, k| sh.x[(start + i) * h + k],
        dw1,
        &projection_signs(sh.seed, e, 1, h),
        &sample_elements(sh.seed, e, 1, n1, h),
        &mut st.dw1_projections,
        &mut st.dw1_elements,
        &format!("expert {e} dW1"),
    );
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The model shapes are timed and verified as GLU silu, bf16, fp32 probs, no bias (what the
    /// PyTorch benches build too).
    #[test]
    fn shape_configs_are_glu_silu_bf16_without_bias() {
        for s in SHAPES {
            let c = shape_config(&s, LayerClass::TeGrouped);
            assert!(c.gated_linear_unit && c.activation == moe_reference::Activation::Silu && !c.add_bias);
            assert_eq!(
                (c.params_dtype, c.probs_dtype, c.clamp_value, c.padding_multiple),
                (Dtype::Bf16, Dtype::F32, None, None)
            );
            assert!(!c.apply_probs_on_input && c.glu_linear_offset == 0.0 && c.parallel == Parallelism::SINGLE);
            assert!(c.validate().is_ok());
        }
    }

    /// `scripts/torch_experts_bench.py` ports this split; both print these counts for seed 42.
    #[test]
    fn skewed_counts_match_the_python_port() {
        let c = skewed_counts(16384, 8, 42);
        assert_eq!(&c[..6], &[2144, 0, 3648, 1584, 3600, 3184]);
        assert_eq!(c.iter().sum::<i64>(), 16384);
        let c = skewed_counts(65536, 128, 42);
        assert_eq!(&c[..6], &[832, 0, 1424, 624, 1408, 1248]);
        assert_eq!(c[126], 0);
        assert!(c.iter().all(|&n| n % 16 == 0));
    }

    const SEED: u64 = 7;

    /// A small layer of `class` (GLU silu, bf16, as the model shapes; 3 experts, the middle one
    /// empty) with "GPU" results that are the f64 values rounded once to their dtype (inside the
    /// model: one rounding is at most `u·|v| ≤ S`), the weight grads computed from the rounded
    /// intermediates, as the GPU computes them from its own. Injections overwrite one value with
    /// its exact value plus an error.
    #[derive(Clone)]
    struct Synth {
        cfg: LayerConfig,
        x: Vec<f64>,
        g: Vec<f64>,
        p: Vec<f64>,
        y: Vec<f64>,
        dx: Vec<f64>,
        dp: Vec<f64>,
        y_exact: Array2<f64>,
        dx_exact: Array2<f64>,
        dp_exact: Array1<f64>,
        u_exact: Vec<Array2<f64>>,
        da_exact: Vec<Array2<f64>>,
        experts: Vec<Expert>,
    }

    impl Synth {
        fn new(class: LayerClass) -> Synth {
            let shape = ModelShape { name: "test", hidden: 48, ffn: 40, experts: 3, tokens: 23 };
            let cfg = shape_config(&shape, class);
            let counts = [9usize, 0, 14];
            let (t, h, dt) = (shape.tokens, cfg.hidden_size, cfg.params_dtype);
            let mut rng = Lcg::new(SEED, 0, 99);
            let mut uniform = |lo: f64, hi: f64| lo + (hi - lo) * ((rng.next() >> 11) as f64 / (1u64 << 53) as f64);
            let x = Array2::from_shape_fn((t, h), |_| dt.round(uniform(-1.0, 1.0)));
            let g = Array2::from_shape_fn((t, h), |_| dt.round(uniform(-1.0, 1.0)));
            let p = Array1::from_shape_fn(t, |_| Dtype::F32.round(uniform(0.05, 1.0)));
            let set = ExpertSet::random(&cfg, SEED);
            let tokens_per_expert = counts.iter().map(|&c| c as i64).collect();
            let inputs = Inputs { hidden_states: x.clone(), tokens_per_expert, probs: p.clone() };
            let fwd = ref_forward(&cfg, &set, &inputs, Numerics::Oracle).unwrap();
            let bwd = fwd.backward(&g, WgradTiming::Immediate).unwrap();
            let rounded = |a: &Array2<f64>| a.iter().map(|&v| dt.round(v)).collect::<Vec<f64>>();
            let layout = |w: &Array2<f64>| -> Vec<f64> {
                if class == LayerClass::Grouped {
                    w.t().iter().copied().collect()
                } else {
                    w.iter().copied().collect()
                }
            };
            let (mut experts, mut u_exact, mut da_exact) = (Vec::new(), Vec::new(), Vec::new());
            let mut start = 0;
            for (e, &n) in counts.iter().enumerate() {
                let w = &set.experts[e];
                let rows = ndarray::s![start..start + n, ..];
                let (u, da) = intermediates(
                    cfg.activation,
                    &x.slice(rows).to_owned(),
                    &g.slice(rows).to_owned(),
                    &p.slice(ndarray::s![start..start + n]).to_owned(),
                    &w.fc1_weight,
                    &w.fc2_weight,
                );
                experts.push(Expert {
                    e,
                    start,
                    n,
                    w1: layout(&w.fc1_weight),
                    w2: layout(&w.fc2_weight),
                    dw1: vec![],
                    dw2: vec![],
                    u: rounded(&u),
                    da: rounded(&da),
                });
                u_exact.push(u);
                da_exact.push(da);
                start += n;
            }
            let mut s = Synth {
                x: x.iter().copied().collect(),
                g: g.iter().copied().collect(),
                p: p.to_vec(),
                y: rounded(fwd.output()),
                dx: rounded(&bwd.grad_input),
                dp: bwd.grad_probs.iter().map(|&v| Dtype::F32.round(v)).collect(),
                y_exact: fwd.output().clone(),
                dx_exact: bwd.grad_input.clone(),
                dp_exact: bwd.grad_probs.clone(),
                u_exact,
                da_exact,
                experts,
                cfg,
            };
            s.derive_wgrads();
            s
        }

        fn grouped(&self) -> bool {
            self.cfg.class == LayerClass::Grouped
        }

        /// Expert `e`'s canonical `dW2 = G_eᵀ·U_e` (`which = 2`) or `dW1 = DA_eᵀ·X_e` (1) in f64,
        /// from the "GPU"'s intermediates.
        fn exact_wgrad(&self, e: usize, which: u64) -> Array2<f64> {
            let (h, n1, n2) = (self.cfg.hidden_size, self.cfg.n1(), self.cfg.n2());
            let ed = &self.experts[e];
            let rows = |v: &[f64]| Array2::from_shape_fn((ed.n, h), |(i, j)| v[(ed.start + i) * h + j]);
            if which == 2 {
                rows(&self.g).t().dot(&Array2::from_shape_vec((ed.n, n2), ed.u.clone()).unwrap())
            } else {
                Array2::from_shape_vec((ed.n, n1), ed.da.clone()).unwrap().t().dot(&rows(&self.x))
            }
        }

        /// The flat index of canonical element `(j, k)` of expert weight grad `which` in the
        /// class's layout.
        fn wgrad_index(&self, which: u64, j: usize, k: usize) -> usize {
            let (h, n1, n2) = (self.cfg.hidden_size, self.cfg.n1(), self.cfg.n2());
            match (which, self.grouped()) {
                (2, true) => k * h + j,
                (2, false) => j * n2 + k,
                (_, true) => k * n1 + j,
                (_, false) => j * h + k,
            }
        }

        fn set_wgrad(&mut self, e: usize, which: u64, j: usize, k: usize, value: f64) {
            let i = self.wgrad_index(which, j, k);
            let ed = &mut self.experts[e];
            if which == 2 {
                ed.dw2[i] = value;
            } else {
                ed.dw1[i] = value;
            }
        }

        /// The weight grads from each expert's (GPU) intermediates, exact then rounded once, in
        /// the class's layout; zeros for empty experts.
        fn derive_wgrads(&mut self) {
            let (h, n1, n2, dt) = (self.cfg.hidden_size, self.cfg.n1(), self.cfg.n2(), self.cfg.params_dtype);
            for e in 0..self.experts.len() {
                let (mut dw1, mut dw2) = (vec![0.0; n1 * h], vec![0.0; h * n2]);
                if self.experts[e].n > 0 {
                    for (which, out) in [(1, &mut dw1), (2, &mut dw2)] {
                        for ((j, k), &v) in self.exact_wgrad(e, which).indexed_iter() {
                            out[self.wgrad_index(which, j, k)] = dt.round(v);
                        }
                    }
                }
                self.experts[e].dw1 = dw1;
                self.experts[e].dw2 = dw2;
            }
        }

        fn run(&self) -> SampledChecks {
            let sh = Shared {
                cfg: &self.cfg,
                x: &self.x,
                g: &self.g,
                y: &self.y,
                dx: &self.dx,
                p: &self.p,
                dp: &self.dp,
                grouped: self.grouped(),
                seed: SEED,
            };
            let mut st = SampledChecks::default();
            for ed in &self.experts {
                check_expert(&sh, ed, &mut st).unwrap();
            }
            st
        }
    }

    fn report(c: &SampledChecks) -> String {
        c.all()
            .iter()
            .map(|s| format!("{}: {:.3} at {}", s.name, s.worst_ratio, s.worst_at))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Injects an error of 1.2x and of 0.8x of the bound the check `stat` computes for the injected
    /// element (`inject(δ)` runs the checks with an error `δ` there): the first must fail that
    /// check, the second pass every check. The bound moves with `δ` only through `|got|` terms,
    /// so a few fixed-point steps find the `δ` of 1.2x.
    fn assert_fails_at_1_2x_and_passes_at_0_8x(
        what: &str,
        inject: &dyn Fn(f64) -> SampledChecks,
        stat: fn(&SampledChecks) -> &CheckStat,
    ) {
        let mut delta = 1.0;
        for _ in 0..12 {
            delta *= 1.2 / stat(&inject(delta)).worst_ratio;
        }
        let high = inject(delta);
        let r = stat(&high).worst_ratio;
        assert!((1.19..1.21).contains(&r), "{what}: 1.2x the bound gave {r:.4}\n{}", report(&high));
        assert!(!high.passed());
        let low = inject(delta * 0.8 / 1.2);
        assert!(low.passed(), "{what}: 0.8x the bound fails\n{}", report(&low));
        assert!(stat(&low).worst_ratio <= 0.81, "{what}: {}", report(&low));
    }

    /// Results within the model (one rounding of the exact values) pass every check, for both
    /// weight layouts, and every check saw values.
    #[test]
    fn results_inside_the_model_pass_every_check() {
        for class in [LayerClass::TeGrouped, LayerClass::Grouped] {
            let c = Synth::new(class).run();
            assert!(c.passed(), "{class}\n{}", report(&c));
            assert!(c.all().iter().all(|s| s.count > 0), "{class}\n{}", report(&c));
            // One rounding is at most u·|v|, at most half the bound (C_SAFETY = 2).
            assert!(c.all().iter().all(|s| s.worst_ratio <= 0.5), "{class}\n{}", report(&c));
        }
    }

    /// Every check fails on one value 1.2x its bound away from the exact value, and passes at
    /// 0.8x; empty experts' grads fail on any non-zero value.
    #[test]
    fn every_check_fails_at_1_2x_its_bound_and_passes_at_0_8x() {
        for class in [LayerClass::TeGrouped, LayerClass::Grouped] {
            let base = Synth::new(class);
            let (h, n1, n2) = (base.cfg.hidden_size, base.cfg.n1(), base.cfg.n2());
            let s0 = base.experts[0].start; // row 0 of expert 0 is always sampled
            let check = |what: &str, f: &dyn Fn(&mut Synth, f64), stat: fn(&SampledChecks) -> &CheckStat| {
                let inject = |delta: f64| {
                    let mut s = base.clone();
                    f(&mut s, delta);
                    s.run()
                };
                assert_fails_at_1_2x_and_passes_at_0_8x(&format!("{class} {what}"), &inject, stat);
            };
            check("output row", &|s, d| s.y[s0 * h + 3] = s.y_exact[[s0, 3]] + d, |c| &c.output_rows);
            check("grad_input row", &|s, d| s.dx[s0 * h + 5] = s.dx_exact[[s0, 5]] - d, |c| &c.grad_input_rows);
            check("grad_probs row", &|s, d| s.dp[s0] = s.dp_exact[s0] + d, |c| &c.grad_probs_rows);
            check(
                "U_e row",
                &|s, d| {
                    s.experts[0].u[2] = s.u_exact[0][[0, 2]] + d;
                    s.derive_wgrads();
                },
                |c| &c.fc2_input_rows,
            );
            check(
                "DA_e row",
                &|s, d| {
                    s.experts[0].da[n2 + 1] = s.da_exact[0][[0, n2 + 1]] - d;
                    s.derive_wgrads();
                },
                |c| &c.fc1_output_grad_rows,
            );
            // Element samples: the first sampled element of expert 2's dW2 and dW1.
            for (which, stat) in
                [(2u64, (|c| &c.dw2_elements) as fn(&SampledChecks) -> &CheckStat), (1, |c| &c.dw1_elements)]
            {
                let (rows, cols) = if which == 2 { (h, n2) } else { (n1, h) };
                let (j, k) = sample_elements(SEED, 2, which, rows, cols)[0];
                let exact = base.exact_wgrad(2, which)[[j, k]];
                check(&format!("dW{which} element"), &|s, d| s.set_wgrad(2, which, j, k, exact + d), stat);
            }
            // Projections: row 5 of expert 2's dW2 and dW1 set to the exact values, one element
            // off by δ (not a sampled element, which would fail at far less).
            for (which, stat) in
                [(2u64, (|c| &c.dw2_projections) as fn(&SampledChecks) -> &CheckStat), (1, |c| &c.dw1_projections)]
            {
                let (rows, cols) = if which == 2 { (h, n2) } else { (n1, h) };
                let samples = sample_elements(SEED, 2, which, rows, cols);
                let j = 5;
                let k = (0..cols).find(|&k| !samples.contains(&(j, k))).unwrap();
                let exact = base.exact_wgrad(2, which);
                check(
                    &format!("dW{which} projection"),
                    &|s, d| {
                        for kk in 0..cols {
                            s.set_wgrad(2, which, j, kk, exact[[j, kk]] + if kk == k { d } else { 0.0 });
                        }
                    },
                    stat,
                );
            }
            // Empty experts: S = 0, any non-zero value fails.
            let mut s = base.clone();
            s.experts[1].dw1[7] = 1e-30;
            let c = s.run();
            assert!(!c.empty_expert_grads.passed() && c.empty_expert_grads.count > 0, "{}", report(&c));
        }
    }

    /// The projection bound follows from the element bounds: errors of 0.9x every element's own
    /// bound `C_SAFETY·(S_jk + rms(S))` (signs drawn independently of the projection's) pass both
    /// the projections and the element samples, while the worst-case sum of those errors would be
    /// far above the projection bound if they were aligned with the signs.
    #[test]
    fn errors_within_every_element_bound_pass_the_projections() {
        let mut s = Synth::new(LayerClass::TeGrouped);
        let (dt, n) = (s.cfg.params_dtype, s.experts[2].n);
        let mut rng = Lcg::new(SEED, 2, 77);
        for which in [1u64, 2] {
            let d = s.exact_wgrad(2, which);
            let (a, b) = if which == 2 {
                let h = s.cfg.hidden_size;
                let gs = Array2::from_shape_fn((n, h), |(i, j)| s.g[(s.experts[2].start + i) * h + j]);
                (gs, Array2::from_shape_vec((n, s.cfg.n2()), s.experts[2].u.clone()).unwrap())
            } else {
                let h = s.cfg.hidden_size;
                let xs = Array2::from_shape_fn((n, h), |(i, j)| s.x[(s.experts[2].start + i) * h + j]);
                (Array2::from_shape_vec((n, s.cfg.n1()), s.experts[2].da.clone()).unwrap(), xs)
            };
            let sum_abs = a.mapv(f64::abs).t().dot(&b.mapv(f64::abs));
            let scale = Array2::from_shape_fn(d.dim(), |(j, k)| gemm_element_scale(dt, d[[j, k]], n, sum_abs[[j, k]]));
            let floor = rms(scale.iter().copied());
            for ((j, k), &v) in d.indexed_iter() {
                let err = 0.9 * C_SAFETY * (scale[[j, k]] + floor) * rng.sign();
                s.set_wgrad(2, which, j, k, v + err);
            }
        }
        let c = s.run();
        assert!(c.passed(), "{}", report(&c));
        assert!(c.dw1_elements.worst_ratio > 0.5 && c.dw2_elements.worst_ratio > 0.5, "{}", report(&c));
    }
}
