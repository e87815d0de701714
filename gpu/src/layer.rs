//! Forward, backward and deferred weight gradients of the three expert classes on the GPU
//! (spec §4, §5), mirroring `moe_reference::layer` step for step: cuBLAS GEMMs per expert
//! segment with f32 accumulation, and the elementwise work in the fused kernels of
//! `kernels/experts.cu`, rounding to the storage dtype at the same points as the reference.
//!
//! Weights stay in each class's own state-dict layout on the device: SequentialMLP and
//! TEGroupedMLP keep `[out, in]` per expert; GroupedMLP keeps `weight1` as `[E_l, h, N1]` and
//! `weight2` as `[E_l, N2, h]` (`[in, out]` blocks), and its GEMMs use the other transposes.

use crate::error::GpuError;
use crate::grouped::GemmProblem;
use crate::kernels::{ActParams, Arg, Buf, Engine};
use moe_reference::{param_specs, Activation, Dtype, LayerClass, LayerConfig, StateDict};
use ndarray::{Array1, Array2, ArrayD, IxDyn};

/// f64 values to and from `dt` bytes: the reference's codec (one rounding, to nearest-even
/// directly from f64), so uploads, downloads, dumps and checkpoints encode alike.
pub use moe_reference::codec::{from_bytes, to_bytes};

fn i32_bytes(v: &[usize]) -> Result<Vec<u8>, GpuError> {
    let mut out = Vec::with_capacity(v.len() * 4);
    for &x in v {
        out.extend_from_slice(&i32::try_from(x)?.to_le_bytes());
    }
    Ok(out)
}

/// One rank's expert weights on the device, in the class's layout.
pub struct DeviceWeights {
    /// fc1 weights of all local experts, contiguous, `E_l` blocks of `N1·h`.
    pub w1: Buf,
    /// fc2 weights, `E_l` blocks of `h·N2`.
    pub w2: Buf,
    /// fc1 biases `[E_l, N1]` (with bias).
    pub b1: Option<Buf>,
    /// fc2 biases `[E_l, h]` (with bias).
    pub b2: Option<Buf>,
}

/// Weight and bias gradients on the device, same layout as [`DeviceWeights`].
pub struct DeviceGrads {
    /// dL/dW1.
    pub w1: Buf,
    /// dL/dW2.
    pub w2: Buf,
    /// dL/db1.
    pub b1: Option<Buf>,
    /// dL/db2.
    pub b2: Option<Buf>,
}

/// The per-call device buffers: inputs, intermediates, outputs and grads, in the padded row
/// layout (each expert segment padded to `padding_multiple` with zero rows and zero probs).
pub struct Workspace {
    /// Real (unpadded) row count of each processed segment.
    pub counts: Vec<usize>,
    /// Padded row count of each segment.
    pub padded: Vec<usize>,
    /// First padded row of each segment.
    pub offsets: Vec<usize>,
    /// Total padded rows.
    pub rows: usize,
    row_expert: Buf,
    seg_off: Buf,
    seg_len: Buf,
    /// Input `[rows, h]`.
    pub x: Buf,
    /// fc1 input (the scaled input with probs-on-input) `[rows, h]`.
    pub xs: Option<Buf>,
    /// Probs `[rows]` f32.
    pub p: Buf,
    /// Probs as applied after the activation (ones with probs-on-input) `[rows]` f32.
    pub p_act: Option<Buf>,
    /// fc1 output, bias included `[rows, N1]`.
    pub a: Buf,
    /// fc2 input `u = round(z·p)` `[rows, N2]`.
    pub u: Buf,
    /// Output `[rows, h]`.
    pub y: Buf,
    /// Upstream gradient `[rows, h]`.
    pub g: Buf,
    /// `round(G·W2)` `[rows, N2]`.
    pub du: Buf,
    /// Gradient of the fc1 output `[rows, N1]`.
    pub da: Buf,
    /// Input gradient `[rows, h]`.
    pub dx: Buf,
    /// Probs gradient `[rows]` f32 (rounded to the probs dtype).
    pub dp: Buf,
    /// Weight gradients.
    pub grads: DeviceGrads,
    /// Fill outputs and grads with NaN before each step (tests: unwritten rows fail loudly).
    pub poison: bool,
}

