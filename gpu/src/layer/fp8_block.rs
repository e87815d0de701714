//! The blockwise fp8 recipe (DeepSeek-V3's, TE `Float8BlockScaling`) of a [`DeviceLayer`]: the
//! passes of `layer/fp8.rs` with each expert's operands block-quantized on the device (1×128
//! blocks for activations and gradients, 128×128 for weights, as
//! `moe_reference::fp8::BlockTile::for_role`) and every GEMM a block-scaled cuBLASLt GEMM
//! ([`Engine::fp8_block_gemm_op_at`]):
//!
//! | GEMM | A | B |
//! | --- | --- | --- |
//! | fprop `y = x·Wᵀ` | `x` rowwise, 1×128 | `W` rowwise, 128×128 |
//! | dgrad `dx = dy·W` | `dy` rowwise, 1×128 | `W` columnwise, 128×128 |
//! | wgrad `dW = dyᵀ·x` | `dy` columnwise, 1×128 | `x` columnwise, 1×128 |
//!
//! Columnwise copies are re-quantizations of the transposed tensor (blocks along the other
//! axis), one quantizer per expert (TE `GroupedLinear`'s `num_gemms` quantizers). The
//! activations and gradients of every expert are quantized by one segmented launch each way
//! ([`Engine::block_quantize_segments_into`]) into buffers kept across calls of the same
//! routing, and each linear's per-expert GEMMs are issued as one list ([`expert_gemms`]: a
//! captured graph under [`Strategy::Auto`]), as the per-tensor recipes do. The weights are
//! block-quantized per expert on a layer's first call. The activation quantizes its own output
//! both ways (`act_fwd_blk`, [`Engine::act_fwd_block_quantized`]) under every strategy but
//! `loop`; everything else outside the GEMMs is the bf16 path's kernels, unchanged.

use super::fp8::{expert_gemms, fuses_activation_quantization, graph_of};
use super::{DeviceLayer, Dims, Workspace};
use crate::engine::Engine;
use crate::error::GpuError;
use crate::fp8::{BlockOperand, SegmentMap, SegmentedBlockFp8};
use crate::gemm::Strategy;
use crate::memory::DeviceBuffer;
use moe_reference::fp8::{BlockTile, Fp8Format, ScaleOptions, TensorRole};
use moe_reference::{Dtype, Fp8Config, LayerClass};

/// The rowwise and columnwise block operands of one expert's tensor.
type Pair = (BlockOperand, BlockOperand);

/// The block-quantized weights of a layer, per expert, made on its first fp8 call.
#[derive(Debug)]
pub(crate) struct BlockWeights {
    w1: Vec<Pair>,
    w2: Vec<Pair>,
}

/// The block-quantized activations of one call, every expert's in one buffer per tensor: the
/// forward's `x` and `u` and the backward's output gradients `G` (fc2) and `da` (fc1), kept
/// for a deferred `backward_dw` and, with the segment map, reused by the next call of the same
/// routing (so the GEMM lists keep their addresses and their captured graphs).
#[derive(Debug)]
pub(crate) struct BlockActs {
    tok: SegmentMap,
    x: SegmentedBlockFp8,
    u: SegmentedBlockFp8,
    g: Option<SegmentedBlockFp8>,
    da: Option<SegmentedBlockFp8>,
    /// Set by the backward of this forward: `g` and `da` are current.
    backward_done: bool,
}

fn options(f: &Fp8Config) -> ScaleOptions {
    ScaleOptions { force_pow_2_scales: f.power_2_scales, amax_epsilon: 0.0 }
}

/// Block-quantizes each expert's `[rows_e, cols]` slice of `buf` (rows at `offsets`): the
/// weights, once per layer.
#[allow(clippy::too_many_arguments)]
fn per_expert(
    eng: &mut Engine,
    buf: &DeviceBuffer,
    dt: Dtype,
    rows: &[usize],
    offsets: &[usize],
    cols: usize,
    format: Fp8Format,
    role: TensorRole,
    opts: ScaleOptions,
) -> Result<Vec<Pair>, GpuError> {
    let tile = BlockTile::for_role(role);
    rows.iter()
        .zip(offsets)
        .map(|(&m, &off)| eng.block_operands(buf.at(off * cols * dt.size_bytes()), dt, (m, cols), format, tile, opts))
        .collect()
}

/// `prev` when its buffers hold the segments of `map`, `cols` wide, in `format`; else new ones.
fn reuse_block(
    eng: &mut Engine,
    prev: Option<SegmentedBlockFp8>,
    map: &SegmentMap,
    cols: usize,
    format: Fp8Format,
) -> Result<SegmentedBlockFp8, GpuError> {
    match prev {
        Some(t) if t.fits(map) && t.cols == cols && t.format == format => Ok(t),
        _ => SegmentedBlockFp8::alloc(eng, map, cols, format),
    }
}

