//! One device's CUDA state: [`Engine`] (context, stream, the expert kernels, the grouped-GEMM
//! executor), reached through [`Gpu`], a cloneable handle the layers hold. Every engine is
//! created by [`Gpu::new`] for one device ordinal; nothing is process-wide.
//!
//! Single-stream design: every allocation, copy, kernel and GEMM of an engine is ordered on its
//! stream (the grouped executor forks side streams from it and joins them back), so cudarc's
//! cross-stream event tracking is turned off.

use crate::error::GpuError;
use crate::gemm::{GemmProblem, Strategy};
use crate::grouped::{GroupedExecutor, RawProblem};
use crate::kernels::ExpertKernels;
use crate::memory::{DeviceBuffer, Region};
use cudarc::driver::{sys as driver_sys, CudaContext, CudaStream};
use moe_reference::Dtype;
use std::sync::{Arc, Mutex, MutexGuard};

/// Checks for a CUDA driver and a device `ordinal` *before* any context is created (dynamic
/// loading panics on a missing `libcuda`).
pub fn probe(ordinal: usize) -> Result<(), GpuError> {
    // SAFETY: `is_culib_present` only tries to dlopen the driver library by name.
    if !unsafe { driver_sys::is_culib_present() } {
        return Err(GpuError::NoDevice("libcuda not found".into()));
    }
    match CudaContext::device_count() {
        Ok(n) if usize::try_from(n).is_ok_and(|n| ordinal < n) => Ok(()),
        Ok(0) => Err(GpuError::NoDevice("the driver reports 0 devices".into())),
        Ok(n) => Err(GpuError::NoDevice(format!("no device {ordinal} (the driver reports {n})"))),
        Err(e) => Err(GpuError::NoDevice(format!("cuInit/cuDeviceGetCount failed: {e}"))),
    }
}

fn arch_name(major: i32, minor: i32) -> &'static str {
    match (major, minor) {
        (9, 0) => "sm_90",
        (8, 0) => "sm_80",
        (8, 6) => "sm_86",
        (8, 9) => "sm_89",
        (10, 0) => "sm_100",
        (12, 0) => "sm_120",
        (ma, mi) => Box::leak(format!("sm_{ma}{mi}").into_boxed_str()),
    }
}

/// A cloneable handle on one device's [`Engine`]; the layers built on it share the engine and
/// take turns (the engine is locked for each call).
#[derive(Clone, Debug)]
pub struct Gpu {
    engine: Arc<Mutex<Engine>>,
}

impl Gpu {
    /// Probes for device `ordinal`, creates a context on it and compiles the kernels.
    /// [`GpuError::NoDevice`] when there is no usable GPU (including a failed initialisation).
    pub fn new(ordinal: usize) -> Result<Gpu, GpuError> {
        probe(ordinal)?;
        let engine = Engine::new(ordinal)
            .map_err(|e| GpuError::NoDevice(format!("CUDA initialisation failed on device {ordinal}: {e}")))?;
        Ok(Gpu { engine: Arc::new(Mutex::new(engine)) })
    }

    /// The engine, locked for the caller, with its context bound to the calling thread.
    pub fn lock(&self) -> Result<MutexGuard<'_, Engine>, GpuError> {
        let guard = self.engine.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        guard.ctx.bind_to_thread()?;
        Ok(guard)
    }
}

/// One device's CUDA state (module docs). Reached through [`Gpu::lock`].
#[derive(Debug)]
pub struct Engine {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) kernels: ExpertKernels,
    gemm: GroupedExecutor,
    /// The fp8 kernels and cuBLASLt state, loaded on first use (`crate::fp8`).
    pub(crate) fp8: Option<Box<crate::fp8::Fp8Engine>>,
    /// Memsets issued by the engine itself.
    memsets: u64,
    device_name: String,
    arch: &'static str,
    sms: usize,
}

impl Drop for Engine {
    /// Waits for the work this engine queued before its fields are torn down. Nothing else
    /// waits: the fields then drop in order (the kernel modules unloaded, the cuBLAS and
    /// cuBLASLt handles destroyed — `Fp8Engine`'s drop relies on this wait —, the side streams,
    /// events and captured graphs destroyed, the workspaces freed), and no kernel of an unloaded
    /// module, nor a GEMM on a destroyed handle's workspace, may still be queued. Every call
    /// joins its side streams back into the engine's stream, so waiting on that stream covers
    /// them. Errors are dropped: a drop cannot report them, and a context with a sticky error
    /// runs nothing more (an error recorded by an earlier drop is cleared first, or the wait
    /// would be skipped).
    fn drop(&mut self) {
        let _ = self.ctx.check_err();
        let _ = self.stream.synchronize();
    }
}

