//! The CUDA engine: device probe, context, NVRTC compilation of `kernels/experts.cu`, raw
//! launches, and the one row-major cuBLAS GEMM helper.
//!
//! Single-stream design: one process-wide [`Engine`] behind a mutex (the implementations are
//! `Send + Sync` and tests run on many threads), cudarc's multi-stream event tracking disabled,
//! buffers addressed by raw device pointers.

use crate::error::GpuError;
use crate::grouped::Strategy;
use cudarc::cublas::{result as cublas_result, sys as cublas_sys, CudaBlas};
use cudarc::driver::{
    sys as driver_sys, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig,
    PushKernelArg,
};
use moe_reference::Dtype;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// The kernel source, embedded; compiled by NVRTC at first use.
const EXPERTS_CU: &str = include_str!("../kernels/experts.cu");

/// Checks for a CUDA driver and at least one device *before* any context is created (dynamic
/// loading panics on a missing `libcuda`).
pub fn probe() -> Result<(), GpuError> {
    // SAFETY: `is_culib_present` only tries to dlopen the driver library by name.
    if !unsafe { driver_sys::is_culib_present() } {
        return Err(GpuError::NoDevice("libcuda not found".into()));
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(()),
        Ok(_) => Err(GpuError::NoDevice("the driver reports 0 devices".into())),
        Err(e) => Err(GpuError::NoDevice(format!("cuInit/cuDeviceGetCount failed: {e}"))),
    }
}

/// A device allocation addressed by raw pointer (bytes).
#[derive(Debug)]
pub struct Buf {
    mem: CudaSlice<u8>,
    bytes: usize,
}

impl Buf {
    /// Size in bytes (0 for an empty tensor; the allocation itself is at least 1 byte).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Parameters of the activation kernels (mirrors `struct ActParams` in `experts.cu`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ActParams {
    /// Gated linear unit.
    pub glu: i32,
    /// 0 silu, 1 gelu, 2 quick_gelu, 3 squared_relu.
    pub act: i32,
    /// 1: eager per-op rounding; 0: fp32 chain rounded once (GroupedMLP).
    pub eager: i32,
    /// Clamp set and honoured.
    pub has_clamp: i32,
    /// Clamp value.
    pub clamp: f32,
    /// GLU linear offset.
    pub offset: f32,
}

// SAFETY: `ActParams` is `repr(C)`, plain old data (four i32 and two f32, no padding), and
// matches the layout of the CUDA struct it is passed as.
unsafe impl DeviceRepr for ActParams {}

/// A kernel argument: a raw device pointer (0 for null) or a scalar.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    /// Device pointer.
    Ptr(u64),
    /// 32-bit integer.
    I32(i32),
    /// Activation parameters.
    Act(ActParams),
    /// 64-bit integer.
    I64(i64),
    /// 64-bit unsigned integer.
    U64(u64),
    /// 32-bit float.
    F32(f32),
}

/// The process-wide CUDA state.
pub struct Engine {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) blas: CudaBlas,
    functions: HashMap<String, CudaFunction>,
    pub(crate) launches: u64,
    /// How the layers issue each set of per-expert GEMMs (see [`Engine::set_gemm_strategy`]).
    gemm_strategy: Strategy,
    /// `MOE_GPU_GEMM` at creation (default [`Strategy::Auto`]).
    default_gemm_strategy: Strategy,
    /// Side streams, handles and caches of the grouped executor (created on first use).
    pub(crate) grouped: crate::grouped::GroupedState,
    device_name: String,
    arch: &'static str,
    /// Multiprocessors of the device.
    sms: usize,
}

static ENGINE: OnceLock<Result<Mutex<Engine>, String>> = OnceLock::new();

