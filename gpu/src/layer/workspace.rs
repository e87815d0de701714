//! The per-call device buffers of a layer in the padded row layout, and what moves them
//! between host and device: inputs in, rows and weight gradients out.

use super::{from_bytes, i32_bytes, names, to_bytes, DeviceGrads, DeviceLayer, Dims};
use crate::engine::Engine;
use crate::error::GpuError;
use crate::kernels::RowMap;
use crate::memory::DeviceBuffer;
use moe_reference::{Dtype, LayerClass, StateDict};
use ndarray::{Array1, Array2, ArrayD, IxDyn};

/// The per-call device buffers: inputs, intermediates, outputs and grads, in the padded row
/// layout (each expert segment padded to `padding_multiple`, or under fp8 to the recipe's alignment, with zero rows and zero probs).
#[derive(Debug)]
pub struct Workspace {
    /// Real (unpadded) row count of each processed segment.
    pub counts: Vec<usize>,
    /// Padded row count of each segment.
    pub padded: Vec<usize>,
    /// First padded row of each segment.
    pub offsets: Vec<usize>,
    /// Total padded rows.
    pub rows: usize,
    pub(super) map: RowMap,
    pub(super) dims: Dims,
    probs_dt: Dtype,
    /// Input `[rows, h]`.
    pub x: DeviceBuffer,
    /// fc1 input (the scaled input with probs-on-input) `[rows, h]`.
    pub xs: Option<DeviceBuffer>,
    /// Probs `[rows]` f32.
    pub p: DeviceBuffer,
    /// Probs as applied after the activation (ones with probs-on-input) `[rows]` f32.
    pub p_act: Option<DeviceBuffer>,
    /// fc1 output, bias included `[rows, N1]`.
    pub a: DeviceBuffer,
    /// fc2 input `u = round(z·p)` `[rows, N2]`.
    pub u: DeviceBuffer,
    /// Output `[rows, h]`.
    pub y: DeviceBuffer,
    /// Upstream gradient `[rows, h]`.
    pub g: DeviceBuffer,
    /// `round(G·W2)` `[rows, N2]`.
    pub du: DeviceBuffer,
    /// Gradient of the fc1 output `[rows, N1]`.
    pub da: DeviceBuffer,
    /// Input gradient `[rows, h]`.
    pub dx: DeviceBuffer,
    /// Probs gradient `[rows]` f32 (rounded to the probs dtype).
    pub dp: DeviceBuffer,
    /// Weight gradients.
    pub grads: DeviceGrads,
    /// Fill outputs and grads with NaN before each step (tests: unwritten rows fail loudly).
    pub poison: bool,
    /// The fp8 operands the forward quantized and the backward adds (fp8 configurations).
    pub(crate) fp8: Option<super::fp8::Fp8Operands>,
    /// The same for the blockwise recipe.
    pub(crate) fp8_block: Option<super::fp8_block::BlockActs>,
    /// The delayed-scaling state of this call (fp8 `delayed` recipe): set before the forward,
    /// read back after the backward.
    pub(crate) delayed: Option<crate::fp8::DeviceDelayedState>,
}