/// Every segment of `x` (`[rows, cols]`, the segments of `map`) block-quantized into `prev`'s
/// buffers when they fit, else new ones.
#[allow(clippy::too_many_arguments)]
fn block_quantize_reusing(
    eng: &mut Engine,
    prev: Option<SegmentedBlockFp8>,
    x: &DeviceBuffer,
    dt: Dtype,
    map: &SegmentMap,
    cols: usize,
    format: Fp8Format,
    opts: ScaleOptions,
) -> Result<SegmentedBlockFp8, GpuError> {
    let mut t = reuse_block(eng, prev, map, cols, format)?;
    eng.block_quantize_segments_into(x, dt, map, opts, &mut t)?;
    Ok(t)
}

impl DeviceLayer {
    /// The blockwise forward.
    pub(super) fn forward_fp8_block(
        &self,
        eng: &mut Engine,
        ws: &mut Workspace,
        f: &Fp8Config,
        strategy: Strategy,
    ) -> Result<(), GpuError> {
        let (cfg, w) = (&self.cfg, &self.weights);
        let d = Dims::of(cfg);
        let (fi, fw) = (f.format.format_for(TensorRole::Input), f.format.format_for(TensorRole::Weight));
        let (opts, graph) = (options(f), graph_of(strategy));
        ws.poison_forward_outputs(eng)?;
        if let Some(xs) = ws.xs.as_mut() {
            let Engine { kernels, stream, .. } = &mut *eng;
            kernels.scale_rows(stream, d.dt, &ws.x, &ws.p, xs, ws.rows, d.h)?;
        }
        let el = ws.padded.len();
        if self.fp8_block_weights.get().is_none() {
            let (n1s, hs) = (vec![d.n1; el], vec![d.h; el]);
            let n1_off: Vec<usize> = (0..el).map(|e| e * d.n1).collect();
            let h_off: Vec<usize> = (0..el).map(|e| e * d.h).collect();
            let w1 = per_expert(eng, &w.w1, d.dt, &n1s, &n1_off, d.h, fw, TensorRole::Weight, opts)?;
            let w2 = per_expert(eng, &w.w2, d.dt, &hs, &h_off, d.n2, fw, TensorRole::Weight, opts)?;
            let _ = self.fp8_block_weights.set(BlockWeights { w1, w2 });
        }
        let wq = self.fp8_block_weights.get().ok_or_else(|| GpuError::Shape("fp8 weights not quantized".into()))?;
        let (tok, px, pu, pg, pda) = match ws.fp8_block.take() {
            Some(p) if p.tok.lens() == ws.padded.as_slice() => (p.tok, Some(p.x), Some(p.u), p.g, p.da),
            _ => (SegmentMap::new(eng, &ws.padded)?, None, None, None, None),
        };
        let xin = ws.xs.as_ref().unwrap_or(&ws.x);
        let xq = block_quantize_reusing(eng, px, xin, d.dt, &tok, d.h, fi, opts)?;
        let beta = match (&w.b1, cfg.class) {
            (Some(b1), LayerClass::TeGrouped) => {
                let Engine { kernels, stream, .. } = &mut *eng;
                kernels.fill_bias_rows(stream, d.dt, &mut ws.a, b1, &ws.map, d.n1)?;
                1.0
            }
            _ => 0.0,
        };
        expert_gemms(eng, el, graph, |eng, e| {
            let c = ws.a.at(ws.offsets[e] * d.n1 * d.ds);
            eng.fp8_block_gemm_op_at(xq.rowwise(e)?, wq.w1[e].0.as_ref(), c, d.dt, beta)
        })?;
        // fc2's input: the activation writes both 1×128 operands of u itself (`act_fwd_blk`),
        // or, under `loop` (the two-step baseline the others are compared with), the activation
        // then the segmented quantizer.
        let uq = if fuses_activation_quantization(strategy) {
            let mut uq = reuse_block(eng, pu, &tok, d.n2, fi)?;
            let seq_b1 = if cfg.class == LayerClass::Sequential { w.b1.as_ref() } else { None };
            let p_act = ws.p_act.as_ref().unwrap_or(&ws.p);
            eng.act_fwd_block_quantized(cfg, &mut ws.a, seq_b1, p_act, &mut ws.u, d.dt, &tok, opts, &mut uq)?;
            uq
        } else {
            self.activation_forward(eng, ws)?;
            block_quantize_reusing(eng, pu, &ws.u, d.dt, &tok, d.n2, fi, opts)?
        };
        expert_gemms(eng, el, graph, |eng, e| {
            let c = ws.y.at(ws.offsets[e] * d.h * d.ds);
            eng.fp8_block_gemm_op_at(uq.rowwise(e)?, wq.w2[e].0.as_ref(), c, d.dt, 0.0)
        })?;
        if let Some(b2) = &w.b2 {
            let probs_in_storage = cfg.probs_dtype == cfg.params_dtype && cfg.params_dtype != Dtype::F32;
            let p_act = ws.p_act.as_ref().unwrap_or(&ws.p);
            let Engine { kernels, stream, .. } = &mut *eng;
            kernels.fc2_bias_fwd(stream, d.dt, &mut ws.y, b2, p_act, &ws.map, d.h, probs_in_storage)?;
        }
        ws.fp8_block = Some(BlockActs { tok, x: xq, u: uq, g: pg, da: pda, backward_done: false });
        Ok(())
    }

