//! The backward pass of one forward (spec §5), segment by segment: fc2's bias, fc2, the probs
//! product, the activation and fc1 on the way down, then the weight gradients (now, or queued
//! for `backward_dw`), then, for the oracle, the error model's scales.

use super::fp8::{fp8_gemm, fp8_input_store, Fp8Operand, GemmOperand, QuantizedOperand};
use super::{check_finite, clamp_glu, gemm, halves, store2, BackwardPass, ErrorScales, ForwardPass, WgradTiming};
use crate::config::{LayerClass, LayerConfig};
use crate::dtype::Numerics;
use crate::error::ReferenceError;
use crate::weights::{ExpertSet, ExpertWeights};
use ndarray::{s, Array1, Array2, Axis, Zip};
use std::collections::VecDeque;

/// What one expert segment's backward computes on the way down (rows padded like the forward).
pub(super) struct SegmentGrads {
    /// `du = G·W2`, the gradient of fc2's input, rounded `[n, N2]`.
    pub(super) du: Array2<f64>,
    /// `dz`, the gradient of the activation output `[n, N2]`.
    pub(super) dz: Array2<f64>,
    /// `da`, the gradient of fc1's output `[n, N1]`.
    pub(super) da: Array2<f64>,
    /// The input gradient `[n, h]`.
    pub(super) dx: Array2<f64>,
    /// The probs gradient `[n]` in f32 (cast to the probs dtype when stored).
    pub(super) dp: Array1<f64>,
    /// fp8 (emulated): the columnwise copies of fc2's and fc1's output gradients, for wgrad.
    pub(super) grad_cols: Option<(GemmOperand, GemmOperand)>,
}

impl ForwardPass {
    /// Backward from `grad_output` `[T, h]`: input grad, probs grad and weight grads (or, with
    /// [`WgradTiming::Deferred`], the queue of weight-gradient GEMMs).
    ///
    /// Deferral follows Megatron: the weight GEMMs of both linears are queued; TE's grouped
    /// linear also queues fc1's bias (it is part of its GEMM), while the fc2 bias of both
    /// classes and SequentialMLP's fc1 bias are eager ops outside the linears and get their
    /// gradients immediately. GroupedMLP rejects deferral (Megatron asserts
    /// `delay_wgrad_compute` is incompatible with the legacy grouped GEMM).
    pub fn backward(&self, grad_output: &Array2<f64>, timing: WgradTiming) -> Result<BackwardPass, ReferenceError> {
        self.check_backward(grad_output, timing)?;
        let (cfg, n) = (&self.cfg, self.numerics);
        let (t, h) = self.output.dim();
        let deferred = timing == WgradTiming::Deferred;
        let mut grad_input = Array2::zeros((t, h));
        let mut grad_probs = Array1::zeros(t);
        let mut grads = ExpertSet::zeros(cfg);
        let mut queue = VecDeque::new();
        let mut scales = (n == Numerics::Oracle).then(|| ErrorScales::zeros(cfg, t));
        let mut fc2_input = Array2::zeros((t, cfg.n2()));
        let mut fc1_output_grad = Array2::zeros((t, cfg.n1()));
        let mut start = 0;
        for (e, (&c, &pc)) in self.counts.iter().zip(&self.padded_counts).enumerate() {
            let rows = start..start + c;
            // The segment's upstream gradient, padded with zero rows like its input.
            let mut g = Array2::zeros((pc, h));
            g.slice_mut(s![..c, ..]).assign(&grad_output.slice(s![rows.clone(), ..]));
            let out = &mut grads.experts[e];
            let sg = self.segment_grads(e, &g, out)?;
            queue.extend(self.weight_grads(e, &g, &sg, deferred, out));
            if let Some(sc) = scales.as_mut() {
                self.record_scales(sc, e, &g, &sg, rows.clone());
            }
            grad_input.slice_mut(s![rows.clone(), ..]).assign(&sg.dx.slice(s![..c, ..]));
            fc2_input.slice_mut(s![rows.clone(), ..]).assign(&self.caches[e].u.slice(s![..c, ..]));
            fc1_output_grad.slice_mut(s![rows.clone(), ..]).assign(&sg.da.slice(s![..c, ..]));
            grad_probs.slice_mut(s![rows]).assign(&sg.dp.slice(s![..c]).mapv(|v| n.to(cfg.probs_dtype, v)));
            start += c;
        }
        Ok(BackwardPass {
            grad_input,
            grad_probs,
            weight_grads: grads,
            pending: deferred.then_some(WeightGradStore { numerics: n, queue }),
            fc2_input,
            fc1_output_grad,
            scales,
        })
    }

