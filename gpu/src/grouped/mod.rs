//! The grouped-GEMM executor of the expert layers: one row-major GEMM per expert,
//! `C_e[m_e, n_e] = op(A_e)·op(B_e)`, issued with the [`Strategy`] the caller passes.
//!
//! Semantics, identical for every strategy:
//! * `m_e = 0` or `n_e = 0`: nothing is written.
//! * `k_e = 0` (an expert with no tokens in a weight-gradient GEMM): `C_e` is set to exact
//!   zeros by a memset, never left to cuBLAS or to the previous contents.
//! * otherwise `cublasGemmEx`-equivalent: alpha 1, beta 0, f32 accumulation (COMPUTE_32F).
//!
//! Every strategy is ordered on the engine's stream: work queued there before the call happens
//! before the GEMMs, and work queued after the call sees their results (side streams are
//! forked from and joined back to it with events).
//!
//! The executor owns what the strategies need: the engine stream's cuBLAS handle, the side
//! streams ([`lanes`]), the caches of captured graphs and device pointer arrays, and the
//! persistent kernels (loaded on first use). It works on problems whose operands the engine has
//! checked against their buffers ([`crate::memory::Operand`]).

mod cublas;
mod lanes;

use crate::error::GpuError;
use crate::gemm::{fills_gpu_alone, prefer_persistent, GemmProblem, Strategy, AUTO_HYBRID_WAVES};
use crate::memory::Operand;
use crate::persistent::{fp8_layout, persistent_layout, Fp8Problem, Fp8Variant, PersistentKernels};
use cublas::{uniform_strides, ColMajorGemm};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{sys as driver_sys, CudaContext, CudaGraph, CudaSlice, CudaStream, DevicePtr};
use lanes::Lanes;
use moe_reference::Dtype;
use std::collections::HashMap;
use std::sync::Arc;

/// Cached graphs / pointer arrays kept before the caches are flushed.
const CACHE_LIMIT: usize = 256;

/// A problem whose operands the engine checked against their buffers.
pub(crate) type RawProblem = GemmProblem<Operand>;

/// A captured graph. `CudaGraph` holds raw driver handles and is not `Send`.
pub(crate) struct SendGraph(pub(crate) CudaGraph);

// SAFETY: a CUDA graph may be used from any thread as long as calls on it are serialized
// (driver docs, "Graph object thread safety"); the graph is owned by one executor, whose every
// use takes `&mut self`, so calls on it never overlap.
unsafe impl Send for SendGraph {}

type ListKey = (Dtype, bool, bool, usize, Vec<RawProblem>);

/// What one problem needs done.
enum Work {
    Nothing,
    Zero { c: u64, bytes: usize },
    Gemm(ColMajorGemm),
}

fn classify(dt: Dtype, ta: bool, tb: bool, p: &RawProblem) -> Result<Work, GpuError> {
    if p.m == 0 || p.n == 0 {
        return Ok(Work::Nothing);
    }
    if p.k == 0 {
        return Ok(Work::Zero { c: p.c.addr, bytes: p.m * p.n * dt.size_bytes() });
    }
    Ok(Work::Gemm(ColMajorGemm::new(ta, tb, p.m, p.n, p.k, p.a.addr, p.b.addr, p.c.addr)?))
}

/// The grouped-GEMM executor of one engine (module docs).
pub(crate) struct GroupedExecutor {
    ctx: Arc<CudaContext>,
    /// The engine's stream: every call is ordered on it.
    stream: Arc<CudaStream>,
    /// The cuBLAS handle bound to the engine's stream.
    blas: CudaBlas,
    sms: usize,
    lanes: Option<Lanes>,
    lane_sm_target: i32,
    graphs: HashMap<ListKey, SendGraph>,
    pointer_arrays: HashMap<ListKey, CudaSlice<u64>>,
    /// The persistent kernels, loaded on first use (or why they cannot be).
    persistent: Option<Result<PersistentKernels, String>>,
    /// Graph captures another thread invalidated (their lists were issued directly).
    pub(crate) capture_fallbacks: u64,
    launches: u64,
    /// Launches of the fp8 grouped GEMM (also counted in `launches`).
    fp8_launches: u64,
}

impl std::fmt::Debug for GroupedExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupedExecutor")
            .field("graphs", &self.graphs.len())
            .field("pointer_arrays", &self.pointer_arrays.len())
            .field("launches", &self.launches)
            .finish()
    }
}

