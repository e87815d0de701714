//! The passes of a [`DeviceLayer`] on a [`Workspace`]: forward, backward (with immediate or
//! deferred weight gradients) and `backward_dw`. Every set of per-expert GEMMs is one grouped
//! call with the strategy the caller passes.

use super::{DeviceLayer, Dims, Workspace};
use crate::engine::Engine;
use crate::error::GpuError;
use crate::gemm::{wgrad_problem, GemmProblem, Strategy};
use crate::kernels::ActParams;
use crate::memory::{DeviceBuffer, Region};
use moe_reference::{Dtype, LayerClass};

/// The two linears of an expert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Linear {
    Fc1,
    Fc2,
}

/// Expert `e`'s first row of a `[rows, cols]` buffer of the workspace.
fn segment<'a>(buf: &'a DeviceBuffer, ws: &Workspace, e: usize, cols: usize) -> Region<'a> {
    buf.at(ws.offsets[e] * cols * ws.dims.ds)
}

/// The per-expert GEMMs over token rows, `out_e[m_e, n] = in_e[m_e, k]·op(weight_e)`, for
/// the first `experts` experts: `input`/`output` segmented by the workspace's row offsets,
/// `weight` a stack of `n·k` blocks (fc1, fc2 and the two data gradients).
fn token_gemms<'a>(
    ws: &Workspace,
    experts: usize,
    (n, k): (usize, usize),
    input: &'a DeviceBuffer,
    weight: &'a DeviceBuffer,
    output: &'a DeviceBuffer,
) -> Vec<GemmProblem<Region<'a>>> {
    (0..experts)
        .map(|e| GemmProblem {
            m: ws.padded[e],
            n,
            k,
            a: segment(input, ws, e, k),
            b: weight.at(e * n * k * ws.dims.ds),
            c: segment(output, ws, e, n),
        })
        .collect()
}

impl DeviceLayer {
    /// The forward pass on device buffers: `ws.y` (and the intermediates backward needs).
    pub fn forward(&self, eng: &mut Engine, ws: &mut Workspace, strategy: Strategy) -> Result<(), GpuError> {
        if self.cfg.fp8.is_some() {
            return self.forward_fp8(eng, ws, strategy);
        }
        let (cfg, w) = (&self.cfg, &self.weights);
        let d = Dims::of(cfg);
        let grouped = cfg.class == LayerClass::Grouped;
        ws.poison_forward_outputs(eng)?;
        let Engine { kernels, stream, .. } = &mut *eng;
        // §4.7: x' = round(p·x), probs replaced by ones.
        if let Some(xs) = ws.xs.as_mut() {
            kernels.scale_rows(stream, d.dt, &ws.x, &ws.p, xs, ws.rows, d.h)?;
        }
        // TEGroupedMLP: fc1 bias inside the GEMM (pre-fill a with b1, beta = 1: one rounding).
        let te_bias = match (&w.b1, cfg.class) {
            (Some(b1), LayerClass::TeGrouped) => {
                kernels.fill_bias_rows(stream, d.dt, &mut ws.a, b1, &ws.map, d.n1)?;
                true
            }
            _ => false,
        };
        // fc1: a_e = x_e·W1_eᵀ ([out,in] weights) or x_e·W1_e ([in,out] GroupedMLP blocks).
        let xin = ws.xs.as_ref().unwrap_or(&ws.x);
        let fc1 = token_gemms(ws, d.el.min(ws.padded.len()), (d.n1, d.h), xin, &w.w1, &ws.a);
        if te_bias {
            // beta = 1 on the bias-filled output: one cuBLAS call per expert.
            for p in &fc1 {
                eng.gemm(d.dt, false, !grouped, p, 1.0)?;
            }
        } else {
            eng.grouped_gemm(strategy, d.dt, false, !grouped, &fc1)?;
        }
        self.activation_forward(eng, ws)?;
        // fc2: y_e = u_e·W2_eᵀ (or u_e·W2_e for GroupedMLP blocks [N2, h]).
        let fc2 = token_gemms(ws, d.el.min(ws.padded.len()), (d.h, d.n2), &ws.u, &w.w2, &ws.y);
        eng.grouped_gemm(strategy, d.dt, false, !grouped, &fc2)?;
        // fc2 bias scaled by the probs: y = round(y + b2·p) in f32.
        // With storage-dtype probs the product b2·p is rounded first (spec §4.8).
        if let Some(b2) = &w.b2 {
            let probs_in_storage = cfg.probs_dtype == cfg.params_dtype && cfg.params_dtype != Dtype::F32;
            let p_act = ws.p_act.as_ref().unwrap_or(&ws.p);
            let Engine { kernels, stream, .. } = &mut *eng;
            kernels.fc2_bias_fwd(stream, d.dt, &mut ws.y, b2, p_act, &ws.map, d.h, probs_in_storage)?;
        }
        Ok(())
    }

