//! FP8 on the device (issue 13): the quantization kernels of `kernels/fp8.cu` (bit-exact with
//! the reference quantizers of [`moe_reference::fp8`]) and the scaled fp8 GEMM through
//! cuBLASLt.
//!
//! * [`QuantSpec`]: which quantizer to run — per-tensor current scaling, 1×128 / 128×128 block
//!   scaling, MXFP8 1×32 / 32×32 — with the reference's option types.
//! * [`DeviceFp8`]: a quantized tensor on the device (codes + scales), downloadable as the
//!   reference's [`Fp8Tensor`] so tests compare bytes and scales with `==`.
//! * [`Engine::quantize`]: the rowwise and columnwise copies of a device tensor, as the
//!   reference's [`Fp8Quantizer::quantize`](moe_reference::fp8::Fp8Quantizer::quantize).
//! * [`Engine::fp8_gemm`]: `C[m, n] = (s_a·s_b)·(A·Bᵀ) (+ C)` for fp8 `A: [m, k]`, `B: [n, k]`
//!   (both K-contiguous, cuBLASLt's TN layout), per-tensor f32 scale pointers
//!   (`CUBLASLT_MATMUL_DESC_{A,B}_SCALE_POINTER`), f32 accumulation, bf16/fp16/f32 output.
//! * [`Engine::block_operands`] and [`Engine::fp8_block_gemm`]: the blockwise recipe's GEMM
//!   operands (1×128 or 128×128 blocks, both copies, scales in cuBLASLt's layout) and the
//!   block-scaled GEMM (`CUBLASLT_MATMUL_DESC_{A,B}_SCALE_MODE`, cuBLASLt >= 12.9).
//!
//! The kernels are compiled on first use (an engine that never quantizes never compiles them;
//! the fp8 `cvt` needs sm_89 or later).

use crate::engine::Engine;
use crate::error::GpuError;
use crate::gemm::{fills_gpu_alone, prefer_persistent, GemmProblem, AUTO_HYBRID_WAVES};
use crate::kernels::{
    block_tile_function, block_tile_smem, block_tile_takes, ActBlockOut, ActCodes, ActFp8Out, ActParams, BlockParams,
    BlockSegs, ExpertKernels,
};
use crate::memory::{DeviceBuffer, Operand, Region};
use crate::persistent::{Fp8Problem, Fp8Variant};
use cudarc::cublaslt::{result as lt, sys as lt_sys};
use cudarc::driver::{CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use moe_reference::fp8::mxfp8::max_norm_rcp;
use moe_reference::fp8::{BlockTile, Fp8Format, Fp8Tensor, MxBlock, ScaleOptions, Scales, Usage};
use moe_reference::{Dtype, LayerConfig};
use ndarray::Array2;
use std::ffi::c_void;

mod lt_algo;
pub use lt_algo::LtAlgoChoice;
use lt_algo::{TuneCall, TUNE_REPS};

/// The kernel source, embedded; compiled by NVRTC on first use.
const FP8_CU: &str = concat!(include_str!("../../kernels/fp8_common.cuh"), include_str!("../../kernels/fp8.cu"));

/// The f32 stride between the per-segment scales of a [`SegmentedFp8`]: each scale on its own
/// 256-byte line, the alignment of a fresh allocation (what TE's scale tensors have).
pub const SCALE_STRIDE: usize = 64;

/// cuBLASLt workspace (TE uses 32 MiB on Hopper).
const LT_WORKSPACE: usize = 32 << 20;

/// Compiles `kernels/fp8.cu` for `arch`. Needs only libnvrtc, no GPU.
pub fn compile_fp8_kernels(arch: &'static str) -> Result<cudarc::nvrtc::Ptx, GpuError> {
    crate::nvrtc::compile(FP8_CU, "fp8.cu", arch, &[])
}

/// Which quantizer to run (the reference's quantizer types and options).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum QuantSpec {
    /// Per-tensor current scaling ([`moe_reference::fp8::CurrentScalingQuantizer`]).
    Current {
        /// Element format.
        format: Fp8Format,
        /// Power-of-2 scales and amax epsilon.
        options: ScaleOptions,
    },
    /// Block scaling ([`moe_reference::fp8::BlockQuantizer`]).
    Block {
        /// Element format.
        format: Fp8Format,
        /// 1×128 or 128×128.
        tile: BlockTile,
        /// Power-of-2 scales and amax epsilon.
        options: ScaleOptions,
    },
    /// MXFP8 ([`moe_reference::fp8::Mxfp8Quantizer`]).
    Mxfp8 {
        /// Element format.
        format: Fp8Format,
        /// 1×32 or 32×32.
        block: MxBlock,
    },
}

impl QuantSpec {
    /// The element format.
    pub fn format(&self) -> Fp8Format {
        match *self {
            QuantSpec::Current { format, .. } | QuantSpec::Block { format, .. } | QuantSpec::Mxfp8 { format, .. } => {
                format
            }
        }
    }
}

/// The scales of a [`DeviceFp8`] on the device.
#[derive(Debug)]
pub enum DeviceScales {
    /// One f32 `scale_inv` (4 bytes).
    PerTensor(DeviceBuffer),
    /// f32 `scale_inv` per `rows × cols` block, grid `[ceil(R/rows), ceil(C/cols)]` row-major.
    Block {
        /// Block height.
        rows: usize,
        /// Block width.
        cols: usize,
        /// The f32 factors.
        scale_inv: DeviceBuffer,
    },
    /// One E8M0 byte per `rows × cols` block, same grid.
    E8m0 {
        /// Block height.
        rows: usize,
        /// Block width.
        cols: usize,
        /// The exponent bytes.
        exponents: DeviceBuffer,
    },
}

/// A quantized `[rows, cols]` tensor on the device.
#[derive(Debug)]
pub struct DeviceFp8 {
    /// Element format.
    pub format: Fp8Format,
    /// Rows of the codes.
    pub rows: usize,
    /// Columns of the codes.
    pub cols: usize,
    /// The codes, row-major.
    pub codes: DeviceBuffer,
    /// The scales.
    pub scales: DeviceScales,
}

/// The quantized copies of one tensor on the device (as the reference's `Quantized`).
#[derive(Debug)]
pub struct DeviceQuantized {
    /// The `[M, N]` copy.
    pub rowwise: Option<DeviceFp8>,
    /// The `[N, M]` copy.
    pub columnwise: Option<DeviceFp8>,
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn shape_err(e: ndarray::ShapeError) -> GpuError {
    GpuError::Shape(format!("fp8 download: {e}"))
}

impl DeviceFp8 {
    /// Downloads codes and scales as the reference's [`Fp8Tensor`] (synchronizes).
    pub fn download(&self, eng: &mut Engine) -> Result<Fp8Tensor, GpuError> {
        let data =
            Array2::from_shape_vec((self.rows, self.cols), eng.download_range(&self.codes, 0, self.rows * self.cols)?)
                .map_err(shape_err)?;
        let grid = |r: usize, c: usize| (self.rows.div_ceil(r), self.cols.div_ceil(c));
        let scales = match &self.scales {
            DeviceScales::PerTensor(b) => Scales::PerTensor { scale_inv: f32s(&eng.download_range(b, 0, 4)?)[0] },
            DeviceScales::Block { rows, cols, scale_inv } => {
                let (gr, gc) = grid(*rows, *cols);
                let v = f32s(&eng.download_range(scale_inv, 0, gr * gc * 4)?);
                Scales::Block {
                    rows: *rows,
                    cols: *cols,
                    scale_inv: Array2::from_shape_vec((gr, gc), v).map_err(shape_err)?,
                }
            }
            DeviceScales::E8m0 { rows, cols, exponents } => {
                let (gr, gc) = grid(*rows, *cols);
                let v = eng.download_range(exponents, 0, gr * gc)?;
                Scales::E8m0 {
                    rows: *rows,
                    cols: *cols,
                    exponents: Array2::from_shape_vec((gr, gc), v).map_err(shape_err)?,
                }
            }
        };
        Ok(Fp8Tensor { format: self.format, data, scales })
    }
}

/// A cuBLASLt handle (a raw pointer, not `Send` by itself).
struct LtHandle(lt_sys::cublasLtHandle_t);

// SAFETY: a cuBLASLt handle may be used from any thread as long as calls on it do not overlap;
// it is owned by one engine, whose every use takes `&mut self` under the engine's lock.
unsafe impl Send for LtHandle {}

/// The loaded fp8 kernels and the cuBLASLt state of one engine.
pub(crate) struct Fp8Engine {
    amax: [CudaFunction; 3],
    cast: [[CudaFunction; 2]; 3],
    block: [[CudaFunction; 2]; 3],
    /// The coalesced 1×128 block quantizers: `[rowwise, columnwise][dtype][format]`.
    block128: [[[CudaFunction; 2]; 3]; 2],
    /// Their segmented forms (`block_quant_{row,col}128_seg`), indexed the same way.
    block128_seg: [[[CudaFunction; 2]; 3]; 2],
    /// Both segmented forms in one pass (`block_quant_both128_seg`): `[dtype][format]`.
    block_both128_seg: [[CudaFunction; 2]; 3],
    /// The per-tensor cast into the rowwise codes and the columnwise copy in one pass
    /// (`cast_both_seg`): `[dtype][format]`.
    cast_both: [[CudaFunction; 2]; 3],
    compute_scales: CudaFunction,
    pub(crate) delayed_scales: CudaFunction,
    pub(crate) delayed_record: CudaFunction,
    pub(crate) delayed_update: CudaFunction,
    transpose_seg: CudaFunction,
    transpose_seg16: CudaFunction,
    block_scales_gemm: CudaFunction,
    lt: LtHandle,
    lt_workspace: DeviceBuffer,
    /// How new plans pick their cuBLASLt algorithm.
    algo_choice: LtAlgoChoice,
    plans: std::collections::HashMap<PlanKey, Plan>,
    /// The capture stream and graph cache of [`Engine::run_fp8_ops`] (made on first use).
    capture: Option<Capture>,
    /// Captures another thread invalidated (their lists were issued one by one instead).
    pub(crate) capture_fallbacks: u64,
    launches: u64,
    /// cuBLASLt calls made to time candidate algorithms ([`LtAlgoChoice::Tuned`]).
    tuned_calls: u64,
}

/// The per-tensor casts' input, per-segment scales and rowwise codes addresses: `x` of `map.rows`
/// rows of `t.cols` values in `dtype`, checked against their buffers.
fn cast_addrs(x: &DeviceBuffer, dtype: Dtype, map: &SegmentMap, t: &SegmentedFp8) -> Result<(u64, u64, u64), GpuError> {
    let (rows, cols) = (map.rows, t.cols);
    Ok((
        x.addr(0, rows * cols * dtype.size_bytes(), "fp8 quantize input")?,
        t.scale.addr(0, map.lens.len() * SCALE_STRIDE * 4, "scale")?,
        t.codes.addr(0, rows * cols, "codes")?,
    ))
}

/// A GEMM's (A, B, C) device addresses, row-major view.
type Addrs = (u64, u64, u64);

/// Whether `stream` is being captured into a graph (nothing may synchronize it then).
fn capturing(stream: cudarc::driver::sys::CUstream) -> bool {
    // SAFETY: `stream` is a live stream of this engine.
    let status = unsafe { cudarc::driver::result::stream::is_capturing(stream) };
    status != Ok(cudarc::driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
}

/// Graphs of fp8 GEMM lists kept before the cache is flushed.
const GRAPH_CACHE_LIMIT: usize = 256;

/// The stream fp8 GEMM lists are captured on and replayed on (capture cannot use the legacy
/// default stream the engine runs on), its ordering events and the captured graphs.
struct Capture {
    stream: std::sync::Arc<CudaStream>,
    to_capture: cudarc::driver::CudaEvent,
    done: cudarc::driver::CudaEvent,
    /// Forks the lanes from the capture stream.
    fork: cudarc::driver::CudaEvent,
    /// Side streams the captured GEMMs are spread over (branches of the graph).
    lanes: Vec<Lane>,
    graphs: std::collections::HashMap<(usize, Vec<Fp8Work>), crate::grouped::SendGraph>,
}

/// A side stream of a captured fp8 GEMM list, with its own cuBLASLt workspace.
struct Lane {
    stream: std::sync::Arc<CudaStream>,
    workspace: DeviceBuffer,
    done: cudarc::driver::CudaEvent,
}

impl std::fmt::Debug for Fp8Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fp8Engine").field("launches", &self.launches).finish()
    }
}

impl Drop for Fp8Engine {
    fn drop(&mut self) {
        // SAFETY: the handle was created by `create_handle` in `Fp8Engine::load` and is destroyed
        // once, here; the owning `Engine`'s drop synchronized its stream (into which every fp8
        // call's side streams are joined) before this field drops.
        let _ = unsafe { lt::destroy_handle(self.lt.0) };
    }
}

fn dt_index(dt: Dtype) -> usize {
    match dt {
        Dtype::F32 => 0,
        Dtype::Bf16 => 1,
        Dtype::F16 => 2,
    }
}

fn fmt_index(f: Fp8Format) -> usize {
    match f {
        Fp8Format::E4M3 => 0,
        Fp8Format::E5M2 => 1,
    }
}

/// `e` with the GEMM's description and the failing step.
fn in_context(e: GpuError, step: &str, context: &str) -> GpuError {
    match e {
        GpuError::Unsupported(why) => GpuError::Unsupported(format!("{context}: {step}: {why}")),
        GpuError::CublasLt(why) => GpuError::CublasLt(format!("{context}: {step}: {why}")),
        other => other,
    }
}