impl Engine {
    /// A new engine on device `ordinal` (already probed).
    fn new(ordinal: usize) -> Result<Engine, GpuError> {
        let ctx = CudaContext::new(ordinal)?;
        // SAFETY: this engine uses one stream for every allocation, launch and copy, so the
        // cross-stream event tracking cudarc does is not needed; turning it off before any
        // allocation exists is the documented use.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let (major, minor) = ctx.compute_capability()?;
        let arch = arch_name(major, minor);
        let device_name = ctx.name()?;
        let sms =
            usize::try_from(ctx.attribute(driver_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?)?;
        let kernels = ExpertKernels::load(&ctx, arch)?;
        let gemm = GroupedExecutor::new(ctx.clone(), stream.clone(), sms)?;
        Ok(Engine { ctx, stream, kernels, gemm, fp8: None, memsets: 0, device_name, arch, sms })
    }

    /// The device's multiprocessor count.
    pub fn sm_count(&self) -> usize {
        self.sms
    }

    /// The device's name (`NVIDIA H100 80GB HBM3`, ...).
    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    /// The NVRTC target the kernels were compiled for (`sm_90`).
    pub fn arch(&self) -> &'static str {
        self.arch
    }

    /// Kernel launches plus cuBLAS calls plus memsets issued since the engine was created.
    pub fn launches(&self) -> u64 {
        self.memsets + self.kernels.launches() + self.gemm.launches() + self.fp8.as_ref().map_or(0, |f| f.launches())
    }

