//! The blockwise fp8 recipe (DeepSeek-V3's, TE `Float8BlockScaling`) of a [`DeviceLayer`]: the
//! passes of `layer/fp8.rs` with each expert's operands block-quantized on the device
//! ([`Engine::block_operands`]: 1×128 blocks for activations and gradients, 128×128 for
//! weights, as `moe_reference::fp8::BlockTile::for_role`) and every GEMM a block-scaled
//! cuBLASLt GEMM ([`Engine::fp8_block_gemm`]):
//!
//! | GEMM | A | B |
//! | --- | --- | --- |
//! | fprop `y = x·Wᵀ` | `x` rowwise, 1×128 | `W` rowwise, 128×128 |
//! | dgrad `dx = dy·W` | `dy` rowwise, 1×128 | `W` columnwise, 128×128 |
//! | wgrad `dW = dyᵀ·x` | `dy` columnwise, 1×128 | `x` columnwise, 1×128 |
//!
//! Columnwise copies are re-quantizations of the transposed tensor (blocks along the other
//! axis), one quantizer per expert (TE `GroupedLinear`'s `num_gemms` quantizers). Everything
//! outside the GEMMs is the bf16 path's kernels, unchanged.

use super::{DeviceLayer, Dims, Workspace};
use crate::engine::Engine;
use crate::error::GpuError;
use crate::fp8::BlockOperand;
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

/// The block-quantized activations of one call, per expert: the forward's `x` and `u` (both
/// copies) and the backward's output gradients `G` (fc2) and `da` (fc1), kept for a deferred
/// `backward_dw`.
#[derive(Debug)]
pub(crate) struct BlockActs {
    x: Vec<Pair>,
    u: Vec<Pair>,
    g: Vec<Pair>,
    da: Vec<Pair>,
    /// Set by the backward of this forward: `g` and `da` are current.
    backward_done: bool,
}

fn options(f: &Fp8Config) -> ScaleOptions {
    ScaleOptions { force_pow_2_scales: f.power_2_scales, amax_epsilon: 0.0 }
}

/// Block-quantizes each expert's `[rows_e, cols]` slice of `buf` (rows at `offsets`).
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

impl DeviceLayer {
    /// The blockwise forward.
    pub(super) fn forward_fp8_block(
        &self,
        eng: &mut Engine,
        ws: &mut Workspace,
        f: &Fp8Config,
    ) -> Result<(), GpuError> {
        let (cfg, w) = (&self.cfg, &self.weights);
        let d = Dims::of(cfg);
        let (fi, fw) = (f.format.format_for(TensorRole::Input), f.format.format_for(TensorRole::Weight));
        let opts = options(f);
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
        let xin = ws.xs.as_ref().unwrap_or(&ws.x);
        let xq = per_expert(eng, xin, d.dt, &ws.padded, &ws.offsets, d.h, fi, TensorRole::Input, opts)?;
        let beta = match (&w.b1, cfg.class) {
            (Some(b1), LayerClass::TeGrouped) => {
                let Engine { kernels, stream, .. } = &mut *eng;
                kernels.fill_bias_rows(stream, d.dt, &mut ws.a, b1, &ws.map, d.n1)?;
                1.0
            }
            _ => 0.0,
        };
        for ((x, w1), &off) in xq.iter().zip(&wq.w1).zip(&ws.offsets) {
            eng.fp8_block_gemm(&x.0, &w1.0, ws.a.at(off * d.n1 * d.ds), d.dt, beta)?;
        }
        self.activation_forward(eng, ws)?;
        let uq = per_expert(eng, &ws.u, d.dt, &ws.padded, &ws.offsets, d.n2, fi, TensorRole::Input, opts)?;
        for ((u, w2), &off) in uq.iter().zip(&wq.w2).zip(&ws.offsets) {
            eng.fp8_block_gemm(&u.0, &w2.0, ws.y.at(off * d.h * d.ds), d.dt, 0.0)?;
        }
        if let Some(b2) = &w.b2 {
            let probs_in_storage = cfg.probs_dtype == cfg.params_dtype && cfg.params_dtype != Dtype::F32;
            let p_act = ws.p_act.as_ref().unwrap_or(&ws.p);
            let Engine { kernels, stream, .. } = &mut *eng;
            kernels.fc2_bias_fwd(stream, d.dt, &mut ws.y, b2, p_act, &ws.map, d.h, probs_in_storage)?;
        }
        ws.fp8_block = Some(BlockActs { x: xq, u: uq, g: Vec::new(), da: Vec::new(), backward_done: false });
        Ok(())
    }