/// Shape bookkeeping for one configuration.
#[derive(Clone, Copy, Debug)]
struct Dims {
    h: usize,
    n1: usize,
    n2: usize,
    el: usize,
    dt: Dtype,
    ds: usize,
}

fn dims(cfg: &LayerConfig) -> Dims {
    Dims {
        h: cfg.hidden_size,
        n1: cfg.n1(),
        n2: cfg.n2(),
        el: cfg.num_local_experts(),
        dt: cfg.params_dtype,
        ds: cfg.params_dtype.size_bytes(),
    }
}

fn probs_code(dt: Dtype) -> i32 {
    match dt {
        Dtype::F32 => 0,
        Dtype::Bf16 => 1,
        Dtype::F16 => 2,
    }
}

fn act_params(cfg: &LayerConfig) -> ActParams {
    let grouped = cfg.class == LayerClass::Grouped;
    // GroupedMLP ignores clamp and offset, and keeps the activation chain in fp32 (spec §4.4, §4.9).
    let clamp = if grouped { None } else { cfg.clamp_value };
    ActParams {
        glu: i32::from(cfg.gated_linear_unit),
        act: match cfg.activation {
            Activation::Silu => 0,
            Activation::Gelu => 1,
            Activation::QuickGelu => 2,
            Activation::SquaredRelu => 3,
        },
        eager: i32::from(!grouped),
        has_clamp: i32::from(clamp.is_some()),
        clamp: clamp.unwrap_or(0.0) as f32,
        offset: if grouped { 0.0 } else { cfg.glu_linear_offset as f32 },
    }
}

/// Row counts of the segments the class processes: `tokens_per_expert`, or `[T]` for
/// SequentialMLP with one local expert (spec §4.1).
pub fn segments(cfg: &LayerConfig, tokens_per_expert: &[i64], rows: usize) -> Result<Vec<usize>, GpuError> {
    if tokens_per_expert.len() != cfg.num_local_experts() {
        return Err(GpuError::Shape(format!(
            "tokens_per_expert has {} entries, the rank has {} local experts",
            tokens_per_expert.len(),
            cfg.num_local_experts()
        )));
    }
    if cfg.class == LayerClass::Sequential && cfg.num_local_experts() == 1 {
        return Ok(vec![rows]);
    }
    let counts: Vec<usize> = tokens_per_expert
        .iter()
        .map(|&c| usize::try_from(c).map_err(|_| GpuError::Shape(format!("negative token count {c}"))))
        .collect::<Result<_, _>>()?;
    if counts.iter().sum::<usize>() != rows {
        return Err(GpuError::Shape(format!("tokens_per_expert {tokens_per_expert:?} does not sum to {rows} rows")));
    }
    Ok(counts)
}

impl Engine {
    /// Uploads one rank's parameters (state-dict layout of `cfg.class`), once.
    pub fn prepare(&mut self, cfg: &LayerConfig, params: &StateDict) -> Result<DeviceWeights, GpuError> {
        let d = dims(cfg);
        let get = |name: &str| -> Result<&ArrayD<f64>, GpuError> {
            params.get(name).ok_or_else(|| GpuError::Shape(format!("missing parameter {name}")))
        };
        for spec in param_specs(cfg) {
            let t = get(&spec.name)?;
            if t.shape() != spec.shape.as_slice() {
                return Err(GpuError::Shape(format!("{}: expected {:?}, got {:?}", spec.name, spec.shape, t.shape())));
            }
        }
        let (mut w1, mut w2, mut b1, mut b2) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        match cfg.class {
            LayerClass::Grouped => {
                // Flat memory of weight1 is [E_l, h, N1], of weight2 [E_l, N2, h]: upload as is.
                w1 = to_bytes(d.dt, get("weight1")?.iter().copied());
                w2 = to_bytes(d.dt, get("weight2")?.iter().copied());
            }
            LayerClass::Sequential | LayerClass::TeGrouped => {
                for e in 0..d.el {
                    let (n1w, n1b, n2w, n2b) = names(cfg.class, e);
                    w1.extend(to_bytes(d.dt, get(&n1w)?.iter().copied()));
                    w2.extend(to_bytes(d.dt, get(&n2w)?.iter().copied()));
                    if cfg.add_bias {
                        b1.extend(to_bytes(d.dt, get(&n1b)?.iter().copied()));
                        b2.extend(to_bytes(d.dt, get(&n2b)?.iter().copied()));
                    }
                }
            }
        }
        Ok(DeviceWeights {
            w1: self.upload(&w1)?,
            w2: self.upload(&w2)?,
            b1: if cfg.add_bias { Some(self.upload(&b1)?) } else { None },
            b2: if cfg.add_bias { Some(self.upload(&b2)?) } else { None },
        })
    }