impl GroupedExecutor {
    /// An executor on `stream` (of `ctx`, a device of `sms` multiprocessors).
    pub(crate) fn new(ctx: Arc<CudaContext>, stream: Arc<CudaStream>, sms: usize) -> Result<Self, GpuError> {
        let blas = CudaBlas::new(stream.clone())?;
        Ok(GroupedExecutor {
            ctx,
            stream,
            blas,
            sms,
            lanes: None,
            lane_sm_target: 0,
            graphs: HashMap::new(),
            pointer_arrays: HashMap::new(),
            persistent: None,
            capture_fallbacks: 0,
            launches: 0,
            fp8_launches: 0,
        })
    }

    /// cuBLAS calls, kernel launches, graph replays and memsets issued so far.
    pub(crate) fn launches(&self) -> u64 {
        self.launches
    }

    /// Fills `bytes` bytes at `addr` with `byte` on the engine's stream (counted).
    fn memset(&mut self, addr: u64, byte: u8, bytes: usize) -> Result<(), GpuError> {
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: `addr` is the output of a problem the engine checked against its buffer,
        // with `bytes` = its m·n·size; the memset is ordered on the engine's stream.
        unsafe { cudarc::driver::result::memset_d8_async(addr, byte, bytes, self.stream.cu_stream()) }?;
        self.launches += 1;
        Ok(())
    }

    /// One GEMM on the engine's stream with `beta` (host f32): `C = op(A)·op(B) + beta·C`;
    /// `k = 0` with `beta = 0` writes exact zeros (by memset, not relying on cuBLAS).
    pub(crate) fn gemm(&mut self, dt: Dtype, ta: bool, tb: bool, p: &RawProblem, beta: f32) -> Result<(), GpuError> {
        match classify(dt, ta, tb, p)? {
            Work::Nothing => Ok(()),
            Work::Zero { c, bytes } if beta == 0.0 => self.memset(c, 0, bytes),
            Work::Zero { .. } => Ok(()),
            Work::Gemm(g) => {
                // SAFETY: the operands were checked against their buffers by the engine
                // (matrices of the problem's shape); the handle is bound to the engine's stream.
                unsafe { g.gemm_ex(*self.blas.handle(), dt, beta) }?;
                self.launches += 1;
                Ok(())
            }
        }
    }

    /// Runs the per-expert GEMMs `problems` with `strategy` (module docs for the semantics).
    pub(crate) fn run(
        &mut self,
        strategy: Strategy,
        dt: Dtype,
        ta: bool,
        tb: bool,
        problems: &[RawProblem],
    ) -> Result<(), GpuError> {
        match strategy {
            Strategy::Loop => problems.iter().try_for_each(|p| self.gemm(dt, ta, tb, p, 0.0)),
            Strategy::MultiStream(s) | Strategy::Threads(s) => {
                self.issue_lanes(s, dt, (ta, tb), problems, matches!(strategy, Strategy::Threads(_)))
            }
            Strategy::Graph(s) => self.graph(s, dt, ta, tb, problems),
            Strategy::GroupedBatched => self.grouped_batched(dt, ta, tb, problems),
            Strategy::Persistent(tile_n) => {
                if !self.persistent(tile_n, dt, ta, tb, problems)? {
                    self.run(Strategy::Auto, dt, ta, tb, problems)?;
                }
                Ok(())
            }
            Strategy::Hybrid(waves) => self.hybrid(waves, dt, ta, tb, problems),
            Strategy::Auto => {
                if self.strided_batched(dt, ta, tb, problems)? {
                    return Ok(());
                }
                if prefer_persistent(problems) {
                    return self.hybrid(AUTO_HYBRID_WAVES, dt, ta, tb, problems);
                }
                self.issue_lanes(4, dt, (ta, tb), problems, false)
            }
        }
    }

    /// [`Strategy::Hybrid`]: the small problems (persistent kernel or cuBLAS on 4 streams), then
    /// each large one on cuBLAS, all ordered on the engine's stream.
    fn hybrid(&mut self, waves: usize, dt: Dtype, ta: bool, tb: bool, problems: &[RawProblem]) -> Result<(), GpuError> {
        let (large, small): (Vec<RawProblem>, Vec<RawProblem>) =
            problems.iter().partition(|p| fills_gpu_alone(p, waves, self.sms));
        let on_kernel = prefer_persistent(&small) && self.persistent(0, dt, ta, tb, &small)?;
        if !small.is_empty() && !on_kernel {
            self.issue_lanes(4, dt, (ta, tb), &small, false)?;
        }
        large.iter().try_for_each(|p| self.gemm(dt, ta, tb, p, 0.0))
    }

