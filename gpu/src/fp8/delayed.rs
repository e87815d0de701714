//! Delayed scaling on the device (TE `DelayedScaling`, Megatron `--fp8-recipe delayed`): the
//! state of every local expert's six fp8 operands (`scale` and amax history, the reference's
//! [`Fp8State`]) kept in device buffers, read by the quantization of each operand (the cast
//! uses the state's scale, the tensor's amax is folded into `amax_history[0]`) and advanced by
//! TE's fused amax-and-scale update ([`DeviceDelayedState::update`], the `kernel_bulk` of
//! `common/recipe/delayed_scaling.cu`), all bit-exact with `moe_reference::fp8::DelayedScaling`.
//!
//! Layout: tensor `t = expert·6 + operand` (the order of [`Fp8Operand::ALL`]) has its scale at
//! `scale[t]` and its history at `history[t·len .. (t+1)·len]`.

use super::{Fp8Engine, SCALE_STRIDE};
use crate::engine::Engine;
use crate::error::GpuError;
use crate::memory::DeviceBuffer;
use cudarc::driver::{LaunchConfig, PushKernelArg};
use moe_reference::layer::{Fp8Operand, Fp8State};

/// Operands per local expert (fc1/fc2 × input, weight, grad output).
const OPS: usize = Fp8Operand::ALL.len();

/// The delayed-scaling state of one layer's local experts on the device.
#[derive(Debug)]
pub struct DeviceDelayedState {
    /// The host state this was uploaded from (formats and configuration; values replaced on
    /// download).
    template: Fp8State,
    experts: usize,
    len: usize,
    scale: DeviceBuffer,
    history: DeviceBuffer,
    /// `fp8_max·2^(−margin)` of each operand (its format's), f32.
    scaled_max: DeviceBuffer,
    most_recent: bool,
}