/// The engine, created on first use, locked for the caller. `NoDevice` when there is no GPU;
/// `Config` (checked first, GPU or not) when `MOE_GPU_GEMM` names no strategy.
pub fn engine() -> Result<MutexGuard<'static, Engine>, GpuError> {
    let strategy = gemm_strategy_setting()?;
    probe()?;
    let cell = ENGINE.get_or_init(|| Engine::create(strategy).map(Mutex::new).map_err(|e| e.to_string()));
    match cell {
        Ok(m) => {
            let guard = m.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            guard.ctx.bind_to_thread()?;
            Ok(guard)
        }
        Err(msg) => Err(GpuError::NoDevice(format!("CUDA initialisation failed: {msg}"))),
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

const KERNEL_NAMES: [&str; 8] =
    ["act_fwd", "act_bwd", "scale_rows", "probs_in_bwd", "fill_bias_rows", "fc2_bias_fwd", "col_sum", "init_uniform"];

/// The kernel-name suffix of a dtype.
pub fn dtype_suffix(dt: Dtype) -> &'static str {
    match dt {
        Dtype::F32 => "f32",
        Dtype::Bf16 => "bf16",
        Dtype::F16 => "f16",
    }
}

pub(crate) fn cuda_dtype(dt: Dtype) -> cublas_sys::cudaDataType {
    match dt {
        Dtype::F32 => cublas_sys::cudaDataType::CUDA_R_32F,
        Dtype::Bf16 => cublas_sys::cudaDataType::CUDA_R_16BF,
        Dtype::F16 => cublas_sys::cudaDataType::CUDA_R_16F,
    }
}

/// Compiles `kernels/experts.cu` with NVRTC for `arch` (`sm_90`). Needs only libnvrtc, no GPU.
pub fn compile_kernels(arch: &'static str) -> Result<cudarc::nvrtc::Ptx, GpuError> {
    let opts =
        cudarc::nvrtc::CompileOptions { arch: Some(arch), name: Some("experts.cu".into()), ..Default::default() };
    cudarc::nvrtc::compile_ptx_with_opts(EXPERTS_CU, opts).map_err(|e| {
        let log = match &e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            other => format!("{other:?}"),
        };
        GpuError::Compile { kernel: "experts.cu", log }
    })
}

/// A row-major GEMM `C[m, n] = op(A)·op(B)` (`A` stored `[m, k]`, `[k, m]` when `ta`; `B`
/// stored `[k, n]`, `[n, k]` when `tb`; `C` compact `[m, n]`) expressed as the column-major
/// cuBLAS call on the same memory: cuBLAS computes `Cᵀ = op(B)ᵀ·op(A)ᵀ`, so its first operand
/// is `B`, its `m` is our `n`, and every leading dimension is a row length. The only place
/// this mapping lives ([`Engine::gemm`] and the grouped executor both use it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ColMajorGemm {
    /// cuBLAS `transa` (applies to our `B`).
    pub transa: cublas_sys::cublasOperation_t,
    /// cuBLAS `transb` (applies to our `A`).
    pub transb: cublas_sys::cublasOperation_t,
    /// cuBLAS `m` (= our `n`).
    pub m: i32,
    /// cuBLAS `n` (= our `m`).
    pub n: i32,
    /// cuBLAS `k` (= our `k`).
    pub k: i32,
    /// cuBLAS `A` pointer (= our `B`).
    pub a: u64,
    /// Leading dimension of cuBLAS `A`.
    pub lda: i32,
    /// cuBLAS `B` pointer (= our `A`).
    pub b: u64,
    /// Leading dimension of cuBLAS `B`.
    pub ldb: i32,
    /// `C` pointer.
    pub c: u64,
    /// Leading dimension of `C` (= our `n`).
    pub ldc: i32,
}

fn op(t: bool) -> cublas_sys::cublasOperation_t {
    if t {
        cublas_sys::cublasOperation_t::CUBLAS_OP_T
    } else {
        cublas_sys::cublasOperation_t::CUBLAS_OP_N
    }
}