impl DeviceLayer {
    /// Allocates the buffers for one call with the given segment row counts (see
    /// [`super::segments`]).
    ///
    /// Under the fp8 `delayed` recipe the workspace starts from TE's initial delayed-scaling
    /// state ([`moe_reference::layer::Fp8State::new`]: scale 1, empty history); replace it with
    /// [`Workspace::set_delayed_state`] to run a later step.
    pub fn workspace(&self, eng: &mut Engine, counts: &[usize], poison: bool) -> Result<Workspace, GpuError> {
        let cfg = &self.cfg;
        let d = Dims::of(cfg);
        let delayed = match cfg.fp8 {
            Some(f) if f.recipe == moe_reference::Fp8Recipe::Delayed => {
                let initial = moe_reference::layer::Fp8State::new(cfg)?;
                Some(crate::fp8::DeviceDelayedState::upload(eng, &initial)?)
            }
            _ => None,
        };
        let padded: Vec<usize> = counts
            .iter()
            .map(|&c| match cfg.row_padding() {
                Some(m) => c.div_ceil(m) * m,
                None => c,
            })
            .collect();
        let (row_expert, offsets, rows) = RowMap::host(&padded);
        let map = RowMap::new(
            &padded,
            eng.upload(&i32_bytes(&row_expert)?)?,
            eng.upload(&i32_bytes(&offsets)?)?,
            eng.upload(&i32_bytes(&padded)?)?,
        )?;
        let mat = |r: usize, c: usize| r * c * d.ds;
        let grads = DeviceGrads {
            w1: eng.alloc(d.el * d.n1 * d.h * d.ds)?,
            w2: eng.alloc(d.el * d.h * d.n2 * d.ds)?,
            b1: if cfg.add_bias { Some(eng.alloc(d.el * d.n1 * d.ds)?) } else { None },
            b2: if cfg.add_bias { Some(eng.alloc(d.el * d.h * d.ds)?) } else { None },
        };
        Ok(Workspace {
            counts: counts.to_vec(),
            padded,
            offsets,
            rows,
            map,
            dims: d,
            probs_dt: cfg.probs_dtype,
            x: eng.alloc(mat(rows, d.h))?,
            xs: if cfg.apply_probs_on_input { Some(eng.alloc(mat(rows, d.h))?) } else { None },
            p: eng.alloc(rows * 4)?,
            p_act: if cfg.apply_probs_on_input {
                Some(eng.upload(&to_bytes(Dtype::F32, std::iter::repeat_n(1.0, rows)))?)
            } else {
                None
            },
            a: eng.alloc(mat(rows, d.n1))?,
            u: eng.alloc(mat(rows, d.n2))?,
            y: eng.alloc(mat(rows, d.h))?,
            g: eng.alloc(mat(rows, d.h))?,
            du: eng.alloc(mat(rows, d.n2))?,
            da: eng.alloc(mat(rows, d.n1))?,
            dx: eng.alloc(mat(rows, d.h))?,
            dp: eng.alloc(rows * 4)?,
            grads,
            poison,
            fp8: None,
            fp8_block: None,
            delayed,
        })
    }

    /// Downloads the weight grads of `ws` into a state dict of the class's layout.
    pub fn download_grads(&self, eng: &mut Engine, ws: &Workspace) -> Result<StateDict, GpuError> {
        let d = Dims::of(&self.cfg);
        let w1 = from_bytes(d.dt, &eng.download(&ws.grads.w1)?);
        let w2 = from_bytes(d.dt, &eng.download(&ws.grads.w2)?);
        let b1 = match &ws.grads.b1 {
            Some(b) => Some(from_bytes(d.dt, &eng.download(b)?)),
            None => None,
        };
        let b2 = match &ws.grads.b2 {
            Some(b) => Some(from_bytes(d.dt, &eng.download(b)?)),
            None => None,
        };
        let arr = |v: &[f64], shape: &[usize]| ArrayD::from_shape_vec(IxDyn(shape), v.to_vec()).expect("sizes match");
        let mut sd = StateDict::new();
        match self.cfg.class {
            LayerClass::Grouped => {
                sd.insert("weight1".into(), arr(&w1, &[d.h, d.el * d.n1]));
                sd.insert("weight2".into(), arr(&w2, &[d.el * d.n2, d.h]));
            }
            LayerClass::Sequential | LayerClass::TeGrouped => {
                for e in 0..d.el {
                    let (n1w, n1b, n2w, n2b) = names(self.cfg.class, e);
                    sd.insert(n1w, arr(&w1[e * d.n1 * d.h..(e + 1) * d.n1 * d.h], &[d.n1, d.h]));
                    sd.insert(n2w, arr(&w2[e * d.h * d.n2..(e + 1) * d.h * d.n2], &[d.h, d.n2]));
                    if let (Some(b1), Some(b2)) = (&b1, &b2) {
                        sd.insert(n1b, arr(&b1[e * d.n1..(e + 1) * d.n1], &[d.n1]));
                        sd.insert(n2b, arr(&b2[e * d.h..(e + 1) * d.h], &[d.h]));
                    }
                }
            }
        }
        Ok(sd)
    }
}

