//! The grouped-GEMM executor of the expert layers (issue 5): one row-major GEMM per expert,
//! `C_e[m_e, n_e] = op(A_e)·op(B_e)`, issued with a selectable [`Strategy`].
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
//! The row-major → column-major mapping is [`ColMajorGemm`], shared with [`Engine::gemm`].

use crate::error::GpuError;
use crate::kernels::{cuda_dtype, ColMajorGemm, Engine};
use cudarc::cublas::{result as cublas_result, sys as cublas_sys, CudaBlas};
use cudarc::driver::{sys as driver_sys, CudaEvent, CudaGraph, CudaSlice, CudaStream, DevicePtr};
use moe_reference::Dtype;
use std::collections::HashMap;
use std::sync::Arc;

/// cuBLAS workspace given to each side-stream handle (the Hopper default size): explicit, so
/// graph capture never allocates and algorithm choice matches the engine's main handle.
const LANE_WORKSPACE_BYTES: usize = 32 << 20;

/// [`Strategy::Auto`]'s [`Strategy::Hybrid`] threshold, in waves (issue 5 session 9,
/// interleaved rounds in docs/performance.md: on Qwen3-30B-A3B with Zipf routing Hybrid(2)
/// ran 2.5-4% faster than the persistent kernel alone and than Hybrid(4), in two device calls;
/// GPT-OSS-120B with Zipf routing within -1% to +5%).
const AUTO_HYBRID_WAVES: usize = 2;

/// Cached graphs / pointer arrays kept before the caches are flushed.
const CACHE_LIMIT: usize = 256;

/// One per-expert problem of a grouped GEMM: row-major `C[m, n] = op(A)·op(B)` with `A`
/// stored `[m, k]` (`[k, m]` when the call's `ta`), `B` stored `[k, n]` (`[n, k]` when `tb`)
/// and `C` compact `[m, n]`; pointers are device addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmProblem {
    /// Rows of `C` (tokens of the expert in fc1/fc2/dgrad; may be 0).
    pub m: usize,
    /// Columns of `C`.
    pub n: usize,
    /// Contraction length (tokens of the expert in wgrad; may be 0: `C` becomes 0).
    pub k: usize,
    /// `A`'s device address.
    pub a: u64,
    /// `B`'s device address.
    pub b: u64,
    /// `C`'s device address.
    pub c: u64,
}

impl GemmProblem {
    /// `2·m·n·k`.
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

/// How the per-expert GEMMs are issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// One `cublasGemmEx` per expert on the engine's stream (the baseline).
    Loop,
    /// The GEMMs spread over `s` side streams (longest-first onto the least-loaded stream),
    /// each with its own cuBLAS handle, forked from and joined back to the engine's stream.
    MultiStream(usize),
    /// [`Strategy::MultiStream`] with each stream's calls issued by its own host thread
    /// (spreads the per-GEMM host cost of cuBLAS and the driver over cores).
    Threads(usize),
    /// [`Strategy::MultiStream`] captured once into a CUDA graph, keyed by the whole problem
    /// list (pointers included), and replayed: removes the per-GEMM host launch cost when the
    /// same list recurs. A new list pays one capture + instantiate.
    Graph(usize),
    /// One `cublasGemmGroupedBatchedEx` call (device pointer arrays, cached per problem list;
    /// consecutive problems of equal shape share a group).
    GroupedBatched,
    /// The persistent Hopper grouped GEMM (`kernels/grouped_gemm.cu`, [`crate::persistent`]):
    /// one launch for all experts, output tiles 128 rows by `tile_n` columns (128 or 256; 0
    /// chooses per problem list). Falls back to [`Strategy::Auto`]'s cuBLAS choice for lists the
    /// kernel does not take (fp32, extents not multiples of 8, not a compute capability 9.0 GPU).
    Persistent(usize),
    /// Split by size: the problems that fill the GPU on their own for at least `waves` waves
    /// ([`crate::persistent::fills_gpu_alone`]) run one `cublasGemmEx` each on the engine's
    /// stream, the rest as [`Strategy::Auto`] would run a non-uniform list: one persistent-kernel
    /// launch where [`crate::persistent::prefer_persistent`] says so and the kernel takes the
    /// list, else cuBLAS over 4 streams. For skewed routing: cuBLAS's kernels are fastest on a
    /// large expert, and the small ones then overlap without it.
    Hybrid(usize),
    /// The layers' default, chosen per call from measurements (docs/performance.md): one
    /// `cublasGemmStridedBatchedEx` when every problem that computes has the same shape and
    /// evenly strided `A`, `B`, `C` (uniform routing); else, for many small experts
    /// ([`crate::persistent::prefer_persistent`]), [`Strategy::Hybrid`]`(2)`: the persistent
    /// kernel (where the list is eligible) with any expert that fills the GPU for 2 waves on
    /// its own taken out to cuBLAS; else [`Strategy::MultiStream`]`(4)` (not a graph: with
    /// routing that changes every step a graph would be re-captured per call, which measured no
    /// faster than issuing the streams directly).
    Auto,
}

