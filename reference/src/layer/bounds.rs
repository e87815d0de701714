//! The error model's scales (oracle only): for every result, the magnitudes of the terms
//! behind it and a first-order running bound of a storage-dtype implementation's error, plus
//! the allowances for a clamped GLU's ambiguous masks.

use super::backward::SegmentGrads;
use super::fp8::Fp8Operand;
use super::fp8_bounds::Fp8Bound;
use super::{clamp_glu, halves, ErrorScales, ForwardPass, SegmentCache};
use crate::config::{LayerClass, LayerConfig};
use crate::glu::{deinterleave_columns, interleave_columns};
use crate::weights::{ExpertSet, ExpertWeights};
use ndarray::{s, Array1, Array2, ArrayView2, Axis, Zip};
use std::ops::Range;

impl ErrorScales {
    /// All-zero scales for a `T`-row call of `cfg`'s layer.
    pub(super) fn zeros(cfg: &LayerConfig, t: usize) -> ErrorScales {
        let h = cfg.hidden_size;
        ErrorScales {
            output: Array2::zeros((t, h)),
            grad_input: Array2::zeros((t, h)),
            grad_probs: Array1::zeros(t),
            weight_grads: ExpertSet::zeros(cfg),
            fc2_input: Array2::zeros((t, cfg.n2())),
            fc1_output_grad: Array2::zeros((t, cfg.n1())),
            allowance_grad_input: Array2::zeros((t, h)),
            allowance_grad_probs: Array1::zeros(t),
            allowance_weight_grads: ExpertSet::zeros(cfg),
        }
    }
}

impl ForwardPass {
    /// Records segment `e`'s scales and allowances (its token rows are `rows`) into `sc`.
    pub(super) fn record_scales(
        &self,
        sc: &mut ErrorScales,
        e: usize,
        g: &Array2<f64>,
        sg: &SegmentGrads,
        rows: Range<usize>,
    ) {
        let cfg = &self.cfg;
        let (w, cache) = (&self.weights.experts[e], &self.caches[e]);
        let (start, c) = (rows.start, rows.len());
        let abs = |a: &Array2<f64>| a.mapv(f64::abs);
        let state = self.fp8.as_ref().map(|r| r.borrow().state.clone());
        let paired = self.fp8_channel == super::Fp8Channel::Paired;
        let fq = cfg.fp8.map(|config| Fp8Bound { config, state: state.as_ref(), expert: e, paired });
        let b = error_bounds(cfg, w, cache, g, &sg.du, &sg.dz, &sg.da, fq.as_ref());
        let ws = &mut sc.weight_grads.experts[e];
        ws.fc1_weight = b.fc1_weight;
        ws.fc2_weight = b.fc2_weight;
        if ws.fc1_bias.is_some() {
            ws.fc1_bias = Some(b.fc1_bias);
            ws.fc2_bias = Some(b.fc2_bias);
        }
        let (y_scale, dx_scale, dp_scale) = (b.output, b.grad_input, b.grad_probs);
        if let (Some(clamp), true) = (cfg.effective_clamp(), cfg.gated_linear_unit) {
            let jump = clamp_ambiguity(cfg, &cache.a, &abs(&cache.x), w, &sg.dz, clamp);
            let mut dx_allow = jump.dot(&abs(&w.fc1_weight));
            if cfg.apply_probs_on_input {
                let dp_allow = (&dx_allow * &abs(&cache.x_orig)).sum_axis(Axis(1));
                sc.allowance_grad_probs.slice_mut(s![start..start + c]).assign(&dp_allow.slice(s![..c]));
                Zip::from(dx_allow.rows_mut())
                    .and(&cache.p_orig)
                    .for_each(|mut row, &pi| row.mapv_inplace(|v| v * pi.abs()));
            }
            sc.allowance_grad_input.slice_mut(s![start..start + c, ..]).assign(&dx_allow.slice(s![..c, ..]));
            let wa = &mut sc.allowance_weight_grads.experts[e];
            wa.fc1_weight = jump.t().dot(&abs(&cache.x));
            if wa.fc1_bias.is_some() {
                wa.fc1_bias = Some(jump.sum_axis(Axis(0)));
            }
        }
        sc.output.slice_mut(s![start..start + c, ..]).assign(&y_scale.slice(s![..c, ..]));
        sc.grad_input.slice_mut(s![start..start + c, ..]).assign(&dx_scale.slice(s![..c, ..]));
        sc.grad_probs.slice_mut(s![start..start + c]).assign(&dp_scale.slice(s![..c]));
        sc.fc2_input.slice_mut(s![start..start + c, ..]).assign(&b.fc2_input.slice(s![..c, ..]));
        sc.fc1_output_grad.slice_mut(s![start..start + c, ..]).assign(&b.fc1_output_grad.slice(s![..c, ..]));
    }
}