impl Workspace {
    /// Random device inputs for a workspace with no padding: `x`, `g` ~ `U(-1, 1)` in the
    /// params dtype, probs ~ `U(0.05, 1)` (f32, rounded to the probs dtype on the host).
    pub fn random_inputs(&mut self, eng: &mut Engine, seed: u64) -> Result<(), GpuError> {
        let d = self.dims;
        eng.fill_uniform(d.dt, &mut self.x, self.rows * d.h, seed ^ 0x1111, 1.0)?;
        eng.fill_uniform(d.dt, &mut self.g, self.rows * d.h, seed ^ 0x2222, 1.0)?;
        let mut state = seed ^ 0x3333;
        let probs: Vec<f64> = (0..self.rows)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                self.probs_dt.round(0.05 + 0.95 * ((state >> 40) as f64 / (1u64 << 24) as f64))
            })
            .collect();
        let pb = to_bytes(Dtype::F32, probs);
        eng.write(&mut self.p, &pb)
    }

    /// Test option (`poison`): fills what a forward writes (`a`, `u`, `y`, the probs-scaled input)
    /// with NaN, so a row a kernel forgets to write fails loudly; nothing otherwise.
    pub(super) fn poison_forward_outputs(&mut self, eng: &mut Engine) -> Result<(), GpuError> {
        if self.poison {
            for b in [&mut self.a, &mut self.u, &mut self.y].into_iter().chain(self.xs.as_mut()) {
                eng.poison(b)?;
            }
        }
        Ok(())
    }

    /// Test option (`poison`): fills what a backward writes (`du`, `da`, `dx`, `dp` and every
    /// weight and bias grad) with NaN; nothing otherwise.
    pub(super) fn poison_backward_outputs(&mut self, eng: &mut Engine) -> Result<(), GpuError> {
        if self.poison {
            let grads = &mut self.grads;
            let all = [&mut self.du, &mut self.da, &mut self.dx, &mut self.dp, &mut grads.w1, &mut grads.w2];
            for b in all.into_iter().chain(grads.b1.as_mut()).chain(grads.b2.as_mut()) {
                eng.poison(b)?;
            }
        }
        Ok(())
    }

    /// Sets the delayed-scaling state the fp8 passes of this workspace cast with and record
    /// into (fp8 `delayed` recipe; without one a delayed layer refuses to run).
    pub fn set_delayed_state(&mut self, state: Option<crate::fp8::DeviceDelayedState>) {
        self.delayed = state;
    }

    /// The delayed-scaling state (after a backward: with this call's amaxes recorded).
    pub fn delayed_state(&self) -> Option<&crate::fp8::DeviceDelayedState> {
        self.delayed.as_ref()
    }

    /// Copies host rows into the padded layout: `x` `[T, h]`, `probs` `[T]`, and the upstream
    /// gradient when given. Padding rows are zeros (zero probs).
    pub fn upload_inputs(
        &mut self,
        eng: &mut Engine,
        x: &Array2<f64>,
        probs: &Array1<f64>,
        grad: Option<&Array2<f64>>,
    ) -> Result<(), GpuError> {
        let d = self.dims;
        let padded_rows = |src: &Array2<f64>| -> Vec<f64> {
            let mut out = vec![0.0; self.rows * d.h];
            let mut start = 0;
            for (e, &c) in self.counts.iter().enumerate() {
                for i in 0..c {
                    let dst = (self.offsets[e] + i) * d.h;
                    for (j, v) in src.row(start + i).iter().enumerate() {
                        out[dst + j] = *v;
                    }
                }
                start += c;
            }
            out
        };
        let xb = to_bytes(d.dt, padded_rows(x));
        let gb = grad.map(|g| to_bytes(d.dt, padded_rows(g)));
        eng.write(&mut self.x, &xb)?;
        let mut p = vec![0.0; self.rows];
        let mut start = 0;
        for (e, &c) in self.counts.iter().enumerate() {
            for i in 0..c {
                p[self.offsets[e] + i] = probs[start + i];
            }
            start += c;
        }
        let pb = to_bytes(Dtype::F32, p);
        eng.write(&mut self.p, &pb)?;
        if let Some(gb) = gb {
            eng.write(&mut self.g, &gb)?;
        }
        Ok(())
    }

    /// Downloads the unpadded rows of `buf`, one of this workspace's `[rows, cols]` buffers
    /// (storage dtype `dt`, or f32 with `cols = 1` for a probs vector).
    pub fn download_rows(
        &self,
        eng: &mut Engine,
        buf: &DeviceBuffer,
        cols: usize,
        dt: Dtype,
    ) -> Result<Array2<f64>, GpuError> {
        let all = from_bytes(dt, &eng.download(buf)?);
        let total: usize = self.counts.iter().sum();
        let mut out = Array2::zeros((total, cols));
        let mut t = 0;
        for (e, &c) in self.counts.iter().enumerate() {
            for i in 0..c {
                let src = (self.offsets[e] + i) * cols;
                for j in 0..cols {
                    out[[t, j]] = all[src + j];
                }
                t += 1;
            }
        }
        Ok(out)
    }
}