impl Strategy {
    /// A short label (`loop`, `ms4`, `mt4`, `graph4`, `gbatched`, `persistent`,
    /// `persistent128`, `hybrid2`, `auto`).
    pub fn label(&self) -> String {
        match self {
            Strategy::Loop => "loop".into(),
            Strategy::MultiStream(s) => format!("ms{s}"),
            Strategy::Threads(s) => format!("mt{s}"),
            Strategy::Graph(s) => format!("graph{s}"),
            Strategy::GroupedBatched => "gbatched".into(),
            Strategy::Persistent(0) => "persistent".into(),
            Strategy::Persistent(n) => format!("persistent{n}"),
            Strategy::Hybrid(w) => format!("hybrid{w}"),
            Strategy::Auto => "auto".into(),
        }
    }

    /// Parses [`Strategy::label`].
    pub fn parse(s: &str) -> Option<Strategy> {
        match s {
            "loop" => Some(Strategy::Loop),
            "gbatched" => Some(Strategy::GroupedBatched),
            "auto" => Some(Strategy::Auto),
            "persistent" => Some(Strategy::Persistent(0)),
            _ => {
                if let Some(n) = s.strip_prefix("persistent") {
                    return n.parse().ok().filter(|n| crate::persistent::TILE_N.contains(n)).map(Strategy::Persistent);
                }
                if let Some(w) = s.strip_prefix("hybrid") {
                    return w.parse().ok().filter(|&w| w > 0).map(Strategy::Hybrid);
                }
                if let Some(n) = s.strip_prefix("ms") {
                    n.parse().ok().filter(|&n| n > 0).map(Strategy::MultiStream)
                } else if let Some(n) = s.strip_prefix("mt") {
                    n.parse().ok().filter(|&n| n > 0).map(Strategy::Threads)
                } else if let Some(n) = s.strip_prefix("graph") {
                    n.parse().ok().filter(|&n| n > 0).map(Strategy::Graph)
                } else {
                    None
                }
            }
        }
    }
}

/// A side stream with its own cuBLAS handle and workspace.
struct Lane {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    done: CudaEvent,
    _workspace: CudaSlice<u8>,
}

/// Streams and events of the multi-stream and graph strategies.
struct Lanes {
    lanes: Vec<Lane>,
    fork: CudaEvent,
    /// The stream graphs are captured on and replayed on (capture cannot use the legacy
    /// default stream the engine runs on).
    capture: Arc<CudaStream>,
    to_capture: CudaEvent,
    capture_done: CudaEvent,
}

/// A captured graph. `CudaGraph` holds raw driver handles and is not `Send`.
struct SendGraph(CudaGraph);

// SAFETY: a CUDA graph may be used from any thread as long as calls on it are serialized
// (driver docs, "Graph object thread safety"); every access goes through `Engine`, which
// lives behind the process-wide mutex of `engine()`.
unsafe impl Send for SendGraph {}

type ListKey = (Dtype, bool, bool, usize, Vec<GemmProblem>);

/// Lazily created state of the grouped executor, owned by the [`Engine`].
#[derive(Default)]
pub struct GroupedState {
    lanes: Option<Lanes>,
    lane_sm_target: i32,
    graphs: HashMap<ListKey, SendGraph>,
    pointer_arrays: HashMap<ListKey, CudaSlice<u64>>,
    /// The persistent kernels, loaded on first use (or why they cannot be).
    pub(crate) persistent: Option<Result<crate::persistent::PersistentKernels, String>>,
}

