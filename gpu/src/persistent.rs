//! The persistent grouped GEMM of `kernels/grouped_gemm.cu` (Hopper, sm_90a): one launch for
//! all experts' GEMMs of a grouped call, a CTA per SM walking the flat list of output tiles,
//! wgmma on 128-byte-swizzled shared-memory tiles filled by cp.async (see the kernel file's
//! header for the design). Same function as [`crate::grouped::Strategy::Loop`]: f32
//! accumulation, one rounding, `k = 0` → exact zeros, `m = 0` → nothing written.
//!
//! Eligibility ([`persistent_eligible`]): bf16 or f16 (fp32 GEMMs stay on cuBLAS, whose
//! `COMPUTE_32F` without TF32 is what the reference models), every operand's contiguous
//! extent a multiple of 8 elements and every pointer 16-byte aligned, a compute capability
//! 9.0 device. Anything else runs on cuBLAS instead (the caller's fallback).

use crate::error::GpuError;
use crate::grouped::GemmProblem;
use crate::kernels::Engine;
use cudarc::driver::{sys as driver_sys, CudaContext, CudaFunction, DeviceRepr, LaunchConfig, PushKernelArg};
use moe_reference::Dtype;
use std::collections::HashMap;
use std::sync::Arc;

const GROUPED_GEMM_CU: &str = include_str!("../kernels/grouped_gemm.cu");

/// Problems per launch (the kernel's `MAX_PROBLEMS`; longer lists take several launches).
pub const MAX_PROBLEMS: usize = 128;
/// Output-tile rows (the kernel's `BM`).
pub const TILE_M: usize = 128;
/// The output-tile widths compiled (`BN`), with their pipeline depths and shared memory.
pub const TILE_N: [usize; 2] = [128, 256];
/// A producer warpgroup and two consumer warpgroups.
const THREADS: u32 = 384;

fn stages(bn: usize) -> usize {
    if bn == 256 {
        4
    } else {
        5
    }
}

/// Dynamic shared memory of a tile width: the stage ring, its `full`/`empty` mbarriers, and
/// 1 KiB to align the ring to the 1024-byte swizzle atom.
fn smem_bytes(bn: usize) -> usize {
    stages(bn) * (TILE_M + bn) * 64 * 2 + 2 * 8 * stages(bn) + 1024
}

/// One problem as the kernel reads it (`struct Problem`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct ProblemRepr {
    a: u64,
    b: u64,
    c: u64,
    m: i32,
    n: i32,
    k: i32,
    tile_start: i32,
    tiles_m: i32,
    pad: i32,
}

/// The kernel's by-value parameter (`struct ProblemTable`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct ProblemTable {
    num_problems: i32,
    total_tiles: i32,
    p: [ProblemRepr; MAX_PROBLEMS],
}

// SAFETY: `ProblemTable` is `#[repr(C)]` plain data (integers only) with the field order,
// sizes and alignment of the kernel's `struct ProblemTable` (checked by the size test below).
unsafe impl DeviceRepr for ProblemTable {}

/// The compiled kernels (one per dtype × tile width × operand layout) and the SM count.
pub(crate) struct PersistentKernels {
    functions: HashMap<String, CudaFunction>,
    sms: usize,
}

impl std::fmt::Debug for PersistentKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PersistentKernels").field("kernels", &self.functions.len()).field("sms", &self.sms).finish()
    }
}

fn kernel_name(dt: Dtype, bn: usize, ta: bool, tb: bool) -> String {
    let dts = if dt == Dtype::F16 { "f16" } else { "bf16" };
    format!("grouped_gemm_{dts}_n{bn}_{}{}", if ta { 'm' } else { 'k' }, if tb { 'k' } else { 'n' })
}

/// Compiles `kernels/grouped_gemm.cu` with NVRTC for `sm_90a` (needs only libnvrtc, no GPU).
pub fn compile_persistent() -> Result<cudarc::nvrtc::Ptx, GpuError> {
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some("sm_90a"),
        name: Some("grouped_gemm.cu".into()),
        options: vec!["-std=c++17".into()],
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(GROUPED_GEMM_CU, opts).map_err(|e| {
        let log = match &e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            other => format!("{other:?}"),
        };
        GpuError::Compile { kernel: "grouped_gemm.cu", log }
    })
}