    /// Random weights generated on the device in `cfg.class`'s layout (benches and sampled
    /// verification of model-sized shapes, where a host state dict would not fit): weights
    /// `U(-1, 1)/√fan_in`, biases `U(-0.5, 0.5)`, rounded to the params dtype, deterministic in
    /// `seed`.
    pub fn prepare_random(&mut self, cfg: &LayerConfig, seed: u64) -> Result<DeviceWeights, GpuError> {
        let d = dims(cfg);
        let n1 = d.el * d.n1 * d.h;
        let n2 = d.el * d.h * d.n2;
        let w1 = self.alloc(n1 * d.ds)?;
        let w2 = self.alloc(n2 * d.ds)?;
        let (p1, p2) = (self.ptr(&w1, 0), self.ptr(&w2, 0));
        self.fill_uniform(d.dt, p1, n1, seed, (1.0 / (d.h as f64).sqrt()) as f32)?;
        self.fill_uniform(d.dt, p2, n2, seed.wrapping_add(1), (1.0 / (cfg.ffn_hidden_size as f64).sqrt()) as f32)?;
        let (b1, b2) = if cfg.add_bias {
            let b1 = self.alloc(d.el * d.n1 * d.ds)?;
            let b2 = self.alloc(d.el * d.h * d.ds)?;
            let (q1, q2) = (self.ptr(&b1, 0), self.ptr(&b2, 0));
            self.fill_uniform(d.dt, q1, d.el * d.n1, seed.wrapping_add(2), 0.5)?;
            self.fill_uniform(d.dt, q2, d.el * d.h, seed.wrapping_add(3), 0.5)?;
            (Some(b1), Some(b2))
        } else {
            (None, None)
        };
        Ok(DeviceWeights { w1, w2, b1, b2 })
    }