impl std::fmt::Debug for GroupedState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupedState")
            .field("lanes", &self.lanes.as_ref().map(|l| l.lanes.len()))
            .field("graphs", &self.graphs.len())
            .field("pointer_arrays", &self.pointer_arrays.len())
            .finish()
    }
}

/// What one problem needs done.
enum Work {
    Nothing,
    Zero { c: u64, bytes: usize },
    Gemm(ColMajorGemm),
}

fn classify(dt: Dtype, ta: bool, tb: bool, p: &GemmProblem) -> Result<Work, GpuError> {
    if p.m == 0 || p.n == 0 {
        return Ok(Work::Nothing);
    }
    if p.k == 0 {
        return Ok(Work::Zero { c: p.c, bytes: p.m * p.n * dt.size_bytes() });
    }
    Ok(Work::Gemm(ColMajorGemm::new(ta, tb, p.m, p.n, p.k, p.a, p.b, p.c)?))
}

/// `Some((stride_a, stride_b, stride_c))` in elements when the computing problems share one
/// shape and their pointers form arithmetic progressions (uniform routing), for
/// `cublasGemmStridedBatchedEx`.
fn uniform_strides(gemms: &[ColMajorGemm], ds: usize) -> Option<(i64, i64, i64)> {
    if gemms.len() < 2 {
        return None;
    }
    let f = gemms[0];
    if gemms.iter().any(|g| (g.m, g.n, g.k, g.transa, g.transb) != (f.m, f.n, f.k, f.transa, f.transb)) {
        return None;
    }
    let stride = |get: fn(&ColMajorGemm) -> u64| -> Option<i64> {
        let d = i64::try_from(get(&gemms[1])).ok()? - i64::try_from(get(&gemms[0])).ok()?;
        let ok = gemms
            .windows(2)
            .all(|w| matches!((i64::try_from(get(&w[1])), i64::try_from(get(&w[0]))), (Ok(x), Ok(y)) if x - y == d));
        let ds = i64::try_from(ds).ok()?;
        (ok && d % ds == 0).then_some(d / ds)
    };
    Some((stride(|g| g.a)?, stride(|g| g.b)?, stride(|g| g.c)?))
}

fn set_sm_target(blas: &CudaBlas, sms: i32) -> Result<(), GpuError> {
    // SAFETY: the handle is live (owned by `blas`); the call only sets a heuristic hint.
    unsafe { cublas_sys::cublasSetSmCountTarget(*blas.handle(), sms) }.result()?;
    Ok(())
}

/// Issues one lane's share on its stream (memsets for k = 0, `cublasGemmEx` otherwise).
fn issue_works(lane: &Lane, dt: Dtype, works: &[Work]) -> Result<(), GpuError> {
    for work in works {
        match work {
            Work::Nothing => {}
            Work::Zero { c, bytes } => {
                // SAFETY: `c` addresses the problem's compact `[m, n]` output of `dt` (caller
                // contract of `grouped_gemm`), `bytes` = m·n·size; ordered on the lane's stream,
                // which was forked from the origin stream.
                unsafe { cudarc::driver::result::memset_d8_async(*c, 0, *bytes, lane.stream.cu_stream()) }?;
            }
            // SAFETY: the pointers come from the caller's problem list (device addresses of
            // matrices of the documented shapes); the lane's handle is bound to its stream and
            // used by one thread at a time.
            Work::Gemm(g) => unsafe { g.gemm_ex(*lane.blas.handle(), dt, 0.0) }?,
        }
    }
    Ok(())
}