    /// Waits for all queued work and surfaces asynchronous errors.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        self.stream.synchronize()?;
        self.ctx.check_err()?;
        Ok(())
    }

    /// Allocates `bytes` zeroed bytes (at least one byte is allocated, so that empty tensors
    /// have an address).
    pub fn alloc(&mut self, bytes: usize) -> Result<DeviceBuffer, GpuError> {
        let mem = self.stream.alloc_zeros::<u8>(bytes.max(1))?;
        DeviceBuffer::new(mem, &self.stream, bytes)
    }

    /// Allocates and uploads.
    pub fn upload(&mut self, data: &[u8]) -> Result<DeviceBuffer, GpuError> {
        let mut buf = self.alloc(data.len())?;
        self.write(&mut buf, data)?;
        Ok(buf)
    }

    /// Overwrites the start of `buf` with `data`.
    pub fn write(&mut self, buf: &mut DeviceBuffer, data: &[u8]) -> Result<(), GpuError> {
        if data.len() > buf.bytes() {
            return Err(GpuError::Shape(format!("write of {} bytes into a {}-byte buffer", data.len(), buf.bytes())));
        }
        if !data.is_empty() {
            self.stream.memcpy_htod(data, &mut buf.slice_mut().slice_mut(..data.len()))?;
        }
        Ok(())
    }

    /// Downloads the whole buffer (synchronizes).
    pub fn download(&mut self, buf: &DeviceBuffer) -> Result<Vec<u8>, GpuError> {
        self.download_range(buf, 0, buf.bytes())
    }

    /// Downloads `len` bytes at `offset` (synchronizes).
    pub fn download_range(&mut self, buf: &DeviceBuffer, offset: usize, len: usize) -> Result<Vec<u8>, GpuError> {
        if offset.checked_add(len).is_none_or(|end| end > buf.bytes()) {
            return Err(GpuError::Shape(format!(
                "download of {offset}+{len} bytes from a {}-byte buffer",
                buf.bytes()
            )));
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        let v = self.stream.clone_dtoh(&buf.slice().slice(offset..offset + len))?;
        self.synchronize()?;
        Ok(v)
    }

    /// Fills the whole of `buf` with `byte` (0xFF poisons every float dtype with NaN; 0 writes
    /// exact zeros).
    pub fn fill_bytes(&mut self, buf: &mut DeviceBuffer, byte: u8) -> Result<(), GpuError> {
        if buf.bytes() == 0 {
            return Ok(());
        }
        let addr = buf.addr(0, buf.bytes(), "fill")?;
        // SAFETY: `addr` is the start of `buf`, a live allocation of this engine holding
        // `buf.bytes()` bytes (checked); the memset is ordered on the engine's stream.
        unsafe { cudarc::driver::result::memset_d8_async(addr, byte, buf.bytes(), self.stream.cu_stream()) }?;
        self.memsets += 1;
        Ok(())
    }

    /// Poisons a whole buffer with NaN bytes.
    pub fn poison(&mut self, buf: &mut DeviceBuffer) -> Result<(), GpuError> {
        self.fill_bytes(buf, 0xFF)
    }

    /// Copies `bytes` bytes from `src` at `src_offset` to `dst` at `dst_offset`, on the
    /// engine's stream.
    pub fn copy(
        &mut self,
        dst: &mut DeviceBuffer,
        dst_offset: usize,
        src: &DeviceBuffer,
        src_offset: usize,
        bytes: usize,
    ) -> Result<(), GpuError> {
        if bytes == 0 {
            return Ok(());
        }
        let d = dst.addr(dst_offset, bytes, "copy destination")?;
        let s = src.addr(src_offset, bytes, "copy source")?;
        // SAFETY: both ranges lie inside live allocations of this engine (checked above); the
        // copy is ordered on the engine's stream.
        unsafe { cudarc::driver::result::memcpy_dtod_async(d, s, bytes, self.stream.cu_stream()) }?;
        Ok(())
    }

    /// `p` at the device-address level, after checking that each operand it reads or writes
    /// fits its buffer: `A` (`m·k` elements) and `B` (`k·n`) when it computes, `C` (`m·n`)
    /// when it is not empty.
    fn lower(dt: Dtype, p: &GemmProblem<Region<'_>>) -> Result<RawProblem, GpuError> {
        let ds = dt.size_bytes();
        let writes = p.m > 0 && p.n > 0;
        let reads = writes && p.k > 0;
        let len = |rows: usize, cols: usize, needed: bool| {
            if needed {
                rows.saturating_mul(cols).saturating_mul(ds)
            } else {
                0
            }
        };
        Ok(GemmProblem {
            m: p.m,
            n: p.n,
            k: p.k,
            a: p.a.operand(len(p.m, p.k, reads), "GEMM operand A")?,
            b: p.b.operand(len(p.k, p.n, reads), "GEMM operand B")?,
            c: p.c.operand(len(p.m, p.n, writes), "GEMM output C")?,
        })
    }

    /// Row-major `C[m, n] = op(A)·op(B) + beta·C` with `A` stored `[m, k]` (`[k, m]` when
    /// `ta`), `B` stored `[k, n]` (`[n, k]` when `tb`), all in `dt`, f32 accumulation
    /// (`CUBLAS_COMPUTE_32F`, no TF32), on the engine's stream. `k = 0` with `beta = 0` writes
    /// exact zeros (by memset, not relying on cuBLAS). Each operand must fit its buffer.
    pub fn gemm(
        &mut self,
        dt: Dtype,
        ta: bool,
        tb: bool,
        problem: &GemmProblem<Region<'_>>,
        beta: f32,
    ) -> Result<(), GpuError> {
        let p = Engine::lower(dt, problem)?;
        self.gemm.gemm(dt, ta, tb, &p, beta)
    }

    /// Runs the per-expert GEMMs `problems` (all in `dt`, transposes `ta`/`tb` as in
    /// [`Engine::gemm`], beta 0) with `strategy`: `m = 0` writes nothing, `k = 0` writes exact
    /// zeros. Asynchronous: ordered on the engine's stream like every other call. Each operand
    /// must fit its buffer.
    pub fn grouped_gemm(
        &mut self,
        strategy: Strategy,
        dt: Dtype,
        ta: bool,
        tb: bool,
        problems: &[GemmProblem<Region<'_>>],
    ) -> Result<(), GpuError> {
        let raw: Vec<RawProblem> = problems.iter().map(|p| Engine::lower(dt, p)).collect::<Result<_, _>>()?;
        self.gemm.run(strategy, dt, ta, tb, &raw)
    }

    /// Launches of the fp8 grouped GEMM ([`crate::fp8::Fp8Issue::Persistent`]) so far: how a
    /// test or bench knows a list ran on the kernel, not on the cuBLASLt fallback.
    pub fn fp8_grouped_kernel_launches(&self) -> u64 {
        self.gemm.fp8_launches()
    }

    /// Runs per-tensor fp8 problems on the fp8 grouped GEMM (`crate::fp8`).
    pub(crate) fn run_fp8_persistent(
        &mut self,
        variant: crate::persistent::Fp8Variant,
        problems: &[crate::persistent::Fp8Problem],
    ) -> Result<bool, GpuError> {
        self.gemm.run_fp8_persistent(variant, problems)
    }

    /// Drops every cached graph and pointer array of the grouped executor (benches use it to
    /// time a capture per call).
    pub fn clear_grouped_caches(&mut self) {
        self.gemm.clear_caches();
    }

    /// Sets cuBLAS's SM-count target on every side-stream handle of the grouped executor,
    /// present and future (0 restores the device's count). For concurrent lanes, an experiment.
    pub fn set_lane_sm_count_target(&mut self, sms: usize) -> Result<(), GpuError> {
        self.gemm.set_lane_sm_count_target(sms)
    }

    /// Fills the first `n` elements of `dt` of `buf` with `round(scale·U(-1, 1))`,
    /// deterministic in `seed`.
    pub fn fill_uniform(
        &mut self,
        dt: Dtype,
        buf: &mut DeviceBuffer,
        n: usize,
        seed: u64,
        scale: f32,
    ) -> Result<(), GpuError> {
        self.kernels.init_uniform(&self.stream, dt, buf, n, seed, scale)
    }
}