/// For a clamped GLU: the size of the gradient term a clamp mask would switch on or off, for
/// every fc1 output element whose pre-activation lies within storage rounding distance of the
/// clamp boundary (`8·u·(|x|·|W1|ᵀ + |b1|)`, the rounding error bound of `a`, plus `u·c`);
/// zero elsewhere. `[n, N1]`, gate half then linear half.
fn clamp_ambiguity(
    cfg: &LayerConfig,
    a: &Array2<f64>,
    x_abs: &Array2<f64>,
    w: &ExpertWeights,
    dz: &Array2<f64>,
    c: f64,
) -> Array2<f64> {
    // With fp8 both fc1 operands carry up to half an fp8 ulp (and the stored activation input
    // another), which widens the window of ambiguous masks.
    let fp8_window = cfg.fp8.map_or(0.0, |f| if f.activation_input_store { 3.0 } else { 2.0 } / 16.0);
    let u = cfg.params_dtype.unit_roundoff() + fp8_window;
    let mut a_mag = x_abs.dot(&w.fc1_weight.mapv(f64::abs).t());
    if let Some(b1) = &w.fc1_bias {
        a_mag += &b1.mapv(f64::abs);
    }
    let act = cfg.activation;
    let offset = cfg.effective_offset();
    // §4.10: pair gate and linear units in the un-interleaved order, answer in the module's.
    let size = cfg.glu_interleave_size;
    let (a, a_mag) = (&deinterleave_columns(a, size), deinterleave_columns(&a_mag, size));
    let k = a.ncols() / 2;
    let (g, l) = halves(a);
    let mut jump = Array2::zeros(a.raw_dim());
    for i in 0..a.nrows() {
        for j in 0..k {
            let (gv, lv, d) = (g[[i, j]], l[[i, j]], dz[[i, j]]);
            let (gc, lc) = (gv.min(c), lv.clamp(-c, c));
            if (gv - c).abs() <= 8.0 * u * a_mag[[i, j]] + u * c {
                jump[[i, j]] = (d * (lc + offset) * act.derivative(gc)).abs();
            }
            if (lv.abs() - c).abs() <= 8.0 * u * a_mag[[i, k + j]] + u * c {
                jump[[i, k + j]] = (d * act.apply(gc)).abs();
            }
        }
    }
    interleave_columns(&jump, size)
}

/// First-order running error bounds of one expert segment's results (see [`ErrorScales`]).
struct SegmentBounds {
    output: Array2<f64>,
    grad_input: Array2<f64>,
    grad_probs: Array1<f64>,
    fc1_weight: Array2<f64>,
    fc1_bias: Array1<f64>,
    fc2_weight: Array2<f64>,
    fc2_bias: Array1<f64>,
    fc2_input: Array2<f64>,
    fc1_output_grad: Array2<f64>,
}