impl Fp8Engine {
    /// The cached plan of `key`, built on first use. A new plan under
    /// [`LtAlgoChoice::Tuned`] times its candidate algorithms on `tune`'s operands (the GEMM's
    /// first call; `None`, or a stream being captured, keeps the heuristic's first).
    fn plan(
        &mut self,
        key: PlanKey,
        scales: (u64, u64),
        context: &str,
        tune: Option<(Addrs, u64, cudarc::driver::sys::CUstream)>,
    ) -> Result<&Plan, GpuError> {
        if !self.plans.contains_key(&key) {
            if self.plans.len() >= PLAN_CACHE_LIMIT {
                self.plans.clear();
            }
            let count = match self.algo_choice {
                LtAlgoChoice::Heuristic => 1,
                LtAlgoChoice::Tuned(n) => n,
            };
            let mut plan = Plan::new(self.lt.0, &key, scales, count).map_err(|e| in_context(e, "plan", context))?;
            if let Some(((a, b, c), ws, stream)) = tune.filter(|t| plan.candidates.len() > 1 && !capturing(t.2)) {
                let (m, n, _) = key.dims;
                let call = TuneCall {
                    handle: self.lt.0,
                    desc: plan.desc,
                    layouts: [plan.la, plan.lb, plan.lc],
                    addrs: [b, a, c],
                    out_bytes: m * n * key.out.size_bytes(),
                    beta: if key.beta_one { 1.0 } else { 0.0 },
                    workspace: (ws, LT_WORKSPACE),
                    stream,
                };
                let best = lt_algo::fastest(&call, &plan.candidates).map_err(|e| in_context(e, "tuning", context))?;
                self.tuned_calls += (plan.candidates.len() * (TUNE_REPS + 1)) as u64;
                plan.algo = plan.candidates[best];
            }
            plan.candidates = Vec::new();
            self.plans.insert(key, plan);
        }
        self.plans.get(&key).ok_or_else(|| GpuError::CublasLt("plan cache".into()))
    }

    /// Runs the cuBLASLt fp8 GEMM of `key` (its plan built once and cached per key) with the
    /// device scale pointers `scales` (per-tensor scale_inv or block scale tensors, as the plan's
    /// scale modes say) on `C = alpha·op(A, B) + beta·C`, `addrs` = (A, B, C), both the tensorwise
    /// and the block-scaled GEMMs' last step. `context` names the GEMM in errors.
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &mut self,
        key: PlanKey,
        (sa, sb): (u64, u64),
        beta: f32,
        (a_addr, b_addr, c_addr): (u64, u64, u64),
        ws: u64,
        stream: cudarc::driver::sys::CUstream,
        context: &str,
    ) -> Result<(), GpuError> {
        let handle = self.lt.0;
        let plan = self.plan(key, (sa, sb), context, Some(((a_addr, b_addr, c_addr), ws, stream)))?;
        plan.set_scales(sa, sb)?;
        let alpha = 1f32;
        // SAFETY: the callers checked that A, B, C and the scales are device ranges holding what
        // this GEMM reads and writes (block scales in the layout of their scale mode), and the
        // plan's layouts describe exactly these shapes (its key); `ws` is the engine's workspace,
        // `LT_WORKSPACE` bytes; the call is ordered on `stream`, the engine's (the driver and
        // runtime stream types are the same `CUstream_st` handle).
        unsafe {
            lt::matmul(
                handle,
                plan.desc,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                b_addr as *const c_void,
                plan.la,
                a_addr as *const c_void,
                plan.lb,
                c_addr as *const c_void,
                plan.lc,
                c_addr as *mut c_void,
                plan.lc,
                &plan.algo,
                ws as *mut c_void,
                LT_WORKSPACE,
                stream as lt_sys::cudaStream_t,
            )
        }
        .map_err(|e| in_context(lt_err(e), "cublasLtMatmul", context))?;
        self.launches += 1;
        Ok(())
    }
}

impl Fp8Engine {
    /// Issues one checked op on `stream`.
    fn issue(
        &mut self,
        op: &Fp8GemmOp,
        stream: cudarc::driver::sys::CUstream,
        ws: Option<u64>,
    ) -> Result<(), GpuError> {
        match op.work {
            Fp8Work::Nothing => Ok(()),
            Fp8Work::Zero { c, bytes } => {
                // SAFETY: `c` starts `bytes` bytes inside a live allocation of this engine (checked
                // by `prologue`); the memset is ordered on `stream`.
                unsafe { cudarc::driver::result::memset_d8_async(c, 0, bytes, stream) }?;
                Ok(())
            }
            Fp8Work::Matmul { key, scales, addrs, .. } => {
                let ws = match ws {
                    Some(ws) => ws,
                    None => self.lt_workspace.addr(0, LT_WORKSPACE, "cuBLASLt workspace")?,
                };
                let beta = if key.beta_one { 1.0 } else { 0.0 };
                self.matmul(key, scales, beta, addrs, ws, stream, &op.context)
            }
        }
    }

    /// Issues `ops` on the capture stream (`lanes` ≤ 1) or forked over the first `lanes` side
    /// streams, longest first onto the least-loaded lane, joined back into the capture stream.
    fn issue_forked(&mut self, cap: &Capture, ops: &[Fp8GemmOp], lanes: usize) -> Result<(), GpuError> {
        if lanes <= 1 {
            return ops.iter().try_for_each(|op| self.issue(op, cap.stream.cu_stream(), None));
        }
        let flops = |op: &Fp8GemmOp| match op.work {
            Fp8Work::Matmul { key, .. } => (key.dims.0 * key.dims.1 * key.dims.2) as f64,
            Fp8Work::Zero { bytes, .. } => bytes as f64,
            Fp8Work::Nothing => 0.0,
        };
        let mut order: Vec<usize> = (0..ops.len()).filter(|&i| ops[i].work != Fp8Work::Nothing).collect();
        order.sort_by(|&a, &b| flops(&ops[b]).total_cmp(&flops(&ops[a])).then(a.cmp(&b)));
        let mut load = vec![0.0f64; lanes];
        let mut per_lane: Vec<Vec<usize>> = vec![Vec::new(); lanes];
        for i in order {
            let (li, _) = load.iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1)).unwrap_or((0, &0.0));
            load[li] += flops(&ops[i]);
            per_lane[li].push(i);
        }
        cap.fork.record(&cap.stream)?;
        for (lane, items) in cap.lanes.iter().zip(&per_lane) {
            lane.stream.wait(&cap.fork)?;
            let ws = lane.workspace.addr(0, LT_WORKSPACE, "lane cuBLASLt workspace")?;
            for &i in items {
                self.issue(&ops[i], lane.stream.cu_stream(), Some(ws))?;
            }
            lane.done.record(&lane.stream)?;
            cap.stream.wait(&lane.done)?;
        }
        Ok(())
    }

    /// [`Engine::run_fp8_ops`] with a graph: capture on first sight of the list, then replay.
    fn run_graph(
        &mut self,
        ctx: &std::sync::Arc<cudarc::driver::CudaContext>,
        main: &std::sync::Arc<CudaStream>,
        ops: &[Fp8GemmOp],
        lanes: usize,
    ) -> Result<(), GpuError> {
        use cudarc::driver::sys as ds;
        let mut cap = match self.capture.take() {
            Some(c) => c,
            None => Capture {
                stream: ctx.new_stream()?,
                to_capture: ctx.new_event(None)?,
                done: ctx.new_event(None)?,
                fork: ctx.new_event(None)?,
                lanes: Vec::new(),
                graphs: Default::default(),
            },
        };
        while cap.lanes.len() < lanes {
            let workspace = main.alloc_zeros::<u8>(LT_WORKSPACE)?;
            cap.lanes.push(Lane {
                stream: ctx.new_stream()?,
                workspace: DeviceBuffer::new(workspace, main, LT_WORKSPACE)?,
                done: ctx.new_event(None)?,
            });
            // The side streams must not touch the workspace before its zeroing finished.
            main.synchronize()?;
        }
        let result = (|| -> Result<(), GpuError> {
            let key = (lanes, ops.iter().map(|o| o.work).collect::<Vec<Fp8Work>>());
            cap.to_capture.record(main)?;
            cap.stream.wait(&cap.to_capture)?;
            if !cap.graphs.contains_key(&key) {
                // Plans first: their heuristic queries stay out of the capture.
                let ws = self.lt_workspace.addr(0, LT_WORKSPACE, "cuBLASLt workspace")?;
                for op in ops {
                    if let Fp8Work::Matmul { key, scales, addrs, .. } = op.work {
                        self.plan(key, scales, &op.context, Some((addrs, ws, main.cu_stream())))?;
                    }
                }
                if cap.graphs.len() >= GRAPH_CACHE_LIMIT {
                    cap.graphs.clear();
                }
                cap.stream.begin_capture(ds::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)?;
                let issued = self.issue_forked(&cap, ops, lanes);
                match cap.stream.end_capture(ds::CUgraphInstantiate_flags(0)) {
                    Ok(Some(graph)) => {
                        issued?;
                        cap.graphs.insert(key.clone(), crate::grouped::SendGraph(graph));
                    }
                    Ok(None) => return Err(GpuError::Unsupported("stream capture produced no graph".into())),
                    Err(e) if e.0 == ds::cudaError_enum::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED => {
                        // Another thread's call on the shared context broke the capture: nothing
                        // captured ran; issue the list directly, in order, on the engine's stream.
                        self.capture_fallbacks += 1;
                        return ops.iter().try_for_each(|op| self.issue(op, main.cu_stream(), None));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            let graph = cap.graphs.get(&key).ok_or_else(|| GpuError::Unsupported("fp8 graph cache".into()))?;
            graph.0.launch()?;
            cap.done.record(&cap.stream)?;
            main.wait(&cap.done)?;
            self.launches += 1;
            Ok(())
        })();
        self.capture = Some(cap);
        result
    }
}

/// A cuBLASLt failure: `NOT_SUPPORTED` (no algorithm for this fp8 problem on this device) is a
/// declared [`GpuError::Unsupported`], anything else an error.
fn lt_err(e: lt::CublasError) -> GpuError {
    if e.0 == lt_sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED {
        GpuError::Unsupported(format!("cuBLASLt has no algorithm for this fp8 GEMM ({e:?})"))
    } else {
        GpuError::CublasLt(format!("{e:?}"))
    }
}

impl Fp8Engine {
    fn load(
        eng_ctx: &std::sync::Arc<cudarc::driver::CudaContext>,
        stream: &std::sync::Arc<CudaStream>,
        arch: &'static str,
    ) -> Result<Fp8Engine, GpuError> {
        let module = eng_ctx.load_module(compile_fp8_kernels(arch)?)?;
        let sfx = ["f32", "bf16", "f16"];
        let fm = ["e4m3", "e5m2"];
        let f = |n: String| module.load_function(&n);
        let amax = [
            f(format!("amax_seg_{}", sfx[0]))?,
            f(format!("amax_seg_{}", sfx[1]))?,
            f(format!("amax_seg_{}", sfx[2]))?,
        ];
        let pair = |base: &str, s: &str| -> Result<[CudaFunction; 2], GpuError> {
            Ok([f(format!("{base}_{s}_{}", fm[0]))?, f(format!("{base}_{s}_{}", fm[1]))?])
        };
        let cast = [pair("cast_seg", sfx[0])?, pair("cast_seg", sfx[1])?, pair("cast_seg", sfx[2])?];
        let block = [pair("block_quant", sfx[0])?, pair("block_quant", sfx[1])?, pair("block_quant", sfx[2])?];
        let b128 = |base: &str| -> Result<[[CudaFunction; 2]; 3], GpuError> {
            Ok([pair(base, sfx[0])?, pair(base, sfx[1])?, pair(base, sfx[2])?])
        };
        let block128 = [b128("block_quant_row128")?, b128("block_quant_col128")?];
        let block128_seg = [b128("block_quant_row128_seg")?, b128("block_quant_col128_seg")?];
        let both = |base: &str, dt: Dtype| -> Result<[CudaFunction; 2], GpuError> {
            Ok([block_tile_function(&module, base, dt, fm[0])?, block_tile_function(&module, base, dt, fm[1])?])
        };
        let all_dtypes = |base: &str| -> Result<[[CudaFunction; 2]; 3], GpuError> {
            Ok([both(base, Dtype::F32)?, both(base, Dtype::Bf16)?, both(base, Dtype::F16)?])
        };
        let block_both128_seg = all_dtypes("block_quant_both128_seg")?;
        let cast_both = all_dtypes("cast_both_seg")?;
        let lt = LtHandle(lt::create_handle().map_err(|e| GpuError::CublasLt(format!("cuBLASLt unavailable: {e:?}")))?);
        let mem = stream.alloc_zeros::<u8>(LT_WORKSPACE)?;
        let lt_workspace = DeviceBuffer::new(mem, stream, LT_WORKSPACE)?;
        Ok(Fp8Engine {
            amax,
            cast,
            block,
            block128,
            block128_seg,
            block_both128_seg,
            cast_both,
            compute_scales: f("compute_scales".into())?,
            delayed_scales: f("delayed_scales".into())?,
            delayed_record: f("delayed_record".into())?,
            delayed_update: f("delayed_update".into())?,
            transpose_seg: f("transpose_seg_u8".into())?,
            transpose_seg16: f("transpose_seg_u8x16".into())?,
            block_scales_gemm: f("block_scales_gemm".into())?,
            lt,
            lt_workspace,
            algo_choice: LtAlgoChoice::Heuristic,
            plans: Default::default(),
            capture: None,
            capture_fallbacks: 0,
            launches: 0,
            tuned_calls: 0,
        })
    }

    /// Launches issued (kernels and cuBLASLt calls; the tuning's timed calls are not counted).
    pub(crate) fn launches(&self) -> u64 {
        self.launches
    }

    /// Chooses how plans made from now on pick their cuBLASLt algorithm; the plans and
    /// captured graphs made before are dropped, so every GEMM is planned again under `choice`.
    pub(crate) fn set_algo_choice(&mut self, choice: LtAlgoChoice) {
        self.algo_choice = choice;
        self.plans.clear();
        if let Some(cap) = self.capture.as_mut() {
            cap.graphs.clear();
        }
    }

    /// cuBLASLt calls made so far to time candidate algorithms.
    pub(crate) fn tuned_calls(&self) -> u64 {
        self.tuned_calls
    }
}

/// Launches `$f` on `$stream` with `$cfg` and the arguments unless the grid is empty; counts it.
macro_rules! launch {
    ($fe:expr, $stream:expr, $f:expr, $cfg:expr, [$($arg:expr),* $(,)?]) => {{
        let cfg: LaunchConfig = $cfg;
        if cfg.grid_dim.0 != 0 && cfg.grid_dim.1 != 0 {
            let mut builder = $stream.launch_builder($f);
            $(builder.arg($arg);)*
            // SAFETY: the arguments are, in order and type, the parameters of the kernel's
            // `extern "C"` signature in `fp8.cu` (pointers as 64-bit device addresses checked
            // by the caller to hold what the kernel touches at these sizes, ints as i32,
            // `BlockParams` by value); the launch shape is the one its contract asks for.
            unsafe { builder.launch(cfg) }?;
            $fe.launches += 1;
        }
    }};
}

mod delayed;
pub use delayed::{update_on_device, DeviceDelayedState};

/// The segment layout of a per-tensor quantization: `seg_off`, `seg_len` (i32 each) and the
/// segment of each row (i32), uploaded.
#[derive(Debug)]
pub struct SegmentMap {
    seg_off: DeviceBuffer,
    seg_len: DeviceBuffer,
    row_seg: DeviceBuffer,
    /// (segment, first row within it) of every 32-row tile, segment by segment (i32 pairs):
    /// the grid of the one-launch segmented transpose.
    tiles: DeviceBuffer,
    n_tiles: usize,
    /// The same for 128-row tiles: the grid of the one-pass quantizers (`cast_both_seg`,
    /// `block_quant_both128_seg`, `act_fwd_blk`) and of the columnwise 1×128 quantizer.
    tiles128: DeviceBuffer,
    n_tiles128: usize,
    lens: Vec<usize>,
    rows: usize,
}

/// (segment, first row within it) of every `rows`-row tile of segments of `lens` rows, segment
/// by segment, as i32 pairs: the grid of a one-launch kernel over all segments' tiles.
fn tile_table(lens: &[usize], rows: usize) -> Result<Vec<u8>, GpuError> {
    let mut table = Vec::new();
    for (s, &l) in lens.iter().enumerate() {
        for r0 in (0..l).step_by(rows) {
            table.extend_from_slice(&i32::try_from(s)?.to_le_bytes());
            table.extend_from_slice(&i32::try_from(r0)?.to_le_bytes());
        }
    }
    Ok(table)
}

impl SegmentMap {
    /// The layout of consecutive segments of `lens` rows each.
    pub fn new(eng: &mut Engine, lens: &[usize]) -> Result<SegmentMap, GpuError> {
        let mut off = Vec::new();
        let mut row_seg = Vec::new();
        let mut rows = 0usize;
        let tiles = tile_table(lens, 32)?;
        let tiles128 = tile_table(lens, BlockTile::LEN)?;
        for (s, &l) in lens.iter().enumerate() {
            off.extend_from_slice(&i32::try_from(rows)?.to_le_bytes());
            rows += l;
            row_seg.extend(std::iter::repeat_n(i32::try_from(s)?.to_le_bytes(), l).flatten());
        }
        let len: Vec<u8> = lens
            .iter()
            .map(|&l| i32::try_from(l))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .flat_map(i32::to_le_bytes)
            .collect();
        Ok(SegmentMap {
            seg_off: eng.upload(&off)?,
            seg_len: eng.upload(&len)?,
            row_seg: eng.upload(&row_seg)?,
            n_tiles: tiles.len() / 8,
            tiles: eng.upload(&tiles)?,
            n_tiles128: tiles128.len() / 8,
            tiles128: eng.upload(&tiles128)?,
            lens: lens.to_vec(),
            rows,
        })
    }

    /// The segment arguments of the 128-row-tile kernels (`BlockSegs`): this map's row
    /// segments, first rows, lengths and 128-row tile table, with `scale_off` (the address of
    /// the per-segment scale offsets, 0 where the kernel reads none).
    fn block_segs(&self, scale_off: u64) -> Result<BlockSegs, GpuError> {
        let segs = self.lens.len();
        Ok(BlockSegs {
            row_seg: self.row_seg.addr(0, self.rows * 4, "row_seg")?,
            seg_off: self.seg_off.addr(0, segs * 4, "seg_off")?,
            seg_len: self.seg_len.addr(0, segs * 4, "seg_len")?,
            tiles: self.tiles128.addr(0, self.n_tiles128 * 8, "128-row tiles")?,
            scale_off,
        })
    }

    /// Segment row counts.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// The first row of each segment.
    pub fn offsets(&self) -> Vec<usize> {
        self.lens
            .iter()
            .scan(0, |acc, &l| {
                let o = *acc;
                *acc += l;
                Some(o)
            })
            .collect()
    }
}

/// Whether [`Engine::transpose_segments`] runs the 16-byte kernel (`transpose_seg_u8x16`) for
/// segments of `lens` rows, `cols` wide: every 16-row group and 16-byte chunk of each segment must
/// be whole (the buffers are allocations, 256-byte aligned, and segment `s` starts at byte
/// `off_s·cols`, a multiple of 16 then).
pub fn transposes_by_16_bytes(cols: usize, lens: &[usize]) -> bool {
    cols.is_multiple_of(16) && lens.iter().all(|l| l.is_multiple_of(16))
}

/// Per-segment per-tensor scaled codes on the device: for segment `s` of `[rows_s, cols]`, the
/// rowwise codes at rows `off_s..`, its columnwise copy (`[cols, rows_s]`, at byte
/// `off_s·cols` of `codes_t`), `scale_inv` and the forward `scale` (f32 at index
/// `s·`[`SCALE_STRIDE`]).
#[derive(Debug)]
pub struct SegmentedFp8 {
    /// Element format.
    pub format: Fp8Format,
    /// Rows (all segments).
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Segments.
    pub segments: usize,
    /// Rowwise codes `[rows, cols]`.
    pub codes: DeviceBuffer,
    /// Per-segment transposed codes, when requested.
    pub codes_t: Option<DeviceBuffer>,
    /// f32 amax bits per segment.
    pub amax: DeviceBuffer,
    /// f32 scale per segment.
    pub scale: DeviceBuffer,
    /// f32 scale_inv per segment.
    pub scale_inv: DeviceBuffer,
}

impl SegmentedFp8 {
    /// Buffers for the segments of `map`, `cols` wide, in `format` (no columnwise copy yet).
    pub fn alloc(eng: &mut Engine, map: &SegmentMap, cols: usize, format: Fp8Format) -> Result<SegmentedFp8, GpuError> {
        let segs = map.lens.len();
        Ok(SegmentedFp8 {
            format,
            rows: map.rows,
            cols,
            segments: segs,
            codes: eng.alloc(map.rows * cols)?,
            codes_t: None,
            amax: eng.alloc(segs * 4)?,
            scale: eng.alloc(segs * SCALE_STRIDE * 4)?,
            scale_inv: eng.alloc(segs * SCALE_STRIDE * 4)?,
        })
    }

    /// Whether these buffers hold the rows and segments of `map`.
    pub fn fits(&self, map: &SegmentMap) -> bool {
        self.rows == map.rows && self.segments == map.lens.len()
    }

    /// Segment `s`'s `scale_inv` (one f32 on the device).
    pub fn scale_inv_at(&self, s: usize) -> Region<'_> {
        self.scale_inv.at(4 * SCALE_STRIDE * s)
    }
}

/// `t` holds the rows and segments of `map`.
fn check_fits(t: &SegmentedFp8, map: &SegmentMap) -> Result<(), GpuError> {
    if t.fits(map) {
        return Ok(());
    }
    Err(GpuError::Shape(format!(
        "fp8 quantize: buffers for {} rows in {} segments, asked for {} rows in {}",
        t.rows,
        t.segments,
        map.rows,
        map.lens.len()
    )))
}

/// Where the per-segment scales of [`Engine::quantize_segments_into`] come from.
#[derive(Clone, Copy, Debug)]
pub enum SegmentScales<'a> {
    /// Per-tensor current scaling: each segment's own amax (TE `Float8CurrentScaling`).
    Current(ScaleOptions),
    /// Delayed scaling: the state's scale of this operand for each local expert, the segment's
    /// amax recorded into the state (TE `DelayedScaling`).
    Delayed(&'a DeviceDelayedState, moe_reference::layer::Fp8Operand),
}

impl From<ScaleOptions> for SegmentScales<'_> {
    fn from(options: ScaleOptions) -> Self {
        SegmentScales::Current(options)
    }
}

