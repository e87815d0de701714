//! The passes of a [`DeviceLayer`] whose configuration has fp8 (issue 13): the bf16 passes with
//! every GEMM replaced by TransformerEngine's fp8 GEMM, as `moe_reference::layer` emulates it.
//!
//! Recipes on the GPU: per-tensor current scaling (`tensorwise`) and delayed scaling (`delayed`:
//! the same passes, each operand's scale read from the layer call's delayed-scaling state and its
//! amax recorded into it, `crate::fp8::DeviceDelayedState`), one quantizer per expert and
//! operand (TE `GroupedLinear`'s `num_gemms` quantizers): `x`, `W1`, `u`, `W2` in the forward,
//! `dy` of fc2 and fc1 in the backward, each with its transposed (columnwise) copy for dgrad
//! and wgrad (`moe_reference::fp8` module doc). GEMMs through cuBLASLt with per-tensor scale
//! pointers, fast accumulation for fprop and split accumulation for dgrad and wgrad (TE's
//! `MMParams` defaults of `Float8CurrentScaling`). Everything outside the GEMMs (activation,
//! probs, bias adds and bias grads) is the bf16 path's kernels, unchanged, except that the
//! activation quantizes its own output for fc2 (its amax, and under delayed scaling its codes,
//! in the same pass; [`fuses_activation_quantization`]).
//!
//! Blockwise scaling runs the same passes with block-scaled operands and GEMMs
//! (`layer/fp8_block.rs`).
//!
//! Declared skips ([`fp8_support`]): MXFP8 (cuBLASLt runs MXFP8 GEMMs
//! on Blackwell only), GroupedMLP, `activation_func_fp8_input_store`, and shapes cuBLASLt's fp8
//! GEMMs refuse (a dimension or an expert's padded rows not a multiple of 16).

use super::{DeviceLayer, Dims, Workspace};
use crate::engine::Engine;
use crate::error::GpuError;
use crate::fp8::{Fp8Issue, SegmentMap, SegmentScales, SegmentedFp8};
use crate::gemm::Strategy;
use crate::kernels::ActParams;
use moe_reference::fp8::{Fp8Format, Fp8Recipe, ScaleOptions, TensorRole};
use moe_reference::layer::Fp8Operand;
use moe_reference::{Dtype, Fp8Config, LayerClass, LayerConfig};

/// TE's `Float8CurrentScaling` GEMM parameters: fprop with fast accumulation
/// (`use_split_accumulator=False`), dgrad and wgrad with split accumulation.
const FPROP_FAST_ACCUM: bool = true;
const DGRAD_FAST_ACCUM: bool = false;
const WGRAD_FAST_ACCUM: bool = false;

/// The quantized weights of a layer (rowwise and columnwise), made on its first fp8 call.
#[derive(Debug)]
pub(crate) struct Fp8Weights {
    w1: SegmentedFp8,
    w2: SegmentedFp8,
}

/// The quantized activations of one call: the forward's (kept for backward, their columnwise
/// copies made by the backward) and the backward's output gradients (kept for a deferred
/// `backward_dw`). The buffers stay in the workspace and are reused by its next call.
#[derive(Debug)]
pub(crate) struct Fp8Operands {
    tok: SegmentMap,
    x: SegmentedFp8,
    u: SegmentedFp8,
    g: Option<SegmentedFp8>,
    da: Option<SegmentedFp8>,
    /// The weights quantized by this call (delayed scaling: their scales change between calls,
    /// so they are not cached on the layer).
    weights: Option<Fp8Weights>,
    /// Set by the backward of this forward: `g`, `da` and the columnwise copies are current.
    backward_done: bool,
}

/// `prev` when its buffers fit `map`, else new ones.
fn reuse(
    eng: &mut Engine,
    prev: Option<SegmentedFp8>,
    map: &SegmentMap,
    cols: usize,
    format: Fp8Format,
) -> Result<SegmentedFp8, GpuError> {
    match prev {
        Some(t) if t.fits(map) && t.cols == cols && t.format == format => Ok(t),
        _ => SegmentedFp8::alloc(eng, map, cols, format),
    }
}