    /// The upstream gradient must have the output's shape and finite values, and GroupedMLP
    /// cannot defer its weight gradients.
    fn check_backward(&self, grad_output: &Array2<f64>, timing: WgradTiming) -> Result<(), ReferenceError> {
        let (t, h) = self.output.dim();
        if grad_output.dim() != (t, h) {
            return Err(ReferenceError::Shape {
                name: "input.grad_output".into(),
                expected: vec![t, h],
                got: grad_output.shape().to_vec(),
            });
        }
        check_finite("input.grad_output", grad_output)?;
        if timing == WgradTiming::Deferred && self.cfg.class == LayerClass::Grouped {
            return Err(ReferenceError::Config(
                "GroupedMLP does not support delay_wgrad_compute (backward_dw is a no-op there)".into(),
            ));
        }
        Ok(())
    }

    /// Segment `e`'s gradients from fc2 down to the input, given its upstream gradient `g`;
    /// fc2's bias gradient (an eager op, never deferred) goes into `out`.
    fn segment_grads(
        &self,
        e: usize,
        g: &Array2<f64>,
        out: &mut ExpertWeights,
    ) -> Result<SegmentGrads, ReferenceError> {
        let (cfg, n) = (&self.cfg, self.numerics);
        let (w, cache) = (&self.weights.experts[e], &self.caches[e]);
        let (pc, h) = g.dim();
        // fc2 bias: y = cast(o + b2·p) ⇒ db2 = Σ_i p_i·G_i, dp_i += Σ_j G_ij·b2_j (fp32).
        let mut dp = Array1::<f64>::zeros(pc);
        if let Some(b2) = &w.fc2_bias {
            let mut db2 = Array1::zeros(h);
            for (gi, &pi) in g.rows().into_iter().zip(&cache.p) {
                db2.scaled_add(pi, &gi);
            }
            out.fc2_bias = Some(db2.mapv(|v| n.store(n.fp32(v))));
            dp += &g.dot(b2).mapv(|v| n.fp32(v));
        }
        // fc2: dW2 = Gᵀ·u, du = G·W2 (fp8: G rowwise times W2's columnwise copy).
        let (du, g_col) = self.dgrad(e, Fp8Operand::Fc2GradOutput, g, &w.fc2_weight, |f| &f.w2)?;
        let du = store2(n, du);
        // u = cast(z·p): dz = cast(du·p), dp_i += Σ_j du_ij·z_ij (fp32).
        let mut dz = du.clone();
        Zip::from(dz.rows_mut()).and(&cache.p).for_each(|mut row, &pi| {
            row.mapv_inplace(|v| if cfg.eager_activation() { n.store(n.fp32(v * pi)) } else { v * pi })
        });
        let dp_act = (&du * &cache.z).sum_axis(Axis(1)).mapv(|v| n.fp32(v));
        if !cfg.apply_probs_on_input {
            dp = (dp + dp_act).mapv(|v| n.fp32(v));
        }
        // activation_func_fp8_input_store: the backward sees the activation input cast to e4m3.
        let a_bwd = match (&cache.fp8, cfg.fp8) {
            (Some(_), Some(f)) if f.activation_input_store => fp8_input_store(&cache.a),
            _ => cache.a.clone(),
        };
        let da = activation_backward(cfg, n, &a_bwd, &dz);
        // fc1: dx = da·W1, dW1 = daᵀ·x, db1 = Σ_i da_i.
        let (dx, da_col) = self.dgrad(e, Fp8Operand::Fc1GradOutput, &da, &w.fc1_weight, |f| &f.w1)?;
        let mut dx = store2(n, dx);
        if cfg.apply_probs_on_input {
            // x' = cast(p·x): dx = cast(dx'·p), dp_i = Σ_j x_ij·dx'_ij (fp32).
            dp = (&dx * &cache.x_orig).sum_axis(Axis(1)).mapv(|v| n.fp32(v));
            Zip::from(dx.rows_mut())
                .and(&cache.p_orig)
                .for_each(|mut row, &pi| row.mapv_inplace(|v| n.store(n.fp32(v * pi))));
        }
        let grad_cols = g_col.zip(da_col);
        Ok(SegmentGrads { du, dz, da, dx, dp, grad_cols })
    }