/// The alignment cuBLASLt may assume for a device address: its largest power-of-two divisor,
/// at most 256 (TE's `_getAlignment`).
fn alignment(addr: u64) -> u32 {
    if addr == 0 {
        256
    } else {
        1u32 << addr.trailing_zeros().min(8)
    }
}

impl Engine {
    /// The fp8 kernels and cuBLASLt state, loaded on first use.
    pub(crate) fn fp8_engine(&mut self) -> Result<&mut Fp8Engine, GpuError> {
        if self.fp8.is_none() {
            let loaded = Fp8Engine::load(&self.ctx, &self.stream, self.arch())?;
            self.fp8 = Some(Box::new(loaded));
        }
        self.fp8.as_deref_mut().ok_or_else(|| GpuError::Unsupported("fp8 engine".into()))
    }

    /// Per-tensor current scaling of each row segment of `x` (`[rows, cols]` in `dtype`),
    /// one amax and scale per segment (TE's quantizer per expert): codes, optionally the
    /// per-segment transposed copy (the columnwise copy: same codes), and the scales.
    #[allow(clippy::too_many_arguments)]
    pub fn quantize_segments<'s>(
        &mut self,
        x: &DeviceBuffer,
        dtype: Dtype,
        map: &SegmentMap,
        cols: usize,
        format: Fp8Format,
        scales: impl Into<SegmentScales<'s>>,
        columnwise: bool,
    ) -> Result<SegmentedFp8, GpuError> {
        let mut t = SegmentedFp8::alloc(self, map, cols, format)?;
        self.quantize_segments_into(x, dtype, map, scales, &mut t)?;
        if columnwise {
            self.transpose_segments(&mut t, map)?;
        }
        Ok(t)
    }

    /// [`Engine::quantize_segments`] into the buffers of `t` (its format and columns; rows and
    /// segments of `map`), without the columnwise copy.
    ///
    /// With [`SegmentScales::Delayed`] the scales come from the delayed-scaling state (segment
    /// `s` = local expert `s`) and each segment's amax is recorded into it.
    pub fn quantize_segments_into<'s>(
        &mut self,
        x: &DeviceBuffer,
        dtype: Dtype,
        map: &SegmentMap,
        scales: impl Into<SegmentScales<'s>>,
        t: &mut SegmentedFp8,
    ) -> Result<(), GpuError> {
        self.quantize_segments_to(x, dtype, map, scales.into(), t, false)
    }

    /// [`Engine::quantize_segments_into`] with the columnwise copy too, as
    /// [`Engine::transpose_segments`] would then write it: the cast writes both copies in one
    /// pass (`cast_both_seg`) where the width is a multiple of 4.
    pub fn quantize_segments_both_into<'s>(
        &mut self,
        x: &DeviceBuffer,
        dtype: Dtype,
        map: &SegmentMap,
        scales: impl Into<SegmentScales<'s>>,
        t: &mut SegmentedFp8,
    ) -> Result<(), GpuError> {
        self.quantize_segments_to(x, dtype, map, scales.into(), t, true)
    }

    fn quantize_segments_to(
        &mut self,
        x: &DeviceBuffer,
        dtype: Dtype,
        map: &SegmentMap,
        scales: SegmentScales<'_>,
        t: &mut SegmentedFp8,
        columnwise: bool,
    ) -> Result<(), GpuError> {
        check_fits(t, map)?;
        let (segs, rows, cols) = (map.lens.len(), map.rows, t.cols);
        self.fill_bytes(&mut t.amax, 0)?;
        let stream = self.stream.clone();
        let fe = self.fp8_engine()?;
        let xa = x.addr(0, rows * cols * dtype.size_bytes(), "fp8 quantize input")?;
        let (off, len) = (map.seg_off.addr(0, segs * 4, "seg_off")?, map.seg_len.addr(0, segs * 4, "seg_len")?);
        let am = t.amax.addr(0, segs * 4, "amax")?;
        // Eight elements per load where every row starts 16-byte aligned.
        let vec = i32::from(cols.is_multiple_of(8) && xa.is_multiple_of(16));
        let ci = i32::try_from(cols)?;
        let max_seg = map.lens.iter().copied().max().unwrap_or(0) * cols;
        let per_thread = if vec == 1 { 8 * 4 } else { 4 };
        let bx = max_seg.div_ceil(256 * per_thread).clamp(1, 1024) as u32;
        let cfg = LaunchConfig { grid_dim: (bx, u32::try_from(segs)?, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        launch!(fe, stream, &fe.amax[dt_index(dtype)], cfg, [&xa, &off, &len, &ci, &vec, &am]);
        match scales {
            SegmentScales::Current(options) => self.current_scales(map, options, t)?,
            SegmentScales::Delayed(state, operand) => {
                self.delayed_scales(map, state, operand, t)?;
                self.record_amax(map, state, operand, t)?;
            }
        }
        self.cast_segments(x, dtype, map, t, columnwise)
    }

    /// The forward activation of `cfg`'s class alone: [`Engine::act_fwd_quantized`]'s `u`
    /// (and `a` with SequentialMLP's fc1 bias), nothing quantized; the kernel the bf16 layers
    /// and the fp8 layers under [`crate::Strategy::Loop`] run.
    #[allow(clippy::too_many_arguments)]
    pub fn act_fwd(
        &mut self,
        cfg: &LayerConfig,
        a: &mut DeviceBuffer,
        b1: Option<&DeviceBuffer>,
        p: &DeviceBuffer,
        u: &mut DeviceBuffer,
        dtype: Dtype,
        map: &SegmentMap,
        n2: usize,
    ) -> Result<(), GpuError> {
        let rows = (&map.row_seg, map.rows, map.lens.len());
        let Engine { kernels, stream, .. } = &mut *self;
        kernels.act_fwd(stream, dtype, ActParams::of(cfg), a, b1, p, rows, u, n2)
    }

    /// The forward activation of `cfg`'s class, `u[r] = round(z(a[r])·p[r])` over the rows of
    /// `map` (one segment per local expert; `a` `[rows, N1]` in `dtype`, SequentialMLP's fc1
    /// bias `b1` `[segments, N1]` added into `a` when given, `p` f32 per row, `u` `[rows,
    /// t.cols]`), with fc2's fp8 input quantized in the same pass: `u` and `t` end as the
    /// activation kernel then [`Engine::quantize_segments_into`]`(u, .., map, scales, t)`
    /// leave them, bit for bit, without the amax pass over `u`. Current scaling: the
    /// activation kernel records each segment's amax, then the scales and one cast; delayed
    /// scaling: the state's scales first, then the activation kernel writes the codes and
    /// amaxes, which are recorded into the state (one pass over the activations in all).
    #[allow(clippy::too_many_arguments)]
    pub fn act_fwd_quantized<'s>(
        &mut self,
        cfg: &LayerConfig,
        a: &mut DeviceBuffer,
        b1: Option<&DeviceBuffer>,
        p: &DeviceBuffer,
        u: &mut DeviceBuffer,
        dtype: Dtype,
        map: &SegmentMap,
        scales: impl Into<SegmentScales<'s>>,
        t: &mut SegmentedFp8,
    ) -> Result<(), GpuError> {
        let (ap, n2) = (ActParams::of(cfg), t.cols);
        let rows = (&map.row_seg, map.rows, map.lens.len());
        self.quantize_in_pass(u, dtype, map, scales.into(), t, false, |kernels, stream, u, fp8| {
            kernels.act_fwd_quantized(stream, dtype, ap, a, b1, p, rows, u, n2, fp8)
        })
    }

    /// The backward activation of `cfg`'s class over the rows of `map`, unfused: from `a`
    /// `[rows, N1]` (fc1's output), `du` `[rows, N2]`, the probs `p` the forward applied, and
    /// `g` `[rows, h]` with the fc2 bias `b2` (the probs gradient's bias term), `da`
    /// `[rows, N1]` and, unless the probs were applied on the input, `dp` per row (the layers'
    /// `act_bwd` step).
    #[allow(clippy::too_many_arguments)]
    pub fn act_bwd(
        &mut self,
        cfg: &LayerConfig,
        inputs: (&DeviceBuffer, &DeviceBuffer, &DeviceBuffer, &DeviceBuffer),
        b2: Option<&DeviceBuffer>,
        outputs: (&mut DeviceBuffer, &mut DeviceBuffer),
        dtype: Dtype,
        map: &SegmentMap,
    ) -> Result<(), GpuError> {
        let rows = (&map.row_seg, map.rows, map.lens.len());
        let (write_dp, dims) = (!cfg.apply_probs_on_input, (cfg.n2(), cfg.hidden_size));
        let Engine { kernels, stream, .. } = &mut *self;
        kernels.act_bwd(
            stream,
            dtype,
            ActParams::of(cfg),
            inputs,
            b2,
            rows,
            outputs,
            write_dp,
            dims,
            cfg.probs_dtype,
            None,
        )
    }

    /// [`Engine::act_bwd`] with fc1's output gradient `da` quantized in the same pass (`t`,
    /// `N1` wide): `da`, `dp` and `t` end as [`Engine::act_bwd`] then
    /// [`Engine::quantize_segments_into`]`(da, .., map, scales, t)` (and with `columnwise`
    /// [`Engine::transpose_segments`]) leave them, bit for bit, without the amax pass over `da`
    /// (current scaling: the kernel records each segment's amax, then the scales and one cast,
    /// which writes the columnwise copy too; delayed scaling: the codes too, one pass, then the
    /// transpose).
    #[allow(clippy::too_many_arguments)]
    pub fn act_bwd_quantized<'s>(
        &mut self,
        cfg: &LayerConfig,
        inputs: (&DeviceBuffer, &DeviceBuffer, &DeviceBuffer, &DeviceBuffer),
        b2: Option<&DeviceBuffer>,
        (da, dp): (&mut DeviceBuffer, &mut DeviceBuffer),
        dtype: Dtype,
        map: &SegmentMap,
        scales: impl Into<SegmentScales<'s>>,
        t: &mut SegmentedFp8,
        columnwise: bool,
    ) -> Result<(), GpuError> {
        let ap = ActParams::of(cfg);
        let rows = (&map.row_seg, map.rows, map.lens.len());
        let (write_dp, dims) = (!cfg.apply_probs_on_input, (cfg.n2(), cfg.hidden_size));
        let n1 = cfg.n1();
        if t.cols != n1 {
            return Err(GpuError::Shape(format!("fp8 act_bwd: buffers {} wide for an output of {n1} columns", t.cols)));
        }
        let probs_dt = cfg.probs_dtype;
        self.quantize_in_pass(da, dtype, map, scales.into(), t, columnwise, |kernels, stream, da, fp8| {
            kernels.act_bwd(stream, dtype, ap, inputs, b2, rows, (da, dp), write_dp, dims, probs_dt, Some(fp8))
        })
    }

    /// Runs `kernel`, an activation kernel that writes `out` and records `t`'s per-segment amax
    /// of it in the same pass (with known scales, under delayed scaling, its codes too), then
    /// finishes `t` as [`Engine::quantize_segments_into`]`(out, .., map, scales, t)` would:
    /// current scaling computes the scales and casts `out` once; delayed scaling takes the
    /// state's scales first and records the amaxes after.
    #[allow(clippy::too_many_arguments)]
    fn quantize_in_pass(
        &mut self,
        out: &mut DeviceBuffer,
        dtype: Dtype,
        map: &SegmentMap,
        scales: SegmentScales<'_>,
        t: &mut SegmentedFp8,
        columnwise: bool,
        kernel: impl FnOnce(&mut ExpertKernels, &CudaStream, &mut DeviceBuffer, ActFp8Out<'_>) -> Result<(), GpuError>,
    ) -> Result<(), GpuError> {
        check_fits(t, map)?;
        self.fill_bytes(&mut t.amax, 0)?;
        match scales {
            SegmentScales::Current(options) => {
                let fp8 = ActFp8Out { amax: &mut t.amax, codes: None };
                let Engine { kernels, stream, .. } = &mut *self;
                kernel(kernels, stream, out, fp8)?;
                self.current_scales(map, options, t)?;
                self.cast_segments(out, dtype, map, t, columnwise)
            }
            SegmentScales::Delayed(state, operand) => {
                self.delayed_scales(map, state, operand, t)?;
                let SegmentedFp8 { amax, scale, codes, format, .. } = t;
                let codes = ActCodes { scale, stride: SCALE_STRIDE, codes, format: *format };
                let fp8 = ActFp8Out { amax, codes: Some(codes) };
                let Engine { kernels, stream, .. } = &mut *self;
                kernel(kernels, stream, out, fp8)?;
                self.record_amax(map, state, operand, t)?;
                if columnwise {
                    self.transpose_segments(t, map)?;
                }
                Ok(())
            }
        }
    }

    /// Current scaling: each segment's scale and scale_inv from the amax in `t`.
    fn current_scales(
        &mut self,
        map: &SegmentMap,
        options: ScaleOptions,
        t: &mut SegmentedFp8,
    ) -> Result<(), GpuError> {
        let segs = map.lens.len();
        let scale_bytes = segs * SCALE_STRIDE * 4;
        let stream = self.stream.clone();
        let fe = self.fp8_engine()?;
        let (am, sc, si) = (
            t.amax.addr(0, segs * 4, "amax")?,
            t.scale.addr(0, scale_bytes, "scale")?,
            t.scale_inv.addr(0, scale_bytes, "scale_inv")?,
        );
        let (fmax, pow2, eps, vinf) =
            (t.format.max_finite(), i32::from(options.force_pow_2_scales), options.amax_epsilon, f32::MAX);
        let (si32, stride) = (i32::try_from(segs)?, SCALE_STRIDE as i32);
        let cfg =
            LaunchConfig { grid_dim: (segs.div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        launch!(fe, stream, &fe.compute_scales, cfg, [&am, &si32, &stride, &fmax, &pow2, &eps, &vinf, &sc, &si]);
        Ok(())
    }

    /// Delayed scaling: each segment's scale and scale_inv from the state's `operand`.
    fn delayed_scales(
        &mut self,
        map: &SegmentMap,
        state: &DeviceDelayedState,
        operand: moe_reference::layer::Fp8Operand,
        t: &mut SegmentedFp8,
    ) -> Result<(), GpuError> {
        let segs = map.lens.len();
        let scale_bytes = segs * SCALE_STRIDE * 4;
        let stream = self.stream.clone();
        let fe = self.fp8_engine()?;
        let (sc, si) = (t.scale.addr(0, scale_bytes, "scale")?, t.scale_inv.addr(0, scale_bytes, "scale_inv")?);
        state.scales_into(fe, &stream, operand, segs, (sc, si))
    }

    /// Delayed scaling: each segment's amax in `t` folded into the state's `operand` history.
    fn record_amax(
        &mut self,
        map: &SegmentMap,
        state: &DeviceDelayedState,
        operand: moe_reference::layer::Fp8Operand,
        t: &SegmentedFp8,
    ) -> Result<(), GpuError> {
        let segs = map.lens.len();
        let stream = self.stream.clone();
        let fe = self.fp8_engine()?;
        let am = t.amax.addr(0, segs * 4, "amax")?;
        state.record(fe, &stream, operand, segs, am)
    }

    /// The codes of `x` at the segments' scales in `t`, and with `columnwise` its columnwise
    /// copy (in the same pass where the width is a multiple of 4, else by the transpose).
    fn cast_segments(
        &mut self,
        x: &DeviceBuffer,
        dtype: Dtype,
        map: &SegmentMap,
        t: &mut SegmentedFp8,
        columnwise: bool,
    ) -> Result<(), GpuError> {
        let (rows, cols, format) = (map.rows, t.cols, t.format);
        if columnwise && block_tile_takes(cols) {
            return self.cast_both_segments(x, dtype, map, t);
        }
        let stream = self.stream.clone();
        let fe = self.fp8_engine()?;
        let (xa, sc, co) = cast_addrs(x, dtype, map, t)?;
        let rs = map.row_seg.addr(0, rows * 4, "row_seg")?;
        let vec = i32::from(cols.is_multiple_of(8) && xa.is_multiple_of(16));
        let (ri, ci, stride) = (i32::try_from(rows)?, i32::try_from(cols)?, SCALE_STRIDE as i32);
        let blocks = if vec == 1 { (rows * cols / 8).div_ceil(256 * 4) } else { rows };
        let cfg = LaunchConfig {
            grid_dim: (blocks.clamp(0, 132 * 32) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            fe,
            stream,
            &fe.cast[dt_index(dtype)][fmt_index(format)],
            cfg,
            [&xa, &rs, &ri, &ci, &sc, &stride, &vec, &co]
        );
        if columnwise {
            self.transpose_segments(t, map)?;
        }
        Ok(())
    }

    /// `cast_both_seg`: the rowwise codes of `x` and their columnwise copy in one pass.
    fn cast_both_segments(
        &mut self,
        x: &DeviceBuffer,
        dtype: Dtype,
        map: &SegmentMap,
        t: &mut SegmentedFp8,
    ) -> Result<(), GpuError> {
        let (rows, cols, format) = (map.rows, t.cols, t.format);
        if t.codes_t.is_none() {
            t.codes_t = Some(self.alloc(rows * cols)?);
        }
        let stream = self.stream.clone();
        let fe = self.fp8_engine()?;
        let (xa, sc, co) = cast_addrs(x, dtype, map, t)?;
        let codes_t = t.codes_t.as_ref().ok_or_else(|| GpuError::Shape("fp8 columnwise codes".into()))?;
        let ct = codes_t.addr(0, rows * cols, "columnwise codes")?;
        let seg = map.block_segs(0)?;
        let (ci, stride) = (i32::try_from(cols)?, SCALE_STRIDE as i32);
        let cfg = LaunchConfig {
            grid_dim: (u32::try_from(map.n_tiles128)?, u32::try_from(cols.div_ceil(128))?, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: u32::try_from(block_tile_smem(dtype))?,
        };
        let f = &fe.cast_both[dt_index(dtype)][fmt_index(format)];
        launch!(fe, stream, f, cfg, [&xa, &ci, &seg, &sc, &stride, &co, &ct]);
        Ok(())
    }

    /// Writes the columnwise copy of `t` (each segment's codes transposed, `[cols, rows_s]` at
    /// byte `off_s·cols`), allocating it on first use. With `cols` and every segment's rows
    /// multiples of 16 (the fp8 layers' padded experts) the 16-byte kernel moves the bytes
    /// ([`transposes_by_16_bytes`]), else the byte kernel; both write the same bytes.
    pub fn transpose_segments(&mut self, t: &mut SegmentedFp8, map: &SegmentMap) -> Result<(), GpuError> {
        if !t.fits(map) {
            return Err(GpuError::Shape("fp8 transpose: the segments are not the quantized tensor's".into()));
        }
        let (rows, cols) = (t.rows, t.cols);
        if t.codes_t.is_none() {
            t.codes_t = Some(self.alloc(rows * cols)?);
        }
        let stream = self.stream.clone();
        let fe = self.fp8_engine()?;
        let ci = i32::try_from(cols)?;
        let codes_t = t.codes_t.as_ref().ok_or_else(|| GpuError::Shape("fp8 transpose output".into()))?;
        let segs = map.lens.len();
        let src = t.codes.addr(0, rows * cols, "transpose input")?;
        let dst = codes_t.addr(0, rows * cols, "transpose output")?;
        let (off, len) = (map.seg_off.addr(0, segs * 4, "seg_off")?, map.seg_len.addr(0, segs * 4, "seg_len")?);
        let tiles = map.tiles.addr(0, map.n_tiles * 8, "transpose tiles")?;
        let by16 = transposes_by_16_bytes(cols, &map.lens);
        let cfg = LaunchConfig {
            grid_dim: (u32::try_from(map.n_tiles)?, u32::try_from(cols.div_ceil(if by16 { 128 } else { 32 }))?, 1),
            block_dim: if by16 { (256, 1, 1) } else { (32, 8, 1) },
            shared_mem_bytes: 0,
        };
        if map.n_tiles > 0 && cols > 0 {
            let f = if by16 { &fe.transpose_seg16 } else { &fe.transpose_seg };
            launch!(fe, stream, f, cfg, [&src, &off, &len, &tiles, &ci, &dst]);
        }
        Ok(())
    }

    /// Quantizes `x` (`[rows, cols]` values of `dtype` on the device) with `spec` into the
    /// copies `usage` asks for, as the reference quantizer of the same spec does (its
    /// columnwise copy is the `[cols, rows]` tensor the GEMM reads).
    pub fn quantize(
        &mut self,
        spec: QuantSpec,
        x: &DeviceBuffer,
        dtype: Dtype,
        (rows, cols): (usize, usize),
        usage: Usage,
    ) -> Result<DeviceQuantized, GpuError> {
        x.addr(0, rows * cols * dtype.size_bytes(), "fp8 quantize input")?;
        match spec {
            QuantSpec::Current { format, options } => {
                let map = SegmentMap::new(self, &[rows])?;
                let q = self.quantize_segments(x, dtype, &map, cols, format, options, usage.columnwise)?;
                let inv_t = if usage.columnwise { Some(self.alloc(4)?) } else { None };
                let mut inv_t = inv_t;
                if let Some(b) = inv_t.as_mut() {
                    self.copy(b, 0, &q.scale_inv, 0, 4)?;
                }
                let SegmentedFp8 { codes, codes_t, scale_inv, .. } = q;
                Ok(DeviceQuantized {
                    rowwise: usage.rowwise.then_some(DeviceFp8 {
                        format,
                        rows,
                        cols,
                        codes,
                        scales: DeviceScales::PerTensor(scale_inv),
                    }),
                    columnwise: codes_t.zip(inv_t).map(|(c, s)| DeviceFp8 {
                        format,
                        rows: cols,
                        cols: rows,
                        codes: c,
                        scales: DeviceScales::PerTensor(s),
                    }),
                })
            }
            QuantSpec::Block { format, tile, options } => {
                let bp = |trans: bool| BlockParams::block(format, tile, options, dtype, trans);
                let rowwise = if usage.rowwise {
                    Some(self.block_quantize(x, dtype, (rows, cols), format, bp(false))?)
                } else {
                    None
                };
                let columnwise = if usage.columnwise {
                    Some(self.block_quantize(x, dtype, (rows, cols), format, bp(true))?)
                } else {
                    None
                };
                Ok(DeviceQuantized { rowwise, columnwise })
            }
            QuantSpec::Mxfp8 { format, block } => {
                moe_reference::fp8::mxfp8::check_mxfp8_shape("fp8 quantize input", [rows, cols])?;
                let [br, bc] = block.dims();
                let bp = |trans: bool| BlockParams {
                    tile_r: br as i32,
                    tile_c: bc as i32,
                    trans: i32::from(trans),
                    mode: 1,
                    max_norm_rcp: max_norm_rcp(format),
                    fp8_max: format.max_finite(),
                    ..BlockParams::default()
                };
                let rowwise = if usage.rowwise {
                    Some(self.block_quantize(x, dtype, (rows, cols), format, bp(false))?)
                } else {
                    None
                };
                let columnwise = if usage.columnwise {
                    Some(self.block_quantize(x, dtype, (rows, cols), format, bp(true))?)
                } else {
                    None
                };
                Ok(DeviceQuantized { rowwise, columnwise })
            }
        }
    }

    /// One `block_quant` launch: the logical tensor (`x` or `xᵀ`) in tiles of `bp`.
    fn block_quantize(
        &mut self,
        x: &DeviceBuffer,
        dtype: Dtype,
        (rows, cols): (usize, usize),
        format: Fp8Format,
        bp: BlockParams,
    ) -> Result<DeviceFp8, GpuError> {
        let xa = x.addr(0, rows * cols * dtype.size_bytes(), "fp8 quantize input")?;
        self.block_quantize_at(xa, dtype, (rows, cols), format, bp)
    }

    /// [`Engine::block_quantize`] of the `[rows, cols]` tensor at device address `xa` (checked
    /// by the caller to hold `rows·cols` elements of `dtype`).
    fn block_quantize_at(
        &mut self,
        xa: u64,
        dtype: Dtype,
        (rows, cols): (usize, usize),
        format: Fp8Format,
        bp: BlockParams,
    ) -> Result<DeviceFp8, GpuError> {
        let (r, c) = if bp.trans != 0 { (cols, rows) } else { (rows, cols) };
        let (tr, tc) = (bp.tile_r as usize, bp.tile_c as usize);
        let (gr, gc) = (r.div_ceil(tr), c.div_ceil(tc));
        let codes = self.alloc(r * c)?;
        let scale_bytes = if bp.mode == 0 { gr * gc * 4 } else { gr * gc };
        let scales = self.alloc(scale_bytes)?;
        let stream = self.stream.clone();
        let fe = self.fp8_engine()?;
        let co = codes.addr(0, r * c, "codes")?;
        let sa = scales.addr(0, scale_bytes, "scales")?;
        let (f32_scales, e8m0) = if bp.mode == 0 { (sa, 0u64) } else { (0u64, sa) };
        let (ri, ci) = (i32::try_from(rows)?, i32::try_from(cols)?);
        let block = |x: usize, y: usize| -> Result<LaunchConfig, GpuError> {
            Ok(LaunchConfig {
                grid_dim: (u32::try_from(x)?, u32::try_from(y)?, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        };
        if bp.mode == 0 && (tr, tc) == (1, 128) {
            // The activations' and gradients' 1×128 blocks: the coalesced kernels (same bits).
            let (f, cfg) = if bp.trans == 0 {
                (&fe.block128[0][dt_index(dtype)][fmt_index(format)], block(rows.div_ceil(8), cols.div_ceil(128))?)
            } else {
                (&fe.block128[1][dt_index(dtype)][fmt_index(format)], block(rows.div_ceil(128), cols.div_ceil(32))?)
            };
            launch!(fe, stream, f, cfg, [&xa, &ri, &ci, &bp, &co, &f32_scales]);
        } else {
            let cfg = block(gc, gr)?;
            launch!(
                fe,
                stream,
                &fe.block[dt_index(dtype)][fmt_index(format)],
                cfg,
                [&xa, &ri, &ci, &bp, &co, &f32_scales, &e8m0]
            );
        }
        let scales = if bp.mode == 0 {
            DeviceScales::Block { rows: tr, cols: tc, scale_inv: scales }
        } else {
            DeviceScales::E8m0 { rows: tr, cols: tc, exponents: scales }
        };
        Ok(DeviceFp8 { format, rows: r, cols: c, codes, scales })
    }

    /// `C[m, n] = s_a·s_b·(A·Bᵀ) + beta·C` through cuBLASLt: `A` fp8 `[m, k]` and `B` fp8
    /// `[n, k]` row-major (K contiguous: cuBLASLt's TN layout), `a_scale_inv`/`b_scale_inv` one
    /// f32 each on the device, `C` `[m, n]` row-major in `out_dt`, f32 accumulation, beta 0 or
    /// 1, `fast_accum` as TE's `use_split_accumulator = !fast_accum`. `k = 0` writes zeros
    /// (beta 0) or leaves `C` (beta 1); `m = 0` or `n = 0` writes nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn fp8_gemm(
        &mut self,
        dims: (usize, usize, usize),
        a: (Region<'_>, Fp8Format, Region<'_>),
        b: (Region<'_>, Fp8Format, Region<'_>),
        c: Region<'_>,
        out_dt: Dtype,
        beta: f32,
        fast_accum: bool,
    ) -> Result<(), GpuError> {
        let op = self.fp8_gemm_op(dims, a, b, c, out_dt, beta, fast_accum)?;
        self.run_fp8_ops(std::slice::from_ref(&op), Fp8Issue::Direct)
    }

    /// [`Engine::fp8_gemm`] checked but not issued: run it, with others, by
    /// [`Engine::run_fp8_ops`].
    #[allow(clippy::too_many_arguments)]
    pub fn fp8_gemm_op(
        &mut self,
        (m, n, k): (usize, usize, usize),
        a: (Region<'_>, Fp8Format, Region<'_>),
        b: (Region<'_>, Fp8Format, Region<'_>),
        c: Region<'_>,
        out_dt: Dtype,
        beta: f32,
        fast_accum: bool,
    ) -> Result<Fp8GemmOp, GpuError> {
        let c_addr = match prologue((m, n, k), (a.1, b.1), c, out_dt, beta, "fp8 GEMM")? {
            Prologue::Done(op) => return Ok(op),
            Prologue::Matmul(c_addr) => c_addr,
        };
        if !k.is_multiple_of(16) {
            return Err(GpuError::Unsupported(format!("fp8 GEMM: k = {k} is not a multiple of 16 (cuBLASLt fp8)")));
        }
        let a_op = a.0.operand(m * k, "fp8 GEMM operand A")?;
        let b_op = b.0.operand(n * k, "fp8 GEMM operand B")?;
        let (a_addr, b_addr) = (a_op.addr, b_op.addr);
        let sa = a.2.addr(4, "fp8 GEMM scale_inv A")?;
        let sb = b.2.addr(4, "fp8 GEMM scale_inv B")?;
        let context = format!(
            "fp8 GEMM (m, n, k) = ({m}, {n}, {k}), {}x{}, fast_accum {fast_accum}, beta {beta}, alignments A {} B {} C {} \
             scale_inv A {} B {}",
            a.1,
            b.1,
            alignment(a_addr),
            alignment(b_addr),
            alignment(c_addr),
            alignment(sa),
            alignment(sb)
        );
        let key = PlanKey {
            dims: (m, n, k),
            formats: (a.1, b.1),
            out: out_dt,
            fast_accum,
            beta_one: beta != 0.0,
            align: [alignment(a_addr), alignment(b_addr), alignment(c_addr)],
            block_modes: None,
        };
        Ok(Fp8GemmOp::matmul(key, (sa, sb), (a_op, b_op), c_addr, context))
    }

    /// Issues checked fp8 GEMMs on the engine's stream (ordered after the work queued before and
    /// before the work queued after): one by one, or ([`Fp8Issue::Graph`], two or more) as one
    /// CUDA graph captured on the first call with this exact list (shapes, pointers, scale
    /// pointers) and replayed on later ones, which removes the per-GEMM host cost of cuBLASLt;
    /// its GEMMs spread over `lanes` parallel branches (side streams, each with its own
    /// cuBLASLt workspace), the fp8 counterpart of [`crate::Strategy::Graph`]. Every way computes
    /// the same bits (each GEMM writes its own output). A capture that another thread's call invalidates (several engines share a device's
    /// primary context) is not cached; the list is then issued one by one.
    pub fn run_fp8_ops(&mut self, ops: &[Fp8GemmOp], issue: Fp8Issue) -> Result<(), GpuError> {
        let issue = match issue {
            Fp8Issue::Persistent if self.run_fp8_grouped(ops)? => return Ok(()),
            Fp8Issue::Auto if self.run_fp8_hybrid(ops)? => return Ok(()),
            Fp8Issue::Persistent | Fp8Issue::Auto => Fp8Issue::Graph { lanes: AUTO_FP8_LANES },
            other => other,
        };
        let (ctx, main) = (self.ctx.clone(), self.stream.clone());
        let fe = self.fp8_engine()?;
        match issue {
            Fp8Issue::Graph { lanes } if ops.iter().filter(|o| o.work != Fp8Work::Nothing).count() >= 2 => {
                fe.run_graph(&ctx, &main, ops, lanes)
            }
            _ => ops.iter().try_for_each(|op| fe.issue(op, main.cu_stream(), None)),
        }
    }

    /// [`Fp8Issue::Persistent`]: the per-tensor GEMMs of `ops` as launches of the fp8 grouped
    /// GEMM (`crate::persistent`), the memsets of empty contractions after them. `Ok(false)`,
    /// nothing issued, when the list has no GEMM, mixes formats, output dtypes or accumulation
    /// modes, has block-scaled GEMMs, an e5m2 B, an fp32 output, or a layout the kernel does not
    /// take.
    fn run_fp8_grouped(&mut self, ops: &[Fp8GemmOp]) -> Result<bool, GpuError> {
        let mut variant = None;
        let mut problems = Vec::with_capacity(ops.len());
        for op in ops {
            let Fp8Work::Matmul { key, scales, addrs, allocs } = op.work else { continue };
            if key.block_modes.is_some()
                || key.formats.1 != Fp8Format::E4M3
                || !matches!(key.out, Dtype::Bf16 | Dtype::F16)
            {
                return Ok(false);
            }
            let v = Fp8Variant {
                a_e5m2: key.formats.0 == Fp8Format::E5M2,
                out: key.out,
                split_accumulation: !key.fast_accum,
            };
            if variant.is_some_and(|seen| seen != v) {
                return Ok(false);
            }
            variant = Some(v);
            let (m, n, k) = key.dims;
            problems.push(Fp8Problem {
                m,
                n,
                k,
                a: Operand { addr: addrs.0, alloc: allocs.0 },
                b: Operand { addr: addrs.1, alloc: allocs.1 },
                c: addrs.2,
                scale_a: scales.0,
                scale_b: scales.1,
                accumulate: key.beta_one,
            });
        }
        let Some(variant) = variant else { return Ok(false) };
        if !self.run_fp8_persistent(variant, &problems)? {
            return Ok(false);
        }
        let main = self.stream.clone();
        let fe = self.fp8_engine()?;
        for op in ops.iter().filter(|o| matches!(o.work, Fp8Work::Zero { .. })) {
            fe.issue(op, main.cu_stream(), None)?;
        }
        Ok(true)
    }

    /// [`Fp8Issue::Auto`]'s kernel branch: where [`prefer_persistent`] says the list's experts are
    /// many and small, the GEMMs that fill the GPU alone for [`AUTO_HYBRID_WAVES`] waves
    /// ([`fills_gpu_alone`]) one by one on cuBLASLt and the rest as one fp8 grouped GEMM launch
    /// (the bf16 `Auto`'s hybrid split). `Ok(false)`, nothing issued, otherwise.
    fn run_fp8_hybrid(&mut self, ops: &[Fp8GemmOp]) -> Result<bool, GpuError> {
        let dims = |op: &Fp8GemmOp| match op.work {
            Fp8Work::Matmul { key, .. } => Some(GemmProblem::dims(key.dims.0, key.dims.1, key.dims.2)),
            _ => None,
        };
        let problems: Vec<Option<GemmProblem<()>>> = ops.iter().map(dims).collect();
        let Some(on_cublaslt) = auto_split(&problems, self.sm_count()) else {
            return Ok(false);
        };
        let (mut large, mut small) = (Vec::new(), Vec::new());
        for (op, on_cublaslt) in ops.iter().zip(on_cublaslt) {
            if on_cublaslt { &mut large } else { &mut small }.push(op.clone());
        }
        if !self.run_fp8_grouped(&small)? {
            return Ok(false);
        }
        let main = self.stream.clone();
        let fe = self.fp8_engine()?;
        large.iter().try_for_each(|op| fe.issue(op, main.cu_stream(), None))?;
        Ok(true)
    }

    /// Fp8 GEMM lists whose graph capture another thread invalidated (issued one by one).
    pub fn fp8_capture_fallbacks(&self) -> u64 {
        self.fp8.as_ref().map_or(0, |f| f.capture_fallbacks)
    }

    /// Chooses how the cuBLASLt fp8 GEMM plans made from now on pick their algorithm
    /// ([`LtAlgoChoice`]; the heuristic's first by default). Earlier plans and graphs are
    /// dropped. Loads the fp8 engine (compiles its kernels) when it is not loaded yet.
    pub fn set_fp8_algo_choice(&mut self, choice: LtAlgoChoice) -> Result<(), GpuError> {
        self.fp8_engine()?.set_algo_choice(choice);
        Ok(())
    }

    /// cuBLASLt calls made so far to time candidate algorithms under [`LtAlgoChoice::Tuned`].
    pub fn fp8_tuning_calls(&self) -> u64 {
        self.fp8.as_ref().map_or(0, |f| f.tuned_calls())
    }
}

/// [`Fp8Issue::Auto`]'s choice for a list of GEMMs (`None`: not a GEMM) on a GPU of `sms`
/// multiprocessors: `None` for a graph (few or large experts, [`prefer_persistent`]), else which
/// GEMMs go to cuBLASLt one by one ([`fills_gpu_alone`] for [`AUTO_HYBRID_WAVES`] waves; the
/// rest run on the fp8 grouped GEMM).
fn auto_split(problems: &[Option<GemmProblem<()>>], sms: usize) -> Option<Vec<bool>> {
    let gemms: Vec<GemmProblem<()>> = problems.iter().flatten().cloned().collect();
    prefer_persistent(&gemms).then(|| {
        problems.iter().map(|p| p.as_ref().is_some_and(|p| fills_gpu_alone(p, AUTO_HYBRID_WAVES, sms))).collect()
    })
}

/// The graph branches the fp8 GEMM lists of [`crate::Strategy::Auto`] get, and the fallback of
/// [`Fp8Issue::Persistent`] (docs/performance.md).
pub const AUTO_FP8_LANES: usize = 4;

/// How [`Engine::run_fp8_ops`] issues a list of fp8 GEMMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp8Issue {
    /// One cuBLASLt call after another on the engine's stream.
    Direct,
    /// One captured CUDA graph per list, its GEMMs over `lanes` parallel branches.
    Graph {
        /// Parallel branches (side streams); 0 or 1: one branch.
        lanes: usize,
    },
    /// The fp8 grouped GEMM (`kernels/grouped_gemm.cu`, Hopper): one launch for every per-tensor
    /// GEMM of the list (same formats, output dtype and accumulation). Lists the kernel does not
    /// take run as `Graph` with [`AUTO_FP8_LANES`] branches.
    Persistent,
    /// Chosen per list (docs/performance.md): many small experts ([`prefer_persistent`]) on the
    /// fp8 grouped GEMM, any expert that fills the GPU alone on cuBLASLt; else, and for lists the
    /// kernel does not take, `Graph` with [`AUTO_FP8_LANES`] branches.
    Auto,
}

/// One checked fp8 GEMM (or the memset of an empty contraction), ready to issue
/// ([`Engine::fp8_gemm_op`], [`Engine::fp8_block_gemm_op`], [`Engine::run_fp8_ops`]).
#[derive(Clone, Debug)]
pub struct Fp8GemmOp {
    work: Fp8Work,
    /// The GEMM's description, for errors.
    context: String,
}

impl Fp8GemmOp {
    /// A checked cuBLASLt matmul: `key` on operands `a` and `b` (device addresses inside their
    /// allocations), writing `C` at `c`, with the scale pointers `scales`.
    fn matmul(key: PlanKey, scales: (u64, u64), (a, b): (Operand, Operand), c: u64, context: String) -> Fp8GemmOp {
        Fp8GemmOp {
            work: Fp8Work::Matmul { key, scales, addrs: (a.addr, b.addr, c), allocs: (a.alloc, b.alloc) },
            context,
        }
    }
}

/// What an [`Fp8GemmOp`] does on the device (its identity in the graph cache).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Fp8Work {
    /// An empty output (`m = 0` or `n = 0`), or `k = 0` with beta 1.
    Nothing,
    /// `k = 0`, beta 0: `C` becomes exact zeros.
    Zero { c: u64, bytes: usize },
    /// A cuBLASLt matmul of `key` with these scale pointers and (A, B, C) addresses (A and B
    /// inside the allocations at `allocs`).
    Matmul { key: PlanKey, scales: (u64, u64), addrs: (u64, u64, u64), allocs: (u64, u64) },
}

/// What both fp8 GEMMs do before their own checks.
enum Prologue {
    /// Nothing to multiply: this op.
    Done(Fp8GemmOp),
    /// A real GEMM writing `C` at this address.
    Matmul(u64),
}

/// The checks and trivial cases both fp8 GEMMs share: an empty output writes nothing; `k = 0`
/// writes zeros (beta 0) or leaves `C` (beta 1); e5m2 x e5m2 is refused (cuBLASLt has no such
/// kernel); `C` must hold `[m, n]` of `out_dt`.
fn prologue(
    (m, n, k): (usize, usize, usize),
    formats: (Fp8Format, Fp8Format),
    c: Region<'_>,
    out_dt: Dtype,
    beta: f32,
    what: &str,
) -> Result<Prologue, GpuError> {
    let done = |work| Ok(Prologue::Done(Fp8GemmOp { work, context: what.to_string() }));
    if m == 0 || n == 0 {
        return done(Fp8Work::Nothing);
    }
    let bytes = m * n * out_dt.size_bytes();
    let c_addr = c.addr(bytes, &format!("{what} output C"))?;
    if k == 0 {
        return done(if beta == 0.0 { Fp8Work::Zero { c: c_addr, bytes } } else { Fp8Work::Nothing });
    }
    if formats == (Fp8Format::E5M2, Fp8Format::E5M2) {
        return Err(GpuError::Unsupported(format!("{what}: e5m2 x e5m2 is not supported by cuBLASLt")));
    }
    Ok(Prologue::Matmul(c_addr))
}

/// One operand of a block-scaled fp8 GEMM on the device: `[rows, k]` codes, K contiguous, and
/// their f32 `scale_inv` in the layout cuBLASLt reads (TE's GEMM-ready `Float8BlockwiseQTensor`
/// scales, `Float8BlockQuantizer.get_scale_shape`): 1×128 blocks `[ceil(k/128),
/// round_up(rows, 4)]`, 128×128 blocks `[ceil(rows/128), round_up(ceil(k/128), 4)]`, row-major
/// (padding zero).
#[derive(Debug)]
pub struct BlockOperand {
    /// Element format.
    pub format: Fp8Format,
    /// Rows (the GEMM's M or N).
    pub rows: usize,
    /// The reduction dimension K.
    pub k: usize,
    /// 1×128 or 128×128 blocks (along K: 1×128 blocks are 128 wide in K).
    pub tile: BlockTile,
    /// The codes, `[rows, k]` row-major.
    pub codes: DeviceBuffer,
    /// The scales, cuBLASLt's layout.
    pub scale_inv: DeviceBuffer,
}

impl BlockOperand {
    /// The `cublasLtMatmulMatrixScale_t` of the scales of `tile` blocks.
    fn scale_mode(tile: BlockTile) -> i32 {
        use lt_sys::cublasLtMatmulMatrixScale_t as S;
        match tile {
            BlockTile::Row1x128 => S::CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F as i32,
            BlockTile::Square128 => S::CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F as i32,
        }
    }

    /// The scale tensor's leading dimension and its number of f32 entries.
    fn scale_dims(tile: BlockTile, rows: usize, k: usize) -> (usize, usize) {
        let kb = k.div_ceil(BlockTile::LEN);
        match tile {
            BlockTile::Row1x128 => {
                let ld = rows.div_ceil(4) * 4;
                (ld, kb * ld)
            }
            BlockTile::Square128 => {
                let ld = kb.div_ceil(4) * 4;
                (ld, rows.div_ceil(BlockTile::LEN) * ld)
            }
        }
    }
}

/// A block operand in place: what [`Engine::fp8_block_gemm_op`] reads of a [`BlockOperand`],
/// or of one expert's operand inside a [`SegmentedBlockFp8`].
#[derive(Clone, Copy, Debug)]
pub struct BlockOperandRef<'a> {
    /// Element format.
    pub format: Fp8Format,
    /// Rows (the GEMM's M or N).
    pub rows: usize,
    /// The reduction dimension K.
    pub k: usize,
    /// 1×128 or 128×128 blocks.
    pub tile: BlockTile,
    /// The codes, `[rows, k]` row-major.
    pub codes: Region<'a>,
    /// The scales, cuBLASLt's layout ([`BlockOperand::scale_inv`]).
    pub scale_inv: Region<'a>,
}

impl BlockOperand {
    /// This operand as [`Engine::fp8_block_gemm_op`] reads it.
    pub fn as_ref(&self) -> BlockOperandRef<'_> {
        BlockOperandRef {
            format: self.format,
            rows: self.rows,
            k: self.k,
            tile: self.tile,
            codes: self.codes.at(0),
            scale_inv: self.scale_inv.at(0),
        }
    }
}

/// Every segment's (local expert's) 1×128 block operands of one `[rows, cols]` activation or
/// gradient tensor, made by one launch each way ([`Engine::block_quantize_segments_into`]):
/// segment `s` (`rows_s` rows from row `off_s`) has the rowwise operand `[rows_s, cols]`
/// (K = cols; codes at row `off_s` of `codes`) and the columnwise operand `[cols, rows_s]`
/// (K = rows_s, the re-quantization of its transpose; codes at byte `off_s·cols` of
/// `codes_t`), each with its scales in cuBLASLt's layout inside one buffer per direction:
/// the operands [`Engine::block_operands`] would make of each segment alone, bit for bit.
#[derive(Debug)]
pub struct SegmentedBlockFp8 {
    /// Element format.
    pub format: Fp8Format,
    /// Columns.
    pub cols: usize,
    lens: Vec<usize>,
    offsets: Vec<usize>,
    /// Rowwise codes `[rows, cols]`.
    pub codes: DeviceBuffer,
    /// Columnwise codes, segment by segment.
    pub codes_t: DeviceBuffer,
    /// Rowwise scales, segment by segment (f32, cuBLASLt's layout, padding zero).
    pub scale_inv: DeviceBuffer,
    /// Columnwise scales, segment by segment.
    pub scale_inv_t: DeviceBuffer,
    /// The first f32 of each segment's scales: rowwise, columnwise (host, and i64 on the device).
    scale_off: [Vec<usize>; 2],
    scale_off_dev: [DeviceBuffer; 2],
    /// The f32 scales of all segments: rowwise, columnwise.
    scale_len: [usize; 2],
}

impl SegmentedBlockFp8 {
    /// Buffers for the segments of `map`, `cols` wide, in `format`.
    pub fn alloc(eng: &mut Engine, map: &SegmentMap, cols: usize, format: Fp8Format) -> Result<Self, GpuError> {
        let tile = BlockTile::Row1x128;
        let mut scale_off = [Vec::new(), Vec::new()];
        let mut totals = [0usize; 2];
        for &l in &map.lens {
            // Rowwise: [l, cols] (K = cols); columnwise: [cols, l] (K = l).
            for (d, (rows, k)) in [(l, cols), (cols, l)].into_iter().enumerate() {
                scale_off[d].push(totals[d]);
                totals[d] += BlockOperand::scale_dims(tile, rows, k).1;
            }
        }
        let to_dev = |eng: &mut Engine, v: &[usize]| -> Result<DeviceBuffer, GpuError> {
            let bytes: Vec<u8> = v
                .iter()
                .map(|&o| i64::try_from(o))
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .flat_map(i64::to_le_bytes)
                .collect();
            // A segment-less map still gets an 8-byte buffer (the kernels never read it then).
            if bytes.is_empty() {
                eng.alloc(8)
            } else {
                eng.upload(&bytes)
            }
        };
        let scale_off_dev = [to_dev(eng, &scale_off[0])?, to_dev(eng, &scale_off[1])?];
        // The quantizers write every scale but the layouts' padding, which stays zero.
        let mut scale_inv = eng.alloc(totals[0].max(1) * 4)?;
        eng.fill_bytes(&mut scale_inv, 0)?;
        let mut scale_inv_t = eng.alloc(totals[1].max(1) * 4)?;
        eng.fill_bytes(&mut scale_inv_t, 0)?;
        Ok(SegmentedBlockFp8 {
            format,
            cols,
            lens: map.lens.clone(),
            offsets: map.offsets(),
            codes: eng.alloc(map.rows * cols)?,
            codes_t: eng.alloc(map.rows * cols)?,
            scale_inv,
            scale_inv_t,
            scale_off,
            scale_off_dev,
            scale_len: totals,
        })
    }

    /// Whether these buffers hold the segments of `map` (rows per segment, in order).
    pub fn fits(&self, map: &SegmentMap) -> bool {
        self.lens == map.lens
    }

    /// Segment `s`'s rowwise operand `[rows_s, cols]`.
    pub fn rowwise(&self, s: usize) -> Result<BlockOperandRef<'_>, GpuError> {
        let (l, off, so) = self.segment(s)?;
        Ok(BlockOperandRef {
            format: self.format,
            rows: l,
            k: self.cols,
            tile: BlockTile::Row1x128,
            codes: self.codes.at(off * self.cols),
            scale_inv: self.scale_inv.at(so[0] * 4),
        })
    }

    /// Segment `s`'s columnwise operand `[cols, rows_s]`.
    pub fn columnwise(&self, s: usize) -> Result<BlockOperandRef<'_>, GpuError> {
        let (l, off, so) = self.segment(s)?;
        Ok(BlockOperandRef {
            format: self.format,
            rows: self.cols,
            k: l,
            tile: BlockTile::Row1x128,
            codes: self.codes_t.at(off * self.cols),
            scale_inv: self.scale_inv_t.at(so[1] * 4),
        })
    }

    /// The device arguments of the kernels that fill these buffers for the segments of `map`
    /// (checked to be the ones they hold): the segments with the rowwise and with the
    /// columnwise scale offsets, and the addresses of the rowwise and columnwise codes and
    /// scales.
    fn kernel_args(&self, map: &SegmentMap, what: &str) -> Result<(BlockSegs, BlockSegs, [u64; 4]), GpuError> {
        if !self.fits(map) {
            return Err(GpuError::Shape(format!(
                "{what}: buffers for segments {:?}, asked for {:?}",
                self.lens, map.lens
            )));
        }
        let (rows, cols, segs) = (map.rows, self.cols, map.lens.len());
        let seg = |d: usize| map.block_segs(self.scale_off_dev[d].addr(0, segs.max(1) * 8, "scale offsets")?);
        let buffers = [
            self.codes.addr(0, rows * cols, "codes")?,
            self.codes_t.addr(0, rows * cols, "columnwise codes")?,
            self.scale_inv.addr(0, self.scale_len[0] * 4, "scales")?,
            self.scale_inv_t.addr(0, self.scale_len[1] * 4, "columnwise scales")?,
        ];
        Ok((seg(0)?, seg(1)?, buffers))
    }

    fn segment(&self, s: usize) -> Result<(usize, usize, [usize; 2]), GpuError> {
        match (self.lens.get(s), self.offsets.get(s)) {
            (Some(&l), Some(&off)) => Ok((l, off, [self.scale_off[0][s], self.scale_off[1][s]])),
            _ => Err(GpuError::Shape(format!("segmented block operands: no segment {s} of {}", self.lens.len()))),
        }
    }
}