    /// The blockwise backward (dgrad; wgrad too when `with_wgrad`).
    pub(super) fn backward_fp8_block(
        &self,
        eng: &mut Engine,
        ws: &mut Workspace,
        f: &Fp8Config,
        with_wgrad: bool,
        strategy: Strategy,
    ) -> Result<(), GpuError> {
        let cfg = &self.cfg;
        let d = Dims::of(cfg);
        let fg = f.format.format_for(TensorRole::GradOutput);
        let (opts, graph) = (options(f), graph_of(strategy));
        let mut acts = ws.fp8_block.take().ok_or_else(|| GpuError::Shape("fp8 backward before its forward".into()))?;
        let wq =
            self.fp8_block_weights.get().ok_or_else(|| GpuError::Shape("fp8 backward before its forward".into()))?;
        let el = ws.padded.len();
        ws.poison_backward_outputs(eng)?;
        self.fc2_bias_grad(eng, ws)?;
        // du_e = G_e·W2_e: G rowwise (1×128) times W2's columnwise copy [N2, h] (128×128).
        let gq = block_quantize_reusing(eng, acts.g.take(), &ws.g, d.dt, &acts.tok, d.h, fg, opts)?;
        expert_gemms(eng, el, graph, |eng, e| {
            let c = ws.du.at(ws.offsets[e] * d.n2 * d.ds);
            eng.fp8_block_gemm_op_at(gq.rowwise(e)?, wq.w2[e].1.as_ref(), c, d.dt, 0.0)
        })?;
        self.activation_backward(eng, ws)?;
        // dx_e = da_e·W1_e: da rowwise times W1's columnwise copy [h, N1].
        let daq = block_quantize_reusing(eng, acts.da.take(), &ws.da, d.dt, &acts.tok, d.n1, fg, opts)?;
        expert_gemms(eng, el, graph, |eng, e| {
            let c = ws.dx.at(ws.offsets[e] * d.h * d.ds);
            eng.fp8_block_gemm_op_at(daq.rowwise(e)?, wq.w1[e].1.as_ref(), c, d.dt, 0.0)
        })?;
        self.probs_on_input_backward(eng, ws)?;
        acts.g = Some(gq);
        acts.da = Some(daq);
        acts.backward_done = true;
        ws.fp8_block = Some(acts);
        if cfg.class == LayerClass::Sequential || with_wgrad {
            self.fc1_bias_grad(eng, ws)?;
        }
        if with_wgrad {
            self.wgrad_fp8_block(eng, ws, strategy)?;
        }
        Ok(())
    }

    /// `dW2_e = G_eᵀ·u_e` and `dW1_e = da_eᵀ·x_e` from the columnwise copies (1×128 blocks
    /// along the expert's rows; an expert with none gets exact zeros).
    pub(super) fn wgrad_fp8_block(&self, eng: &mut Engine, ws: &Workspace, strategy: Strategy) -> Result<(), GpuError> {
        let d = Dims::of(&self.cfg);
        let acts =
            ws.fp8_block.as_ref().ok_or_else(|| GpuError::Shape("fp8 backward_dw before its backward".into()))?;
        let missing = || GpuError::Shape("fp8 wgrad before the backward quantized the output gradients".into());
        let (gq, daq) = match (&acts.g, &acts.da) {
            (Some(g), Some(da)) if acts.backward_done => (g, da),
            _ => return Err(missing()),
        };
        let (el, graph) = (ws.padded.len(), graph_of(strategy));
        expert_gemms(eng, el, graph, |eng, e| {
            let c = ws.grads.w2.at(e * d.h * d.n2 * d.ds);
            eng.fp8_block_gemm_op_at(gq.columnwise(e)?, acts.u.columnwise(e)?, c, d.dt, 0.0)
        })?;
        expert_gemms(eng, el, graph, |eng, e| {
            let c = ws.grads.w1.at(e * d.n1 * d.h * d.ds);
            eng.fp8_block_gemm_op_at(daq.columnwise(e)?, acts.x.columnwise(e)?, c, d.dt, 0.0)
        })
    }
}