    /// A linear's dgrad `dy·W`: in fp8 (emulated, `cfg.fp8` set) `dy` is quantized as `op` of
    /// expert `e` and multiplied with the weight's columnwise copy kept by the forward; returns
    /// the unrounded product and `dy`'s columnwise copy (for wgrad).
    fn dgrad(
        &self,
        e: usize,
        op: Fp8Operand,
        dy: &Array2<f64>,
        w: &Array2<f64>,
        pick: impl Fn(&super::SegmentFp8) -> &QuantizedOperand,
    ) -> Result<(Array2<f64>, Option<GemmOperand>), ReferenceError> {
        let n = self.numerics;
        match (&self.caches[e].fp8, &self.fp8, n) {
            (Some(f), Some(run), Numerics::Emulated(dt)) => {
                let q = run.borrow_mut().quantize(e, op, dy, dt)?;
                Ok((fp8_gemm(&q.rowwise, &pick(f).columnwise), Some(q.columnwise)))
            }
            _ => Ok((gemm(n, dy.view(), w.view()), None)),
        }
    }

    /// Segment `e`'s weight gradients (and fc1's bias gradient) into `out`: computed now, or,
    /// `deferred`, returned as queued GEMMs with the tensors they will fill set to NaN.
    fn weight_grads(
        &self,
        e: usize,
        g: &Array2<f64>,
        sg: &SegmentGrads,
        deferred: bool,
        out: &mut ExpertWeights,
    ) -> Vec<WgradEntry> {
        let n = self.numerics;
        let da = &sg.da;
        let (w, cache) = (&self.weights.experts[e], &self.caches[e]);
        // fp8: (dy columnwise, x columnwise) of each wgrad GEMM, quantized already.
        let (fc2_q, fc1_q) = match (&cache.fp8, &sg.grad_cols) {
            (Some(f), Some((g_col, da_col))) => {
                (Some((g_col.clone(), f.u_col.clone())), Some((da_col.clone(), f.x_col.clone())))
            }
            _ => (None, None),
        };
        let te = self.cfg.class == LayerClass::TeGrouped;
        let mut queued = Vec::new();
        if deferred {
            queued.push(WgradEntry {
                linear: Linear::Fc2,
                expert: e,
                input: cache.u.clone(),
                grad_output: g.clone(),
                with_bias: false,
                fp8: fc2_q.clone(),
            });
            queued.push(WgradEntry {
                linear: Linear::Fc1,
                expert: e,
                input: cache.x.clone(),
                grad_output: da.clone(),
                with_bias: te && w.fc1_bias.is_some(),
                fp8: fc1_q.clone(),
            });
            out.fc2_weight.fill(f64::NAN);
            out.fc1_weight.fill(f64::NAN);
            if te {
                if let Some(b) = out.fc1_bias.as_mut() {
                    b.fill(f64::NAN);
                }
            }
        } else {
            out.fc2_weight = weight_grad(n, g, &cache.u, fc2_q.as_ref()).0;
            out.fc1_weight = weight_grad(n, da, &cache.x, fc1_q.as_ref()).0;
        }
        if w.fc1_bias.is_some() && !(deferred && te) {
            out.fc1_bias = Some(weight_grad(n, da, &cache.x, None).1);
        }
        queued
    }
}

/// Which linear a queued weight-gradient GEMM belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Linear {
    Fc1,
    Fc2,
}

#[derive(Clone, Debug)]
struct WgradEntry {
    linear: Linear,
    expert: usize,
    /// The linear's input rows `[n, in]`.
    input: Array2<f64>,
    /// The gradient of the linear's output `[n, out]`.
    grad_output: Array2<f64>,
    /// Whether the bias gradient is computed with the weight gradient (TE's grouped linear).
    with_bias: bool,
    /// fp8: the GEMM's operands as quantized in the backward (`dy` and `x` columnwise).
    fp8: Option<(GemmOperand, GemmOperand)>,
}

/// The FIFO of queued weight-gradient GEMMs (TE's `WeightGradStore`).
#[derive(Clone, Debug)]
pub struct WeightGradStore {
    numerics: Numerics,
    queue: VecDeque<WgradEntry>,
}