/// A first-order running error bound of a storage-dtype implementation of one expert segment,
/// in absolute units, propagated through the computation with the oracle's exact values:
///
/// * an operation that rounds its result `v` to the storage dtype adds `u·|v| + η` (unit
///   roundoff `u`, subnormal spacing `η`); one that stays in f32 adds `u_f32·|v|`;
/// * a GEMM or reduction over `K` terms adds `√K·u_f32·Σ|terms|` for f32 accumulation, and
///   propagates its operands' bounds as `err(A)·|B| + |A|·err(B)`;
/// * an elementwise function propagates `|f'(w)|·err(w)` (and `|f''|` for derivatives);
/// * inputs, weights, probs and the upstream gradient are exact (both sides see the same
///   values), so they carry no error.
///
/// The rounding points are those of an eager implementation (spec §4.8); an implementation
/// that fuses the elementwise chain rounds less and stays inside the bound.
///
/// With fp8 (`fq`) every bound has a second part, the fp8 channel `R` (`fp8_bounds` module doc):
/// the quantization errors of the GEMM operands and what they become downstream, propagated
/// through each GEMM as a root sum of squares over `K` ([`rss_gemm`]) and through the
/// activation like the storage part (without its roundings). The result is `E + R`.
#[allow(clippy::too_many_arguments)]
fn error_bounds(
    cfg: &LayerConfig,
    w: &ExpertWeights,
    cache: &SegmentCache,
    g: &Array2<f64>,
    du: &Array2<f64>,
    dz: &Array2<f64>,
    da: &Array2<f64>,
    fq: Option<&Fp8Bound>,
) -> SegmentBounds {
    let us = cfg.params_dtype.unit_roundoff();
    let eta = cfg.params_dtype.subnormal_spacing();
    let ua = crate::dtype::Dtype::F32.unit_roundoff();
    let abs = |a: &Array2<f64>| a.mapv(f64::abs);
    let rnd = |v: f64| us * v.abs() + eta;
    let acc = |k: usize| (k.max(1) as f64).sqrt() * ua;
    let (n, h) = (cache.x.nrows(), cache.x.ncols());
    let p_abs = cache.p.mapv(f64::abs);
    let scale_rows = |a: &Array2<f64>, p: &Array1<f64>| {
        let mut a = a.clone();
        Zip::from(a.rows_mut()).and(p).for_each(|mut row, &pi| row.mapv_inplace(|v| v * pi));
        a
    };
    let x_abs = abs(&cache.x);
    let fp8 = fq.is_some();
    let zeros_like = |a: &Array2<f64>| Array2::<f64>::zeros(a.raw_dim());
    // x' = cast(p·x) with probs on the input, else exact.
    let err_x = if cfg.apply_probs_on_input { cache.x.mapv(rnd) } else { Array2::zeros((n, h)) };
    // fc1: a = round(x·W1ᵀ (+ b1)); SequentialMLP rounds before the bias add too.
    let w1_abs = abs(&w.fc1_weight);
    let mut err_a = err_x.dot(&w1_abs.t()) + x_abs.dot(&w1_abs.t()) * acc(h) + cache.a.mapv(rnd);
    // fp8: the quantization bound of each operand (zero without fp8), the fp8 accumulation term.
    let quant = |op: Fp8Operand, v: &Array2<f64>, e: &Array2<f64>| match fq {
        Some(f) => f.quantization(op, v, e),
        None => zeros_like(v),
    };
    let acc8 = |k: usize| fq.map_or(0.0, |f| f.accumulation(k));
    let qx = quant(Fp8Operand::Fc1Input, &cache.x, &err_x);
    let qw1 = quant(Fp8Operand::Fc1Weight, &w.fc1_weight, &zeros_like(&w.fc1_weight));
    let qw2 = quant(Fp8Operand::Fc2Weight, &w.fc2_weight, &zeros_like(&w.fc2_weight));
    // The fp8 channel of a: the quantizations of x and W1 (first order, root sum of squares);
    // their product stays in the storage part.
    let mut r_a = zeros_like(&cache.a);
    if fp8 {
        r_a = rss_gemm(qx.view(), w1_abs.t(), x_abs.view(), qw1.t());
        err_a += &((&err_x + &qx).dot(&qw1.t()) + x_abs.dot(&w1_abs.t()) * acc8(h));
    }
    if let (Some(b1), LayerClass::Sequential) = (&w.fc1_bias, cfg.class) {
        err_a += &(&cache.a - b1).mapv(rnd);
    }
    let a = &cache.a;
    let err_z = activation_forward_error(cfg, a, &err_a, true);
    let r_z = if fp8 { activation_forward_error(cfg, a, &r_a, false) } else { zeros_like(&err_z) };
    // u = cast(z·p): product in f32, one storage rounding.
    let err_u = scale_rows(&err_z, &p_abs) + cache.u.mapv(rnd);
    let r_u = scale_rows(&r_z, &p_abs);
    let qu = quant(Fp8Operand::Fc2Input, &cache.u, &(&err_u + &r_u));
    let u_abs = abs(&cache.u);
    // Output: y = round(u·W2ᵀ) (+ b2·p in f32, one rounding).
    let w2_abs = abs(&w.fc2_weight);
    let n2 = w.fc2_weight.ncols();
    let mut output = err_u.dot(&w2_abs.t()) + u_abs.dot(&w2_abs.t()) * (acc(n2) + acc8(n2));
    let mut r_output = zeros_like(&output);
    if fp8 {
        output += &(&err_u + &r_u + &qu).dot(&qw2.t());
        r_output = rss_gemm((&r_u + &qu).view(), w2_abs.t(), u_abs.view(), qw2.t());
    }
    let y_exact = cache.u.dot(&w.fc2_weight.t());
    output += &y_exact.mapv(rnd);
    if let Some(b2) = &w.fc2_bias {
        let mut yb = y_exact.clone();
        Zip::from(yb.rows_mut()).and(&cache.p).for_each(|mut row, &pi| row.scaled_add(pi, b2));
        output += &yb.mapv(rnd);
        // With probs in the storage dtype, b2·p is itself rounded (§4.8).
        if cfg.probs_dtype != crate::dtype::Dtype::F32 {
            let mut bp = Array2::zeros(yb.raw_dim());
            Zip::from(bp.rows_mut()).and(&cache.p).for_each(|mut row, &pi| row.scaled_add(pi, b2));
            output += &bp.mapv(rnd);
        }
    }
    // Backward. du = round(G·W2); dz = cast(du·p) (eager) or du·p in f32 (fused).
    let g_abs = abs(g);
    let qg = quant(Fp8Operand::Fc2GradOutput, g, &zeros_like(g));
    let mut err_du = g_abs.dot(&w2_abs) * (acc(h) + acc8(h)) + du.mapv(rnd);
    let mut r_du = zeros_like(du);
    if fp8 {
        err_du += &qg.dot(&qw2);
        r_du = rss_gemm(qg.view(), w2_abs.view(), g_abs.view(), qw2.view());
    }
    // activation_func_fp8_input_store: the backward's activation input is cast to e4m3 (a
    // rounding of each element: the fp8 channel).
    let r_a_b = match (fq, cfg.fp8) {
        (Some(_), Some(f)) if f.activation_input_store => {
            Zip::from(a).and(&err_a).and(&r_a).map_collect(|&v, &e, &r| r + Fp8Bound::input_store(v, e + r))
        }
        _ => r_a.clone(),
    };
    let rnd_el = |v: f64| if cfg.eager_activation() { us * v.abs() + eta } else { ua * v.abs() };
    let err_dz = scale_rows(&err_du, &p_abs) + dz.mapv(rnd_el);
    let r_dz = scale_rows(&r_du, &p_abs);
    let err_da = activation_backward_error(cfg, a, dz, da, &err_a, &err_dz, true);
    let r_da = if fp8 { activation_backward_error(cfg, a, dz, da, &r_a_b, &r_dz, false) } else { zeros_like(da) };
    let da_abs = abs(da);
    let n1 = w.fc1_weight.nrows();
    // dx' = round(da·W1); with probs on the input dx = cast(dx'·p), dp = Σ x·dx'.
    let dxp = da.dot(&w.fc1_weight);
    let mut grad_input = err_da.dot(&w1_abs) + da_abs.dot(&w1_abs) * (acc(n1) + acc8(n1)) + dxp.mapv(rnd);
    let qda = quant(Fp8Operand::Fc1GradOutput, da, &(&err_da + &r_da));
    let mut r_grad_input = zeros_like(&grad_input);
    if fp8 {
        grad_input += &(&err_da + &r_da + &qda).dot(&qw1);
        r_grad_input = rss_gemm((&r_da + &qda).view(), w1_abs.view(), da_abs.view(), qw1.view());
    }
    // The probs grad is stored in the probs dtype.
    let round_probs = |v: f64| {
        if cfg.probs_dtype == crate::dtype::Dtype::F32 {
            ua * v.abs()
        } else {
            cfg.probs_dtype.unit_roundoff() * v.abs() + cfg.probs_dtype.subnormal_spacing()
        }
    };
    let (grad_probs, r_grad_probs) = if cfg.apply_probs_on_input {
        let x_orig_abs = abs(&cache.x_orig);
        let dp_value = (&dxp * &cache.x_orig).sum_axis(Axis(1));
        let dp = (&grad_input * &x_orig_abs).sum_axis(Axis(1))
            + (abs(&dxp) * &x_orig_abs).sum_axis(Axis(1)) * acc(h)
            + dp_value.mapv(round_probs);
        let r_dp = row_rss(&(&r_grad_input * &x_orig_abs));
        let p_orig_abs = cache.p_orig.mapv(f64::abs);
        grad_input = scale_rows(&grad_input, &p_orig_abs) + scale_rows(&dxp, &cache.p_orig).mapv(rnd);
        r_grad_input = scale_rows(&r_grad_input, &p_orig_abs);
        (dp, r_dp)
    } else {
        // dp = Σ_j du·z (+ Σ_j G·b2), f32 sums, stored in the probs dtype.
        let z_abs = abs(&cache.z);
        let mut dp_value = (du * &cache.z).sum_axis(Axis(1));
        let mut dp =
            (&err_du * &z_abs + abs(du) * &err_z).sum_axis(Axis(1)) + (abs(du) * &z_abs).sum_axis(Axis(1)) * acc(n2);
        if let Some(b2) = &w.fc2_bias {
            dp += &(g_abs.dot(&b2.mapv(f64::abs)) * acc(h));
            dp_value += &g.dot(b2);
        }
        let r_dp = row_rss(&(&r_du * &z_abs + abs(du) * &r_z));
        (dp + dp_value.mapv(round_probs), r_dp)
    };
    let x_err_total = &err_x;
    let mut fc1_weight = err_da.t().dot(&x_abs)
        + da_abs.t().dot(x_err_total)
        + da_abs.t().dot(&x_abs) * (acc(n) + acc8(n))
        + da.t().dot(&cache.x).mapv(rnd);
    let mut r_fc1_weight = zeros_like(&fc1_weight);
    if fp8 {
        fc1_weight += &(&err_da + &r_da + &qda).t().dot(&(x_err_total + &qx));
        r_fc1_weight = rss_gemm((&r_da + &qda).t(), x_abs.view(), da_abs.t(), qx.view());
    }
    let fc1_bias = err_da.sum_axis(Axis(0)) + da_abs.sum_axis(Axis(0)) * acc(n) + da.sum_axis(Axis(0)).mapv(rnd);
    let r_fc1_bias = r_da.mapv(|v| v * v).sum_axis(Axis(0)).mapv(f64::sqrt);
    let mut fc2_weight =
        g_abs.t().dot(&err_u) + g_abs.t().dot(&u_abs) * (acc(n) + acc8(n)) + g.t().dot(&cache.u).mapv(rnd);
    let mut r_fc2_weight = zeros_like(&fc2_weight);
    if fp8 {
        fc2_weight += &qg.t().dot(&(&err_u + &r_u + &qu));
        r_fc2_weight = rss_gemm(qg.t(), u_abs.view(), g_abs.t(), (&r_u + &qu).view());
    }
    let gp = scale_rows(g, &cache.p);
    let fc2_bias = abs(&gp).sum_axis(Axis(0)) * acc(n) + gp.sum_axis(Axis(0)).mapv(rnd);
    if !fp8 {
        return SegmentBounds {
            output,
            grad_input,
            grad_probs,
            fc1_weight,
            fc1_bias,
            fc2_weight,
            fc2_bias,
            fc2_input: err_u,
            fc1_output_grad: err_da,
        };
    }
    SegmentBounds {
        output: output + r_output,
        grad_input: grad_input + r_grad_input,
        grad_probs: grad_probs + r_grad_probs,
        fc1_weight: fc1_weight + r_fc1_weight,
        fc1_bias: fc1_bias + r_fc1_bias,
        fc2_weight: fc2_weight + r_fc2_weight,
        fc2_bias,
        fc2_input: err_u + r_u,
        fc1_output_grad: err_da + r_da,
    }
}