/// Whether the fp8 CUDA path runs `cfg` (with `padded` rows per expert when known): its fp8
/// configuration, or the declared reason it does not.
pub fn fp8_support(cfg: &LayerConfig, padded: Option<&[usize]>) -> Result<Fp8Config, GpuError> {
    let f = cfg.fp8.ok_or_else(|| GpuError::Unsupported("not an fp8 configuration".into()))?;
    let skip = |why: String| Err(GpuError::Unsupported(format!("fp8 {} on the GPU: {why}", f.label())));
    match f.recipe {
        Fp8Recipe::Tensorwise | Fp8Recipe::Delayed | Fp8Recipe::Blockwise => {}
        Fp8Recipe::Mxfp8 => {
            return skip("cuBLASLt runs MXFP8 (VEC32_UE8M0) GEMMs on Blackwell (sm_100) only, not on Hopper".into())
        }
    }
    if cfg.class == LayerClass::Grouped {
        return skip("GroupedMLP has no TransformerEngine fp8 path".into());
    }
    if f.activation_input_store {
        return skip("activation_func_fp8_input_store is not implemented on the GPU".into());
    }
    for (what, dim) in [("hidden_size", cfg.hidden_size), ("fc1 width N1", cfg.n1()), ("fc2 width N2", cfg.n2())] {
        if !dim.is_multiple_of(16) {
            return skip(format!("{what} = {dim} is not a multiple of 16 (cuBLASLt fp8 GEMM operands)"));
        }
    }
    if let Some((e, rows)) = padded.and_then(|p| p.iter().enumerate().find(|(_, r)| !r.is_multiple_of(16))) {
        return skip(format!("expert {e} has {rows} rows, not a multiple of 16 (the wgrad GEMM's K)"));
    }
    Ok(f)
}

/// How the per-expert fp8 GEMMs of a linear are issued ([`Engine::run_fp8_ops`]):
/// [`Fp8Issue::Auto`] for [`Strategy::Auto`] (the fp8 grouped GEMM for many small experts, else
/// one captured CUDA graph with [`crate::fp8::AUTO_FP8_LANES`] branches), a graph with `s` branches for
/// [`Strategy::Graph`]`(s)`; the fp8 grouped GEMM for [`Strategy::Persistent`] (the per-tensor
/// recipes; lists it does not take, and blockwise GEMMs, run as a graph); one cuBLASLt call after
/// another for the other strategies.
pub(super) fn graph_of(strategy: Strategy) -> Fp8Issue {
    match strategy {
        Strategy::Auto => Fp8Issue::Auto,
        Strategy::Graph(s) => Fp8Issue::Graph { lanes: s },
        Strategy::Persistent(_) => Fp8Issue::Persistent,
        _ => Fp8Issue::Direct,
    }
}

/// Whether the layer quantizes in the passes that make the values: fc2's input inside the
/// forward activation ([`Engine::act_fwd_quantized`], [`Engine::act_fwd_block_quantized`]),
/// fc1's output gradient inside the activation backward ([`Engine::act_bwd_quantized`]), and the
/// output gradients' rowwise and columnwise copies in one cast
/// ([`Engine::quantize_segments_both_into`]); the same bits, fewer passes. [`Strategy::Loop`],
/// the baseline every other strategy is compared with bit for bit, keeps the separate steps.
pub(super) fn fuses_activation_quantization(strategy: Strategy) -> bool {
    strategy != Strategy::Loop
}

/// Issues one fp8 GEMM per local expert, `gemm(eng, e)` for `e` in `0..experts`, as one list
/// ([`Engine::run_fp8_ops`] with `issue`).
pub(super) fn expert_gemms(
    eng: &mut Engine,
    experts: usize,
    issue: Fp8Issue,
    mut gemm: impl FnMut(&mut Engine, usize) -> Result<crate::fp8::Fp8GemmOp, GpuError>,
) -> Result<(), GpuError> {
    let mut ops = Vec::with_capacity(experts);
    for e in 0..experts {
        ops.push(gemm(eng, e)?);
    }
    eng.run_fp8_ops(&ops, issue)
}