impl Engine {
    /// The 1×128 block scaling of [`Engine::block_operands`] (activations and gradients, TE's
    /// `Float8BlockQuantizer` per expert) of every segment of `x` (`[rows, t.cols]` of
    /// `dtype`, the segments of `map`) into `t`: one rowwise and one columnwise launch for all
    /// segments (the scales' padding stays as `SegmentedBlockFp8::alloc` zeroed it), each
    /// segment's codes and scales those of that segment quantized alone.
    pub fn block_quantize_segments_into(
        &mut self,
        x: &DeviceBuffer,
        dtype: Dtype,
        map: &SegmentMap,
        options: ScaleOptions,
        t: &mut SegmentedBlockFp8,
    ) -> Result<(), GpuError> {
        let (rows_seg, cols_seg, [co, ct, si, st]) = t.kernel_args(map, "fp8 block quantize")?;
        let segs_by_dir = [rows_seg, cols_seg];
        let (rows, cols, format) = (map.rows, t.cols, t.format);
        let stream = self.stream.clone();
        let fe = self.fp8_engine()?;
        let xa = x.addr(0, rows * cols * dtype.size_bytes(), "fp8 block quantize input")?;
        let (ri, ci) = (i32::try_from(rows)?, i32::try_from(cols)?);
        let block = |x: usize, y: usize| -> Result<LaunchConfig, GpuError> {
            Ok(LaunchConfig {
                grid_dim: (u32::try_from(x)?, u32::try_from(y)?, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        };
        if block_tile_takes(cols) {
            // Both directions in one pass over x (`block_quant_both128_seg`).
            let bp = BlockParams::block(format, BlockTile::Row1x128, options, dtype, false);
            let (seg, col_off) = (segs_by_dir[0], segs_by_dir[1].scale_off);
            let f = &fe.block_both128_seg[dt_index(dtype)][fmt_index(format)];
            let cfg = LaunchConfig {
                shared_mem_bytes: u32::try_from(block_tile_smem(dtype))?,
                ..block(map.n_tiles128, cols.div_ceil(128))?
            };
            launch!(fe, stream, f, cfg, [&xa, &ci, &bp, &seg, &col_off, &co, &si, &ct, &st]);
            return Ok(());
        }
        for (d, trans) in [false, true].into_iter().enumerate() {
            let bp = BlockParams::block(format, BlockTile::Row1x128, options, dtype, trans);
            let seg = segs_by_dir[d];
            let f = &fe.block128_seg[d][dt_index(dtype)][fmt_index(format)];
            if trans {
                let cfg = block(map.n_tiles128, cols.div_ceil(32))?;
                launch!(fe, stream, f, cfg, [&xa, &ri, &ci, &bp, &seg, &ct, &st]);
            } else {
                let cfg = block(rows.div_ceil(8), cols.div_ceil(128))?;
                launch!(fe, stream, f, cfg, [&xa, &ri, &ci, &bp, &seg, &co, &si]);
            }
        }
        Ok(())
    }

    /// The forward activation of `cfg`'s class over the rows of `map` (as
    /// [`Engine::act_fwd_quantized`]: `a` `[rows, N1]`, SequentialMLP's fc1 bias `b1` added
    /// into `a` when given, `p` f32 per row, `u` `[rows, t.cols]`) with fc2's blockwise input
    /// quantized in the same pass: `u` and `t` end as the activation kernel then
    /// [`Engine::block_quantize_segments_into`]`(u, .., map, options, t)` leave them, bit for
    /// bit, without the two quantizer passes over `u` (1×128 blocks are local, so the codes
    /// need no amax of the whole tensor first). Widths the fused kernel does not take
    /// (`n2 % 4 != 0`) run the two steps.
    #[allow(clippy::too_many_arguments)]
    pub fn act_fwd_block_quantized(
        &mut self,
        cfg: &LayerConfig,
        a: &mut DeviceBuffer,
        b1: Option<&DeviceBuffer>,
        p: &DeviceBuffer,
        u: &mut DeviceBuffer,
        dtype: Dtype,
        map: &SegmentMap,
        options: ScaleOptions,
        t: &mut SegmentedBlockFp8,
    ) -> Result<(), GpuError> {
        let (ap, n2, segs) = (ActParams::of(cfg), t.cols, map.lens.len());
        let rows = (&map.row_seg, map.rows, segs);
        if !block_tile_takes(n2) {
            let Engine { kernels, stream, .. } = &mut *self;
            kernels.act_fwd(stream, dtype, ap, a, b1, p, rows, u, n2)?;
            return self.block_quantize_segments_into(u, dtype, map, options, t);
        }
        let (seg, cols_seg, [codes, codes_t, scale_inv, scale_inv_t]) = t.kernel_args(map, "fp8 block activation")?;
        let out = ActBlockOut {
            format: t.format,
            bp: BlockParams::block(t.format, BlockTile::Row1x128, options, dtype, false),
            seg,
            n_tiles: map.n_tiles128,
            col_scale_off: cols_seg.scale_off,
            codes,
            scale_inv,
            codes_t,
            scale_inv_t,
        };
        let Engine { kernels, stream, .. } = &mut *self;
        kernels.act_fwd_block_quantized(stream, dtype, ap, a, b1, p, rows, u, n2, out)
    }
}

impl Engine {
    /// Block scaling (TE's `Float8BlockQuantizer`, bit-exact with the reference
    /// [`BlockQuantizer`](moe_reference::fp8::BlockQuantizer)) of the `[rows, cols]` tensor of
    /// `dtype` at `x` into the two GEMM operands TE makes of it: the rowwise copy `[rows, cols]`
    /// (K = cols) and the columnwise copy `[cols, rows]` (K = rows; a re-quantization of `xᵀ`
    /// in the same tile shape), each with its scales in cuBLASLt's layout.
    pub fn block_operands(
        &mut self,
        x: Region<'_>,
        dtype: Dtype,
        (rows, cols): (usize, usize),
        format: Fp8Format,
        tile: BlockTile,
        options: ScaleOptions,
    ) -> Result<(BlockOperand, BlockOperand), GpuError> {
        let xa = x.addr(rows * cols * dtype.size_bytes(), "fp8 block operand input")?;
        let [tr, tc] = tile.dims();
        let bp = |trans: bool| BlockParams::block(format, tile, options, dtype, trans);
        let mut out = Vec::with_capacity(2);
        for trans in [false, true] {
            let q = self.block_quantize_at(xa, dtype, (rows, cols), format, bp(trans))?;
            let DeviceFp8 { rows: r, cols: k, codes, scales, .. } = q;
            let DeviceScales::Block { scale_inv: grid, .. } = scales else {
                return Err(GpuError::Shape("fp8 block quantization returned no f32 block scales".into()));
            };
            let (ld, len) = BlockOperand::scale_dims(tile, r, k);
            let mut scale_inv = self.alloc(len * 4)?;
            self.fill_bytes(&mut scale_inv, 0)?;
            let (gr, gc) = (r.div_ceil(tr), k.div_ceil(tc));
            let stream = self.stream.clone();
            let fe = self.fp8_engine()?;
            let (gi, si) = (grid.addr(0, gr * gc * 4, "block scales")?, scale_inv.addr(0, len * 4, "GEMM scales")?);
            let (gri, gci, ldi) = (i32::try_from(gr)?, i32::try_from(gc)?, i32::try_from(ld)?);
            let trans_layout = i32::from(tile == BlockTile::Row1x128);
            let blocks = (gr * gc).div_ceil(256).clamp(0, 1024) as u32;
            let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            launch!(fe, stream, &fe.block_scales_gemm, cfg, [&gi, &gri, &gci, &trans_layout, &ldi, &si]);
            out.push(BlockOperand { format, rows: r, k, tile, codes, scale_inv });
        }
        let columnwise = out.pop().ok_or_else(|| GpuError::Shape("fp8 block operands".into()))?;
        let rowwise = out.pop().ok_or_else(|| GpuError::Shape("fp8 block operands".into()))?;
        Ok((rowwise, columnwise))
    }

    /// `C[m, n] = A·Bᵀ + beta·C` with block-scaled fp8 operands (TE's blockwise GEMM on Hopper,
    /// cuBLASLt >= 12.9: `CUBLASLT_MATMUL_DESC_{A,B}_SCALE_MODE` = `VEC128_32F` for 1×128,
    /// `BLK128x128_32F` for 128×128; not both 128×128), f32 accumulation, `C` `[m, n]`
    /// row-major in `out_dt`, beta 0 or 1. `k = 0` writes zeros (beta 0) or leaves `C`.
    pub fn fp8_block_gemm(
        &mut self,
        a: &BlockOperand,
        b: &BlockOperand,
        c: Region<'_>,
        out_dt: Dtype,
        beta: f32,
    ) -> Result<(), GpuError> {
        let op = self.fp8_block_gemm_op(a, b, c, out_dt, beta)?;
        self.run_fp8_ops(std::slice::from_ref(&op), Fp8Issue::Direct)
    }

    /// [`Engine::fp8_block_gemm`] checked but not issued: run it, with others, by
    /// [`Engine::run_fp8_ops`].
    pub fn fp8_block_gemm_op(
        &mut self,
        a: &BlockOperand,
        b: &BlockOperand,
        c: Region<'_>,
        out_dt: Dtype,
        beta: f32,
    ) -> Result<Fp8GemmOp, GpuError> {
        self.fp8_block_gemm_op_at(a.as_ref(), b.as_ref(), c, out_dt, beta)
    }

    /// [`Engine::fp8_block_gemm_op`] of operands in place (one expert's operands inside a
    /// [`SegmentedBlockFp8`], or a [`BlockOperand`]'s).
    pub fn fp8_block_gemm_op_at(
        &mut self,
        a: BlockOperandRef<'_>,
        b: BlockOperandRef<'_>,
        c: Region<'_>,
        out_dt: Dtype,
        beta: f32,
    ) -> Result<Fp8GemmOp, GpuError> {
        let (m, n, k) = (a.rows, b.rows, a.k);
        if b.k != k {
            return Err(GpuError::Shape(format!("fp8 block GEMM: A has K = {k}, B has K = {}", b.k)));
        }
        let c_addr = match prologue((m, n, k), (a.format, b.format), c, out_dt, beta, "fp8 block GEMM")? {
            Prologue::Done(op) => return Ok(op),
            Prologue::Matmul(c_addr) => c_addr,
        };
        if a.tile == BlockTile::Square128 && b.tile == BlockTile::Square128 {
            return Err(GpuError::Unsupported(
                "fp8 block GEMM: 128x128 by 128x128 block scaling (cuBLASLt runs 1D x 1D, 1D x 2D, 2D x 1D)".into(),
            ));
        }
        if !k.is_multiple_of(16) || !m.is_multiple_of(8) || !n.is_multiple_of(8) {
            return Err(GpuError::Unsupported(format!(
                "fp8 block GEMM: (m, n, k) = ({m}, {n}, {k}) needs k a multiple of 16, m and n of 8 (cuBLASLt block scaling)"
            )));
        }
        let a_op = a.codes.operand(m * k, "fp8 block GEMM operand A")?;
        let b_op = b.codes.operand(n * k, "fp8 block GEMM operand B")?;
        let (a_addr, b_addr) = (a_op.addr, b_op.addr);
        let sa = a.scale_inv.addr(BlockOperand::scale_dims(a.tile, m, k).1 * 4, "fp8 block GEMM scales A")?;
        let sb = b.scale_inv.addr(BlockOperand::scale_dims(b.tile, n, k).1 * 4, "fp8 block GEMM scales B")?;
        let context = format!(
            "fp8 block GEMM (m, n, k) = ({m}, {n}, {k}), {} {:?} x {} {:?}, beta {beta}",
            a.format, a.tile, b.format, b.tile
        );
        let key = PlanKey {
            dims: (m, n, k),
            formats: (a.format, b.format),
            out: out_dt,
            fast_accum: false,
            beta_one: beta != 0.0,
            align: [alignment(a_addr), alignment(b_addr), alignment(c_addr)],
            block_modes: Some((BlockOperand::scale_mode(a.tile), BlockOperand::scale_mode(b.tile))),
        };
        Ok(Fp8GemmOp::matmul(key, (sa, sb), (a_op, b_op), c_addr, context))
    }
}

/// Plans kept per engine before the cache is emptied (a bench or test makes a few hundred).
const PLAN_CACHE_LIMIT: usize = 4096;

/// What a cuBLASLt fp8 plan depends on: shape, formats, output type, accumulation, beta and
/// the operands' alignments (the scale pointers are set per call).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PlanKey {
    dims: (usize, usize, usize),
    formats: (Fp8Format, Fp8Format),
    out: Dtype,
    fast_accum: bool,
    beta_one: bool,
    align: [u32; 3],
    /// Block scaling: the `cublasLtMatmulMatrixScale_t` of the row-major A and B (None:
    /// per-tensor scales).
    block_modes: Option<(i32, i32)>,
}

/// A cuBLASLt fp8 GEMM ready to run: descriptor, layouts and the heuristic's algorithm.
struct Plan {
    desc: lt_sys::cublasLtMatmulDesc_t,
    la: lt_sys::cublasLtMatrixLayout_t,
    lb: lt_sys::cublasLtMatrixLayout_t,
    lc: lt_sys::cublasLtMatrixLayout_t,
    algo: lt_sys::cublasLtMatmulAlgo_t,
    /// The heuristic's algorithms, first to last, until the plan is tuned (then empty).
    candidates: Vec<lt_sys::cublasLtMatmulAlgo_t>,
}

// SAFETY: the descriptors are plain cuBLASLt objects owned by one engine's plan cache, used only
// under the engine's `&mut self`, never concurrently.
unsafe impl Send for Plan {}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each object was created in `Plan::new` and is destroyed once, here.
        unsafe {
            let _ = lt::destroy_matmul_desc(self.desc);
            let _ = lt::destroy_matrix_layout(self.lc);
            let _ = lt::destroy_matrix_layout(self.lb);
            let _ = lt::destroy_matrix_layout(self.la);
        }
    }
}