impl WeightGradStore {
    /// Number of queued GEMMs (one per expert segment and linear).
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// `backward_dw()`: computes the queued weight (and, for TE's grouped linear, bias)
    /// gradients, fc2 first then fc1 as `TEGroupedMLP.backward_dw` and `MLP.backward_dw` order
    /// them, and assigns them into `grads` (TE assigns `.grad`, it does not accumulate).
    pub fn backward_dw(mut self, grads: &mut ExpertSet) {
        for linear in [Linear::Fc2, Linear::Fc1] {
            let (now, later): (VecDeque<_>, VecDeque<_>) = self.queue.drain(..).partition(|e| e.linear == linear);
            self.queue = later;
            for entry in now {
                let g = &mut grads.experts[entry.expert];
                let (dw, db) = weight_grad(self.numerics, &entry.grad_output, &entry.input, entry.fp8.as_ref());
                match linear {
                    Linear::Fc2 => {
                        g.fc2_weight = dw;
                        if entry.with_bias {
                            g.fc2_bias = Some(db);
                        }
                    }
                    Linear::Fc1 => {
                        g.fc1_weight = dw;
                        if entry.with_bias {
                            g.fc1_bias = Some(db);
                        }
                    }
                }
            }
        }
    }
}

/// `dW = Gᵀ·X` rounded to the storage dtype (in fp8 from the quantized columnwise copies
/// `(Gᶜ, Xᶜ)` when given), and the bias gradient `Σ_i G_i` (fp32 sum of the high-precision
/// gradient, cast).
fn weight_grad(
    n: Numerics,
    grad_output: &Array2<f64>,
    input: &Array2<f64>,
    fp8: Option<&(GemmOperand, GemmOperand)>,
) -> (Array2<f64>, Array1<f64>) {
    let dw = match fp8 {
        Some((g_col, x_col)) => fp8_gemm(g_col, x_col),
        None => gemm(n, grad_output.t(), input.view()),
    }
    .mapv(|v| n.store(v));
    let db = grad_output.sum_axis(Axis(0)).mapv(|v| n.store(n.fp32(v)));
    (dw, db)
}

/// The gradient of the activation block: returns `da` `[n, N1]` from `dz` (eager) or from
/// `du·p` (compiled, unrounded).
fn activation_backward(cfg: &LayerConfig, n: Numerics, a: &Array2<f64>, dz: &Array2<f64>) -> Array2<f64> {
    let act = cfg.activation;
    let eager = cfg.eager_activation();
    if !cfg.gated_linear_unit {
        let mut da = dz.clone();
        Zip::from(&mut da).and(a).for_each(|d, &a| *d = n.store(*d * act.derivative(a)));
        return da;
    }
    let clamp = cfg.effective_clamp();
    let offset = cfg.effective_offset();
    // §4.10: the activation sees the un-interleaved halves; its gradient flows back through the
    // inverse permutation into the module's (interleaved) order.
    let a = &crate::glu::deinterleave_columns(a, cfg.glu_interleave_size);
    let k = a.ncols() / 2;
    let (g, l) = halves(a);
    let mut da = Array2::zeros(a.raw_dim());
    {
        let (mut dg, mut dl) = da.view_mut().split_at(Axis(1), k);
        Zip::from(&mut dg).and(&mut dl).and(g).and(l).and(dz).for_each(|dg, dl, &g, &l, &dz| {
            let (gc, lc, gate_mask, lin_mask) = clamp_glu(g, l, clamp);
            let (gc, lc) = (n.store(gc), n.store(lc));
            if eager {
                let act_g = n.store(act.apply(gc));
                let lin = if offset != 0.0 { n.store(lc + offset) } else { lc };
                let d_act_g = n.store(dz * lin);
                let d_lin = n.store(dz * act_g);
                *dg = if gate_mask { n.store(d_act_g * act.derivative(gc)) } else { 0.0 };
                *dl = if lin_mask { d_lin } else { 0.0 };
            } else {
                *dg = n.store(dz * (lc + offset) * act.derivative(gc));
                *dl = n.store(dz * act.apply(gc));
            }
        });
    }
    crate::glu::interleave_columns(&da, cfg.glu_interleave_size)
}