impl Engine {
    /// Runs the per-expert GEMMs `problems` (all in `dt`, transposes `ta`/`tb` as in
    /// [`Engine::gemm`]) with `strategy`; see the module docs for the `m = 0` / `k = 0`
    /// semantics. Asynchronous: ordered on the engine's stream like every other call.
    pub fn grouped_gemm(
        &mut self,
        strategy: Strategy,
        dt: Dtype,
        ta: bool,
        tb: bool,
        problems: &[GemmProblem],
    ) -> Result<(), GpuError> {
        match strategy {
            Strategy::Loop => {
                for p in problems {
                    self.gemm(dt, ta, tb, p.m, p.n, p.k, p.a, p.b, p.c, 0.0)?;
                }
                Ok(())
            }
            Strategy::MultiStream(s) | Strategy::Threads(s) => {
                self.ensure_lanes(s)?;
                let main = self.stream.clone();
                self.issue_lanes(s, dt, ta, tb, problems, &main, matches!(strategy, Strategy::Threads(_)))
            }
            Strategy::Graph(s) => self.graph(s, dt, ta, tb, problems),
            Strategy::GroupedBatched => self.grouped_batched(dt, ta, tb, problems),
            Strategy::Persistent(tile_n) => {
                if !self.persistent_gemm(tile_n, dt, ta, tb, problems)? {
                    self.grouped_gemm(Strategy::Auto, dt, ta, tb, problems)?;
                }
                Ok(())
            }
            Strategy::Hybrid(waves) => self.hybrid(waves, dt, ta, tb, problems),
            Strategy::Auto => {
                if self.strided_batched(dt, ta, tb, problems)? {
                    return Ok(());
                }
                if crate::persistent::prefer_persistent(problems) {
                    return self.hybrid(AUTO_HYBRID_WAVES, dt, ta, tb, problems);
                }
                self.ensure_lanes(4)?;
                let main = self.stream.clone();
                self.issue_lanes(4, dt, ta, tb, problems, &main, false)?;
                Ok(())
            }
        }
    }

    /// [`Strategy::Hybrid`]: the small problems (persistent kernel or cuBLAS on 4 streams), then
    /// each large one on cuBLAS, all ordered on the engine's stream.
    fn hybrid(
        &mut self,
        waves: usize,
        dt: Dtype,
        ta: bool,
        tb: bool,
        problems: &[GemmProblem],
    ) -> Result<(), GpuError> {
        let sms = self.sm_count();
        let (large, small): (Vec<GemmProblem>, Vec<GemmProblem>) =
            problems.iter().partition(|p| crate::persistent::fills_gpu_alone(p, waves, sms));
        let on_kernel = crate::persistent::prefer_persistent(&small) && self.persistent_gemm(0, dt, ta, tb, &small)?;
        if !small.is_empty() && !on_kernel {
            self.ensure_lanes(4)?;
            let main = self.stream.clone();
            self.issue_lanes(4, dt, ta, tb, &small, &main, false)?;
        }
        for p in &large {
            self.gemm(dt, ta, tb, p.m, p.n, p.k, p.a, p.b, p.c, 0.0)?;
        }
        Ok(())
    }

    /// Drops every cached graph and pointer array (benches use it to time a capture per call).
    pub fn clear_grouped_caches(&mut self) {
        self.grouped.graphs.clear();
        self.grouped.pointer_arrays.clear();
    }

    fn ensure_lanes(&mut self, s: usize) -> Result<(), GpuError> {
        if s == 0 {
            return Err(GpuError::Unsupported("a multi-stream strategy needs at least one stream".into()));
        }
        if self.grouped.lanes.is_none() {
            let capture = self.ctx.new_stream()?;
            self.grouped.lanes = Some(Lanes {
                lanes: Vec::new(),
                fork: self.ctx.new_event(None)?,
                capture,
                to_capture: self.ctx.new_event(None)?,
                capture_done: self.ctx.new_event(None)?,
            });
        }
        let have = self.grouped.lanes.as_ref().map_or(0, |l| l.lanes.len());
        if have >= s {
            return Ok(());
        }
        for _ in have..s {
            let stream = self.ctx.new_stream()?;
            let blas = CudaBlas::new(stream.clone())?;
            let workspace = self.stream.alloc_zeros::<u8>(LANE_WORKSPACE_BYTES)?;
            let wp = {
                let (wp, _sync) = workspace.device_ptr(&self.stream);
                wp
            };
            // SAFETY: `wp` addresses a live allocation of LANE_WORKSPACE_BYTES that the lane
            // keeps alive as long as its handle; the handle is used only on its own stream, so
            // no two kernels share the workspace concurrently. Set after `set_stream` (which
            // resets the workspace), as cuBLAS requires.
            unsafe {
                cublas_sys::cublasSetWorkspace_v2(*blas.handle(), wp as *mut std::ffi::c_void, LANE_WORKSPACE_BYTES)
            }
            .result()?;
            if self.grouped.lane_sm_target != 0 {
                set_sm_target(&blas, self.grouped.lane_sm_target)?;
            }
            let done = self.ctx.new_event(None)?;
            self.grouped.lanes.as_mut().expect("created above").lanes.push(Lane {
                stream,
                blas,
                done,
                _workspace: workspace,
            });
        }
        // The workspaces were allocated (zeroed) on the engine's stream; the side streams must
        // not touch them before that finished.
        self.stream.synchronize()?;
        Ok(())
    }