/// The element format of each operand role.
fn formats(f: &Fp8Config) -> (Fp8Format, Fp8Format, Fp8Format) {
    (
        f.format.format_for(TensorRole::Input),
        f.format.format_for(TensorRole::Weight),
        f.format.format_for(TensorRole::GradOutput),
    )
}

fn options(f: &Fp8Config) -> ScaleOptions {
    ScaleOptions { force_pow_2_scales: f.power_2_scales, amax_epsilon: 0.0 }
}

/// One operand of a per-expert fp8 GEMM: expert `e`'s codes starting at row `row` of a
/// `cols`-wide tensor (`transposed`: its columnwise copy, which starts at the same byte).
fn op<'a>(
    t: &'a SegmentedFp8,
    e: usize,
    row: usize,
    transposed: bool,
) -> Result<(crate::memory::Region<'a>, Fp8Format, crate::memory::Region<'a>), GpuError> {
    let codes = if transposed {
        t.codes_t.as_ref().ok_or_else(|| GpuError::Shape("fp8 operand has no columnwise copy".into()))?
    } else {
        &t.codes
    };
    Ok((codes.at(row * t.cols), t.format, t.scale_inv_at(e)))
}

impl DeviceLayer {
    /// The fp8 forward: [`DeviceLayer::forward`] with fp8 fc1 and fc2 GEMMs.
    pub(super) fn forward_fp8(&self, eng: &mut Engine, ws: &mut Workspace, strategy: Strategy) -> Result<(), GpuError> {
        let (cfg, w) = (&self.cfg, &self.weights);
        let f = fp8_support(cfg, Some(&ws.padded))?;
        if f.recipe == Fp8Recipe::Blockwise {
            return self.forward_fp8_block(eng, ws, &f, strategy);
        }
        let d = Dims::of(cfg);
        let (fi, fw, _) = formats(&f);
        let graph = graph_of(strategy);
        let opts = options(&f);
        ws.poison_forward_outputs(eng)?;
        if let Some(xs) = ws.xs.as_mut() {
            let Engine { kernels, stream, .. } = &mut *eng;
            kernels.scale_rows(stream, d.dt, &ws.x, &ws.p, xs, ws.rows, d.h)?;
        }
        let prev = ws.fp8.take();
        let (tok, px, pu, pg, pda, pw) = match prev {
            Some(o) if o.tok.lens() == ws.padded.as_slice() => (o.tok, Some(o.x), Some(o.u), o.g, o.da, o.weights),
            _ => (SegmentMap::new(eng, &ws.padded)?, None, None, None, None, None),
        };
        let el = ws.padded.len();
        let delayed = ws.delayed.as_ref();
        if f.recipe == Fp8Recipe::Delayed && delayed.is_none() {
            return Err(GpuError::Shape("fp8 delayed scaling: the workspace holds no delayed-scaling state".into()));
        }
        let scales = |operand: Fp8Operand| match delayed {
            Some(state) => SegmentScales::Delayed(state, operand),
            None => SegmentScales::Current(opts),
        };
        let call_weights = match delayed {
            // Delayed scaling: the weights take this call's scales (and record their amaxes).
            Some(_) => {
                let (w1map, w2map) = (SegmentMap::new(eng, &vec![d.n1; el])?, SegmentMap::new(eng, &vec![d.h; el])?);
                let (pw1, pw2) = pw.map_or((None, None), |w| (Some(w.w1), Some(w.w2)));
                let mut w1 = reuse(eng, pw1, &w1map, d.h, fw)?;
                eng.quantize_segments_into(&w.w1, d.dt, &w1map, scales(Fp8Operand::Fc1Weight), &mut w1)?;
                eng.transpose_segments(&mut w1, &w1map)?;
                let mut w2 = reuse(eng, pw2, &w2map, d.n2, fw)?;
                eng.quantize_segments_into(&w.w2, d.dt, &w2map, scales(Fp8Operand::Fc2Weight), &mut w2)?;
                eng.transpose_segments(&mut w2, &w2map)?;
                Some(Fp8Weights { w1, w2 })
            }
            None => {
                if self.fp8_weights.get().is_none() {
                    let w1map = SegmentMap::new(eng, &vec![d.n1; el])?;
                    let w1 = eng.quantize_segments(&w.w1, d.dt, &w1map, d.h, fw, opts, true)?;
                    let w2map = SegmentMap::new(eng, &vec![d.h; el])?;
                    let w2 = eng.quantize_segments(&w.w2, d.dt, &w2map, d.n2, fw, opts, true)?;
                    let _ = self.fp8_weights.set(Fp8Weights { w1, w2 });
                }
                None
            }
        };
        let wq = match &call_weights {
            Some(w) => w,
            None => self.fp8_weights.get().ok_or_else(|| GpuError::Shape("fp8 weights not quantized".into()))?,
        };
        let (w1q, w2q) = (&wq.w1, &wq.w2);
        let xin = ws.xs.as_ref().unwrap_or(&ws.x);
        let mut xq = reuse(eng, px, &tok, d.h, fi)?;
        eng.quantize_segments_into(xin, d.dt, &tok, scales(Fp8Operand::Fc1Input), &mut xq)?;
        let beta = match (&w.b1, cfg.class) {
            (Some(b1), LayerClass::TeGrouped) => {
                let Engine { kernels, stream, .. } = &mut *eng;
                kernels.fill_bias_rows(stream, d.dt, &mut ws.a, b1, &ws.map, d.n1)?;
                1.0
            }
            _ => 0.0,
        };
        expert_gemms(eng, el, graph, |eng, e| {
            let (m, off) = (ws.padded[e], ws.offsets[e]);
            let c = ws.a.at(off * d.n1 * d.ds);
            eng.fp8_gemm_op(
                (m, d.n1, d.h),
                op(&xq, e, off, false)?,
                op(w1q, e, e * d.n1, false)?,
                c,
                d.dt,
                beta,
                FPROP_FAST_ACCUM,
            )
        })?;
        let mut uq = reuse(eng, pu, &tok, d.n2, fi)?;
        let seq_b1 = if cfg.class == LayerClass::Sequential { w.b1.as_ref() } else { None };
        let p_act = ws.p_act.as_ref().unwrap_or(&ws.p);
        let (a, u) = (&mut ws.a, &mut ws.u);
        if fuses_activation_quantization(strategy) {
            eng.act_fwd_quantized(cfg, a, seq_b1, p_act, u, d.dt, &tok, scales(Fp8Operand::Fc2Input), &mut uq)?;
        } else {
            // `activation_forward`'s kernel (not the method: `scales` holds the delayed state of `ws`).
            let (Engine { kernels, stream, .. }, rows) = (&mut *eng, ws.map.rows_arg());
            kernels.act_fwd(stream, d.dt, ActParams::of(cfg), a, seq_b1, p_act, rows, u, d.n2)?;
            eng.quantize_segments_into(u, d.dt, &tok, scales(Fp8Operand::Fc2Input), &mut uq)?;
        }
        expert_gemms(eng, el, graph, |eng, e| {
            let (m, off) = (ws.padded[e], ws.offsets[e]);
            let c = ws.y.at(off * d.h * d.ds);
            eng.fp8_gemm_op(
                (m, d.h, d.n2),
                op(&uq, e, off, false)?,
                op(w2q, e, e * d.h, false)?,
                c,
                d.dt,
                0.0,
                FPROP_FAST_ACCUM,
            )
        })?;
        if let Some(b2) = &w.b2 {
            let probs_in_storage = cfg.probs_dtype == cfg.params_dtype && cfg.params_dtype != Dtype::F32;
            let p_act = ws.p_act.as_ref().unwrap_or(&ws.p);
            let Engine { kernels, stream, .. } = &mut *eng;
            kernels.fc2_bias_fwd(stream, d.dt, &mut ws.y, b2, p_act, &ws.map, d.h, probs_in_storage)?;
        }
        ws.fp8 = Some(Fp8Operands { tok, x: xq, u: uq, g: pg, da: pda, weights: call_weights, backward_done: false });
        Ok(())
    }