/// The fp8 channel of a GEMM `C = A·B` whose operands deviate by independent per-element errors
/// of at most `eA` (of `A`, magnitudes `|A|`) and `eB` (of `B`, magnitudes `|B|`): the root sum
/// of squares over `K` of the first-order terms,
/// `√(Σ_k (eA_ik·|B_kj| + |A_ik|·eB_kj)²)`, computed as three GEMMs of squares:
/// `eA²·|B|² + 2·(eA∘|A|)·(|B|∘eB) + |A|²·eB²`. Arguments: `ea = eA`, `b = |B|`, `a = |A|`,
/// `eb = eB`.
fn rss_gemm(ea: ArrayView2<f64>, b: ArrayView2<f64>, a: ArrayView2<f64>, eb: ArrayView2<f64>) -> Array2<f64> {
    let sq = |m: &ArrayView2<f64>| m.mapv(|v| v * v);
    let cross = (&ea * &a).dot(&(&b * &eb));
    (sq(&ea).dot(&sq(&b)) + cross * 2.0 + sq(&a).dot(&sq(&eb))).mapv(f64::sqrt)
}

/// `√(Σ_j t_ij²)` of every row (the fp8 channel of a row sum).
fn row_rss(t: &Array2<f64>) -> Array1<f64> {
    t.mapv(|v| v * v).sum_axis(Axis(1)).mapv(f64::sqrt)
}