impl PersistentKernels {
    pub(crate) fn load(ctx: &Arc<CudaContext>) -> Result<PersistentKernels, GpuError> {
        let (major, minor) = ctx.compute_capability()?;
        if (major, minor) != (9, 0) {
            return Err(GpuError::Unsupported(format!(
                "the persistent grouped GEMM needs a compute capability 9.0 GPU (wgmma, sm_90a); this one is {major}.{minor}"
            )));
        }
        let sms = ctx.attribute(driver_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let module = ctx.load_module(compile_persistent()?)?;
        let mut functions = HashMap::new();
        for dt in [Dtype::Bf16, Dtype::F16] {
            for bn in TILE_N {
                for ta in [false, true] {
                    for tb in [false, true] {
                        let name = kernel_name(dt, bn, ta, tb);
                        let f = module.load_function(&name)?;
                        f.set_attribute(
                            driver_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                            i32::try_from(smem_bytes(bn))?,
                        )?;
                        functions.insert(name, f);
                    }
                }
            }
        }
        Ok(PersistentKernels { functions, sms: usize::try_from(sms)? })
    }
}

/// Why `problems` cannot run on the persistent kernel (`None`: they can). `ta`/`tb` as in
/// [`Engine::gemm`].
pub fn persistent_eligible(dt: Dtype, ta: bool, tb: bool, problems: &[GemmProblem]) -> Option<String> {
    if dt == Dtype::F32 {
        return Some("fp32 GEMMs stay on cuBLAS (no TF32)".into());
    }
    for (i, p) in problems.iter().enumerate() {
        if p.m == 0 || p.n == 0 {
            continue;
        }
        // The contiguous extent of each operand: A [m, k] / [k, m]; B [k, n] / [n, k]; C [m, n].
        let a_row = if ta { p.m } else { p.k };
        let b_row = if tb { p.k } else { p.n };
        if a_row % 8 != 0 || b_row % 8 != 0 || p.n % 8 != 0 {
            return Some(format!(
                "problem {i} ({}x{}x{}): rows of A ({a_row}), B ({b_row}) and C ({}) must be multiples of 8 elements",
                p.m, p.n, p.k, p.n
            ));
        }
        if (p.a | p.b | p.c) % 16 != 0 {
            return Some(format!("problem {i}: operands must be 16-byte aligned"));
        }
        if [p.m, p.n, p.k].iter().any(|&d| d > i32::MAX as usize / 2) {
            return Some(format!("problem {i}: a dimension exceeds the kernel's 32-bit indexing"));
        }
    }
    None
}

/// The output-tile width for a problem list: the one with fewer waves of tiles over the SMs,
/// counting a 256-wide tile as the time of 1.8 narrow ones (its better operand reuse); ties
/// go to the narrower tile.
pub fn choose_tile_n(problems: &[GemmProblem], sms: usize) -> usize {
    let cost = |bn: usize, weight: f64| -> f64 {
        let tiles: usize =
            problems.iter().filter(|p| p.m > 0 && p.n > 0).map(|p| p.m.div_ceil(TILE_M) * p.n.div_ceil(bn)).sum();
        tiles.div_ceil(sms.max(1)) as f64 * weight
    };
    if cost(256, 1.8) < cost(128, 1.0) {
        256
    } else {
        128
    }
}

impl Engine {
    /// Runs `problems` on the persistent kernel with output tiles `tile_n` wide (128, 256, or
    /// 0 = [`choose_tile_n`]). `Ok(false)` (nothing issued) when the list is not eligible
    /// ([`persistent_eligible`]) or the GPU is not a Hopper; the caller then uses cuBLAS.
    pub fn persistent_gemm(
        &mut self,
        tile_n: usize,
        dt: Dtype,
        ta: bool,
        tb: bool,
        problems: &[GemmProblem],
    ) -> Result<bool, GpuError> {
        if persistent_eligible(dt, ta, tb, problems).is_some() {
            return Ok(false);
        }
        if self.grouped.persistent.is_none() {
            self.grouped.persistent = Some(PersistentKernels::load(&self.ctx).map_err(|e| e.to_string()));
        }
        let Some(Ok(kernels)) = &self.grouped.persistent else {
            return Ok(false);
        };
        let bn = match tile_n {
            0 => choose_tile_n(problems, kernels.sms),
            128 | 256 => tile_n,
            other => return Err(GpuError::Unsupported(format!("persistent tile width {other} (expected 128 or 256)"))),
        };
        let f = kernels.functions.get(&kernel_name(dt, bn, ta, tb)).expect("every combination is loaded").clone();
        let sms = kernels.sms;
        let computing: Vec<&GemmProblem> = problems.iter().filter(|p| p.m > 0 && p.n > 0).collect();
        for chunk in computing.chunks(MAX_PROBLEMS) {
            let mut table = ProblemTable { num_problems: 0, total_tiles: 0, p: [ProblemRepr::default(); MAX_PROBLEMS] };
            let mut tiles = 0usize;
            for (slot, p) in table.p.iter_mut().zip(chunk) {
                let tiles_m = p.m.div_ceil(TILE_M);
                *slot = ProblemRepr {
                    a: p.a,
                    b: p.b,
                    c: p.c,
                    m: i32::try_from(p.m)?,
                    n: i32::try_from(p.n)?,
                    k: i32::try_from(p.k)?,
                    tile_start: i32::try_from(tiles)?,
                    tiles_m: i32::try_from(tiles_m)?,
                    pad: 0,
                };
                tiles += tiles_m * p.n.div_ceil(bn);
            }
            table.num_problems = i32::try_from(chunk.len())?;
            table.total_tiles = i32::try_from(tiles)?;
            let grid = u32::try_from(tiles.min(sms))?;
            let cfg = LaunchConfig {
                grid_dim: (grid, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: u32::try_from(smem_bytes(bn))?,
            };
            let mut builder = self.stream.launch_builder(&f);
            builder.arg(&table);
            // SAFETY: the kernel takes exactly one `ProblemTable` by value; every pointer in it
            // is a caller-provided device address of a matrix of the documented shape
            // (`grouped_gemm`'s contract), the eligibility check guaranteed the alignment and
            // multiple-of-8 extents the 16-byte loads and stores need, and the dynamic shared
            // memory matches the attribute set at load.
            unsafe { builder.launch(cfg) }?;
            self.launches += 1;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel indexes the table by the C layout: 8 bytes of counts, then 48-byte problems.
    #[test]
    fn problem_table_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<ProblemRepr>(), 48);
        assert_eq!(std::mem::size_of::<ProblemTable>(), 8 + 48 * MAX_PROBLEMS);
        assert!(std::mem::size_of::<ProblemTable>() < 32 * 1024, "sm_90 kernel parameters are limited to 32 KiB");
    }

    #[test]
    fn eligibility_names_the_reason() {
        let p = |m, n, k| GemmProblem { m, n, k, a: 0, b: 0, c: 0 };
        assert!(persistent_eligible(Dtype::Bf16, false, true, &[p(17, 64, 32), p(0, 64, 32), p(5, 64, 0)]).is_none());
        assert!(persistent_eligible(Dtype::F32, false, true, &[p(16, 64, 32)]).unwrap().contains("fp32"));
        assert!(persistent_eligible(Dtype::Bf16, false, true, &[p(16, 64, 12)]).unwrap().contains("problem 0"));
        // ta: A is [k, m], so m must be a multiple of 8 and k may be anything.
        assert!(persistent_eligible(Dtype::Bf16, true, false, &[p(16, 64, 13)]).is_none());
        assert!(persistent_eligible(Dtype::Bf16, true, false, &[p(12, 64, 16)]).is_some());
        let mut q = p(16, 64, 32);
        q.b = 8;
        assert!(persistent_eligible(Dtype::F16, false, true, &[q]).unwrap().contains("aligned"));
    }

    #[test]
    fn tile_width_follows_the_waves() {
        let p = |m, n| GemmProblem { m, n, k: 64, a: 0, b: 0, c: 0 };
        // 132 SMs, one 128x256 tile vs two 128x128: one wave either way, narrow wins the tie.
        assert_eq!(choose_tile_n(&[p(128, 256)], 132), 128);
        // Many tiles: 256 halves the waves.
        assert_eq!(choose_tile_n(&vec![p(4096, 4096); 8], 132), 256);
    }

    /// The kernel source compiles for sm_90a wherever libnvrtc is loadable (no GPU needed),
    /// with every entry point the engine loads and real wgmma instructions. Skips loudly
    /// elsewhere.
    #[test]
    fn persistent_kernels_compile_with_nvrtc_for_sm_90a() {
        // SAFETY: only tries to dlopen libnvrtc by name.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            println!("SKIP gpu::persistent_kernels_compile_with_nvrtc_for_sm_90a: libnvrtc not found");
            return;
        }
        let src = compile_persistent().unwrap_or_else(|e| panic!("{e}")).to_src();
        for dt in [Dtype::Bf16, Dtype::F16] {
            for bn in TILE_N {
                for ta in [false, true] {
                    for tb in [false, true] {
                        let name = kernel_name(dt, bn, ta, tb);
                        assert!(src.contains(&format!(".entry {name}(")), "{name} missing from the PTX");
                    }
                }
            }
        }
        assert!(src.contains("wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16"));
    }
}