    /// The fp8 backward: [`DeviceLayer::backward`] with fp8 dgrad (and, when `with_wgrad`,
    /// wgrad) GEMMs.
    pub(super) fn backward_fp8(
        &self,
        eng: &mut Engine,
        ws: &mut Workspace,
        with_wgrad: bool,
        strategy: Strategy,
    ) -> Result<(), GpuError> {
        let cfg = &self.cfg;
        let f = fp8_support(cfg, Some(&ws.padded))?;
        if f.recipe == Fp8Recipe::Blockwise {
            return self.backward_fp8_block(eng, ws, &f, with_wgrad, strategy);
        }
        let d = Dims::of(cfg);
        let (_, _, fg) = formats(&f);
        let graph = graph_of(strategy);
        let opts = options(&f);
        let mut ops = ws.fp8.take().ok_or_else(|| GpuError::Shape("fp8 backward before its forward".into()))?;
        let call_weights = ops.weights.take();
        let wq = match &call_weights {
            Some(w) => w,
            None => self.fp8_weights.get().ok_or_else(|| GpuError::Shape("fp8 backward before its forward".into()))?,
        };
        // Out of the workspace while its other buffers are borrowed; put back below.
        let delayed = ws.delayed.take();
        let scales = |operand: Fp8Operand| match &delayed {
            Some(state) => SegmentScales::Delayed(state, operand),
            None => SegmentScales::Current(opts),
        };
        ws.poison_backward_outputs(eng)?;
        let el = ws.padded.len();
        self.fc2_bias_grad(eng, ws)?;
        // du_e = G_e·W2_e: G rowwise times W2's columnwise copy [N2, h].
        // Under every strategy but `loop`, the output gradients' casts write their columnwise
        // copies (wgrad's operands) in the same pass; `loop` transposes them below.
        let one_pass = fuses_activation_quantization(strategy);
        let mut gq = reuse(eng, ops.g.take(), &ops.tok, d.h, fg)?;
        if one_pass {
            eng.quantize_segments_both_into(&ws.g, d.dt, &ops.tok, scales(Fp8Operand::Fc2GradOutput), &mut gq)?;
        } else {
            eng.quantize_segments_into(&ws.g, d.dt, &ops.tok, scales(Fp8Operand::Fc2GradOutput), &mut gq)?;
        }
        expert_gemms(eng, el, graph, |eng, e| {
            let (m, off) = (ws.padded[e], ws.offsets[e]);
            let c = ws.du.at(off * d.n2 * d.ds);
            eng.fp8_gemm_op(
                (m, d.n2, d.h),
                op(&gq, e, off, false)?,
                op(&wq.w2, e, e * d.h, true)?,
                c,
                d.dt,
                0.0,
                DGRAD_FAST_ACCUM,
            )
        })?;
        // fc1's output gradient da, quantized by the activation backward in its own pass
        // (`act_bwd_q`: its amax, or under delayed scaling its codes too), or under `loop` by
        // the activation then the quantizer.
        let mut daq = reuse(eng, ops.da.take(), &ops.tok, d.n1, fg)?;
        if one_pass {
            let p_act = ws.p_act.as_ref().unwrap_or(&ws.p);
            let (inputs, b2) = ((&ws.a, &ws.du, p_act, &ws.g), self.weights.b2.as_ref());
            let (da, tok, op) = ((&mut ws.da, &mut ws.dp), &ops.tok, Fp8Operand::Fc1GradOutput);
            eng.act_bwd_quantized(cfg, inputs, b2, da, d.dt, tok, scales(op), &mut daq, true)?;
        } else {
            self.activation_backward(eng, ws)?;
            eng.quantize_segments_into(&ws.da, d.dt, &ops.tok, scales(Fp8Operand::Fc1GradOutput), &mut daq)?;
        }
        // dx_e = da_e·W1_e: da rowwise times W1's columnwise copy [h, N1].
        expert_gemms(eng, el, graph, |eng, e| {
            let (m, off) = (ws.padded[e], ws.offsets[e]);
            let c = ws.dx.at(off * d.h * d.ds);
            eng.fp8_gemm_op(
                (m, d.h, d.n1),
                op(&daq, e, off, false)?,
                op(&wq.w1, e, e * d.n1, true)?,
                c,
                d.dt,
                0.0,
                DGRAD_FAST_ACCUM,
            )
        })?;
        self.probs_on_input_backward(eng, ws)?;
        // The columnwise copies the wgrad GEMMs read: dyᵀ of both linears (written by their
        // casts above, except under `loop`), and the forward's x and u (the same codes
        // transposed: tensorwise scaling).
        if !one_pass {
            eng.transpose_segments(&mut gq, &ops.tok)?;
            eng.transpose_segments(&mut daq, &ops.tok)?;
        }
        for t in [&mut ops.x, &mut ops.u] {
            eng.transpose_segments(t, &ops.tok)?;
        }
        ops.g = Some(gq);
        ops.da = Some(daq);
        ops.weights = call_weights;
        ws.delayed = delayed;
        ops.backward_done = true;
        ws.fp8 = Some(ops);
        if cfg.class == LayerClass::Sequential || with_wgrad {
            self.fc1_bias_grad(eng, ws)?;
        }
        if with_wgrad {
            self.wgrad_fp8(eng, ws, graph)?;
        }
        Ok(())
    }