/// `|h(x)|`, or with `widen` the largest `|h|` at `x − e`, `x`, `x + e`: the fp8 channel's errors
/// are large enough to move an activation input across a kink of `h` (squared ReLU's second
/// derivative jumps at 0, so a gate just below 0 can have a non-zero first derivative in an
/// implementation), where the derivative at the oracle's point alone would give a zero bound.
fn span(h: impl Fn(f64) -> f64, x: f64, e: f64, widen: bool) -> f64 {
    let at = h(x).abs();
    if widen && e > 0.0 {
        at.max(h(x - e).abs()).max(h(x + e).abs())
    } else {
        at
    }
}

/// The bound of the activation output `z` `[n, N2]` given a bound `err_a` of its input `a`
/// (propagated with `|f'|`), plus, with `rounding`, the activation's own storage roundings.
fn activation_forward_error(cfg: &LayerConfig, a: &Array2<f64>, err_a: &Array2<f64>, rounding: bool) -> Array2<f64> {
    let us = cfg.params_dtype.unit_roundoff();
    let eta = cfg.params_dtype.subnormal_spacing();
    let ua = crate::dtype::Dtype::F32.unit_roundoff();
    let eager = cfg.eager_activation();
    let rnd_el = |v: f64| match (rounding, eager) {
        (false, _) => 0.0,
        (true, true) => us * v.abs() + eta,
        (true, false) => ua * v.abs(),
    };
    let act = cfg.activation;
    if !cfg.gated_linear_unit {
        return Zip::from(a)
            .and(err_a)
            .map_collect(|&a, &ea| span(|x| act.derivative(x), a, ea, !rounding) * ea + rnd_el(act.apply(a)));
    }
    let clamp = cfg.effective_clamp();
    let offset = cfg.effective_offset();
    // §4.10: gate and linear units paired in the un-interleaved order.
    let size = cfg.glu_interleave_size;
    let (a, err_a) = (&deinterleave_columns(a, size), &deinterleave_columns(err_a, size));
    let (n, k) = (a.nrows(), a.ncols() / 2);
    let mut err_z = Array2::zeros((n, k));
    for i in 0..n {
        for j in 0..k {
            let (gc, lc, gate_on, lin_on) = clamp_glu(a[[i, j]], a[[i, k + j]], clamp);
            let (eg, el) = (if gate_on { err_a[[i, j]] } else { 0.0 }, if lin_on { err_a[[i, k + j]] } else { 0.0 });
            let (f, f1) = (span(|x| act.apply(x), gc, eg, !rounding), span(|x| act.derivative(x), gc, eg, !rounding));
            let lin = lc + offset;
            let err_act = f1 * eg + rnd_el(f);
            let err_lin = el + if offset != 0.0 { rnd_el(lin) } else { 0.0 };
            err_z[[i, j]] = lin.abs() * err_act + f.abs() * err_lin + rnd_el(f * lin);
        }
    }
    err_z
}