    /// Runs `problems` on the persistent kernel (loaded on first use). `Ok(false)`, nothing
    /// issued, when the list is not eligible or the GPU cannot run the kernel.
    fn persistent(
        &mut self,
        tile_n: usize,
        dt: Dtype,
        ta: bool,
        tb: bool,
        problems: &[RawProblem],
    ) -> Result<bool, GpuError> {
        let Ok(layout) = persistent_layout(dt, ta, tb, problems) else {
            return Ok(false);
        };
        if self.persistent.is_none() {
            self.persistent = Some(PersistentKernels::load(&self.ctx).map_err(|e| e.to_string()));
        }
        let Some(Ok(kernels)) = &self.persistent else {
            return Ok(false);
        };
        self.launches += kernels.run(&self.stream, tile_n, dt, (ta, tb), problems, &layout)?;
        Ok(true)
    }

    /// Runs the per-tensor fp8 GEMMs `problems` on the fp8 grouped GEMM (loaded on first use,
    /// with the bf16 kernels). `Ok(false)`, nothing issued, when the list is not eligible
    /// ([`fp8_layout`]) or the GPU cannot run the kernel.
    pub(crate) fn run_fp8_persistent(
        &mut self,
        variant: Fp8Variant,
        problems: &[Fp8Problem],
    ) -> Result<bool, GpuError> {
        let Ok(layout) = fp8_layout(problems) else {
            return Ok(false);
        };
        if self.persistent.is_none() {
            self.persistent = Some(PersistentKernels::load(&self.ctx).map_err(|e| e.to_string()));
        }
        let Some(Ok(kernels)) = &self.persistent else {
            return Ok(false);
        };
        let n = kernels.run_fp8(&self.stream, variant, problems, &layout)?;
        self.launches += n;
        self.fp8_launches += n;
        Ok(true)
    }

    /// Launches of the fp8 grouped GEMM so far.
    pub(crate) fn fp8_launches(&self) -> u64 {
        self.fp8_launches
    }

    /// Drops every cached graph and pointer array (benches use it to time a capture per call).
    pub(crate) fn clear_caches(&mut self) {
        self.graphs.clear();
        self.pointer_arrays.clear();
    }

    /// The side streams, at least `s` of them.
    fn ensure_lanes(&mut self, s: usize) -> Result<&Lanes, GpuError> {
        if s == 0 {
            return Err(GpuError::Unsupported("a multi-stream strategy needs at least one stream".into()));
        }
        if self.lanes.is_none() {
            self.lanes = Some(Lanes::new(&self.ctx)?);
        }
        let lanes = self.lanes.as_mut().expect("created above");
        lanes.ensure(&self.ctx, &self.stream, s, self.lane_sm_target)?;
        Ok(lanes)
    }

    /// The problems over `s` side streams forked from and joined back into the engine's stream.
    fn issue_lanes(
        &mut self,
        s: usize,
        dt: Dtype,
        transposes: (bool, bool),
        problems: &[RawProblem],
        threaded: bool,
    ) -> Result<(), GpuError> {
        self.ensure_lanes(s)?;
        let lanes = self.lanes.as_ref().expect("ensured");
        self.launches += lanes.issue(&self.ctx, s, dt, transposes, problems, &self.stream, threaded)?;
        Ok(())
    }

    /// Sets cuBLAS's SM-count target (`cublasSetSmCountTarget`) on every side-stream handle,
    /// present and future: kernels are then chosen as if only `sms` multiprocessors were
    /// available (0 restores the device's count). For concurrent lanes, an experiment.
    pub(crate) fn set_lane_sm_count_target(&mut self, sms: usize) -> Result<(), GpuError> {
        self.lane_sm_target = i32::try_from(sms)?;
        if let Some(lanes) = &self.lanes {
            lanes.set_sm_target(self.lane_sm_target)?;
        }
        Ok(())
    }