    /// Forks `s` lanes from `origin`, spreads the problems over them (longest first onto the
    /// least-loaded lane), joins them back into `origin`. Works while `origin` is capturing.
    /// `threaded`: each lane's calls are issued by its own (scoped) host thread.
    #[allow(clippy::too_many_arguments)]
    fn issue_lanes(
        &mut self,
        s: usize,
        dt: Dtype,
        ta: bool,
        tb: bool,
        problems: &[GemmProblem],
        origin: &Arc<CudaStream>,
        threaded: bool,
    ) -> Result<(), GpuError> {
        let mut order: Vec<usize> = (0..problems.len()).collect();
        order.sort_by(|&x, &y| problems[y].flops().total_cmp(&problems[x].flops()).then(x.cmp(&y)));
        let mut per_lane: Vec<Vec<Work>> = (0..s).map(|_| Vec::new()).collect();
        let mut load = vec![0.0f64; s];
        let mut issued = 0u64;
        for &i in &order {
            let p = &problems[i];
            let work = classify(dt, ta, tb, p)?;
            if matches!(work, Work::Nothing) {
                continue;
            }
            let (li, _) = load.iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1)).expect("s > 0");
            // A memset costs about as much as a small GEMM to issue; weigh it by its bytes.
            load[li] += p.flops().max((p.m * p.n) as f64);
            per_lane[li].push(work);
            issued += 1;
        }
        let l = self.grouped.lanes.as_ref().ok_or_else(|| GpuError::Unsupported("lanes not created".into()))?;
        let lanes = &l.lanes[..s];
        l.fork.record(origin)?;
        for lane in lanes {
            lane.stream.wait(&l.fork)?;
        }
        if threaded {
            let ctx = &self.ctx;
            std::thread::scope(|scope| {
                let handles: Vec<_> = lanes
                    .iter()
                    .zip(&per_lane)
                    .filter(|(_, w)| !w.is_empty())
                    .map(|(lane, works)| {
                        scope.spawn(move || -> Result<(), GpuError> {
                            ctx.bind_to_thread()?;
                            issue_works(lane, dt, works)
                        })
                    })
                    .collect();
                handles.into_iter().try_for_each(|h| h.join().expect("lane thread panicked"))
            })?;
        } else {
            for (lane, works) in lanes.iter().zip(&per_lane) {
                issue_works(lane, dt, works)?;
            }
        }
        for lane in lanes {
            lane.done.record(&lane.stream)?;
            origin.wait(&lane.done)?;
        }
        self.launches += issued;
        Ok(())
    }

    /// Sets cuBLAS's SM-count target (`cublasSetSmCountTarget`) on every side-stream handle,
    /// present and future: kernels are then chosen as if only `sms` multiprocessors were
    /// available (0 restores the device's count). For concurrent lanes, an experiment.
    pub fn set_lane_sm_count_target(&mut self, sms: usize) -> Result<(), GpuError> {
        self.grouped.lane_sm_target = i32::try_from(sms)?;
        if let Some(l) = &self.grouped.lanes {
            for lane in &l.lanes {
                set_sm_target(&lane.blas, self.grouped.lane_sm_target)?;
            }
        }
        Ok(())
    }

    fn graph(&mut self, s: usize, dt: Dtype, ta: bool, tb: bool, problems: &[GemmProblem]) -> Result<(), GpuError> {
        self.ensure_lanes(s)?;
        let key: ListKey = (dt, ta, tb, s, problems.to_vec());
        let main = self.stream.clone();
        let capture = self.grouped.lanes.as_ref().expect("ensured").capture.clone();
        {
            let l = self.grouped.lanes.as_ref().expect("ensured");
            l.to_capture.record(&main)?;
            capture.wait(&l.to_capture)?;
        }
        if !self.grouped.graphs.contains_key(&key) {
            if self.grouped.graphs.len() >= CACHE_LIMIT {
                self.grouped.graphs.clear();
            }
            capture.begin_capture(driver_sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)?;
            let issued = self.issue_lanes(s, dt, ta, tb, problems, &capture, false);
            let ended = capture.end_capture(driver_sys::CUgraphInstantiate_flags(0));
            issued?;
            let graph = ended?.ok_or_else(|| GpuError::Unsupported("stream capture produced no graph".into()))?;
            self.grouped.graphs.insert(key.clone(), SendGraph(graph));
        }
        self.grouped.graphs.get(&key).expect("inserted").0.launch()?;
        let l = self.grouped.lanes.as_ref().expect("ensured");
        l.capture_done.record(&capture)?;
        main.wait(&l.capture_done)?;
        self.launches += 1;
        Ok(())
    }

    fn grouped_batched(&mut self, dt: Dtype, ta: bool, tb: bool, problems: &[GemmProblem]) -> Result<(), GpuError> {
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
        // Groups: runs of equal (m, n, k); per-group host arrays, per-problem device pointers.
        let (mut ms, mut ns, mut ks, mut ldas, mut ldbs, mut ldcs, mut sizes) =
            (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
        for g in &gemms {
            if ms.last() == Some(&g.m) && ns.last() == Some(&g.n) && ks.last() == Some(&g.k) {
                *sizes.last_mut().expect("non-empty") += 1;
            } else {
                ms.push(g.m);
                ns.push(g.n);
                ks.push(g.k);
                ldas.push(g.lda);
                ldbs.push(g.ldb);
                ldcs.push(g.ldc);
                sizes.push(1i32);
            }
        }
        let groups = sizes.len();
        let count = gemms.len();
        let key: ListKey = (dt, ta, tb, 0, problems.to_vec());
        if !self.grouped.pointer_arrays.contains_key(&key) {
            if self.grouped.pointer_arrays.len() >= CACHE_LIMIT {
                self.grouped.pointer_arrays.clear();
            }
            let mut host: Vec<u64> = gemms.iter().map(|g| g.a).collect();
            host.extend(gemms.iter().map(|g| g.b));
            host.extend(gemms.iter().map(|g| g.c));
            let dev = self.stream.clone_htod(&host)?;
            self.grouped.pointer_arrays.insert(key.clone(), dev);
        }
        let base = {
            let arrays = self.grouped.pointer_arrays.get(&key).expect("inserted");
            let (base, _sync) = arrays.device_ptr(&self.stream);
            base
        };
        let ptr_bytes = std::mem::size_of::<u64>() as u64;
        let count_u64 = u64::try_from(count)?;
        let transa = vec![gemms[0].transa; groups];
        let transb = vec![gemms[0].transb; groups];
        let alpha = vec![1.0f32; groups];
        let beta = vec![0.0f32; groups];
        let cdt = cuda_dtype(dt);
        // SAFETY: the per-group arrays (transa..ldc, alpha/beta f32, sizes) are host arrays of
        // `groups` entries alive for the call (host pointer mode); the A/B/C pointer arrays are
        // `count` device u64 each, consecutive in one live device allocation (cuBLAS requires
        // device memory here: cudarc's safe GroupedGemm passes host arrays and faults); the
        // pointers they hold address matrices of the shapes given, per the caller contract;
        // `sum(sizes) == count`; the handle is bound to the engine's stream.
        unsafe {
            cublas_sys::cublasGemmGroupedBatchedEx(
                *self.blas.handle(),
                transa.as_ptr(),
                transb.as_ptr(),
                ms.as_ptr(),
                ns.as_ptr(),
                ks.as_ptr(),
                alpha.as_ptr().cast(),
                base as *const *const std::ffi::c_void,
                cdt,
                ldas.as_ptr(),
                (base + count_u64 * ptr_bytes) as *const *const std::ffi::c_void,
                cdt,
                ldbs.as_ptr(),
                beta.as_ptr().cast(),
                (base + 2 * count_u64 * ptr_bytes) as *const *mut std::ffi::c_void,
                cdt,
                ldcs.as_ptr(),
                i32::try_from(groups)?,
                sizes.as_ptr(),
                cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            )
        }
        .result()?;
        self.launches += 1;
        Ok(())
    }

    /// One `cublasGemmStridedBatchedEx` when [`uniform_strides`] applies (k = 0 problems are
    /// zeroed first); `false` (nothing issued) otherwise.
    fn strided_batched(&mut self, dt: Dtype, ta: bool, tb: bool, problems: &[GemmProblem]) -> Result<bool, GpuError> {
        let mut gemms = Vec::new();
        let mut zeros = Vec::new();
        for p in problems {
            match classify(dt, ta, tb, p)? {
                Work::Nothing => {}
                Work::Zero { c, bytes } => zeros.push((c, bytes)),
                Work::Gemm(g) => gemms.push(g),
            }
        }
        let Some((sa, sb, sc)) = uniform_strides(&gemms, dt.size_bytes()) else {
            return Ok(false);
        };
        for (c, bytes) in zeros {
            self.memset(c, 0, bytes)?;
        }
        let g = gemms[0];
        let alpha = 1.0f32;
        let beta = 0.0f32;
        let cdt = cuda_dtype(dt);
        // SAFETY: batch i's operands are at g.a + i·sa, g.b + i·sb, g.c + i·sc elements, which
        // `uniform_strides` checked are exactly the caller's problem pointers (device
        // addresses of matrices of the documented shapes); alpha/beta are host f32; the handle
        // is bound to the engine's stream.
        unsafe {
            cublas_result::gemm_strided_batched_ex(
                *self.blas.handle(),
                g.transa,
                g.transb,
                g.m,
                g.n,
                g.k,
                (&alpha as *const f32).cast(),
                g.a as *const std::ffi::c_void,
                cdt,
                g.lda,
                sa,
                g.b as *const std::ffi::c_void,
                cdt,
                g.ldb,
                sb,
                (&beta as *const f32).cast(),
                g.c as *mut std::ffi::c_void,
                cdt,
                g.ldc,
                sc,
                i32::try_from(gemms.len())?,
                cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }?;
        self.launches += 1;
        Ok(true)
    }

    /// Copies `bytes` bytes from device address `src` to `dst` on the engine's stream.
    pub fn copy_dtod(&mut self, dst: u64, src: u64, bytes: usize) -> Result<(), GpuError> {
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: callers pass addresses inside live allocations of this engine's context with
        // at least `bytes` bytes after each; the copy is ordered on the engine's stream.
        unsafe { cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategy_labels_round_trip() {
        for s in [
            Strategy::Loop,
            Strategy::MultiStream(4),
            Strategy::Graph(8),
            Strategy::Threads(2),
            Strategy::GroupedBatched,
            Strategy::Persistent(0),
            Strategy::Persistent(256),
            Strategy::Hybrid(2),
            Strategy::Auto,
        ] {
            assert_eq!(Strategy::parse(&s.label()), Some(s));
        }
        assert_eq!(Strategy::parse("persistent64"), None);
        assert_eq!(Strategy::parse("ms0"), None);
        assert_eq!(Strategy::parse("hybrid0"), None);
        assert_eq!(Strategy::parse("nope"), None);
    }

    fn p(m: usize, a: u64, b: u64, c: u64) -> ColMajorGemm {
        ColMajorGemm::new(false, true, m, 64, 32, a, b, c).expect("fits")
    }

    #[test]
    fn uniform_strides_only_for_even_progressions() {
        let even: Vec<_> =
            (0..4u64).map(|i| p(16, 1000 + i * 16 * 32 * 2, 9000 + i * 64 * 32 * 2, 50000 + i * 16 * 64 * 2)).collect();
        // cuBLAS A = our B (stride 64·32), B = our A (16·32), C (16·64), in elements.
        assert_eq!(uniform_strides(&even, 2), Some((64 * 32, 16 * 32, 16 * 64)));
        let mut ragged = even.clone();
        ragged[2] = p(32, ragged[2].b, ragged[2].a, ragged[2].c);
        assert_eq!(uniform_strides(&ragged, 2), None);
        let mut uneven = even.clone();
        uneven[3].c += 2;
        assert_eq!(uniform_strides(&uneven, 2), None);
        assert_eq!(uniform_strides(&even[..1], 2), None);
    }
}