/// The bound of the activation's input gradient `da` `[n, N1]` given bounds of the activation
/// input (`err_a`, as the backward sees it) and of `dz` (`err_dz`), plus, with `rounding`, the
/// storage roundings of the backward's elementwise ops.
fn activation_backward_error(
    cfg: &LayerConfig,
    a: &Array2<f64>,
    dz: &Array2<f64>,
    da: &Array2<f64>,
    err_a: &Array2<f64>,
    err_dz: &Array2<f64>,
    rounding: bool,
) -> Array2<f64> {
    let us = cfg.params_dtype.unit_roundoff();
    let eta = cfg.params_dtype.subnormal_spacing();
    let ua = crate::dtype::Dtype::F32.unit_roundoff();
    let eager = cfg.eager_activation();
    let rnd = |v: f64| if rounding { us * v.abs() + eta } else { 0.0 };
    let rnd_el = |v: f64| match (rounding, eager) {
        (false, _) => 0.0,
        (true, true) => us * v.abs() + eta,
        (true, false) => ua * v.abs(),
    };
    let act = cfg.activation;
    if !cfg.gated_linear_unit {
        return Zip::from(a).and(err_a).and(err_dz).and(dz).map_collect(|&a, &ea, &ed, &d| {
            let widen = !rounding;
            span(|x| act.derivative(x), a, ea, widen) * ed
                + d.abs() * span(|x| act.second_derivative(x), a, ea, widen) * ea
                + rnd(d * act.derivative(a))
        });
    }
    let clamp = cfg.effective_clamp();
    let offset = cfg.effective_offset();
    // §4.10: pair gate and linear units in the un-interleaved order, answer in the module's.
    let size = cfg.glu_interleave_size;
    let (a, err_a, da) =
        (&deinterleave_columns(a, size), &deinterleave_columns(err_a, size), &deinterleave_columns(da, size));
    let (n, k) = (a.nrows(), a.ncols() / 2);
    let mut e_da = Array2::zeros(a.raw_dim());
    for i in 0..n {
        for j in 0..k {
            let (gc, lc, gate_on, lin_on) = clamp_glu(a[[i, j]], a[[i, k + j]], clamp);
            let (eg, el) = (if gate_on { err_a[[i, j]] } else { 0.0 }, if lin_on { err_a[[i, k + j]] } else { 0.0 });
            let widen = !rounding;
            let (f, f1, f2) = (
                span(|x| act.apply(x), gc, eg, widen),
                span(|x| act.derivative(x), gc, eg, widen),
                span(|x| act.second_derivative(x), gc, eg, widen),
            );
            let lin = lc + offset;
            let (d, ed) = (dz[[i, j]], err_dz[[i, j]]);
            let err_act = f1.abs() * eg + rnd_el(f);
            let d_act_g = d * lin;
            let err_d_act_g = lin.abs() * ed + d.abs() * el + rnd_el(d_act_g);
            e_da[[i, j]] =
                if gate_on { f1.abs() * err_d_act_g + d_act_g.abs() * f2 * eg + rnd(da[[i, j]]) } else { 0.0 };
            e_da[[i, k + j]] = if lin_on { f.abs() * ed + d.abs() * err_act + rnd(da[[i, k + j]]) } else { 0.0 };
        }
    }
    interleave_columns(&e_da, size)
}