impl ColMajorGemm {
    /// Maps a row-major problem (see the type's docs); dimensions must fit `i32`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(ta: bool, tb: bool, m: usize, n: usize, k: usize, a: u64, b: u64, c: u64) -> Result<Self, GpuError> {
        let (mi, ni, ki) = (i32::try_from(m)?, i32::try_from(n)?, i32::try_from(k)?);
        Ok(ColMajorGemm {
            transa: op(tb),
            transb: op(ta),
            m: ni,
            n: mi,
            k: ki,
            a: b,
            lda: if tb { ki } else { ni },
            b: a,
            ldb: if ta { mi } else { ki },
            c,
            ldc: ni,
        })
    }

    /// Issues `cublasGemmEx` (alpha 1, `beta` host f32, COMPUTE_32F, default algorithm) on
    /// `handle`'s stream.
    ///
    /// # Safety
    /// The three pointers must address live device memory of `dt` holding the matrices this
    /// problem was built for, `handle` must be a live cuBLAS handle of the current context,
    /// and `k`, `m`, `n` must be positive.
    pub unsafe fn gemm_ex(&self, handle: cublas_sys::cublasHandle_t, dt: Dtype, beta: f32) -> Result<(), GpuError> {
        let alpha = 1.0f32;
        let cdt = cuda_dtype(dt);
        // SAFETY: the caller guarantees the pointers and handle (this fn's contract); leading
        // dimensions are the row lengths computed in `new`; alpha/beta are host f32 as
        // COMPUTE_32F with the default host pointer mode requires, alive for the call.
        unsafe {
            cublas_result::gemm_ex(
                handle,
                self.transa,
                self.transb,
                self.m,
                self.n,
                self.k,
                (&alpha as *const f32).cast(),
                self.a as *const std::ffi::c_void,
                cdt,
                self.lda,
                self.b as *const std::ffi::c_void,
                cdt,
                self.ldb,
                (&beta as *const f32).cast(),
                self.c as *mut std::ffi::c_void,
                cdt,
                self.ldc,
                cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }?;
        Ok(())
    }
}

/// `MOE_GPU_GEMM` as a strategy: `None` when unset or empty, `Config` when it names none.
pub fn gemm_strategy_setting() -> Result<Option<Strategy>, GpuError> {
    match std::env::var("MOE_GPU_GEMM") {
        Ok(label) if !label.trim().is_empty() => parse_gemm_setting(&label).map(Some),
        _ => Ok(None),
    }
}

/// One `MOE_GPU_GEMM` value as a strategy, or an error that names the variable, the value and
/// the accepted forms.
pub fn parse_gemm_setting(label: &str) -> Result<Strategy, GpuError> {
    Strategy::parse(label.trim()).ok_or_else(|| {
        GpuError::Config(format!(
            "MOE_GPU_GEMM={label:?} is not a GEMM strategy (expected auto, persistent, persistent128, persistent256, \
             hybridN, loop, msN, mtN, graphN or gbatched)"
        ))
    })
}

impl Engine {
    /// A new engine; `strategy` is `MOE_GPU_GEMM` as [`engine`] read it (`None`: `Auto`).
    fn create(strategy: Option<Strategy>) -> Result<Engine, GpuError> {
        let ctx = CudaContext::new(0)?;
        // SAFETY: this engine uses one stream for every allocation, launch and copy, so the
        // cross-stream event tracking cudarc does is not needed; turning it off before any
        // allocation exists is the documented use.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone())?;
        let (major, minor) = ctx.compute_capability()?;
        let arch = arch_name(major, minor);
        let device_name = ctx.name()?;
        let sms = usize::try_from(
            ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
        )?;
        let ptx = compile_kernels(arch)?;
        let module = ctx.load_module(ptx)?;
        let mut functions = HashMap::new();
        for base in KERNEL_NAMES {
            for dt in Dtype::ALL {
                let name = format!("{base}_{}", dtype_suffix(dt));
                functions.insert(name.clone(), module.load_function(&name)?);
            }
        }
        let strategy = strategy.unwrap_or(Strategy::Auto);
        Ok(Engine {
            ctx,
            stream,
            blas,
            functions,
            launches: 0,
            grouped: crate::grouped::GroupedState::default(),
            gemm_strategy: strategy,
            default_gemm_strategy: strategy,
            device_name,
            arch,
            sms,
        })
    }

    /// The device's multiprocessor count.
    pub fn sm_count(&self) -> usize {
        self.sms
    }

    /// Sets how the layers issue each set of per-expert GEMMs (fc1, fc2, the two dgrads, the
    /// two wgrads): any [`Strategy`] of the grouped executor. Every strategy computes the same
    /// function (see `grouped.rs`); they differ in speed only.
    pub fn set_gemm_strategy(&mut self, strategy: Strategy) {
        self.gemm_strategy = strategy;
    }

    /// The strategy the layers use now.
    pub fn gemm_strategy(&self) -> Strategy {
        self.gemm_strategy
    }

    /// `MOE_GPU_GEMM` as read at creation ([`Strategy::Auto`] when unset).
    pub fn default_gemm_strategy(&self) -> Strategy {
        self.default_gemm_strategy
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
        self.launches
    }

