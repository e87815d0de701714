//! How the cuBLASLt fp8 GEMM plans choose their algorithm: the heuristic's first (what TE and
//! PyTorch run), or the fastest of its first few timed on the GEMM's own operands when the plan
//! is made (PyTorch's TunableOp does the same for its GEMMs).

use crate::error::GpuError;
use cudarc::cublaslt::result::CublasError;
use cudarc::cublaslt::sys as lt_sys;
use cudarc::driver::result as dr;
use cudarc::driver::sys as ds;
use std::ffi::c_void;

/// How a cuBLASLt fp8 plan picks its algorithm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LtAlgoChoice {
    /// The heuristic's first algorithm (cuBLASLt's default; TE and PyTorch run it).
    #[default]
    Heuristic,
    /// The fastest of the heuristic's first `n` algorithms, each timed (one warm-up, then
    /// [`TUNE_REPS`] calls) on the first call's operands into a scratch output when the plan is
    /// made; the heuristic's first stays unless another is at least [`TUNE_MARGIN`] faster.
    /// Plans are per shape, so every later call of the shape (and every issue way of one engine)
    /// runs the chosen algorithm.
    Tuned(usize),
}

/// Timed calls per candidate algorithm.
pub const TUNE_REPS: usize = 5;

/// The relative speed-up a candidate needs over the heuristic's first to replace it.
pub const TUNE_MARGIN: f32 = 0.02;

/// The heuristic's first `count` algorithms for a described GEMM whose workspace fits
/// `workspace` bytes, in the heuristic's order; `NOT_SUPPORTED` when there is none.
///
/// # Safety
/// The handle, descriptor, layouts and preference are live cuBLASLt objects describing one GEMM.
pub(super) unsafe fn candidates(
    handle: lt_sys::cublasLtHandle_t,
    desc: lt_sys::cublasLtMatmulDesc_t,
    layouts: [lt_sys::cublasLtMatrixLayout_t; 3],
    pref: lt_sys::cublasLtMatmulPreference_t,
    count: usize,
    workspace: usize,
) -> Result<Vec<lt_sys::cublasLtMatmulAlgo_t>, CublasError> {
    let count = count.clamp(1, 64);
    let mut results: Vec<lt_sys::cublasLtMatmulHeuristicResult_t> = Vec::with_capacity(count);
    let mut returned = 0i32;
    let [la, lb, lc] = layouts;
    // SAFETY: `results` has room for `count` entries, the call writes at most `count` and says how
    // many in `returned`; the objects are live (the caller's contract).
    let status = unsafe {
        lt_sys::cublasLtMatmulAlgoGetHeuristic(
            handle,
            desc,
            la,
            lb,
            lc,
            lc,
            pref,
            count as i32,
            results.as_mut_ptr(),
            &mut returned,
        )
    };
    if status != lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        return Err(CublasError(status));
    }
    // SAFETY: the call initialized the first `returned` (≤ `count`) entries.
    unsafe { results.set_len((returned.max(0) as usize).min(count)) };
    let algos: Vec<_> = results
        .into_iter()
        .filter(|r| r.state == lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS && r.workspaceSize <= workspace)
        .map(|r| r.algo)
        .collect();
    if algos.is_empty() {
        return Err(CublasError(lt_sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED));
    }
    Ok(algos)
}

/// One GEMM to time: `D = alpha·op(A)·op(B) + beta·C` as the plan describes it, D a scratch
/// buffer of the plan's output size.
pub(super) struct TuneCall {
    pub handle: lt_sys::cublasLtHandle_t,
    pub desc: lt_sys::cublasLtMatmulDesc_t,
    /// cuBLASLt's A, B and C/D layouts.
    pub layouts: [lt_sys::cublasLtMatrixLayout_t; 3],
    /// cuBLASLt's A, B and C addresses.
    pub addrs: [u64; 3],
    /// Bytes of the output (C/D).
    pub out_bytes: usize,
    pub beta: f32,
    pub workspace: (u64, usize),
    pub stream: ds::CUstream,
}