    /// Random device inputs for a workspace with no padding: `x`, `g` ~ `U(-1, 1)` in the
    /// params dtype, probs ~ `U(0.05, 1)` (f32, rounded to the probs dtype on the host).
    pub fn random_inputs(&mut self, cfg: &LayerConfig, ws: &mut Workspace, seed: u64) -> Result<(), GpuError> {
        let d = dims(cfg);
        let (px, pg) = (self.ptr(&ws.x, 0), self.ptr(&ws.g, 0));
        self.fill_uniform(d.dt, px, ws.rows * d.h, seed ^ 0x1111, 1.0)?;
        self.fill_uniform(d.dt, pg, ws.rows * d.h, seed ^ 0x2222, 1.0)?;
        let mut state = seed ^ 0x3333;
        let probs: Vec<f64> = (0..ws.rows)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                cfg.probs_dtype.round(0.05 + 0.95 * ((state >> 40) as f64 / (1u64 << 24) as f64))
            })
            .collect();
        let pb = to_bytes(Dtype::F32, probs);
        self.write(&mut ws.p, &pb)
    }

    /// Allocates the buffers for one call with the given segment row counts (see [`segments`]).
    pub fn workspace(&mut self, cfg: &LayerConfig, counts: &[usize], poison: bool) -> Result<Workspace, GpuError> {
        let d = dims(cfg);
        let padded: Vec<usize> = counts
            .iter()
            .map(|&c| match cfg.padding_multiple {
                Some(m) => c.div_ceil(m) * m,
                None => c,
            })
            .collect();
        let mut offsets = Vec::with_capacity(padded.len());
        let mut rows = 0;
        let mut row_expert = Vec::new();
        for (e, &pc) in padded.iter().enumerate() {
            offsets.push(rows);
            rows += pc;
            row_expert.extend(std::iter::repeat_n(e, pc));
        }
        let row_expert = self.upload(&i32_bytes(&row_expert)?)?;
        let seg_off = self.upload(&i32_bytes(&offsets)?)?;
        let seg_len = self.upload(&i32_bytes(&padded)?)?;
        let mat = |r: usize, c: usize| r * c * d.ds;
        let grads = DeviceGrads {
            w1: self.alloc(d.el * d.n1 * d.h * d.ds)?,
            w2: self.alloc(d.el * d.h * d.n2 * d.ds)?,
            b1: if cfg.add_bias { Some(self.alloc(d.el * d.n1 * d.ds)?) } else { None },
            b2: if cfg.add_bias { Some(self.alloc(d.el * d.h * d.ds)?) } else { None },
        };
        Ok(Workspace {
            counts: counts.to_vec(),
            padded,
            offsets,
            rows,
            row_expert,
            seg_off,
            seg_len,
            x: self.alloc(mat(rows, d.h))?,
            xs: if cfg.apply_probs_on_input { Some(self.alloc(mat(rows, d.h))?) } else { None },
            p: self.alloc(rows * 4)?,
            p_act: if cfg.apply_probs_on_input {
                Some(self.upload(&to_bytes(Dtype::F32, std::iter::repeat_n(1.0, rows)))?)
            } else {
                None
            },
            a: self.alloc(mat(rows, d.n1))?,
            u: self.alloc(mat(rows, d.n2))?,
            y: self.alloc(mat(rows, d.h))?,
            g: self.alloc(mat(rows, d.h))?,
            du: self.alloc(mat(rows, d.n2))?,
            da: self.alloc(mat(rows, d.n1))?,
            dx: self.alloc(mat(rows, d.h))?,
            dp: self.alloc(rows * 4)?,
            grads,
            poison,
        })
    }

    /// Copies host rows into the padded layout: `x` `[T, h]`, `probs` `[T]`, and the upstream
    /// gradient when given. Padding rows are zeros (zero probs).
    pub fn upload_inputs(
        &mut self,
        cfg: &LayerConfig,
        ws: &mut Workspace,
        x: &Array2<f64>,
        probs: &Array1<f64>,
        grad: Option<&Array2<f64>>,
    ) -> Result<(), GpuError> {
        let d = dims(cfg);
        let padded_rows = |src: &Array2<f64>| -> Vec<f64> {
            let mut out = vec![0.0; ws.rows * d.h];
            let mut start = 0;
            for (e, &c) in ws.counts.iter().enumerate() {
                for i in 0..c {
                    let dst = (ws.offsets[e] + i) * d.h;
                    for (j, v) in src.row(start + i).iter().enumerate() {
                        out[dst + j] = *v;
                    }
                }
                start += c;
            }
            out
        };
        let xb = to_bytes(d.dt, padded_rows(x));
        self.write(&mut ws.x, &xb)?;
        let mut p = vec![0.0; ws.rows];
        let mut start = 0;
        for (e, &c) in ws.counts.iter().enumerate() {
            for i in 0..c {
                p[ws.offsets[e] + i] = probs[start + i];
            }
            start += c;
        }
        let pb = to_bytes(Dtype::F32, p);
        self.write(&mut ws.p, &pb)?;
        if let Some(g) = grad {
            let gb = to_bytes(d.dt, padded_rows(g));
            self.write(&mut ws.g, &gb)?;
        }
        Ok(())
    }

    /// Downloads the unpadded rows of a `[rows, cols]` buffer (storage dtype, or f32 for cols = 0
    /// meaning a probs vector).
    pub fn download_rows(
        &mut self,
        ws: &Workspace,
        buf: &Buf,
        cols: usize,
        dt: Dtype,
    ) -> Result<Array2<f64>, GpuError> {
        let all = from_bytes(dt, &self.download(buf)?);
        let total: usize = ws.counts.iter().sum();
        let mut out = Array2::zeros((total, cols));
        let mut t = 0;
        for (e, &c) in ws.counts.iter().enumerate() {
            for i in 0..c {
                let src = (ws.offsets[e] + i) * cols;
                for j in 0..cols {
                    out[[t, j]] = all[src + j];
                }
                t += 1;
            }
        }
        Ok(out)
    }

    fn seg_ptr(&self, buf: &Buf, ws: &Workspace, e: usize, cols: usize, ds: usize) -> u64 {
        self.ptr(buf, ws.offsets[e] * cols * ds)
    }

    /// The forward pass on device buffers: `ws.y` (and the intermediates backward needs).
    pub fn forward(&mut self, cfg: &LayerConfig, w: &DeviceWeights, ws: &mut Workspace) -> Result<(), GpuError> {
        let d = dims(cfg);
        let rows = ws.rows;
        let grouped = cfg.class == LayerClass::Grouped;
        if ws.poison {
            for b in [&ws.a, &ws.u, &ws.y] {
                self.poison(b)?;
            }
            if let Some(xs) = &ws.xs {
                self.poison(xs)?;
            }
        }
        let ri = i32::try_from(rows)?;
        let (hi, n1i, n2i) = (i32::try_from(d.h)?, i32::try_from(d.n1)?, i32::try_from(d.n2)?);
        // §4.7: x' = round(p·x), probs replaced by ones.
        if let Some(xs) = &ws.xs {
            let args = [
                Arg::Ptr(self.ptr(&ws.x, 0)),
                Arg::Ptr(self.ptr(&ws.p, 0)),
                Arg::Ptr(self.ptr(xs, 0)),
                Arg::I32(ri),
                Arg::I32(hi),
            ];
            self.launch("scale_rows", d.dt, Engine::over_rows(rows), &args)?;
        }
        let xin = ws.xs.as_ref().unwrap_or(&ws.x);
        let p_act = ws.p_act.as_ref().unwrap_or(&ws.p);
        // TEGroupedMLP: fc1 bias inside the GEMM (pre-fill a with b1, beta = 1: one rounding).
        let te_bias = cfg.class == LayerClass::TeGrouped && w.b1.is_some();
        if te_bias {
            let b1 = w.b1.as_ref().expect("checked");
            let args = [
                Arg::Ptr(self.ptr(&ws.a, 0)),
                Arg::Ptr(self.ptr(b1, 0)),
                Arg::Ptr(self.ptr(&ws.row_expert, 0)),
                Arg::I32(ri),
                Arg::I32(n1i),
            ];
            self.launch("fill_bias_rows", d.dt, Engine::over_rows(rows), &args)?;
        }
        // fc1: a_e = x_e·W1_eᵀ ([out,in] weights) or x_e·W1_e ([in,out] GroupedMLP blocks).
        let fc1 = self.token_gemms(ws, d.el.min(ws.padded.len()), d.n1, d.h, xin, &w.w1, &ws.a, d.ds);
        if te_bias {
            // beta = 1 on the bias-filled output: one cuBLAS call per expert.
            for p in &fc1 {
                self.gemm(d.dt, false, !grouped, p.m, p.n, p.k, p.a, p.b, p.c, 1.0)?;
            }
        } else {
            self.expert_gemms(d.dt, false, !grouped, &fc1)?;
        }
        // Activation block: (SequentialMLP fc1 bias) → act/GLU → u = round(z·p).
        let seq_b1 =
            if cfg.class == LayerClass::Sequential { w.b1.as_ref().map(|b| self.ptr(b, 0)).unwrap_or(0) } else { 0 };
        let args = [
            Arg::Ptr(self.ptr(&ws.a, 0)),
            Arg::Ptr(seq_b1),
            Arg::Ptr(self.ptr(p_act, 0)),
            Arg::Ptr(self.ptr(&ws.row_expert, 0)),
            Arg::Ptr(self.ptr(&ws.u, 0)),
            Arg::I32(ri),
            Arg::I32(n2i),
            Arg::Act(act_params(cfg)),
        ];
        self.launch("act_fwd", d.dt, Engine::over_rows(rows), &args)?;
        // fc2: y_e = u_e·W2_eᵀ (or u_e·W2_e for GroupedMLP blocks [N2, h]).
        let fc2 = self.token_gemms(ws, d.el.min(ws.padded.len()), d.h, d.n2, &ws.u, &w.w2, &ws.y, d.ds);
        self.expert_gemms(d.dt, false, !grouped, &fc2)?;
        // fc2 bias scaled by the probs: y = round(y + b2·p) in f32.
        // With storage-dtype probs the product b2·p is rounded first (spec §4.8).
        if let Some(b2) = &w.b2 {
            let probs_in_storage = cfg.probs_dtype == cfg.params_dtype && cfg.params_dtype != Dtype::F32;
            let args = [
                Arg::Ptr(self.ptr(&ws.y, 0)),
                Arg::Ptr(self.ptr(b2, 0)),
                Arg::Ptr(self.ptr(p_act, 0)),
                Arg::Ptr(self.ptr(&ws.row_expert, 0)),
                Arg::I32(ri),
                Arg::I32(hi),
                Arg::I32(i32::from(probs_in_storage)),
            ];
            self.launch("fc2_bias_fwd", d.dt, Engine::over_rows(rows), &args)?;
        }
        Ok(())
    }

    /// Backward from `ws.g`: `ws.dx`, `ws.dp`, the fc2 bias grad, SequentialMLP's fc1 bias grad,
    /// and — when `with_wgrad` — the weight grads (else queued for [`Engine::backward_dw`]).
    pub fn backward(
        &mut self,
        cfg: &LayerConfig,
        w: &DeviceWeights,
        ws: &mut Workspace,
        with_wgrad: bool,
    ) -> Result<(), GpuError> {
        let d = dims(cfg);
        let rows = ws.rows;
        let grouped = cfg.class == LayerClass::Grouped;
        if ws.poison {
            for b in [&ws.du, &ws.da, &ws.dx, &ws.dp, &ws.grads.w1, &ws.grads.w2] {
                self.poison(b)?;
            }
            for b in [&ws.grads.b1, &ws.grads.b2].into_iter().flatten() {
                self.poison(b)?;
            }
        }
        let ri = i32::try_from(rows)?;
        let (hi, n2i) = (i32::try_from(d.h)?, i32::try_from(d.n2)?);
        let el = ws.padded.len();
        let el_i = u32::try_from(el)?;
        let p_act = ws.p_act.as_ref().unwrap_or(&ws.p);
        // db2 = Σ_i p_i·G_i per expert (f32 sum, one rounding).
        if let (Some(db2), Some(_)) = (&ws.grads.b2, &w.b2) {
            let args = [
                Arg::Ptr(self.ptr(&ws.g, 0)),
                Arg::Ptr(self.ptr(p_act, 0)),
                Arg::Ptr(self.ptr(&ws.seg_off, 0)),
                Arg::Ptr(self.ptr(&ws.seg_len, 0)),
                Arg::Ptr(self.ptr(db2, 0)),
                Arg::I32(hi),
            ];
            self.launch("col_sum", d.dt, col_sum_cfg(d.h, el_i), &args)?;
        }
        // du_e = round(G_e·W2_e) ([h, N2] weights: no transpose; GroupedMLP [N2, h]: transpose).
        let dgrad2 = self.token_gemms(ws, el, d.n2, d.h, &ws.g, &w.w2, &ws.du, d.ds);
        self.expert_gemms(d.dt, false, grouped, &dgrad2)?;
        // Activation backward + dp (fc2-bias term and Σ du·z), one block per row.
        let b2p = w.b2.as_ref().map(|b| self.ptr(b, 0)).unwrap_or(0);
        let args = [
            Arg::Ptr(self.ptr(&ws.a, 0)),
            Arg::Ptr(self.ptr(&ws.du, 0)),
            Arg::Ptr(self.ptr(p_act, 0)),
            Arg::Ptr(self.ptr(&ws.g, 0)),
            Arg::Ptr(b2p),
            Arg::Ptr(self.ptr(&ws.row_expert, 0)),
            Arg::Ptr(self.ptr(&ws.da, 0)),
            Arg::Ptr(self.ptr(&ws.dp, 0)),
            Arg::I32(i32::from(!cfg.apply_probs_on_input)),
            Arg::I32(ri),
            Arg::I32(n2i),
            Arg::I32(hi),
            Arg::Act(act_params(cfg)),
            Arg::I32(probs_code(cfg.probs_dtype)),
        ];
        self.launch("act_bwd", d.dt, Engine::per_row(rows)?, &args)?;
        // dx_e = round(da_e·W1_e) ([N1, h]: no transpose; GroupedMLP [h, N1]: transpose).
        let dgrad1 = self.token_gemms(ws, el, d.h, d.n1, &ws.da, &w.w1, &ws.dx, d.ds);
        self.expert_gemms(d.dt, false, grouped, &dgrad1)?;
        // §4.7 backward: dp = Σ dx'·x, dx = round(dx'·p).
        if cfg.apply_probs_on_input {
            let args = [
                Arg::Ptr(self.ptr(&ws.dx, 0)),
                Arg::Ptr(self.ptr(&ws.x, 0)),
                Arg::Ptr(self.ptr(&ws.p, 0)),
                Arg::Ptr(self.ptr(&ws.dp, 0)),
                Arg::I32(ri),
                Arg::I32(hi),
                Arg::I32(probs_code(cfg.probs_dtype)),
            ];
            self.launch("probs_in_bwd", d.dt, Engine::per_row(rows)?, &args)?;
        }
        // SequentialMLP's fc1 bias is an eager op outside the linear: its grad is never deferred.
        if cfg.class == LayerClass::Sequential || with_wgrad {
            self.fc1_bias_grad(cfg, ws)?;
        }
        if with_wgrad {
            self.wgrad(cfg, ws, Linear::Fc2)?;
            self.wgrad(cfg, ws, Linear::Fc1)?;
        }
        Ok(())
    }

    /// `backward_dw()`: the deferred weight GEMMs, fc2 then fc1 (TEGroupedMLP's fc1 bias grad
    /// goes with its GEMM).
    pub fn backward_dw(&mut self, cfg: &LayerConfig, ws: &mut Workspace) -> Result<(), GpuError> {
        self.wgrad(cfg, ws, Linear::Fc2)?;
        self.wgrad(cfg, ws, Linear::Fc1)?;
        if cfg.class == LayerClass::TeGrouped {
            self.fc1_bias_grad(cfg, ws)?;
        }
        Ok(())
    }

    fn fc1_bias_grad(&mut self, cfg: &LayerConfig, ws: &Workspace) -> Result<(), GpuError> {
        let d = dims(cfg);
        if let Some(db1) = &ws.grads.b1 {
            let args = [
                Arg::Ptr(self.ptr(&ws.da, 0)),
                Arg::Ptr(0),
                Arg::Ptr(self.ptr(&ws.seg_off, 0)),
                Arg::Ptr(self.ptr(&ws.seg_len, 0)),
                Arg::Ptr(self.ptr(db1, 0)),
                Arg::I32(i32::try_from(d.n1)?),
            ];
            self.launch("col_sum", d.dt, col_sum_cfg(d.n1, u32::try_from(ws.padded.len())?), &args)?;
        }
        Ok(())
    }

    /// Variable-K weight GEMMs per expert; an expert with 0 rows gets exact zeros.
    fn wgrad(&mut self, cfg: &LayerConfig, ws: &Workspace, linear: Linear) -> Result<(), GpuError> {
        let d = dims(cfg);
        let grouped = cfg.class == LayerClass::Grouped;
        let xin = ws.xs.as_ref().unwrap_or(&ws.x);
        // (output-side activation grad, its columns, input-side activation, its columns,
        // weight-grad buffer).
        let (out_side, out_cols, in_side, in_cols, grad) = match linear {
            Linear::Fc2 => (&ws.g, d.h, &ws.u, d.n2, &ws.grads.w2),
            Linear::Fc1 => (&ws.da, d.n1, xin, d.h, &ws.grads.w1),
        };
        let problems: Vec<GemmProblem> = (0..ws.padded.len())
            .map(|e| {
                wgrad_problem(
                    (self.seg_ptr(out_side, ws, e, out_cols, d.ds), out_cols),
                    (self.seg_ptr(in_side, ws, e, in_cols, d.ds), in_cols),
                    self.ptr(grad, e * out_cols * in_cols * d.ds),
                    ws.padded[e],
                    !grouped,
                )
            })
            .collect();
        self.expert_gemms(d.dt, true, false, &problems)
    }

    /// The per-expert GEMMs over token rows, `out_e[m_e, n] = in_e[m_e, k]·op(weight_e)`, for
    /// the first `experts` experts: `input`/`output` segmented by the workspace's row offsets,
    /// `weight` a stack of `n·k` blocks (fc1, fc2 and the two data gradients).
    #[allow(clippy::too_many_arguments)]
    fn token_gemms(
        &self,
        ws: &Workspace,
        experts: usize,
        n: usize,
        k: usize,
        input: &Buf,
        weight: &Buf,
        output: &Buf,
        ds: usize,
    ) -> Vec<GemmProblem> {
        (0..experts)
            .map(|e| GemmProblem {
                m: ws.padded[e],
                n,
                k,
                a: self.seg_ptr(input, ws, e, k, ds),
                b: self.ptr(weight, e * n * k * ds),
                c: self.seg_ptr(output, ws, e, n, ds),
            })
            .collect()
    }

    /// One set of per-expert GEMMs, issued with the engine's [`Engine::gemm_strategy`].
    fn expert_gemms(&mut self, dt: Dtype, ta: bool, tb: bool, problems: &[GemmProblem]) -> Result<(), GpuError> {
        let strategy = self.gemm_strategy();
        self.grouped_gemm(strategy, dt, ta, tb, problems)
    }

    /// Downloads the weight grads into a state dict of `cfg.class`'s layout.
    pub fn download_grads(&mut self, cfg: &LayerConfig, ws: &Workspace) -> Result<StateDict, GpuError> {
        let d = dims(cfg);
        let w1 = from_bytes(d.dt, &self.download(&ws.grads.w1)?);
        let w2 = from_bytes(d.dt, &self.download(&ws.grads.w2)?);
        let b1 = match &ws.grads.b1 {
            Some(b) => Some(from_bytes(d.dt, &self.download(b)?)),
            None => None,
        };
        let b2 = match &ws.grads.b2 {
            Some(b) => Some(from_bytes(d.dt, &self.download(b)?)),
            None => None,
        };
        let arr = |v: &[f64], shape: &[usize]| ArrayD::from_shape_vec(IxDyn(shape), v.to_vec()).expect("sizes match");
        let mut sd = StateDict::new();
        match cfg.class {
            LayerClass::Grouped => {
                sd.insert("weight1".into(), arr(&w1, &[d.h, d.el * d.n1]));
                sd.insert("weight2".into(), arr(&w2, &[d.el * d.n2, d.h]));
            }
            LayerClass::Sequential | LayerClass::TeGrouped => {
                for e in 0..d.el {
                    let (n1w, n1b, n2w, n2b) = names(cfg.class, e);
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

/// One expert's weight-gradient GEMM over its `tokens` rows, for [`Engine::grouped_gemm`] with
/// `ta = true, tb = false`: `out_side = (address, columns)` is the expert's rows of the
/// output-side activation gradient, `in_side` those of the input-side activation, both
/// row-major with `tokens` rows. With `[out, in]` weights (`weights_out_in`: SequentialMLP,
/// TEGroupedMLP) the grad at `grad` is `out_sideᵀ·in_side`; GroupedMLP's `[in, out]` blocks
/// take `in_sideᵀ·out_side`. The layers and `benches/gpu_grouped.rs` build their weight
/// gradients with it.
pub fn wgrad_problem(
    out_side: (u64, usize),
    in_side: (u64, usize),
    grad: u64,
    tokens: usize,
    weights_out_in: bool,
) -> GemmProblem {
    let ((a, m), (b, n)) = if weights_out_in { (out_side, in_side) } else { (in_side, out_side) };
    GemmProblem { m, n, k: tokens, a, b, c: grad }
}

fn col_sum_cfg(cols: usize, experts: u32) -> cudarc::driver::LaunchConfig {
    cudarc::driver::LaunchConfig {
        grid_dim: (cols.div_ceil(256) as u32, experts, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Linear {
    Fc1,
    Fc2,
}

/// State-dict names of expert `e`'s fc1 weight, fc1 bias, fc2 weight, fc2 bias (the
/// reference's naming, so both sides read the same parameters).
pub use moe_reference::state_dict::per_expert_names as names;

#[cfg(test)]
mod tests {
    use super::*;

    /// The weight-gradient orientation both the layers and the GEMM-set bench use: `[out, in]`
    /// weights take out_sideᵀ·in_side, GroupedMLP's `[in, out]` blocks in_sideᵀ·out_side; the
    /// contraction is over the expert's token rows either way.
    #[test]
    fn wgrad_problem_orients_by_weight_layout() {
        let (out_side, in_side) = ((0x1000, 4), (0x2000, 6));
        let te = wgrad_problem(out_side, in_side, 0x3000, 5, true);
        assert_eq!((te.m, te.n, te.k, te.a, te.b, te.c), (4, 6, 5, 0x1000, 0x2000, 0x3000));
        let grouped = wgrad_problem(out_side, in_side, 0x3000, 5, false);
        assert_eq!(
            (grouped.m, grouped.n, grouped.k, grouped.a, grouped.b, grouped.c),
            (6, 4, 5, 0x2000, 0x1000, 0x3000)
        );
    }
}