    /// The engine's stream.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits for all queued work and surfaces asynchronous errors.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        self.stream.synchronize()?;
        self.ctx.check_err()?;
        Ok(())
    }

    /// Allocates `bytes` (at least one byte is allocated so that empty tensors have an address).
    pub fn alloc(&mut self, bytes: usize) -> Result<Buf, GpuError> {
        let mem = self.stream.alloc_zeros::<u8>(bytes.max(1))?;
        Ok(Buf { mem, bytes })
    }

    /// The raw device address of `buf` plus `offset_bytes`.
    pub fn ptr(&self, buf: &Buf, offset_bytes: usize) -> u64 {
        let (p, _sync) = buf.mem.device_ptr(&self.stream);
        p + offset_bytes as u64
    }

    /// Allocates and uploads.
    pub fn upload(&mut self, data: &[u8]) -> Result<Buf, GpuError> {
        let mut buf = self.alloc(data.len())?;
        if !data.is_empty() {
            self.stream.memcpy_htod(data, &mut buf.mem.slice_mut(..data.len()))?;
        }
        Ok(buf)
    }

    /// Overwrites the start of `buf` with `data`.
    pub fn write(&mut self, buf: &mut Buf, data: &[u8]) -> Result<(), GpuError> {
        if data.len() > buf.bytes {
            return Err(GpuError::Shape(format!("write of {} bytes into a {}-byte buffer", data.len(), buf.bytes)));
        }
        if !data.is_empty() {
            self.stream.memcpy_htod(data, &mut buf.mem.slice_mut(..data.len()))?;
        }
        Ok(())
    }

    /// Downloads the whole buffer (synchronizes).
    pub fn download(&mut self, buf: &Buf) -> Result<Vec<u8>, GpuError> {
        if buf.bytes == 0 {
            return Ok(Vec::new());
        }
        let v = self.stream.clone_dtoh(&buf.mem.slice(..buf.bytes))?;
        self.synchronize()?;
        Ok(v)
    }

    /// Downloads `len` bytes at `offset` (synchronizes).
    pub fn download_range(&mut self, buf: &Buf, offset: usize, len: usize) -> Result<Vec<u8>, GpuError> {
        if offset + len > buf.bytes {
            return Err(GpuError::Shape(format!("download of {offset}+{len} bytes from a {}-byte buffer", buf.bytes)));
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        let v = self.stream.clone_dtoh(&buf.mem.slice(offset..offset + len))?;
        self.synchronize()?;
        Ok(v)
    }

    /// Fills `bytes` bytes at device address `ptr` with `byte` (0xFF poisons every float dtype
    /// with NaN; 0 writes exact zeros).
    pub fn memset(&mut self, ptr: u64, byte: u8, bytes: usize) -> Result<(), GpuError> {
        let stream = self.stream.cu_stream();
        self.memset_on(stream, ptr, byte, bytes)
    }

    fn memset_on(&mut self, stream: driver_sys::CUstream, ptr: u64, byte: u8, bytes: usize) -> Result<(), GpuError> {
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: callers pass an address inside a live allocation of this engine's context
        // with at least `bytes` bytes after it; the memset is ordered on `stream`, the main
        // stream or a side stream of a GEMM batch (joined by events).
        unsafe { cudarc::driver::result::memset_d8_async(ptr, byte, bytes, stream) }?;
        self.launches += 1;
        Ok(())
    }

    /// Poisons a whole buffer with NaN bytes.
    pub fn poison(&mut self, buf: &Buf) -> Result<(), GpuError> {
        let p = self.ptr(buf, 0);
        self.memset(p, 0xFF, buf.bytes)
    }

    /// Launches `<name>_<dtype>` with `args` (in the kernel's parameter order).
    pub fn launch(&mut self, name: &str, dt: Dtype, cfg: LaunchConfig, args: &[Arg]) -> Result<(), GpuError> {
        if cfg.grid_dim.0 == 0 || cfg.grid_dim.1 == 0 {
            return Ok(());
        }
        let full = format!("{name}_{}", dtype_suffix(dt));
        let f = self.functions.get(&full).ok_or_else(|| GpuError::Unsupported(format!("no kernel {full}")))?;
        let mut builder = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::Ptr(p) => builder.arg(p),
                Arg::I32(v) => builder.arg(v),
                Arg::Act(ap) => builder.arg(ap),
                Arg::I64(v) => builder.arg(v),
                Arg::U64(v) => builder.arg(v),
                Arg::F32(v) => builder.arg(v),
            };
        }
        // SAFETY: every `experts.cu` kernel takes exactly the arguments its Rust caller in
        // `layer.rs` passes, in order (pointers as 64-bit device addresses into live buffers of
        // the sizes documented at each call, ints as i32, ActParams by value); the launch
        // shapes follow the contract in the `.cu` header (1-D grid-stride or one block of 256
        // threads per row).
        unsafe { builder.launch(cfg) }?;
        self.launches += 1;
        Ok(())
    }

    /// Row-major `C[m, n] = op(A)·op(B) + beta·C` with `A` stored `[m, k]` (`[k, m]` when
    /// `ta`), `B` stored `[k, n]` (`[n, k]` when `tb`), all in `dt`, f32 accumulation
    /// (`CUBLAS_COMPUTE_32F`, no TF32). The row-major → column-major mapping lives in
    /// [`ColMajorGemm`] (shared with [`Engine::grouped_gemm`](crate::grouped)). `k = 0` with
    /// `beta = 0` writes exact zeros (by memset, not relying on cuBLAS).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &mut self,
        dt: Dtype,
        ta: bool,
        tb: bool,
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        b: u64,
        c: u64,
        beta: f32,
    ) -> Result<(), GpuError> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let (handle, stream) = (*self.blas.handle(), self.stream.cu_stream());
        if k == 0 {
            if beta == 0.0 {
                return self.memset_on(stream, c, 0, m * n * dt.size_bytes());
            }
            return Ok(());
        }
        let g = ColMajorGemm::new(ta, tb, m, n, k, a, b, c)?;
        // SAFETY: `a`, `b`, `c` are device addresses of row-major matrices of the shapes
        // documented above (checked by the callers in layer.rs against their buffers); the
        // handle is bound to the engine's stream.
        unsafe { g.gemm_ex(handle, dt, beta) }?;
        self.launches += 1;
        Ok(())
    }

    /// Fills `n` elements of `dt` at `ptr` with `round(scale·U(-1, 1))`, deterministic in `seed`.
    pub fn fill_uniform(&mut self, dt: Dtype, ptr: u64, n: usize, seed: u64, scale: f32) -> Result<(), GpuError> {
        let args = [Arg::Ptr(ptr), Arg::I64(i64::try_from(n)?), Arg::U64(seed), Arg::F32(scale)];
        self.launch("init_uniform", dt, Engine::elementwise(n), &args)
    }

    /// A 1-D grid-stride launch shape for `total` elements.
    pub fn elementwise(total: usize) -> LaunchConfig {
        let blocks = total.div_ceil(256).min(132 * 32) as u32;
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
    }

    /// The grid of the row-looping elementwise kernels (`act_fwd`, `scale_rows`,
    /// `fill_bias_rows`, `fc2_bias_fwd`): blocks of 256 threads striding over `rows`.
    pub fn over_rows(rows: usize) -> LaunchConfig {
        let blocks = rows.min(132 * 32) as u32; // 0 rows: no launch
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
    }

    /// One block of 256 threads per row.
    pub fn per_row(rows: usize) -> Result<LaunchConfig, GpuError> {
        Ok(LaunchConfig { grid_dim: (u32::try_from(rows)?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compiles the kernels where libnvrtc is loadable (no GPU needed) and checks every entry
    /// point the engine loads is in the PTX. Skips loudly elsewhere.
    #[test]
    fn kernels_compile_with_nvrtc_for_sm_90() {
        // SAFETY: only tries to dlopen libnvrtc by name.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            crate::print_skip("SKIP gpu::kernels_compile_with_nvrtc_for_sm_90: libnvrtc not found");
            return;
        }
        let ptx = compile_kernels("sm_90").unwrap_or_else(|e| panic!("{e}"));
        let src = ptx.to_src();
        for base in KERNEL_NAMES {
            for dt in Dtype::ALL {
                let name = format!("{base}_{}", dtype_suffix(dt));
                assert!(src.contains(&format!(".entry {name}(")), "{name} missing from the PTX");
            }
        }
    }
}