fn f32_bytes(v: impl IntoIterator<Item = f32>) -> Vec<u8> {
    v.into_iter().flat_map(f32::to_le_bytes).collect()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn one_d(n: usize) -> Result<LaunchConfig, GpuError> {
    Ok(LaunchConfig { grid_dim: (u32::try_from(n.div_ceil(256))?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 })
}

impl DeviceDelayedState {
    /// Uploads `state` (a delayed-scaling [`Fp8State`] with at least one local expert).
    pub fn upload(eng: &mut Engine, state: &Fp8State) -> Result<DeviceDelayedState, GpuError> {
        let experts = state.experts();
        let first = state
            .get(0, Fp8Operand::Fc1Input)
            .ok_or_else(|| GpuError::Shape("delayed scaling: the fp8 state holds no local expert".into()))?;
        let config = first.config();
        let len = config.amax_history_len;
        let mut scales = Vec::with_capacity(experts * OPS);
        let mut history = Vec::with_capacity(experts * OPS * len);
        for e in 0..experts {
            for op in Fp8Operand::ALL {
                let t = state.get(e, op).ok_or_else(|| {
                    GpuError::Shape(format!("delayed scaling: no state for {} of local expert {e}", op.name()))
                })?;
                if t.amax_history().len() != len || t.config() != config {
                    return Err(GpuError::Shape(format!(
                        "delayed scaling: {} of local expert {e} has another configuration than linear_fc1.input \
                         of expert 0 (one DelayedScaling recipe per layer)",
                        op.name()
                    )));
                }
                scales.push(t.scale());
                history.extend_from_slice(t.amax_history());
            }
        }
        let scaled_max: Vec<f32> =
            Fp8Operand::ALL.iter().map(|&op| state.get(0, op).map(|t| t.scaled_max()).unwrap_or(0.0)).collect();
        Ok(DeviceDelayedState {
            template: state.clone(),
            experts,
            len,
            scale: eng.upload(&f32_bytes(scales))?,
            history: eng.upload(&f32_bytes(history))?,
            scaled_max: eng.upload(&f32_bytes(scaled_max))?,
            most_recent: config.amax_compute_algo == moe_reference::fp8::AmaxComputeAlgo::MostRecent,
        })
    }

    /// Local experts of the state.
    pub fn experts(&self) -> usize {
        self.experts
    }

    /// Downloads the state (synchronizes).
    pub fn download(&self, eng: &mut Engine) -> Result<Fp8State, GpuError> {
        let n = self.experts * OPS;
        let scales = f32s(&eng.download_range(&self.scale, 0, n * 4)?);
        let history = f32s(&eng.download_range(&self.history, 0, n * self.len * 4)?);
        let mut out = self.template.clone();
        for e in 0..self.experts {
            for (i, op) in Fp8Operand::ALL.into_iter().enumerate() {
                let t = e * OPS + i;
                out.set(e, op, scales[t], &history[t * self.len..(t + 1) * self.len])?;
            }
        }
        Ok(out)
    }

    /// TE's fused amax-and-scale update of every tensor, on the device (what the reference's
    /// [`Fp8State::update`] does on the host).
    pub fn update(&mut self, eng: &mut Engine) -> Result<(), GpuError> {
        let n = self.experts * OPS;
        let (ni, ops, len, mr) = (i32::try_from(n)?, OPS as i32, i32::try_from(self.len)?, i32::from(self.most_recent));
        let stream = eng.stream.clone();
        let (h, s, m) = (
            self.history.addr(0, n * self.len * 4, "amax history")?,
            self.scale.addr(0, n * 4, "delayed scale")?,
            self.scaled_max.addr(0, OPS * 4, "scaled max")?,
        );
        let fe: &mut Fp8Engine = eng.fp8_engine()?;
        launch!(fe, stream, &fe.delayed_update, one_d(n)?, [&h, &s, &m, &ni, &ops, &len, &mr]);
        Ok(())
    }

    /// Writes the state's scale of `operand` for each of `segs` segments (one per local expert)
    /// into `scale`/`scale_inv` at stride [`SCALE_STRIDE`].
    pub(super) fn scales_into(
        &self,
        fe: &mut Fp8Engine,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
        operand: Fp8Operand,
        segs: usize,
        (scale, scale_inv): (u64, u64),
    ) -> Result<(), GpuError> {
        self.check_segments(operand, segs)?;
        let st = self.scale.addr(0, self.experts * OPS * 4, "delayed scale")?;
        let (op, ops, si, stride) = (op_index(operand), OPS as i32, i32::try_from(segs)?, SCALE_STRIDE as i32);
        launch!(fe, stream, &fe.delayed_scales, one_d(segs)?, [&st, &op, &ops, &si, &stride, &scale, &scale_inv]);
        Ok(())
    }

    /// Folds the per-segment amaxes (f32 bits at `amax`) into `operand`'s `amax_history[0]`.
    pub(super) fn record(
        &self,
        fe: &mut Fp8Engine,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
        operand: Fp8Operand,
        segs: usize,
        amax: u64,
    ) -> Result<(), GpuError> {
        self.check_segments(operand, segs)?;
        let h = self.history.addr(0, self.experts * OPS * self.len * 4, "amax history")?;
        let (op, ops, si, len) = (op_index(operand), OPS as i32, i32::try_from(segs)?, i32::try_from(self.len)?);
        launch!(fe, stream, &fe.delayed_record, one_d(segs)?, [&amax, &op, &ops, &si, &len, &h]);
        Ok(())
    }

    fn check_segments(&self, operand: Fp8Operand, segs: usize) -> Result<(), GpuError> {
        if segs != self.experts {
            return Err(GpuError::Shape(format!(
                "delayed scaling of {}: {segs} segments, the state holds {} local experts",
                operand.name(),
                self.experts
            )));
        }
        Ok(())
    }
}

fn op_index(operand: Fp8Operand) -> i32 {
    Fp8Operand::ALL.iter().position(|&o| o == operand).unwrap_or(0) as i32
}

/// [`Fp8State::update`] run on the device: uploads `state`, runs TE's fused update kernel and
/// downloads the result.
pub fn update_on_device(eng: &mut Engine, state: &Fp8State) -> Result<Fp8State, GpuError> {
    let mut d = DeviceDelayedState::upload(eng, state)?;
    d.update(eng)?;
    d.download(eng)
}