impl Plan {
    /// Builds the plan of `key` (column-major view: `D[n, m] = op(A_lt)·op(B_lt)` with
    /// `A_lt` = B stored `[k, n]`, ld k, transposed, and `B_lt` = A stored `[k, m]`, ld k; D ld
    /// n), with the scale pointers `scales` = (A's, B's) set before the heuristic query, and the
    /// heuristic's first `count` algorithms as candidates (the first one chosen).
    fn new(
        handle: lt_sys::cublasLtHandle_t,
        key: &PlanKey,
        scales: (u64, u64),
        count: usize,
    ) -> Result<Plan, GpuError> {
        let (m, n, k) = key.dims;
        let lt_type = |f: Fp8Format| match f {
            Fp8Format::E4M3 => lt_sys::cudaDataType::CUDA_R_8F_E4M3,
            Fp8Format::E5M2 => lt_sys::cudaDataType::CUDA_R_8F_E5M2,
        };
        let out_type = match key.out {
            Dtype::F32 => lt_sys::cudaDataType::CUDA_R_32F,
            Dtype::Bf16 => lt_sys::cudaDataType::CUDA_R_16BF,
            Dtype::F16 => lt_sys::cudaDataType::CUDA_R_16F,
        };
        let (m64, n64, k64) = (m as u64, n as u64, k as u64);
        let la = lt::create_matrix_layout(lt_type(key.formats.1), k64, n64, k as i64).map_err(lt_err)?;
        let mut plan = Plan {
            desc: std::ptr::null_mut(),
            la,
            lb: std::ptr::null_mut(),
            lc: std::ptr::null_mut(),
            algo: lt_sys::cublasLtMatmulAlgo_t { data: [0; 8] },
            candidates: Vec::new(),
        };
        plan.lb = lt::create_matrix_layout(lt_type(key.formats.0), k64, m64, k as i64).map_err(lt_err)?;
        plan.lc = lt::create_matrix_layout(out_type, n64, m64, n as i64).map_err(lt_err)?;
        plan.desc =
            lt::create_matmul_desc(lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, lt_sys::cudaDataType::CUDA_R_32F)
                .map_err(lt_err)?;
        use lt_sys::cublasLtMatmulDescAttributes_t as A;
        // cublasOperation_t as i32: CUBLAS_OP_N = 0, CUBLAS_OP_T = 1.
        let (ta, tb) = (1i32, 0i32);
        plan.set(A::CUBLASLT_MATMUL_DESC_TRANSA, (&ta as *const i32).cast(), 4)?;
        plan.set(A::CUBLASLT_MATMUL_DESC_TRANSB, (&tb as *const i32).cast(), 4)?;
        let fast = i8::from(key.fast_accum);
        plan.set(A::CUBLASLT_MATMUL_DESC_FAST_ACCUM, (&fast as *const i8).cast(), 1)?;
        plan.set_scales(scales.0, scales.1)?;
        if let Some((mode_a, mode_b)) = key.block_modes {
            // The row-major A is cuBLASLt's B and the other way round.
            plan.set(A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, (&mode_b as *const i32).cast(), 4)?;
            plan.set(A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, (&mode_a as *const i32).cast(), 4)?;
        }
        let pref = lt::create_matmul_pref().map_err(lt_err)?;
        let found = (|| -> Result<Vec<lt_sys::cublasLtMatmulAlgo_t>, GpuError> {
            use lt_sys::cublasLtMatmulPreferenceAttributes_t as P;
            let wsb = LT_WORKSPACE as u64;
            // SAFETY: `pref` is a live preference; the attribute is a u64 byte count.
            unsafe {
                lt::set_matmul_pref_attribute(
                    pref,
                    P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    (&wsb as *const u64).cast(),
                    8,
                )
            }
            .map_err(lt_err)?;
            // The operands' real alignments (cuBLASLt otherwise assumes 256 bytes), as TE sets them.
            let [aa, ab, ac] = key.align;
            for (attr, bytes) in [
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, ab),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, aa),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, ac),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, ac),
            ] {
                // SAFETY: `pref` is a live preference; the attribute is a u32 byte count.
                unsafe { lt::set_matmul_pref_attribute(pref, attr, (&bytes as *const u32).cast(), 4) }
                    .map_err(lt_err)?;
            }
            // SAFETY: the descriptor, layouts and preference are live and describe the GEMM of `key`.
            unsafe { lt_algo::candidates(handle, plan.desc, [plan.la, plan.lb, plan.lc], pref, count, LT_WORKSPACE) }
                .map_err(|e| in_context(lt_err(e), "no algorithm (heuristic)", ""))
        })();
        // SAFETY: `pref` was created above and is destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(pref) };
        plan.candidates = found?;
        plan.algo = plan.candidates[0];
        Ok(plan)
    }

    /// Sets one attribute of the descriptor.
    fn set(&self, attr: lt_sys::cublasLtMatmulDescAttributes_t, p: *const c_void, size: usize) -> Result<(), GpuError> {
        // SAFETY: `desc` is a live descriptor; `p` points to `size` bytes of the attribute's
        // documented type, alive for the call.
        unsafe { lt::set_matmul_desc_attribute(self.desc, attr, p, size) }.map_err(lt_err)
    }

    /// Points the descriptor at this call's scales: `sa` of the row-major A (cuBLASLt's B),
    /// `sb` of B (cuBLASLt's A).
    fn set_scales(&self, sa: u64, sb: u64) -> Result<(), GpuError> {
        use lt_sys::cublasLtMatmulDescAttributes_t as A;
        self.set(A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, (&sb as *const u64).cast(), 8)?;
        self.set(A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, (&sa as *const u64).cast(), 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compiles `fp8.cu` where libnvrtc is loadable (no GPU needed) and checks each entry point
    /// the engine loads is in the PTX: a renamed kernel fails here rather than on the GPU.
    #[test]
    fn fp8_kernels_compile_with_nvrtc_for_sm_90() {
        if !crate::nvrtc::nvrtc_present() {
            crate::print_skip("SKIP gpu::fp8_kernels_compile_with_nvrtc_for_sm_90: libnvrtc not found");
            return;
        }
        let ptx = compile_fp8_kernels("sm_90").unwrap_or_else(|e| panic!("{e}"));
        let src = ptx.to_src();
        let mut names: Vec<String> = [
            "compute_scales",
            "transpose_seg_u8",
            "transpose_seg_u8x16",
            "block_scales_gemm",
            "delayed_scales",
            "delayed_record",
            "delayed_update",
        ]
        .map(String::from)
        .to_vec();
        for s in ["f32", "bf16", "f16"] {
            names.push(format!("amax_seg_{s}"));
            for f in ["e4m3", "e5m2"] {
                names.push(format!("cast_seg_{s}_{f}"));
                names.push(format!("block_quant_{s}_{f}"));
                names.push(format!("block_quant_row128_{s}_{f}"));
                names.push(format!("block_quant_col128_{s}_{f}"));
                names.push(format!("block_quant_row128_seg_{s}_{f}"));
                names.push(format!("block_quant_col128_seg_{s}_{f}"));
                names.push(format!("block_quant_both128_seg_{s}_{f}"));
                names.push(format!("cast_both_seg_{s}_{f}"));
            }
        }
        for name in names {
            assert!(src.contains(&format!(".entry {name}(")), "{name} missing from the PTX");
        }
    }
}

#[cfg(test)]
mod host_rule_tests {
    use super::{alignment, auto_split, transposes_by_16_bytes, GemmProblem};

    /// The 16-byte transpose takes only whole 16-row groups and 16-byte chunks: the layers'
    /// padded experts (multiples of 16 rows, widths multiples of 16), empty segments included;
    /// one ragged segment or a width off by 8 sends the call to the byte kernel (the 16-byte
    /// kernel would read and write across segment ends there).
    #[test]
    fn the_16_byte_transpose_takes_whole_16_row_groups_only() {
        assert!(transposes_by_16_bytes(272, &[16, 0, 48, 32, 80]));
        assert!(transposes_by_16_bytes(16, &[]));
        assert!(!transposes_by_16_bytes(80, &[0, 5, 17, 0, 48, 1]));
        assert!(!transposes_by_16_bytes(272, &[16, 8]));
        assert!(!transposes_by_16_bytes(24, &[16, 32]));
    }

    /// cuBLASLt is told each operand's real alignment (its largest power-of-two divisor, at
    /// most 256): an overstated one lets the heuristic pick a kernel the pointer cannot feed.
    /// `Auto`'s fp8 choice at the model shapes (132 SMs): Qwen3-30B-A3B's and GPT-OSS-120B's
    /// forward GEMMs (128 experts of 512 and 256 rows) go to the grouped kernel, with a Zipf
    /// split's one large expert (4096 rows of GPT-OSS fc1: 32 x 23 tiles) on cuBLASLt;
    /// Mixtral's (8 experts of 4096 rows) and DeepSeek-V3's (32 of 1024) stay on the graph.
    #[test]
    fn auto_takes_the_grouped_kernel_for_many_small_experts_only() {
        let list = |rows: &[usize], n: usize, k: usize| -> Vec<Option<GemmProblem<()>>> {
            rows.iter().map(|&m| Some(GemmProblem::dims(m, n, k))).collect()
        };
        assert_eq!(auto_split(&list(&[512; 128], 1536, 2048), 132), Some(vec![false; 128]));
        let mut zipf = vec![128; 127];
        zipf.insert(0, 4096);
        let split = auto_split(&list(&zipf, 5760, 2880), 132).expect("kernel");
        assert!(split[0] && split[1..].iter().all(|&l| !l), "{split:?}");
        assert_eq!(auto_split(&list(&[4096; 8], 28672, 4096), 132), None);
        assert_eq!(auto_split(&list(&[1024; 32], 4096, 7168), 132), None);
        // Memsets and empty outputs (no GEMM) are neither.
        let mut with_empty = list(&[512; 4], 1536, 2048);
        with_empty.push(None);
        assert_eq!(auto_split(&with_empty, 132), Some(vec![false; 5]));
    }

    #[test]
    fn alignment_is_the_largest_power_of_two_divisor_up_to_256() {
        assert_eq!(alignment(0x1000), 256);
        assert_eq!(alignment(0x1010), 16);
        assert_eq!(alignment(0x1008), 8);
        assert_eq!(alignment(0x1001), 1);
        assert_eq!(alignment(0x1080), 128);
        assert_eq!(alignment(0), 256);
    }
}
