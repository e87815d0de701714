//! Sampled verification of model-sized shapes (Mixtral 8x7B, DeepSeek-V3 EP slice,
//! Qwen3-30B-A3B, GPT-OSS-120B; GLU silu, bf16), too large for an f64 oracle on every element.
//!
//! * Rows are independent in forward, dx and dprobs: for a sample of rows of **every** expert
//!   (first, last and two random rows), the f64 oracle (`moe_reference::forward` + `backward`
//!   with [`Numerics::Oracle`] on a one-expert layer built from that expert's downloaded
//!   weights) is compared with the GPU's output, dx and dprobs rows, and the GPU's own
//!   intermediates `U_e = round(z·p)` (fc2 input) and `DA_e` (fc1 output grad) on those rows are
//!   compared with the same math in f64.
//! * Weight grads by Freivalds projections with a random ±1 vector `v`:
//!   `dW2·v` vs `G_eᵀ(U_e·v)` and `dW1·v` vs `DA_eᵀ(X_e·v)` (canonical orientation), using the
//!   GPU's `U_e`/`DA_e` (checked above), plus 64 sampled elements of each expert's `dW1`/`dW2`
//!   against their exact dot products. Empty experts' weight grads must be exactly zero.
//!
//! Tolerances follow the harness model: `|got − exp| ≤ rtol·(|exp| + rms) + atol`,
//! `rtol = 8·u_storage + 4·√K·u_f32`. Freivalds rows use
//! `8·u_s·‖dW_j‖₂ + 8·√n·u_f32·Σ_i |A_ij|·‖B_i‖₂` (rounding of each stored element plus f32
//! accumulation, random signs).

use crate::error::GpuError;
use crate::kernels::engine;
use crate::layer::{from_bytes, segments};
use moe_reference::layer::forward as ref_forward;
use moe_reference::{
    Activation, Dtype, ExpertSet, ExpertWeights, Inputs, LayerClass, LayerConfig, Numerics, Parallelism, WgradTiming,
};
use ndarray::{Array1, Array2};
use std::fmt;
use std::time::Instant;

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
    /// Worst `|got − exp| / tolerance` (≤ 1 passes).
    pub worst_ratio: f64,
    /// Where the worst value was.
    pub worst_at: String,
}

impl CheckStat {
    fn new(name: &str) -> CheckStat {
        CheckStat { name: name.into(), count: 0, worst_ratio: 0.0, worst_at: String::new() }
    }

    fn record(&mut self, err: f64, tol: f64, at: impl FnOnce() -> String) {
        self.count += 1;
        let ratio = if err.is_nan() {
            f64::INFINITY
        } else if tol > 0.0 {
            err / tol
        } else if err == 0.0 {
            0.0
        } else {
            f64::INFINITY
        };
        if ratio > self.worst_ratio {
            self.worst_ratio = ratio;
            self.worst_at = at();
        }
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
    pub checks: Vec<CheckStat>,
}

impl LargeShapeReport {
    /// True when every check's worst ratio is ≤ 1.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.worst_ratio <= 1.0)
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
        for c in &self.checks {
            writeln!(f, "  {:<28} n={:<9} worst err/tol {:.3}  {}", c.name, c.count, c.worst_ratio, c.worst_at)?;
        }
        Ok(())
    }
}

/// Sampled verification of `shape_name` with `tokens` rows (0: the shape's default) on the
/// GPU for TEGroupedMLP (the class Megatron uses for grouped GEMM today).
pub fn verify_large_shape(shape_name: &str, tokens: usize, seed: u64) -> Result<LargeShapeReport, GpuError> {
    verify_large_shape_class(LayerClass::TeGrouped, shape_name, tokens, seed)
}

fn rms(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt()
    }
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

