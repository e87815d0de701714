//! The side streams of the multi-stream and graph strategies: each lane a stream with its own
//! cuBLAS handle and workspace, forked from and joined back into an origin stream with events.

use super::{classify, RawProblem, Work};
use crate::error::GpuError;
use cudarc::cublas::{sys as cublas_sys, CudaBlas};
use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr};
use moe_reference::Dtype;
use std::sync::Arc;

/// cuBLAS workspace given to each side-stream handle (the Hopper default size): explicit, so
/// graph capture never allocates and algorithm choice matches the engine's main handle.
const LANE_WORKSPACE_BYTES: usize = 32 << 20;

/// A side stream with its own cuBLAS handle and workspace.
struct Lane {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    done: CudaEvent,
    _workspace: CudaSlice<u8>,
}

/// Streams and events of the multi-stream and graph strategies.
pub(super) struct Lanes {
    lanes: Vec<Lane>,
    fork: CudaEvent,
    /// The stream graphs are captured on and replayed on (capture cannot use the legacy
    /// default stream the engine runs on).
    pub(super) capture: Arc<CudaStream>,
    /// Orders the capture stream after the engine's stream.
    pub(super) to_capture: CudaEvent,
    /// Orders the engine's stream after a replay.
    pub(super) capture_done: CudaEvent,
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
                // SAFETY: `c` addresses the problem's compact `[m, n]` output of `dt`, checked
                // against its buffer by the engine, `bytes` = m·n·size; ordered on the lane's
                // stream, which was forked from the origin stream.
                unsafe { cudarc::driver::result::memset_d8_async(*c, 0, *bytes, lane.stream.cu_stream()) }?;
            }
            // SAFETY: the pointers are the problem's operands, checked against their buffers by
            // the engine (matrices of the problem's shape); the lane's handle is bound to its
            // stream and used by one thread at a time.
            Work::Gemm(g) => unsafe { g.gemm_ex(*lane.blas.handle(), dt, 0.0) }?,
        }
    }
    Ok(())
}

impl Lanes {
    /// The fork/join events and the capture stream; no lanes yet.
    pub(super) fn new(ctx: &Arc<CudaContext>) -> Result<Lanes, GpuError> {
        Ok(Lanes {
            lanes: Vec::new(),
            fork: ctx.new_event(None)?,
            capture: ctx.new_stream()?,
            to_capture: ctx.new_event(None)?,
            capture_done: ctx.new_event(None)?,
        })
    }

    /// Adds lanes up to `s` (their workspaces allocated on `main`, which is synchronized
    /// before a side stream may touch them); new handles get the SM-count target `sm_target`
    /// when it is not 0.
    pub(super) fn ensure(
        &mut self,
        ctx: &Arc<CudaContext>,
        main: &Arc<CudaStream>,
        s: usize,
        sm_target: i32,
    ) -> Result<(), GpuError> {
        if self.lanes.len() >= s {
            return Ok(());
        }
        for _ in self.lanes.len()..s {
            let stream = ctx.new_stream()?;
            let blas = CudaBlas::new(stream.clone())?;
            let workspace = main.alloc_zeros::<u8>(LANE_WORKSPACE_BYTES)?;
            let wp = {
                let (wp, _sync) = workspace.device_ptr(main);
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
            if sm_target != 0 {
                set_sm_target(&blas, sm_target)?;
            }
            let done = ctx.new_event(None)?;
            self.lanes.push(Lane { stream, blas, done, _workspace: workspace });
        }
        // The workspaces were allocated (zeroed) on the engine's stream; the side streams must
        // not touch them before that finished.
        main.synchronize()?;
        Ok(())
    }

    /// Sets cuBLAS's SM-count target on every lane's handle.
    pub(super) fn set_sm_target(&self, sms: i32) -> Result<(), GpuError> {
        self.lanes.iter().try_for_each(|lane| set_sm_target(&lane.blas, sms))
    }

    /// Forks the first `s` lanes from `origin`, spreads the problems over them (longest first
    /// onto the least-loaded lane), joins them back into `origin`. Works while `origin` is
    /// capturing. `threaded`: each lane's calls are issued by its own (scoped) host thread,
    /// with `ctx` bound. Returns the number of GEMMs and memsets issued.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn issue(
        &self,
        ctx: &Arc<CudaContext>,
        s: usize,
        dt: Dtype,
        (ta, tb): (bool, bool),
        problems: &[RawProblem],
        origin: &Arc<CudaStream>,
        threaded: bool,
    ) -> Result<u64, GpuError> {
        if self.lanes.len() < s {
            return Err(GpuError::Unsupported(format!("{s} lanes needed, {} created", self.lanes.len())));
        }
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
        let lanes = &self.lanes[..s];
        self.fork.record(origin)?;
        for lane in lanes {
            lane.stream.wait(&self.fork)?;
        }
        if threaded {
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
        Ok(issued)
    }
}