    /// The fc2 bias grad `db2 = Σ_i p_i·G_i` per expert (f32 sum, one rounding) into
    /// `ws.grads.b2`, when the layer has an fc2 bias; the same step for every precision.
    pub(super) fn fc2_bias_grad(&self, eng: &mut Engine, ws: &mut Workspace) -> Result<(), GpuError> {
        let d = Dims::of(&self.cfg);
        if let (Some(db2), Some(_)) = (ws.grads.b2.as_mut(), &self.weights.b2) {
            let p_act = ws.p_act.as_ref().unwrap_or(&ws.p);
            let Engine { kernels, stream, .. } = &mut *eng;
            kernels.col_sum(stream, d.dt, &ws.g, Some(p_act), &ws.map, db2, d.h)?;
        }
        Ok(())
    }

    /// The activation block of every forward: (SequentialMLP's fc1 bias into `a`) → act/GLU →
    /// `u = round(z·p)`.
    pub(super) fn activation_forward(&self, eng: &mut Engine, ws: &mut Workspace) -> Result<(), GpuError> {
        let cfg = &self.cfg;
        let d = Dims::of(cfg);
        let seq_b1 = if cfg.class == LayerClass::Sequential { self.weights.b1.as_ref() } else { None };
        let p_act = ws.p_act.as_ref().unwrap_or(&ws.p);
        let Engine { kernels, stream, .. } = &mut *eng;
        let rows = ws.map.rows_arg();
        kernels.act_fwd(stream, d.dt, ActParams::of(cfg), &mut ws.a, seq_b1, p_act, rows, &mut ws.u, d.n2)
    }

    /// With the probs applied on the input (§4.7 backward): `dp = Σ dx'·x` and `dx = round(dx'·p)`
    /// in place on `ws.dx`, `ws.dp`; nothing otherwise; the same step for every precision.
    pub(super) fn probs_on_input_backward(&self, eng: &mut Engine, ws: &mut Workspace) -> Result<(), GpuError> {
        let cfg = &self.cfg;
        if cfg.apply_probs_on_input {
            let d = Dims::of(cfg);
            let Engine { kernels, stream, .. } = &mut *eng;
            kernels.probs_in_bwd(
                stream,
                d.dt,
                &mut ws.dx,
                &ws.x,
                &ws.p,
                &mut ws.dp,
                (ws.rows, d.h),
                cfg.probs_dtype,
            )?;
        }
        Ok(())
    }

    /// Activation backward and `dp` (the fc2-bias term and `Σ du·z`) from `ws.du` into `ws.da`
    /// and `ws.dp`, one block per row; the same step for every precision.
    pub(super) fn activation_backward(&self, eng: &mut Engine, ws: &mut Workspace) -> Result<(), GpuError> {
        let (cfg, d) = (&self.cfg, Dims::of(&self.cfg));
        let p_act = ws.p_act.as_ref().unwrap_or(&ws.p);
        let Engine { kernels, stream, .. } = &mut *eng;
        kernels.act_bwd(
            stream,
            d.dt,
            ActParams::of(cfg),
            (&ws.a, &ws.du, p_act, &ws.g),
            self.weights.b2.as_ref(),
            ws.map.rows_arg(),
            (&mut ws.da, &mut ws.dp),
            !cfg.apply_probs_on_input,
            (d.n2, d.h),
            cfg.probs_dtype,
            None,
        )?;
        Ok(())
    }