    /// `backward_dw()` in fp8: the deferred weight GEMMs, fc2 then fc1, and TEGroupedMLP's fc1
    /// bias grad.
    pub(super) fn backward_dw_fp8(
        &self,
        eng: &mut Engine,
        ws: &mut Workspace,
        strategy: Strategy,
    ) -> Result<(), GpuError> {
        if self.cfg.fp8.is_some_and(|f| f.recipe == Fp8Recipe::Blockwise) {
            self.wgrad_fp8_block(eng, ws, strategy)?;
        } else {
            self.wgrad_fp8(eng, ws, graph_of(strategy))?;
        }
        if self.cfg.class == LayerClass::TeGrouped {
            self.fc1_bias_grad(eng, ws)?;
        }
        Ok(())
    }

    /// The per-tensor `scale_inv` of each local expert's `operand` that the last fp8 call of
    /// `ws` cast with (per-tensor recipes; the output gradients after its backward): what the
    /// tests hold against the recipe's rule, e.g. `1/scale` of a delayed-scaling state.
    pub fn fp8_scale_inv(&self, eng: &mut Engine, ws: &Workspace, operand: Fp8Operand) -> Result<Vec<f32>, GpuError> {
        let missing = || GpuError::Shape(format!("no per-tensor fp8 {} in this workspace", operand.name()));
        let ops = ws.fp8.as_ref().ok_or_else(missing)?;
        let weights = ops.weights.as_ref().or(self.fp8_weights.get());
        let t = match operand {
            Fp8Operand::Fc1Input => Some(&ops.x),
            Fp8Operand::Fc2Input => Some(&ops.u),
            Fp8Operand::Fc1GradOutput => ops.da.as_ref(),
            Fp8Operand::Fc2GradOutput => ops.g.as_ref(),
            Fp8Operand::Fc1Weight => weights.map(|w| &w.w1),
            Fp8Operand::Fc2Weight => weights.map(|w| &w.w2),
        }
        .ok_or_else(missing)?;
        let bytes = eng.download(&t.scale_inv)?;
        Ok((0..t.segments)
            .map(|s| {
                let at = 4 * crate::fp8::SCALE_STRIDE * s;
                f32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
            })
            .collect())
    }