    /// The blockwise backward (dgrad; wgrad too when `with_wgrad`).
    pub(super) fn backward_fp8_block(
        &self,
        eng: &mut Engine,
        ws: &mut Workspace,
        f: &Fp8Config,
        with_wgrad: bool,
    ) -> Result<(), GpuError> {
        let cfg = &self.cfg;
        let d = Dims::of(cfg);
        let fg = f.format.format_for(TensorRole::GradOutput);
        let opts = options(f);
        let mut acts = ws.fp8_block.take().ok_or_else(|| GpuError::Shape("fp8 backward before its forward".into()))?;
        let wq =
            self.fp8_block_weights.get().ok_or_else(|| GpuError::Shape("fp8 backward before its forward".into()))?;
        ws.poison_backward_outputs(eng)?;
        self.fc2_bias_grad(eng, ws)?;
        // du_e = G_e·W2_e: G rowwise (1×128) times W2's columnwise copy [N2, h] (128×128).
        let gq = per_expert(eng, &ws.g, d.dt, &ws.padded, &ws.offsets, d.h, fg, TensorRole::GradOutput, opts)?;
        for ((g, w2), &off) in gq.iter().zip(&wq.w2).zip(&ws.offsets) {
            eng.fp8_block_gemm(&g.0, &w2.1, ws.du.at(off * d.n2 * d.ds), d.dt, 0.0)?;
        }
        self.activation_backward(eng, ws)?;
        // dx_e = da_e·W1_e: da rowwise times W1's columnwise copy [h, N1].
        let daq = per_expert(eng, &ws.da, d.dt, &ws.padded, &ws.offsets, d.n1, fg, TensorRole::GradOutput, opts)?;
        for ((da, w1), &off) in daq.iter().zip(&wq.w1).zip(&ws.offsets) {
            eng.fp8_block_gemm(&da.0, &w1.1, ws.dx.at(off * d.h * d.ds), d.dt, 0.0)?;
        }
        self.probs_on_input_backward(eng, ws)?;
        acts.g = gq;
        acts.da = daq;
        acts.backward_done = true;
        ws.fp8_block = Some(acts);
        if cfg.class == LayerClass::Sequential || with_wgrad {
            self.fc1_bias_grad(eng, ws)?;
        }
        if with_wgrad {
            self.wgrad_fp8_block(eng, ws)?;
        }
        Ok(())
    }

    /// `dW2_e = G_eᵀ·u_e` and `dW1_e = da_eᵀ·x_e` from the columnwise copies (1×128 blocks
    /// along the expert's rows; an expert with none gets exact zeros).
    pub(super) fn wgrad_fp8_block(&self, eng: &mut Engine, ws: &Workspace) -> Result<(), GpuError> {
        let d = Dims::of(&self.cfg);
        let acts =
            ws.fp8_block.as_ref().ok_or_else(|| GpuError::Shape("fp8 backward_dw before its backward".into()))?;
        if !acts.backward_done {
            return Err(GpuError::Shape("fp8 wgrad before the backward quantized the output gradients".into()));
        }
        for (e, (g, u)) in acts.g.iter().zip(&acts.u).enumerate() {
            eng.fp8_block_gemm(&g.1, &u.1, ws.grads.w2.at(e * d.h * d.n2 * d.ds), d.dt, 0.0)?;
        }
        for (e, (da, x)) in acts.da.iter().zip(&acts.x).enumerate() {
            eng.fp8_block_gemm(&da.1, &x.1, ws.grads.w1.at(e * d.n1 * d.h * d.ds), d.dt, 0.0)?;
        }
        Ok(())
    }
}