    /// Backward from `ws.g`: `ws.dx`, `ws.dp`, the fc2 bias grad, SequentialMLP's fc1 bias grad,
    /// and — when `with_wgrad` — the weight grads (else left for [`DeviceLayer::backward_dw`]).
    pub fn backward(
        &self,
        eng: &mut Engine,
        ws: &mut Workspace,
        with_wgrad: bool,
        strategy: Strategy,
    ) -> Result<(), GpuError> {
        if self.cfg.fp8.is_some() {
            return self.backward_fp8(eng, ws, with_wgrad, strategy);
        }
        let (cfg, w) = (&self.cfg, &self.weights);
        let d = Dims::of(cfg);
        let grouped = cfg.class == LayerClass::Grouped;
        ws.poison_backward_outputs(eng)?;
        let el = ws.padded.len();
        // db2 = Σ_i p_i·G_i per expert (f32 sum, one rounding).
        self.fc2_bias_grad(eng, ws)?;
        // du_e = round(G_e·W2_e) ([h, N2] weights: no transpose; GroupedMLP [N2, h]: transpose).
        let dgrad2 = token_gemms(ws, el, (d.n2, d.h), &ws.g, &w.w2, &ws.du);
        eng.grouped_gemm(strategy, d.dt, false, grouped, &dgrad2)?;
        // Activation backward + dp (fc2-bias term and Σ du·z), one block per row.
        self.activation_backward(eng, ws)?;
        // dx_e = round(da_e·W1_e) ([N1, h]: no transpose; GroupedMLP [h, N1]: transpose).
        let dgrad1 = token_gemms(ws, el, (d.h, d.n1), &ws.da, &w.w1, &ws.dx);
        eng.grouped_gemm(strategy, d.dt, false, grouped, &dgrad1)?;
        // §4.7 backward: dp = Σ dx'·x, dx = round(dx'·p).
        self.probs_on_input_backward(eng, ws)?;
        // SequentialMLP's fc1 bias is an eager op outside the linear: its grad is never deferred.
        if cfg.class == LayerClass::Sequential || with_wgrad {
            self.fc1_bias_grad(eng, ws)?;
        }
        if with_wgrad {
            self.wgrad(eng, ws, Linear::Fc2, strategy)?;
            self.wgrad(eng, ws, Linear::Fc1, strategy)?;
        }
        Ok(())
    }

    /// `backward_dw()`: the deferred weight GEMMs, fc2 then fc1 (TEGroupedMLP's fc1 bias grad
    /// goes with its GEMM).
    pub fn backward_dw(&self, eng: &mut Engine, ws: &mut Workspace, strategy: Strategy) -> Result<(), GpuError> {
        if self.cfg.fp8.is_some() {
            return self.backward_dw_fp8(eng, ws, strategy);
        }
        self.wgrad(eng, ws, Linear::Fc2, strategy)?;
        self.wgrad(eng, ws, Linear::Fc1, strategy)?;
        if self.cfg.class == LayerClass::TeGrouped {
            self.fc1_bias_grad(eng, ws)?;
        }
        Ok(())
    }

    pub(super) fn fc1_bias_grad(&self, eng: &mut Engine, ws: &mut Workspace) -> Result<(), GpuError> {
        let d = Dims::of(&self.cfg);
        if let Some(db1) = ws.grads.b1.as_mut() {
            let Engine { kernels, stream, .. } = &mut *eng;
            kernels.col_sum(stream, d.dt, &ws.da, None, &ws.map, db1, d.n1)?;
        }
        Ok(())
    }

    /// Variable-K weight GEMMs per expert; an expert with 0 rows gets exact zeros.
    fn wgrad(&self, eng: &mut Engine, ws: &Workspace, linear: Linear, strategy: Strategy) -> Result<(), GpuError> {
        let d = Dims::of(&self.cfg);
        let grouped = self.cfg.class == LayerClass::Grouped;
        let xin = ws.xs.as_ref().unwrap_or(&ws.x);
        // (output-side activation grad, its columns, input-side activation, its columns,
        // weight-grad buffer).
        let (out_side, out_cols, in_side, in_cols, grad) = match linear {
            Linear::Fc2 => (&ws.g, d.h, &ws.u, d.n2, &ws.grads.w2),
            Linear::Fc1 => (&ws.da, d.n1, xin, d.h, &ws.grads.w1),
        };
        let problems: Vec<GemmProblem<Region>> = (0..ws.padded.len())
            .map(|e| {
                wgrad_problem(
                    (segment(out_side, ws, e, out_cols), out_cols),
                    (segment(in_side, ws, e, in_cols), in_cols),
                    grad.at(e * out_cols * in_cols * d.ds),
                    ws.padded[e],
                    !grouped,
                )
            })
            .collect();
        eng.grouped_gemm(strategy, d.dt, true, false, &problems)
    }
}