fn dsilu(x: f64) -> f64 {
    let s = 1.0 / (1.0 + (-x).exp());
    s * (1.0 + x * (1.0 - s))
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

/// One expert's data in f64.
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
    let results: Vec<Result<(Vec<CheckStat>, usize), GpuError>> = std::thread::scope(|s| {
        let handles: Vec<_> = chunks.iter().map(|chunk| s.spawn(|| check_experts(&shared, chunk))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(GpuError::Shape("a checker thread panicked".into()))))
            .collect()
    });
    let mut checks: Vec<CheckStat> = Vec::new();
    let mut rows_checked = 0;
    for r in results {
        let (stats, rows) = r?;
        rows_checked += rows;
        for st in stats {
            match checks.iter_mut().find(|c| c.name == st.name) {
                Some(c) => {
                    c.count += st.count;
                    if st.worst_ratio > c.worst_ratio {
                        c.worst_ratio = st.worst_ratio;
                        c.worst_at = st.worst_at;
                    }
                }
                None => checks.push(st),
            }
        }
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

const NAMES: [&str; 10] = [
    "output rows",
    "grad_input rows",
    "grad_probs rows",
    "U_e rows (fc2 input)",
    "DA_e rows (fc1 out grad)",
    "dW2·v (Freivalds)",
    "dW1·v (Freivalds)",
    "dW2 sampled elements",
    "dW1 sampled elements",
    "empty-expert grads == 0",
];

fn check_experts(sh: &Shared, chunk: &[ExpertData]) -> Result<(Vec<CheckStat>, usize), GpuError> {
    let mut st: Vec<CheckStat> = NAMES.iter().map(|n| CheckStat::new(n)).collect();
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

fn check_expert(sh: &Shared, ed: &Expert, st: &mut [CheckStat]) -> Result<usize, GpuError> {
    let cfg = sh.cfg;
    let (h, n1, n2) = (cfg.hidden_size, cfg.n1(), cfg.n2());
    let e = ed.e;
    let u_s = cfg.params_dtype.unit_roundoff();
    let u32_ = Dtype::F32.unit_roundoff();
    if ed.n == 0 {
        for (name, v) in [("dW1", &ed.dw1), ("dW2", &ed.dw2)] {
            for (i, &x) in v.iter().enumerate() {
                st[9].record(x.abs(), 0.0, || format!("expert {e} {name}[{i}] = {x}"));
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
    // Sample rows: first, last and two pseudo-random.
    let mut rows = vec![0, ed.n - 1];
    let mut s = sh.seed ^ (e as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for _ in 0..2 {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        rows.push((s >> 33) as usize % ed.n);
    }
    rows.sort_unstable();
    rows.dedup();
    let m = rows.len();
    let gx = |r: usize, j: usize| sh.x[(ed.start + r) * h + j];
    let gg = |r: usize, j: usize| sh.g[(ed.start + r) * h + j];
    let xs = Array2::from_shape_fn((m, h), |(i, j)| gx(rows[i], j));
    let gs = Array2::from_shape_fn((m, h), |(i, j)| gg(rows[i], j));
    let ps = Array1::from_shape_fn(m, |i| sh.p[ed.start + rows[i]]);
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
    let k = h.max(n1).max(ed.n);
    let rtol = 8.0 * u_s + 4.0 * (k as f64).sqrt() * u32_;
    let mut cmp = |idx: usize, what: &str, got: &dyn Fn(usize, usize) -> f64, exp: &Array2<f64>| {
        let r = rms(exp.as_slice().unwrap_or(&exp.iter().copied().collect::<Vec<_>>()));
        for ((i, j), &ev) in exp.indexed_iter() {
            let gv = got(i, j);
            st[idx].record((gv - ev).abs(), rtol * (ev.abs() + r), || {
                format!("expert {e} row {} col {j}: got {gv:e} exp {ev:e} ({what})", rows[i])
            });
        }
    };
    cmp(0, "y", &|i, j| sh.y[(ed.start + rows[i]) * h + j], fwd.output());
    cmp(1, "dx", &|i, j| sh.dx[(ed.start + rows[i]) * h + j], &bwd.grad_input);
    let dp_exp = bwd.grad_probs.clone().insert_axis(ndarray::Axis(1));
    cmp(2, "dp", &|i, _| sh.dp[ed.start + rows[i]], &dp_exp);
    // Intermediates in f64 on the same rows: a = x·W1ᵀ, z = silu(gate)·lin, u = z·p;
    // du = G·W2, dz = du·p, da = [dz·lin·silu'(gate), dz·silu(gate)].
    let a = xs.dot(&w1c.t());
    let du = gs.dot(&w2c);
    let mut u_exp = Array2::zeros((m, n2));
    let mut da_exp = Array2::zeros((m, n1));
    for i in 0..m {
        for j in 0..n2 {
            let (gt, l) = (a[[i, j]], a[[i, n2 + j]]);
            u_exp[[i, j]] = silu(gt) * l * ps[i];
            let dz = du[[i, j]] * ps[i];
            da_exp[[i, j]] = dz * l * dsilu(gt);
            da_exp[[i, n2 + j]] = dz * silu(gt);
        }
    }
    cmp(3, "u", &|i, j| ed.u[rows[i] * n2 + j], &u_exp);
    cmp(4, "da", &|i, j| ed.da[rows[i] * n1 + j], &da_exp);

    // Freivalds: canonical dW2 [h, N2] = Gᵀ·U, dW1 [N1, h] = DAᵀ·X.
    let dw2 = |j: usize, kk: usize| {
        if sh.grouped {
            ed.dw2[kk * h + j]
        } else {
            ed.dw2[j * n2 + kk]
        }
    };
    let dw1 = |j: usize, kk: usize| {
        if sh.grouped {
            ed.dw1[kk * n1 + j]
        } else {
            ed.dw1[j * h + kk]
        }
    };
    let mut s2 = sh.seed ^ 0xf00d ^ (e as u64) << 20;
    let mut sign = || {
        s2 = s2.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        if (s2 >> 63) == 0 {
            1.0
        } else {
            -1.0
        }
    };
    let n = ed.n;
    let sqrt_n = (n as f64).sqrt();
    // dW2·v vs Gᵀ(U·v)
    {
        let v: Vec<f64> = (0..n2).map(|_| sign()).collect();
        let uv: Vec<f64> = (0..n).map(|i| (0..n2).map(|kk| ed.u[i * n2 + kk] * v[kk]).sum()).collect();
        let unorm: Vec<f64> = (0..n).map(|i| (0..n2).map(|kk| ed.u[i * n2 + kk].powi(2)).sum::<f64>().sqrt()).collect();
        for j in 0..h {
            let lhs: f64 = (0..n2).map(|kk| dw2(j, kk) * v[kk]).sum();
            let rhs: f64 = (0..n).map(|i| sh.g[(ed.start + i) * h + j] * uv[i]).sum();
            let wnorm = (0..n2).map(|kk| dw2(j, kk).powi(2)).sum::<f64>().sqrt();
            let acc: f64 = (0..n).map(|i| sh.g[(ed.start + i) * h + j].abs() * unorm[i]).sum();
            let tol = 8.0 * u_s * wnorm + 8.0 * sqrt_n * u32_ * acc;
            st[5].record((lhs - rhs).abs(), tol, || format!("expert {e} dW2 row {j}: {lhs:e} vs {rhs:e}"));
        }
    }
    // dW1·v vs DAᵀ(X·v)
    {
        let v: Vec<f64> = (0..h).map(|_| sign()).collect();
        let xv: Vec<f64> = (0..n).map(|i| (0..h).map(|kk| sh.x[(ed.start + i) * h + kk] * v[kk]).sum()).collect();
        let xnorm: Vec<f64> =
            (0..n).map(|i| (0..h).map(|kk| sh.x[(ed.start + i) * h + kk].powi(2)).sum::<f64>().sqrt()).collect();
        for j in 0..n1 {
            let lhs: f64 = (0..h).map(|kk| dw1(j, kk) * v[kk]).sum();
            let rhs: f64 = (0..n).map(|i| ed.da[i * n1 + j] * xv[i]).sum();
            let wnorm = (0..h).map(|kk| dw1(j, kk).powi(2)).sum::<f64>().sqrt();
            let acc: f64 = (0..n).map(|i| ed.da[i * n1 + j].abs() * xnorm[i]).sum();
            let tol = 8.0 * u_s * wnorm + 8.0 * sqrt_n * u32_ * acc;
            st[6].record((lhs - rhs).abs(), tol, || format!("expert {e} dW1 row {j}: {lhs:e} vs {rhs:e}"));
        }
    }
    // 64 sampled elements of each weight grad against their exact dot products.
    let rms2 = rms(&ed.dw2);
    let rms1 = rms(&ed.dw1);
    let rtol_w = 8.0 * u_s + 4.0 * sqrt_n * u32_;
    for _ in 0..64 {
        s2 = s2.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let (j, kk) = ((s2 >> 20) as usize % h, (s2 >> 42) as usize % n2);
        let exp: f64 = (0..n).map(|i| sh.g[(ed.start + i) * h + j] * ed.u[i * n2 + kk]).sum();
        let got = dw2(j, kk);
        st[7].record((got - exp).abs(), rtol_w * (exp.abs() + rms2), || {
            format!("expert {e} dW2[{j},{kk}]: {got:e} vs {exp:e}")
        });
        s2 = s2.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let (j, kk) = ((s2 >> 20) as usize % n1, (s2 >> 42) as usize % h);
        let exp: f64 = (0..n).map(|i| ed.da[i * n1 + j] * sh.x[(ed.start + i) * h + kk]).sum();
        let got = dw1(j, kk);
        st[8].record((got - exp).abs(), rtol_w * (exp.abs() + rms1), || {
            format!("expert {e} dW1[{j},{kk}]: {got:e} vs {exp:e}")
        });
    }
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
}