    fn graph(&mut self, s: usize, dt: Dtype, ta: bool, tb: bool, problems: &[RawProblem]) -> Result<(), GpuError> {
        self.ensure_lanes(s)?;
        let key: ListKey = (dt, ta, tb, s, problems.to_vec());
        let lanes = self.lanes.as_ref().expect("ensured");
        let capture = lanes.capture.clone();
        lanes.to_capture.record(&self.stream)?;
        capture.wait(&lanes.to_capture)?;
        if !self.graphs.contains_key(&key) {
            if self.graphs.len() >= CACHE_LIMIT {
                self.graphs.clear();
            }
            capture.begin_capture(driver_sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)?;
            let issued = lanes.issue(&self.ctx, s, dt, (ta, tb), problems, &capture, false);
            let ended = capture.end_capture(driver_sys::CUgraphInstantiate_flags(0));
            if let Err(e) = &ended {
                if e.0 == driver_sys::cudaError_enum::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED {
                    // Another thread's call on the device's shared primary context broke the
                    // capture (nothing captured ran): issue the list on the lanes directly, from
                    // the engine's stream, and cache nothing.
                    self.capture_fallbacks += 1;
                    let direct = lanes.issue(&self.ctx, s, dt, (ta, tb), problems, &self.stream, false)?;
                    self.launches += direct;
                    return Ok(());
                }
            }
            self.launches += issued?;
            let graph = ended?.ok_or_else(|| GpuError::Unsupported("stream capture produced no graph".into()))?;
            self.graphs.insert(key.clone(), SendGraph(graph));
        }
        self.graphs.get(&key).expect("inserted").0.launch()?;
        lanes.capture_done.record(&capture)?;
        self.stream.wait(&lanes.capture_done)?;
        self.launches += 1;
        Ok(())
    }

    fn grouped_batched(&mut self, dt: Dtype, ta: bool, tb: bool, problems: &[RawProblem]) -> Result<(), GpuError> {
        let mut gemms = Vec::new();
        for p in problems {
            match classify(dt, ta, tb, p)? {
                Work::Nothing => {}
                Work::Zero { c, bytes } => self.memset(c, 0, bytes)?,
                Work::Gemm(g) => gemms.push(g),
            }
        }
        if gemms.is_empty() {
            return Ok(());
        }
        let key: ListKey = (dt, ta, tb, 0, problems.to_vec());
        if !self.pointer_arrays.contains_key(&key) {
            if self.pointer_arrays.len() >= CACHE_LIMIT {
                self.pointer_arrays.clear();
            }
            let mut host: Vec<u64> = gemms.iter().map(|g| g.a).collect();
            host.extend(gemms.iter().map(|g| g.b));
            host.extend(gemms.iter().map(|g| g.c));
            let dev = self.stream.clone_htod(&host)?;
            self.pointer_arrays.insert(key.clone(), dev);
        }
        let base = {
            let arrays = self.pointer_arrays.get(&key).expect("inserted");
            let (base, _sync) = arrays.device_ptr(&self.stream);
            base
        };
        // SAFETY: `base` is a live device array holding the `gemms`' a, then b, then c pointers
        // (uploaded above or cached under the same problem list), whose operands the engine
        // checked against their buffers; the handle is bound to the engine's stream.
        unsafe { cublas::grouped_batched(*self.blas.handle(), dt, &gemms, base) }?;
        self.launches += 1;
        Ok(())
    }

    /// One `cublasGemmStridedBatchedEx` when [`uniform_strides`] applies (k = 0 problems are
    /// zeroed first); `false` (nothing issued) otherwise.
    fn strided_batched(&mut self, dt: Dtype, ta: bool, tb: bool, problems: &[RawProblem]) -> Result<bool, GpuError> {
        let mut gemms = Vec::new();
        let mut zeros = Vec::new();
        for p in problems {
            match classify(dt, ta, tb, p)? {
                Work::Nothing => {}
                Work::Zero { c, bytes } => zeros.push((c, bytes)),
                Work::Gemm(g) => gemms.push(g),
            }
        }
        let Some(strides) = uniform_strides(&gemms, dt.size_bytes()) else {
            return Ok(false);
        };
        for (c, bytes) in zeros {
            self.memset(c, 0, bytes)?;
        }
        // SAFETY: `strides` are `uniform_strides` of these gemms, whose operands the engine
        // checked against their buffers; the handle is bound to the engine's stream.
        unsafe { cublas::strided_batched(*self.blas.handle(), dt, &gemms, strides) }?;
        self.launches += 1;
        Ok(true)
    }
}