    /// `dW2_e = G_eᵀ·u_e` and `dW1_e = da_eᵀ·x_e` from the columnwise copies (K = the expert's
    /// padded rows; an expert with none gets exact zeros).
    fn wgrad_fp8(&self, eng: &mut Engine, ws: &Workspace, graph: Fp8Issue) -> Result<(), GpuError> {
        let d = Dims::of(&self.cfg);
        let ops = ws.fp8.as_ref().ok_or_else(|| GpuError::Shape("fp8 backward_dw before its backward".into()))?;
        let missing = || GpuError::Shape("fp8 wgrad before the backward quantized the output gradients".into());
        if !ops.backward_done {
            return Err(missing());
        }
        let (gq, daq) = (ops.g.as_ref().ok_or_else(missing)?, ops.da.as_ref().ok_or_else(missing)?);
        expert_gemms(eng, ws.padded.len(), graph, |eng, e| {
            let (m, off) = (ws.padded[e], ws.offsets[e]);
            let c = ws.grads.w2.at(e * d.h * d.n2 * d.ds);
            eng.fp8_gemm_op(
                (d.h, d.n2, m),
                op(gq, e, off, true)?,
                op(&ops.u, e, off, true)?,
                c,
                d.dt,
                0.0,
                WGRAD_FAST_ACCUM,
            )
        })?;
        expert_gemms(eng, ws.padded.len(), graph, |eng, e| {
            let (m, off) = (ws.padded[e], ws.offsets[e]);
            let c = ws.grads.w1.at(e * d.n1 * d.h * d.ds);
            eng.fp8_gemm_op(
                (d.n1, d.h, m),
                op(daq, e, off, true)?,
                op(&ops.x, e, off, true)?,
                c,
                d.dt,
                0.0,
                WGRAD_FAST_ACCUM,
            )
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_reference::fp8::TeFormat;

    fn cfg(recipe: Fp8Recipe) -> LayerConfig {
        LayerConfig {
            class: LayerClass::TeGrouped,
            num_experts: 4,
            hidden_size: 32,
            ffn_hidden_size: 48,
            fp8: Some(Fp8Config::new(recipe).with_format(TeFormat::Hybrid)),
            ..LayerConfig::example()
        }
    }

    fn reason(r: Result<Fp8Config, GpuError>) -> String {
        match r {
            Err(GpuError::Unsupported(why)) => why,
            other => panic!("expected a declared skip, got {other:?}"),
        }
    }

    /// What the fp8 GPU path runs and what it declares unsupported, with the reason (no GPU
    /// needed): each refusal exists so that a report counts a skip instead of running bf16 under
    /// an fp8 name or failing inside cuBLASLt.
    #[test]
    fn fp8_support_runs_tensorwise_delayed_and_blockwise_and_names_every_refusal() {
        assert!(fp8_support(&cfg(Fp8Recipe::Tensorwise), Some(&[16, 0, 32])).is_ok());
        assert!(fp8_support(&cfg(Fp8Recipe::Blockwise), Some(&[16, 0, 32])).is_ok());
        assert!(reason(fp8_support(&cfg(Fp8Recipe::Mxfp8), None)).contains("Blackwell"));
        assert!(fp8_support(&cfg(Fp8Recipe::Delayed), Some(&[16, 0, 32])).is_ok());
        let odd = LayerConfig { hidden_size: 40, ..cfg(Fp8Recipe::Tensorwise) };
        assert!(reason(fp8_support(&odd, None)).contains("hidden_size = 40"));
        // An expert whose padded rows are not a multiple of 16 (the wgrad GEMM's K).
        assert!(reason(fp8_support(&cfg(Fp8Recipe::Tensorwise), Some(&[16, 8]))).contains("expert 1 has 8 rows"));
        let store = Fp8Config { activation_input_store: true, ..Fp8Config::new(Fp8Recipe::Tensorwise) };
        let c = LayerConfig { fp8: Some(store), ..cfg(Fp8Recipe::Tensorwise) };
        assert!(reason(fp8_support(&c, None)).contains("activation_func_fp8_input_store"));
        let none = LayerConfig { fp8: None, ..cfg(Fp8Recipe::Tensorwise) };
        assert!(reason(fp8_support(&none, None)).contains("not an fp8"));
    }
}