/// The index into `algos` of the fastest (module doc; 0 unless another beats it by
/// [`TUNE_MARGIN`]), or the first error. Synchronizes `call.stream`.
pub(super) fn fastest(call: &TuneCall, algos: &[lt_sys::cublasLtMatmulAlgo_t]) -> Result<usize, GpuError> {
    if algos.len() < 2 {
        return Ok(0);
    }
    // SAFETY: a fresh allocation of the output's size, freed below on every path.
    let scratch = unsafe { dr::malloc_sync(call.out_bytes.max(1)) }?;
    let start = dr::event::create(ds::CUevent_flags::CU_EVENT_DEFAULT);
    let end = dr::event::create(ds::CUevent_flags::CU_EVENT_DEFAULT);
    let timed = match (start, end) {
        (Ok(s), Ok(e)) => time_each(call, algos, scratch, s, e),
        (Err(e), _) | (_, Err(e)) => Err(e.into()),
    };
    // SAFETY: the stream is synchronized (time_each ends with it, or failed, then we sync here)
    // before the scratch buffer and the events are released; each is released once.
    unsafe {
        let _ = dr::stream::synchronize(call.stream);
        let _ = dr::free_sync(scratch);
        if let Ok(s) = start {
            let _ = dr::event::destroy(s);
        }
        if let Ok(e) = end {
            let _ = dr::event::destroy(e);
        }
    }
    Ok(pick(&timed?))
}

/// The index of the fastest of `times` (ms per call, the heuristic's first at 0) if it beats the
/// first by [`TUNE_MARGIN`], else 0 (ties and noise keep the heuristic's choice).
fn pick(times: &[f32]) -> usize {
    let best = (0..times.len()).min_by(|&a, &b| times[a].total_cmp(&times[b])).unwrap_or(0);
    if times[best] < times[0] * (1.0 - TUNE_MARGIN) {
        best
    } else {
        0
    }
}

/// Milliseconds per call of each algorithm (an algorithm the GEMM refuses gets +inf).
fn time_each(
    call: &TuneCall,
    algos: &[lt_sys::cublasLtMatmulAlgo_t],
    scratch: u64,
    start: ds::CUevent,
    end: ds::CUevent,
) -> Result<Vec<f32>, GpuError> {
    let alpha = 1f32;
    let [la, lb, lc] = call.layouts;
    let [a, b, c] = call.addrs;
    let run = |algo: &lt_sys::cublasLtMatmulAlgo_t| {
        // SAFETY: the caller's operands are device ranges the plan's layouts describe; D is the
        // scratch buffer of the output's size (C is only read, so the caller's data is kept);
        // the workspace is the engine's, of the size given; ordered on the caller's stream.
        unsafe {
            lt_sys::cublasLtMatmul(
                call.handle,
                call.desc,
                (&alpha as *const f32).cast(),
                a as *const c_void,
                la,
                b as *const c_void,
                lb,
                (&call.beta as *const f32).cast(),
                c as *const c_void,
                lc,
                scratch as *mut c_void,
                lc,
                algo,
                call.workspace.0 as *mut c_void,
                call.workspace.1,
                call.stream as lt_sys::cudaStream_t,
            )
        }
    };
    let mut times = Vec::with_capacity(algos.len());
    for algo in algos {
        if run(algo) != lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            times.push(f32::INFINITY);
            continue;
        }
        // SAFETY: live events recorded on the caller's stream around the timed calls, read after
        // the end event completed.
        let ms = unsafe {
            dr::event::record(start, call.stream)?;
            for _ in 0..TUNE_REPS {
                run(algo);
            }
            dr::event::record(end, call.stream)?;
            dr::event::synchronize(end)?;
            dr::event::elapsed(start, end)?
        };
        times.push(ms / TUNE_REPS as f32);
    }
    Ok(times)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule that keeps the heuristic's algorithm unless another is clearly faster: a 1 %
    /// win is noise, a 5 % one replaces it, the fastest of several wins, and a refused
    /// algorithm (+inf) or a refused first never wins over a timed one.
    #[test]
    fn tuning_keeps_the_heuristic_first_unless_another_beats_it_by_the_margin() {
        assert_eq!(pick(&[1.0]), 0);
        assert_eq!(pick(&[1.0, 0.99]), 0, "a 1 % win is within the margin");
        assert_eq!(pick(&[1.0, 1.0 - TUNE_MARGIN]), 0, "a win of exactly the margin is not enough");
        assert_eq!(pick(&[1.0, 0.95]), 1);
        assert_eq!(pick(&[1.0, 0.95, 0.90, 0.97]), 2, "the fastest, not the first that wins");
        assert_eq!(pick(&[1.0, f32::INFINITY, 0.5]), 2);
        assert_eq!(pick(&[1.0, 1.2, f32::INFINITY]), 0);
        assert_eq!(pick(&[f32::INFINITY, 2.0]), 1, "a refused first loses to any timed one");
    }
}
