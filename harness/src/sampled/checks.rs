//! The checks of one expert (the parent module's doc derives each bound): rows against the
//! f64 oracle, the implementation's intermediates against the same math in f64, and the
//! weight gradients by element samples and projections.

use super::{sampled_supported, CheckStat, ExpertTensors, SampledChecks, SampledError, SampledLayer};
use super::{ELEMENT_SAMPLES, PROJECTIONS, PROJECTION_T, SUBLAYER_ROWS};
use crate::compare::{compare_tensor, Bounds};
use crate::tolerance::{fp8_accumulation, gemm_element_scale, Tolerance, C_SAFETY};
use moe_reference::layer::{forward as ref_forward, Fp8Operand, Fp8Run, Fp8State};
use moe_reference::Fp8Recipe;
use moe_reference::{
    Activation, Dtype, ExpertSet, ExpertWeights, Fp8Config, Inputs, LayerConfig, Numerics, Parallelism, ReferenceError,
    WgradTiming,
};
use ndarray::{s, Array1, Array2, ArrayView2, Axis};

/// A 64-bit LCG (Knuth's MMIX constants): the sampled rows, signs and elements, deterministic in
/// the seed and the expert.
pub(super) struct Lcg(u64);

impl Lcg {
    pub(super) fn new(seed: u64, expert: usize, stream: u64) -> Lcg {
        Lcg(seed ^ (expert as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ stream.wrapping_mul(0xd1b5_4a32_d192_ed03))
    }

    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() >> 33) as usize % n.max(1)
    }

    pub(super) fn sign(&mut self) -> f64 {
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

/// The random signs `V` `[len, PROJECTIONS]` of the projections of expert `e`'s `dW2`
/// (`which = 2`) or `dW1` (1).
pub(super) fn projection_signs(seed: u64, e: usize, which: u64, len: usize) -> Array2<f64> {
    let mut rng = Lcg::new(seed, e, 10 + which);
    Array2::from_shape_fn((len, PROJECTIONS), |_| rng.sign())
}

/// The [`ELEMENT_SAMPLES`] canonical positions `(j, k)` of expert `e`'s `dW2` (`which = 2`) or
/// `dW1` (1) checked element by element.
pub(super) fn sample_elements(seed: u64, e: usize, which: u64, rows: usize, cols: usize) -> Vec<(usize, usize)> {
    let mut rng = Lcg::new(seed, e, 20 + which);
    (0..ELEMENT_SAMPLES).map(|_| (rng.below(rows), rng.below(cols))).collect()
}

/// Records `got` against `exp` under the error model with [`compare_tensor`]: the bound of
/// element `(i, j)` is `C_SAFETY·(S + A + rms(S))` with `S` = `scale`, `A` = `allowance` (zero
/// when `None`) and the rms over all of `scale` (the expert's sampled rows). `at(i, j)` names
/// element `(i, j)`.
fn check_sampled(
    stat: &mut CheckStat,
    got: ArrayView2<f64>,
    exp: ArrayView2<f64>,
    scale: ArrayView2<f64>,
    allowance: Option<ArrayView2<f64>>,
    at: impl Fn(usize, usize) -> String,
) {
    let bounds = Bounds { scale: Some(scale.into_dyn()), allowance: allowance.map(|a| a.into_dyn()) };
    let diff = compare_tensor(&stat.name, got.into_dyn(), exp.into_dyn(), bounds, 1, Tolerance::error_model());
    stat.record_diff(&diff, |index| at(index[0], index[1]));
}

/// `U = act(gate)·lin·p` `[m, N2]` and `DA = [dz·lin·act'(gate), dz·act(gate)]` `[m, N1]` with
/// `dz = (G·W2)·p`, in f64, for the rows `xs`, `gs`, `ps` of one expert with canonical weights
/// `w1` `[N1, h]`, `w2` `[h, N2]` (a GLU without clamp, offset, bias or probs on the input:
/// [`intermediates_supported`]).
pub(super) fn intermediates(
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

/// The projection rows of one weight grad (module doc, "Projections"): for every row `j` of
/// `D = Aᵀ·B` the error `‖P_j‖₂ = ‖got_j·V − (Aᵀ·(B·V))_j‖₂` over the `r` sign columns of
/// `V`, the terms of its bound, and the block's rms floor `R̄` the element samples share.
pub(super) struct ProjectionRows {
    /// `‖P_j‖₂` per row.
    pub(super) err: Vec<f64>,
    /// Per row, `C_SAFETY·Σ_k (S_jk + R̄)` bounded above: at least every `|P_jr|`.
    pub(super) worst: Vec<f64>,
    /// Per row, the storage part of `s_j ≥ ‖S_j‖₂`: `u_s·‖got_j‖₂ + √K'·η`.
    pub(super) storage: Vec<f64>,
    /// Per row, the accumulation part of `s_j`: `acc·Σ_i |A_ij|·‖B_i‖₂`.
    pub(super) accumulation: Vec<f64>,
    /// `R̄ ≥ rms(S)` over the block.
    pub(super) r_bar: f64,
    /// Columns `K'`.
    pub(super) cols: usize,
    /// Sign vectors `r`.
    pub(super) r: usize,
}

impl ProjectionRows {
    /// `C_SAFETY·(s_j + √K'·R̄) ≥ ‖b_j‖₂`, the 2-norm of row `j`'s element bounds.
    pub(super) fn sigma(&self, j: usize) -> f64 {
        C_SAFETY * (self.storage[j] + self.accumulation[j] + (self.cols as f64).sqrt() * self.r_bar)
    }

    /// The bound of `‖P_j‖₂`: `min(√r·Σ_k b_jk, projection_factor(r)·‖b_j‖₂)` (module doc).
    pub(super) fn bound(&self, j: usize) -> f64 {
        ((self.r as f64).sqrt() * self.worst[j]).min(projection_factor(self.r) * self.sigma(j))
    }
}

/// The accumulation terms of one wgrad element per unit of `Σ_i |A_ij·B_ik|` over `n` rows:
/// f32, plus the fp8 GEMM's with `fp8`.
fn wgrad_accumulation(n: usize, fp8: Option<Fp8Recipe>) -> f64 {
    (n.max(1) as f64).sqrt() * Dtype::F32.unit_roundoff() + fp8.map_or(0.0, |r| fp8_accumulation(n, 1.0, r))
}

/// The factor on `‖b_j‖₂` of the projections' random-sign bound with `r` sign vectors:
/// `√(r + 2·√(r·x) + 2·x)` with `x = t²/2`, `t` = [`PROJECTION_T`] (module doc: the tail
/// `e^{−x}` of a sum of squares of `r` independent sub-Gaussian projections).
pub(super) fn projection_factor(r: usize) -> f64 {
    let (r, x) = (r as f64, PROJECTION_T * PROJECTION_T / 2.0);
    (r + 2.0 * (r * x).sqrt() + 2.0 * x).sqrt()
}

/// The 1-norm and 2-norm of every row of `m`.
fn row_norms(m: ArrayView2<f64>) -> (Array1<f64>, Array1<f64>) {
    let l1 = m.rows().into_iter().map(|row| row.iter().map(|x| x.abs()).sum()).collect();
    let l2 = m.rows().into_iter().map(|row| row.iter().map(|x| x * x).sum::<f64>().sqrt()).collect();
    (l1, l2)
}

/// The projections of every row of the canonical weight grad `got` `[J, K']` of `D = Aᵀ·B`
/// (`a` `[n, J]`, `b` `[n, K']`, the operands the implementation used) on the sign columns
/// `signs` `[K', r]`, with the bounds the module doc derives.
pub(super) fn projection_rows(
    dt: Dtype,
    fp8: Option<Fp8Recipe>,
    a: ArrayView2<f64>,
    b: ArrayView2<f64>,
    got: ArrayView2<f64>,
    signs: ArrayView2<f64>,
) -> ProjectionRows {
    let (n, rows) = a.dim();
    let cols = b.ncols();
    let r = signs.ncols();
    let (us, eta) = (dt.unit_roundoff(), dt.subnormal_spacing());
    let acc = wgrad_accumulation(n, fp8);
    // Per row j of D: Aᵀ·(B·V), Σ_i |A_ij|·‖B_i‖₁ and Σ_i |A_ij|·‖B_i‖₂.
    let rhs = a.t().dot(&b.dot(&signs));
    let (b1, b2) = row_norms(b);
    let (mut acc1, mut acc2) = (vec![0.0; rows], vec![0.0; rows]);
    for (a_i, (&b1_i, &b2_i)) in a.rows().into_iter().zip(b1.iter().zip(&b2)) {
        for ((x, s1), s2) in a_i.iter().zip(&mut acc1).zip(&mut acc2) {
            *s1 += x.abs() * b1_i;
            *s2 += x.abs() * b2_i;
        }
    }
    // The implementation's rows: projections, ‖got_j‖₁, ‖got_j‖₂.
    let lhs = got.dot(&signs);
    let (g1, g2) = row_norms(got);
    let kf = cols as f64;
    // s_j ≥ ‖S_j‖₂ (storage + accumulation), and the block's rms floor R̄ ≥ rms(S).
    let storage: Vec<f64> = g2.iter().map(|g| us * g + kf.sqrt() * eta).collect();
    let accumulation: Vec<f64> = acc2.iter().map(|x| acc * x).collect();
    let r_bar = ((0..rows).map(|j| (storage[j] + accumulation[j]).powi(2)).sum::<f64>() / (rows as f64 * kf)).sqrt();
    let err = (0..rows).map(|j| (&lhs.row(j) - &rhs.row(j)).mapv(|d| d * d).sum().sqrt()).collect();
    // Σ_k b_jk ≤ C·(u_s·‖got_j‖₁ + K'·η + acc·Σ_i |A_ij|·‖B_i‖₁ + K'·R̄).
    let worst = (0..rows).map(|j| C_SAFETY * (us * g1[j] + kf * eta + acc * acc1[j] + kf * r_bar)).collect();
    ProjectionRows { err, worst, storage, accumulation, r_bar, cols, r }
}

/// Checks one expert's canonical weight grad `D = Aᵀ·B` `[J, K']`, given the operands the
/// implementation used (`a` `[n, J]`, `b` `[n, K']`) and its result `got` `[J, K']`: the
/// projections of every row on the sign columns `signs` `[K', r]` into `projections`, and the
/// `samples` elements against their exact dot products into `elements`, with the bounds the
/// module doc derives. `label` names the matrix in reports. With `fp8` the GEMM is an fp8 GEMM
/// of the (dequantized) operands given, and every bound gains the model's fp8 accumulation
/// term ([`fp8_accumulation`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn check_wgrad(
    dt: Dtype,
    fp8: Option<Fp8Recipe>,
    a: ArrayView2<f64>,
    b: ArrayView2<f64>,
    got: ArrayView2<f64>,
    signs: ArrayView2<f64>,
    samples: &[(usize, usize)],
    projections: &mut CheckStat,
    elements: &mut CheckStat,
    label: &str,
) {
    let (n, rows) = a.dim();
    let cols = b.ncols();
    assert_eq!((b.nrows(), got.dim(), signs.nrows()), (n, (rows, cols), cols), "{label}: operand shapes");
    if rows == 0 || cols == 0 {
        return;
    }
    let p = projection_rows(dt, fp8, a, b, got, signs);
    for j in 0..rows {
        let (e, bound) = (p.err[j], p.bound(j));
        projections.record(e, bound, || format!("{label} row {j}: ‖P‖₂ {e:e}"));
    }
    let tol = Tolerance::error_model();
    for &(j, k) in samples {
        let (mut exact, mut sum_abs) = (0.0, 0.0);
        for i in 0..n {
            let t = a[[i, j]] * b[[i, k]];
            exact += t;
            sum_abs += t.abs();
        }
        let gv = got[[j, k]];
        let fp8_term = fp8.map_or(0.0, |r| fp8_accumulation(n, sum_abs, r));
        let bound = tol.bound(gemm_element_scale(dt, exact, n, sum_abs) + fp8_term, p.r_bar);
        elements.record((gv - exact).abs(), bound, || format!("{label}[{j},{k}]: {gv:e} vs {exact:e}"));
    }
}

/// Checks one expert (module doc); returns the number of rows checked against the oracle.
pub(super) fn check_expert(
    sh: &SampledLayer,
    ed: &ExpertTensors,
    st: &mut SampledChecks,
) -> Result<usize, SampledError> {
    let cfg = sh.cfg;
    sampled_supported(cfg)?;
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
    let w1c: Array2<f64> = if sh.grouped() {
        Array2::from_shape_vec((h, n1), ed.w1.clone()).expect("size").t().to_owned()
    } else {
        Array2::from_shape_vec((n1, h), ed.w1.clone()).expect("size")
    };
    let w2c: Array2<f64> = if sh.grouped() {
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
    // The f64 oracle with its running error bounds on a one-expert layer of the sampled rows;
    // under fp8 padded with zero rows of zero probs to SUBLAYER_ROWS (module doc: TE's shape
    // checks; zero rows change no row-local quantization and no sampled row's result).
    let mp = if cfg.fp8.is_some() { m.div_ceil(SUBLAYER_ROWS) * SUBLAYER_ROWS } else { m };
    let pad_rows = |a: &Array2<f64>| {
        let mut out = Array2::zeros((mp, a.ncols()));
        out.slice_mut(s![..m, ..]).assign(a);
        out
    };
    let mut ps_padded = Array1::zeros(mp);
    ps_padded.slice_mut(s![..m]).assign(&ps);
    let cfg1 = LayerConfig { num_experts: 1, parallel: Parallelism::SINGLE, ..cfg.clone() };
    let set = ExpertSet {
        experts: vec![ExpertWeights {
            fc1_weight: w1c.clone(),
            fc1_bias: None,
            fc2_weight: w2c.clone(),
            fc2_bias: None,
        }],
    };
    let inp = Inputs { hidden_states: pad_rows(&xs), tokens_per_expert: vec![mp as i64], probs: ps_padded };
    let fwd = ref_forward(&cfg1, &set, &inp, Numerics::Oracle)?;
    let bwd = fwd.backward(&pad_rows(&gs), WgradTiming::Immediate)?;
    let sc =
        bwd.scales.as_ref().ok_or_else(|| ReferenceError::Config("the f64 oracle returned no error scales".into()))?;
    let sampled = &rows;
    let at = |what: &'static str| move |i: usize, j: usize| format!("expert {e} row {} col {j} ({what})", sampled[i]);
    let rows_of = |v: &[f64], width: usize| Array2::from_shape_fn((m, width), |(i, j)| v[global(i) * width + j]);
    // The sampled rows of an oracle tensor (the padding rows are never compared).
    let top = |a: &Array2<f64>| a.slice(s![..m, ..]).to_owned();
    check_sampled(
        &mut st.output_rows,
        rows_of(sh.y, h).view(),
        top(fwd.output()).view(),
        top(&sc.output).view(),
        None,
        at("y"),
    );
    check_sampled(
        &mut st.grad_input_rows,
        rows_of(sh.dx, h).view(),
        top(&bwd.grad_input).view(),
        top(&sc.grad_input).view(),
        Some(top(&sc.allowance_grad_input).view()),
        at("dx"),
    );
    let column = |v: &Array1<f64>| v.slice(s![..m]).insert_axis(Axis(1)).to_owned();
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
    check_sampled(
        &mut st.fc2_input_rows,
        local(&ed.u, n2).view(),
        u_exp.view(),
        top(&sc.fc2_input).view(),
        None,
        at("u"),
    );
    check_sampled(
        &mut st.fc1_output_grad_rows,
        local(&ed.da, n1).view(),
        da_exp.view(),
        top(&sc.fc1_output_grad).view(),
        None,
        at("da"),
    );

    // fp8: the last GEMMs of y and dx on the sampled rows, from the implementation's own
    // operands quantized as the layer quantizes them (row-local) and the weights.
    if let Some(f) = cfg.fp8 {
        let [u_rows, w2_rows] =
            fprop_operands(&cfg1, f, [Fp8Operand::Fc2Input, Fp8Operand::Fc2Weight], &local(&ed.u, n2), &w2c)?;
        let (exp, scale) = gemm_rows(dt, &u_rows, &w2_rows, f.recipe);
        check_sampled(
            &mut st.output_gemm_rows,
            rows_of(sh.y, h).view(),
            exp.view(),
            scale.view(),
            None,
            at("y = U_e·W2ᵀ"),
        );
        let [da_rows, w1_cols] = dgrad_operands(&cfg1, f, &local(&ed.da, n1), &w1c)?;
        let (exp, scale) = gemm_rows(dt, &da_rows, &w1_cols, f.recipe);
        check_sampled(
            &mut st.grad_input_gemm_rows,
            rows_of(sh.dx, h).view(),
            exp.view(),
            scale.view(),
            None,
            at("dx = DA_e·W1"),
        );
    }

    // Weight grads, canonical: dW2 [h, N2] = G_eᵀ·U_e, dW1 [N1, h] = DA_eᵀ·X_e.
    let (n, start) = (ed.n, ed.start);
    let (dw2, dw1) = if sh.grouped() {
        (view(&ed.dw2, (n2, h)).reversed_axes(), view(&ed.dw1, (h, n1)).reversed_axes())
    } else {
        (view(&ed.dw2, (h, n2)), view(&ed.dw1, (n1, h)))
    };
    let g_e = view(&sh.g[start * h..(start + n) * h], (n, h));
    let x_e = view(&sh.x[start * h..(start + n) * h], (n, h));
    let (u_e, da_e) = (view(&ed.u, (n, n2)), view(&ed.da, (n, n1)));
    let (signs2, samples2) = (projection_signs(sh.seed, e, 2, n2), sample_elements(sh.seed, e, 2, h, n2));
    let (signs1, samples1) = (projection_signs(sh.seed, e, 1, h), sample_elements(sh.seed, e, 1, n1, h));
    let (label2, label1) = (format!("expert {e} dW2"), format!("expert {e} dW1"));
    let Some(f) = cfg.fp8 else {
        let (p2, e2) = (&mut st.dw2_projections, &mut st.dw2_elements);
        check_wgrad(dt, None, g_e, u_e, dw2, signs2.view(), &samples2, p2, e2, &label2);
        let (p1, e1) = (&mut st.dw1_projections, &mut st.dw1_elements);
        check_wgrad(dt, None, da_e, x_e, dw1, signs1.view(), &samples1, p1, e1, &label1);
        return Ok(m);
    };
    // fp8: the wgrad GEMMs multiply the columnwise copies, re-quantized along the expert's
    // (padded) rows; quantized here as the layer does, they are the exact operands.
    let k = cfg.row_padding().map_or(n, |a| n.div_ceil(a) * a);
    let gq = wgrad_operand(&cfg1, f, Fp8Operand::Fc2GradOutput, (n, k, h), |i, j| g_e[[i, j]])?;
    let uq = wgrad_operand(&cfg1, f, Fp8Operand::Fc2Input, (n, k, n2), |i, j| u_e[[i, j]])?;
    let (p2, e2) = (&mut st.dw2_projections, &mut st.dw2_elements);
    check_wgrad(dt, Some(f.recipe), gq.view(), uq.view(), dw2, signs2.view(), &samples2, p2, e2, &label2);
    drop((gq, uq));
    let daq = wgrad_operand(&cfg1, f, Fp8Operand::Fc1GradOutput, (n, k, n1), |i, j| da_e[[i, j]])?;
    let xq = wgrad_operand(&cfg1, f, Fp8Operand::Fc1Input, (n, k, h), |i, j| x_e[[i, j]])?;
    let (p1, e1) = (&mut st.dw1_projections, &mut st.dw1_elements);
    check_wgrad(dt, Some(f.recipe), daq.view(), xq.view(), dw1, signs1.view(), &samples1, p1, e1, &label1);
    Ok(m)
}

/// `v` as a row-major `[rows, cols]` matrix.
fn view(v: &[f64], shape: (usize, usize)) -> ArrayView2<'_, f64> {
    ArrayView2::from_shape(shape, v).expect("size")
}

/// The wgrad GEMM operand of `op` as an fp8 layer of `cfg` (one expert) multiplies it: the
/// expert's `[n, width]` rows `v(i, j)`, padded with zero rows to `k` (the layer's padding),
/// quantized by the reference's quantizer of the recipe (which the device quantizers match bit
/// for bit), its columnwise copy (blocks along the rows) dequantized and returned as `[k, width]`.
pub(super) fn wgrad_operand(
    cfg: &LayerConfig,
    f: Fp8Config,
    op: Fp8Operand,
    (n, k, width): (usize, usize, usize),
    v: impl Fn(usize, usize) -> f64,
) -> Result<Array2<f64>, SampledError> {
    let mut run = Fp8Run { config: f, state: Fp8State::new(cfg)?, fault: None };
    let rows = Array2::from_shape_fn((k, width), |(i, j)| if i < n { v(i, j) } else { 0.0 });
    let q = run.quantize(0, op, &rows, cfg.params_dtype)?;
    Ok(q.columnwise.dequantized().reversed_axes().as_standard_layout().to_owned())
}

/// `x` with zero rows appended to a multiple of [`SUBLAYER_ROWS`] (MXFP8's quantizer wants
/// 32; rowwise tiles lie inside a row, so the rows' codes do not change).
fn padded(x: &Array2<f64>) -> Array2<f64> {
    let m = x.nrows().div_ceil(SUBLAYER_ROWS) * SUBLAYER_ROWS;
    let mut out = Array2::zeros((m, x.ncols()));
    out.slice_mut(s![..x.nrows(), ..]).assign(x);
    out
}

/// The first `m` rows of `x`.
fn sliced(x: Array2<f64>, m: usize) -> Array2<f64> {
    x.slice(s![..m, ..]).to_owned()
}

/// The fprop operands `[x, W]` of one linear of an fp8 layer of `cfg`: `x` `[m, K]` (rows of
/// the implementation's input, whose rowwise tiles lie inside a row: padded with zero rows to
/// quantize) and the canonical weight
/// `w` `[N, K]`, each quantized by the reference's quantizer of its operand `ops` and its
/// rowwise copy dequantized.
pub(super) fn fprop_operands(
    cfg: &LayerConfig,
    f: Fp8Config,
    ops: [Fp8Operand; 2],
    x: &Array2<f64>,
    w: &Array2<f64>,
) -> Result<[Array2<f64>; 2], SampledError> {
    let mut run = Fp8Run { config: f, state: Fp8State::new(cfg)?, fault: None };
    let xq = sliced(run.quantize(0, ops[0], &padded(x), cfg.params_dtype)?.rowwise.dequantized(), x.nrows());
    let wq = run.quantize(0, ops[1], w, cfg.params_dtype)?.rowwise.dequantized();
    Ok([xq, wq])
}

/// The dgrad operands `[da, W1ᵀ]` of fc1 in an fp8 layer of `cfg`: the rows `da` `[m, N1]`
/// (rowwise copy) and the columnwise copy `[h, N1]` of the canonical `w1` `[N1, h]`, dequantized.
pub(super) fn dgrad_operands(
    cfg: &LayerConfig,
    f: Fp8Config,
    da: &Array2<f64>,
    w1: &Array2<f64>,
) -> Result<[Array2<f64>; 2], SampledError> {
    let mut run = Fp8Run { config: f, state: Fp8State::new(cfg)?, fault: None };
    let daq = run.quantize(0, Fp8Operand::Fc1GradOutput, &padded(da), cfg.params_dtype)?.rowwise.dequantized();
    let daq = sliced(daq, da.nrows());
    let wq = run.quantize(0, Fp8Operand::Fc1Weight, w1, cfg.params_dtype)?.columnwise.dequantized();
    Ok([daq, wq])
}

/// `C = A·Bᵀ` (`a` `[m, K]`, `b` `[N, K]`) of exact (dequantized fp8) operands, and the error
/// model's bound of an fp8 GEMM result stored in `dt`: `S = u·|C| + η + (√K·u_f32 +
/// fp8 accumulation)·Σ_k |A_ik·B_jk|` ([`gemm_element_scale`] plus [`fp8_accumulation`]).
pub(super) fn gemm_rows(dt: Dtype, a: &Array2<f64>, b: &Array2<f64>, recipe: Fp8Recipe) -> (Array2<f64>, Array2<f64>) {
    let k = a.ncols();
    let exp = a.dot(&b.t());
    let sum_abs = a.mapv(f64::abs).dot(&b.mapv(f64::abs).t());
    let scale = ndarray::Zip::from(&exp)
        .and(&sum_abs)
        .map_collect(|&c, &sa| gemm_element_scale(dt, c, k, sa) + fp8_accumulation(k, sa, recipe));
    (exp, scale)
}
