//! The persistent grouped GEMM of `kernels/grouped_gemm.cu` (Hopper, sm_90a): one launch for
//! all experts' GEMMs of a grouped call, a CTA per SM walking the flat list of output tiles,
//! operands through TMA tensor maps into 128-byte-swizzled shared-memory stages, wgmma,
//! warp-specialized producer / consumers / storers (see the kernel file's header for the
//! design). Same function as [`Strategy::Loop`](crate::gemm::Strategy::Loop): f32 accumulation,
//! one rounding, `k = 0` → exact zeros, `m = 0` → nothing written.
//!
//! The same file holds the fp8 grouped GEMM of TransformerEngine's per-tensor recipes
//! (`PersistentKernels::run_fp8`, `grouped_gemm_fp8_*`): both operands K-major fp8 (A e4m3 or
//! e5m2, B e4m3), each expert's two f32 `scale_inv` read from the device, beta 0 or 1, fast or
//! split accumulation, bf16/f16 output: the function of one cuBLASLt fp8 GEMM per expert.
//!
//! Eligibility (`persistent_layout`): bf16 or f16 (fp32 GEMMs stay on cuBLAS, whose
//! `COMPUTE_32F` without TF32 is what the reference models); every expert's A inside one 2-D
//! tensor in one buffer and every expert's B inside another (packed buffers, as the layers have
//! them), with rows of a multiple of 16 bytes and 16-byte aligned; C rows a multiple of 8
//! elements; a compute capability 9.0 device. Anything else runs on cuBLAS instead (the grouped
//! executor's fallback).

use crate::error::GpuError;
use crate::gemm::{choose_tile_n, GemmProblem, TILE_M, TILE_N};
use crate::memory::Operand;
use cudarc::driver::{
    sys as driver_sys, CudaContext, CudaFunction, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg,
};
use moe_reference::Dtype;
use std::collections::HashMap;
use std::sync::Arc;

const GROUPED_GEMM_CU: &str = include_str!("../kernels/grouped_gemm.cu");

/// Problems per launch (the kernel's `MAX_PROBLEMS`; longer lists take several launches).
pub const MAX_PROBLEMS: usize = 128;
/// A problem list at the device-address level.
type RawProblem = GemmProblem<Operand>;
/// A producer warpgroup and two consumer warpgroups.
const THREADS: u32 = 384;

/// Pipeline stages of a tile width (the `STAGES` of the kernel's `GROUPED_GEMM_LAYOUTS` lines).
fn stages(bn: usize) -> usize {
    if bn == 256 {
        3
    } else {
        5
    }
}

/// Dynamic shared memory of a tile width: the stage ring, the staged output tile, the ring's
/// `full`/`empty` mbarriers and the output tile's two, and 1 KiB to align the ring to the
/// 1024-byte swizzle atom.
fn smem_bytes(bn: usize) -> usize {
    stages(bn) * (TILE_M + bn) * 64 * 2 + TILE_M * bn * 2 + 2 * 8 * stages(bn) + 16 + 1024
}

/// The fp8 kernel's pipeline stages per output-tile width (`FP8_STAGES_128`, `FP8_STAGES_256` of
/// the kernel file) and its k-step (`FP8_BK`).
fn fp8_stages(bn: usize) -> usize {
    if bn == 256 {
        3
    } else {
        5
    }
}
const FP8_BK: usize = 128;

/// Dynamic shared memory of the fp8 kernel with `bn`-wide tiles (as [`smem_bytes`], 1-byte
/// operands, 128-wide k-steps).
fn fp8_smem_bytes(bn: usize) -> usize {
    fp8_stages(bn) * (TILE_M + bn) * FP8_BK + TILE_M * bn * 2 + 2 * 8 * fp8_stages(bn) + 16 + 1024
}

/// One problem as the kernel reads it (`struct Problem`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct ProblemRepr {
    c: u64,
    m: i32,
    n: i32,
    k: i32,
    a_row: i32,
    b_row: i32,
    tile_start: i32,
    tiles_m: i32,
    pad: i32,
}

/// A driver tensor map (`CUtensorMap`), written by `cuTensorMapEncodeTiled`.
#[repr(C, align(128))]
#[derive(Clone, Copy, Debug)]
struct TensorMap([u64; 16]);

/// A kernel's by-value parameter: `struct Params` with [`ProblemRepr`] problems (the bf16/fp16
/// kernels), `struct Fp8Params` with [`Fp8ProblemRepr`] ones (the fp8 kernels).
#[repr(C, align(128))]
#[derive(Clone, Copy, Debug)]
struct Params<P> {
    map_a: TensorMap,
    map_b: TensorMap,
    num_problems: i32,
    total_tiles: i32,
    pad: [i32; 2],
    p: [P; MAX_PROBLEMS],
}

// SAFETY: `Params<ProblemRepr>` is `#[repr(C)]` plain data (integers only) with the field order,
// sizes and alignment of the kernel's `struct Params` (checked by the size test below).
unsafe impl DeviceRepr for Params<ProblemRepr> {}

/// One fp8 problem as the kernel reads it (`struct Fp8Problem`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Fp8ProblemRepr {
    c: u64,
    scale_a: u64,
    scale_b: u64,
    m: i32,
    n: i32,
    k: i32,
    a_row: i32,
    b_row: i32,
    tile_start: i32,
    tiles_m: i32,
    beta: i32,
}

// SAFETY: `Params<Fp8ProblemRepr>` is `#[repr(C)]` plain data (integers only) with the field
// order, sizes and alignment of the kernel's `struct Fp8Params` (checked by the size test below).
unsafe impl DeviceRepr for Params<Fp8ProblemRepr> {}

/// One expert's fp8 GEMM for [`PersistentKernels::run_fp8`]: `C [m, n] = s_a·s_b·A·Bᵀ (+ C)`,
/// `A [m, k]` and `B [n, k]` fp8 codes (K-major), `scale_a`/`scale_b` device addresses of f32
/// `scale_inv` values, every address checked against its buffer by the engine.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Fp8Problem {
    pub(crate) m: usize,
    pub(crate) n: usize,
    pub(crate) k: usize,
    pub(crate) a: Operand,
    pub(crate) b: Operand,
    pub(crate) c: u64,
    pub(crate) scale_a: u64,
    pub(crate) scale_b: u64,
    /// `C += ...` (beta 1) instead of `C = ...`.
    pub(crate) accumulate: bool,
}

impl Fp8Problem {
    /// Whether the problem multiplies anything (`m`, `n` and `k` all positive), as
    /// [`GemmProblem::computes`].
    fn computes(&self) -> bool {
        self.m > 0 && self.n > 0 && self.k > 0
    }
}

/// The fp8 kernel variant: A's format (B is e4m3), C's dtype, split accumulation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Fp8Variant {
    pub(crate) a_e5m2: bool,
    pub(crate) out: Dtype,
    pub(crate) split_accumulation: bool,
}

fn fp8_kernel_name(v: Fp8Variant, bn: usize) -> String {
    format!(
        "grouped_gemm_fp8_{}_{}_{}_n{bn}",
        if v.a_e5m2 { "e5m2" } else { "e4m3" },
        if v.out == Dtype::F16 { "f16" } else { "bf16" },
        if v.split_accumulation { "split" } else { "fast" }
    )
}

/// The output-tile widths of a variant: 128 and 256 with fast accumulation, 128 with split
/// accumulation (its partial sum would double the 256-wide tile's 128 accumulator registers).
fn fp8_tile_widths(v: Fp8Variant) -> &'static [usize] {
    if v.split_accumulation {
        &[128]
    } else {
        &TILE_N
    }
}

/// Every fp8 kernel the module defines (bf16/f16 output), with its tile width.
fn fp8_kernels() -> impl Iterator<Item = (Fp8Variant, usize)> {
    [false, true].into_iter().flat_map(|a_e5m2| {
        [Dtype::Bf16, Dtype::F16].into_iter().flat_map(move |out| {
            [false, true].into_iter().flat_map(move |split_accumulation| {
                let v = Fp8Variant { a_e5m2, out, split_accumulation };
                fp8_tile_widths(v).iter().map(move |&bn| (v, bn))
            })
        })
    })
}

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
    crate::nvrtc::compile(GROUPED_GEMM_CU, "grouped_gemm.cu", "sm_90a", &["-std=c++17"])
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
        for (v, bn) in fp8_kernels() {
            let name = fp8_kernel_name(v, bn);
            let f = module.load_function(&name)?;
            f.set_attribute(
                driver_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                i32::try_from(fp8_smem_bytes(bn))?,
            )?;
            functions.insert(name, f);
        }
        Ok(PersistentKernels { functions, sms: usize::try_from(sms)? })
    }
}

/// One operand of every expert as rows of a single 2-D tensor (what a TMA tensor map
/// describes): `width` elements per row, `rows` rows from `base`; expert `e` starts at row
/// `first_row[e]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct OperandTensor {
    /// Device address of row 0.
    base: u64,
    /// Elements per row (the operand's contiguous extent).
    width: usize,
    /// Rows spanned by all experts' operands.
    rows: usize,
    /// Each problem's first row (0 for problems that read nothing).
    first_row: Vec<usize>,
}

/// Lays the operand `(operand, width, rows)` of each problem (elements of `elem` bytes) out as
/// one tensor, or says why it cannot be (different buffers or widths, pointers not a whole
/// number of rows apart, misalignment). The tensor then lies inside the one buffer every
/// operand lies in.
fn operand_tensor(which: &str, elem: usize, ops: &[(Operand, usize, usize)]) -> Result<OperandTensor, String> {
    let reading: Vec<&(Operand, usize, usize)> = ops.iter().filter(|o| o.2 > 0).collect();
    let Some(&&(first, width, _)) = reading.first() else {
        return Ok(OperandTensor { base: 0, width: 8, rows: 1, first_row: vec![0; ops.len()] });
    };
    if reading.iter().any(|o| o.0.alloc != first.alloc) {
        return Err(format!("{which}: operands in more than one buffer"));
    }
    if let Some(o) = reading.iter().find(|o| o.1 != width) {
        return Err(format!("{which}: rows of {} and {width} elements in one call", o.1));
    }
    let row_bytes = (width * elem) as u64;
    if !row_bytes.is_multiple_of(16) {
        return Err(format!("{which}: rows of {width} elements are not a multiple of 16 bytes"));
    }
    let base = reading.iter().map(|o| o.0.addr).min().expect("non-empty");
    if !base.is_multiple_of(16) {
        return Err(format!("{which}: base address is not 16-byte aligned"));
    }
    let mut first_row = Vec::with_capacity(ops.len());
    let mut rows = 0usize;
    for &(op, _, n) in ops {
        if n == 0 {
            first_row.push(0);
            continue;
        }
        if !(op.addr - base).is_multiple_of(row_bytes) {
            return Err(format!("{which}: operands are not a whole number of {width}-element rows apart"));
        }
        let r = usize::try_from((op.addr - base) / row_bytes).map_err(|e| e.to_string())?;
        rows = rows.max(r + n);
        first_row.push(r);
    }
    if rows > i32::MAX as usize {
        return Err(format!("{which}: {rows} rows exceed the kernel's 32-bit row index"));
    }
    Ok(OperandTensor { base, width, rows, first_row })
}

/// What both kernels need of every problem that writes output (`(m, n, k)` and C's address):
/// C rows of a multiple of 8 elements, 16-byte aligned (the storers' 16-byte stores), and
/// dimensions the kernels' 32-bit indexing holds. Problems with an empty C are not checked.
fn check_outputs(problems: impl Iterator<Item = ((usize, usize, usize), u64)>) -> Result<(), String> {
    for (i, ((m, n, k), c)) in problems.enumerate() {
        if m == 0 || n == 0 {
            continue;
        }
        if !n.is_multiple_of(8) || !c.is_multiple_of(16) {
            return Err(format!("problem {i}: C rows of {n} elements (need a multiple of 8, 16-byte aligned)"));
        }
        if [m, n, k].iter().any(|&d| d > i32::MAX as usize / 2) {
            return Err(format!("problem {i}: a dimension exceeds the kernel's 32-bit indexing"));
        }
    }
    Ok(())
}

/// The A and B tensors of a problem list for the kernel, or why it cannot run it. `ta`/`tb`
/// as in a grouped GEMM (`ta`: A stored `[k, m]`; `tb`: B stored `[n, k]`).
pub(crate) fn persistent_layout(
    dt: Dtype,
    ta: bool,
    tb: bool,
    problems: &[RawProblem],
) -> Result<(OperandTensor, OperandTensor), String> {
    if dt == Dtype::F32 {
        return Err("fp32 GEMMs stay on cuBLAS (no TF32)".into());
    }
    check_outputs(problems.iter().map(|p| ((p.m, p.n, p.k), p.c.addr)))?;
    // (operand, row width, rows read) per problem; nothing is read when C is empty or k = 0.
    let reads = |p: &RawProblem| p.computes();
    let a: Vec<_> =
        problems
            .iter()
            .map(|p| {
                if ta {
                    (p.a, p.m, if reads(p) { p.k } else { 0 })
                } else {
                    (p.a, p.k, if reads(p) { p.m } else { 0 })
                }
            })
            .collect();
    let b: Vec<_> =
        problems
            .iter()
            .map(|p| {
                if tb {
                    (p.b, p.k, if reads(p) { p.n } else { 0 })
                } else {
                    (p.b, p.n, if reads(p) { p.k } else { 0 })
                }
            })
            .collect();
    Ok((operand_tensor("A", 2, &a)?, operand_tensor("B", 2, &b)?))
}

/// The A and B tensors of an fp8 problem list for [`PersistentKernels::run_fp8`], or why the
/// kernel cannot run it: every expert's `A [m, k]` rows inside one tensor of one buffer, its
/// `B [n, k]` inside another, rows of a multiple of 16 bytes, C rows a multiple of 8 elements
/// and 16-byte aligned.
pub(crate) fn fp8_layout(problems: &[Fp8Problem]) -> Result<(OperandTensor, OperandTensor), String> {
    check_outputs(problems.iter().map(|p| ((p.m, p.n, p.k), p.c)))?;
    let reads = |p: &Fp8Problem, rows: usize| if p.computes() { rows } else { 0 };
    let a: Vec<_> = problems.iter().map(|p| (p.a, p.k, reads(p, p.m))).collect();
    let b: Vec<_> = problems.iter().map(|p| (p.b, p.k, reads(p, p.n))).collect();
    Ok((operand_tensor("A", 1, &a)?, operand_tensor("B", 1, &b)?))
}

/// Why `problems` cannot run on the persistent kernel (`None`: they can).
#[cfg(test)]
fn persistent_eligible(dt: Dtype, ta: bool, tb: bool, problems: &[RawProblem]) -> Option<String> {
    persistent_layout(dt, ta, tb, problems).err()
}

/// The element type of a tensor map: bf16, f16, or fp8 codes (bytes).
#[derive(Clone, Copy, Debug)]
enum MapElement {
    Half(Dtype),
    Byte,
}

/// Encodes a 2-D tensor map over `t` with boxes of 128 bytes (64 bf16/f16 elements, 128 fp8
/// codes) by `box_rows` rows, 128-byte swizzle (the layout wgmma's descriptors read), zero fill
/// out of bounds.
fn encode_map(elem: MapElement, t: &OperandTensor, box_rows: usize) -> Result<TensorMap, GpuError> {
    let mut map = TensorMap([0; 16]);
    let bytes = match elem {
        MapElement::Half(_) => 2,
        MapElement::Byte => 1,
    };
    let dims = [t.width as u64, t.rows as u64];
    let strides = [(t.width * bytes) as u64];
    let boxes = [u32::try_from(128 / bytes)?, u32::try_from(box_rows)?];
    let elem_strides = [1u32, 1];
    let ty = match elem {
        MapElement::Half(Dtype::F16) => driver_sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        MapElement::Half(_) => driver_sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        MapElement::Byte => driver_sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
    };
    // SAFETY: `map` is 128 writable, 128-byte aligned bytes (a CUtensorMap); the arrays hold
    // `rank` (2) entries (`rank - 1` for the strides) and outlive the call; `base` is the
    // device address of `rows` rows of `width` elements inside one live buffer
    // (`operand_tensor` over operands the engine checked against their buffers). The driver
    // validates the rest and returns an error code.
    unsafe {
        driver_sys::cuTensorMapEncodeTiled(
            (&mut map as *mut TensorMap).cast(),
            ty,
            2,
            t.base as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            elem_strides.as_ptr(),
            driver_sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            driver_sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            driver_sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            driver_sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    }
    .result()?;
    Ok(map)
}

impl PersistentKernels {
    /// Runs `problems`, laid out as `layout` (their [`persistent_layout`]), on `stream` with
    /// output tiles `tile_n` wide (128, 256, or 0 = [`choose_tile_n`]). Returns the number of
    /// launches.
    pub(crate) fn run(
        &self,
        stream: &CudaStream,
        tile_n: usize,
        dt: Dtype,
        (ta, tb): (bool, bool),
        problems: &[RawProblem],
        (ta_tensor, tb_tensor): &(OperandTensor, OperandTensor),
    ) -> Result<u64, GpuError> {
        let bn = match tile_n {
            0 => choose_tile_n(problems, self.sms),
            128 | 256 => tile_n,
            other => return Err(GpuError::Unsupported(format!("persistent tile width {other} (expected 128 or 256)"))),
        };
        let f = self.functions.get(&kernel_name(dt, bn, ta, tb)).expect("every combination is loaded");
        // K-major operands take one box of all the tile's rows; MN-major ones 64 x 64 blocks.
        // When no problem reads anything (every k = 0: the tiles only write zeros) the kernel
        // issues no copy, and there is no operand to describe.
        let reads = problems.iter().any(|p| p.computes());
        let (map_a, map_b) = if reads {
            (
                encode_map(MapElement::Half(dt), ta_tensor, if ta { 64 } else { TILE_M })?,
                encode_map(MapElement::Half(dt), tb_tensor, if tb { bn } else { 64 })?,
            )
        } else {
            (TensorMap([0; 16]), TensorMap([0; 16]))
        };
        // Costliest tiles (largest k) first: the kernel's alternating waves (`cta_tile`) then
        // balance the CTAs when k differs between experts (weight gradients).
        let mut computing: Vec<usize> =
            (0..problems.len()).filter(|&i| problems[i].m > 0 && problems[i].n > 0).collect();
        computing.sort_by_key(|&i| std::cmp::Reverse(problems[i].k));
        // SAFETY: the kernel takes exactly one `Params<ProblemRepr>` by value; its tensor maps
        // cover the problems' operands (`persistent_layout` checked that every expert's A and B
        // are rows of one tensor each inside one buffer, aligned), every C pointer is the address
        // of a compact [m, n] matrix the engine checked against its buffer, and the dynamic shared
        // memory matches the attribute set at load.
        unsafe {
            self.launch_chunks(stream, f, (map_a, map_b), &computing, smem_bytes(bn), |i, tile_start| {
                let p = &problems[i];
                let tiles_m = p.m.div_ceil(TILE_M);
                let entry = ProblemRepr {
                    c: p.c.addr,
                    m: i32::try_from(p.m)?,
                    n: i32::try_from(p.n)?,
                    k: i32::try_from(p.k)?,
                    a_row: i32::try_from(ta_tensor.first_row[i])?,
                    b_row: i32::try_from(tb_tensor.first_row[i])?,
                    tile_start: i32::try_from(tile_start)?,
                    tiles_m: i32::try_from(tiles_m)?,
                    pad: 0,
                };
                Ok((entry, tiles_m * p.n.div_ceil(bn)))
            })
        }
    }

    /// Runs the fp8 `problems`, laid out as `layout` (their [`fp8_layout`]), with kernel
    /// `variant` on `stream`: 256-wide output tiles where the variant has them and the list
    /// covers the SMs with them ([`choose_tile_n`]), else 128. Returns the number of launches.
    pub(crate) fn run_fp8(
        &self,
        stream: &CudaStream,
        variant: Fp8Variant,
        problems: &[Fp8Problem],
        (ta_tensor, tb_tensor): &(OperandTensor, OperandTensor),
    ) -> Result<u64, GpuError> {
        if !matches!(variant.out, Dtype::Bf16 | Dtype::F16) {
            return Err(GpuError::Unsupported(format!("the fp8 grouped GEMM writes bf16 or f16, not {}", variant.out)));
        }
        let dims: Vec<GemmProblem<()>> = problems.iter().map(|p| GemmProblem::dims(p.m, p.n, p.k)).collect();
        let bn = if fp8_tile_widths(variant).contains(&256) { choose_tile_n(&dims, self.sms) } else { 128 };
        let f = self.functions.get(&fp8_kernel_name(variant, bn)).expect("every fp8 kernel is loaded");
        let (map_a, map_b) = if problems.iter().any(Fp8Problem::computes) {
            (encode_map(MapElement::Byte, ta_tensor, TILE_M)?, encode_map(MapElement::Byte, tb_tensor, bn)?)
        } else {
            (TensorMap([0; 16]), TensorMap([0; 16]))
        };
        let computing: Vec<usize> = (0..problems.len()).filter(|&i| problems[i].m > 0 && problems[i].n > 0).collect();
        // SAFETY: the kernel takes exactly one `Params<Fp8ProblemRepr>` (`struct Fp8Params`) by
        // value; its tensor maps cover the problems' operands (`fp8_layout` checked that every
        // expert's A and B are rows of one tensor each inside one buffer, aligned), every C and
        // scale pointer is an address the engine checked against its buffer (C: a compact [m, n]
        // matrix of `variant.out`; scales: one f32 each), and the dynamic shared memory matches the
        // attribute set at load.
        unsafe {
            self.launch_chunks(stream, f, (map_a, map_b), &computing, fp8_smem_bytes(bn), |i, tile_start| {
                let p = &problems[i];
                let tiles_m = p.m.div_ceil(TILE_M);
                let entry = Fp8ProblemRepr {
                    c: p.c,
                    scale_a: p.scale_a,
                    scale_b: p.scale_b,
                    m: i32::try_from(p.m)?,
                    n: i32::try_from(p.n)?,
                    k: i32::try_from(p.k)?,
                    a_row: i32::try_from(ta_tensor.first_row[i])?,
                    b_row: i32::try_from(tb_tensor.first_row[i])?,
                    tile_start: i32::try_from(tile_start)?,
                    tiles_m: i32::try_from(tiles_m)?,
                    beta: i32::from(p.accumulate),
                };
                Ok((entry, tiles_m * p.n.div_ceil(bn)))
            })
        }
    }

    /// Launches `f` once per chunk of at most [`MAX_PROBLEMS`] of the problems `computing` (their
    /// indices, in launch order) with tensor maps `maps`: `entry(i, tile_start)` gives problem
    /// `i`'s table entry, its output tiles numbered from `tile_start`, and its tile count; the
    /// grid is the chunk's tiles, at most one CTA per SM; `smem` bytes of dynamic shared memory.
    /// Returns the number of launches.
    ///
    /// # Safety
    /// `f` takes exactly one `Params<P>` by value, the maps cover every entry's operands, every
    /// address in an entry is one the kernel may read or write as the entry says, and `smem` is
    /// the dynamic shared memory `f` was loaded for.
    unsafe fn launch_chunks<P: Copy + Default>(
        &self,
        stream: &CudaStream,
        f: &CudaFunction,
        (map_a, map_b): (TensorMap, TensorMap),
        computing: &[usize],
        smem: usize,
        mut entry: impl FnMut(usize, usize) -> Result<(P, usize), GpuError>,
    ) -> Result<u64, GpuError>
    where
        Params<P>: DeviceRepr,
    {
        let mut launches = 0;
        for chunk in computing.chunks(MAX_PROBLEMS) {
            let mut params = Params {
                map_a,
                map_b,
                num_problems: i32::try_from(chunk.len())?,
                total_tiles: 0,
                pad: [0; 2],
                p: [P::default(); MAX_PROBLEMS],
            };
            let mut tiles = 0usize;
            for (slot, &i) in params.p.iter_mut().zip(chunk) {
                let (e, t) = entry(i, tiles)?;
                *slot = e;
                tiles += t;
            }
            params.total_tiles = i32::try_from(tiles)?;
            let cfg = LaunchConfig {
                grid_dim: (u32::try_from(tiles.min(self.sms))?, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: u32::try_from(smem)?,
            };
            let mut builder = stream.launch_builder(f);
            builder.arg(&params);
            // SAFETY: the caller's contract: `f` takes one `Params<P>` whose entries and maps
            // describe memory it may access, with `smem` bytes of dynamic shared memory.
            unsafe { builder.launch(cfg) }?;
            launches += 1;
        }
        Ok(launches)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel reads `Params` by the C layout: two 128-byte tensor maps, counts, 40-byte problems.
    #[test]
    fn problem_table_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<ProblemRepr>(), 40);
        assert_eq!(std::mem::align_of::<Params<ProblemRepr>>(), 128);
        assert_eq!(std::mem::offset_of!(Params<ProblemRepr>, num_problems), 256);
        assert_eq!(std::mem::offset_of!(Params<ProblemRepr>, p), 272);
        assert!(
            std::mem::size_of::<Params<ProblemRepr>>() < 32 * 1024,
            "sm_90 kernel parameters are limited to 32 KiB"
        );
        assert_eq!(std::mem::size_of::<Fp8ProblemRepr>(), 56);
        assert_eq!(std::mem::offset_of!(Fp8ProblemRepr, m), 24);
        assert_eq!(std::mem::offset_of!(Params<Fp8ProblemRepr>, p), 272);
        assert!(
            std::mem::size_of::<Params<Fp8ProblemRepr>>() < 32 * 1024,
            "sm_90 kernel parameters are limited to 32 KiB"
        );
    }

    /// The host's constants and the kernel source's must agree: shared-memory size, the
    /// problem table and the tile widths are computed from them on both sides.
    #[test]
    fn host_constants_match_the_kernel_source() {
        let src = GROUPED_GEMM_CU;
        assert!(src.contains(&format!("constexpr int MAX_PROBLEMS = {MAX_PROBLEMS};")));
        assert!(src.contains(&format!("constexpr int BM = {TILE_M};")));
        assert!(src.contains(&format!("constexpr int THREADS = {THREADS};")));
        for bn in TILE_N {
            for dt in ["bf16, false", "f16, true"] {
                let line = format!("GROUPED_GEMM_LAYOUTS({dt}, {bn}, {})", stages(bn));
                assert!(src.contains(&line), "{line} not in grouped_gemm.cu");
            }
        }
        assert!(smem_bytes(256) <= 227 * 1024 && smem_bytes(128) <= 227 * 1024, "over the sm_90 shared-memory limit");
        for line in [
            format!("constexpr int FP8_STAGES_128 = {};", fp8_stages(128)),
            format!("constexpr int FP8_STAGES_256 = {};", fp8_stages(256)),
            format!("constexpr int FP8_BK = {FP8_BK};"),
        ] {
            assert!(src.contains(&line), "{line} not in grouped_gemm.cu");
        }
        for bn in TILE_N {
            assert!(fp8_smem_bytes(bn) <= 227 * 1024, "fp8 kernel (n{bn}) over the sm_90 shared-memory limit");
        }
        // The fp8 kernel's shared memory, piece by piece as grouped_gemm_fp8_body lays it out: per
        // stage a 128-row A tile and a BN-row B tile of 128 one-byte k (16 KiB + BN·128 bytes),
        // the staged bf16 output tile (128·BN·2 bytes), two mbarriers per stage and the output
        // tile's two (8 bytes each), and up to 1023 bytes to align the ring to 1024.
        let layout = |bn: usize, stages: usize| stages * (16384 + bn * 128) + 128 * bn * 2 + stages * 16 + 16 + 1024;
        assert_eq!(fp8_smem_bytes(128), layout(128, 5), "5 stages of 128 x 128 tiles");
        assert_eq!(fp8_smem_bytes(256), layout(256, 3), "3 stages of 128 x 256 tiles");
    }

    /// A problem at address 0 of one buffer.
    fn p(m: usize, n: usize, k: usize) -> RawProblem {
        GemmProblem::dims(m, n, k).map(|_| Operand::default())
    }

    /// An operand at `addr` of the buffer at 0.
    fn at(addr: u64) -> Operand {
        Operand { addr, alloc: 0 }
    }

    #[test]
    fn eligibility_names_the_reason() {
        assert!(persistent_eligible(Dtype::Bf16, false, true, &[p(17, 64, 32), p(0, 64, 32), p(5, 64, 0)]).is_none());
        assert!(persistent_eligible(Dtype::F32, false, true, &[p(16, 64, 32)]).unwrap().contains("fp32"));
        assert!(persistent_eligible(Dtype::Bf16, false, true, &[p(16, 64, 12)]).unwrap().contains("16 bytes"));
        assert!(persistent_eligible(Dtype::Bf16, false, true, &[p(16, 60, 16)]).unwrap().contains("problem 0"));
        // ta: A is [k, m], so m must be a multiple of 8 and k may be anything.
        assert!(persistent_eligible(Dtype::Bf16, true, false, &[p(16, 64, 13)]).is_none());
        assert!(persistent_eligible(Dtype::Bf16, true, false, &[p(12, 64, 16)]).is_some());
        let mut q = p(16, 64, 32);
        q.b = at(8);
        assert!(persistent_eligible(Dtype::F16, false, true, &[q]).unwrap().contains("aligned"));
        // Operands of one kind in two buffers are no tensor (the map would span the gap).
        let mut r = p(16, 64, 32);
        r.a = Operand { addr: 16 * 32 * 2, alloc: 1 << 20 };
        assert!(persistent_eligible(Dtype::Bf16, false, true, &[p(16, 64, 32), r])
            .unwrap()
            .contains("more than one buffer"));
    }

    /// Packed per-expert operands become one tensor with each expert's first row; anything
    /// else is refused with the operand named.
    #[test]
    fn operands_of_all_experts_form_one_tensor() {
        // Three experts of 5, 0 and 3 rows of 64 bf16 (128 bytes), packed from 0x1000.
        let t = operand_tensor(
            "A",
            2,
            &[(at(0x1000), 64, 5), (at(0x1000 + 5 * 128), 64, 0), (at(0x1000 + 5 * 128), 64, 3)],
        )
        .unwrap();
        assert_eq!((t.base, t.width, t.rows, t.first_row), (0x1000, 64, 8, vec![0, 0, 5]));
        // Weights stacked in any order are fine too.
        let t = operand_tensor("B", 2, &[(at(0x2000 + 256), 64, 2), (at(0x2000), 64, 2)]).unwrap();
        assert_eq!((t.base, t.rows, t.first_row), (0x2000, 4, vec![2, 0]));
        assert!(operand_tensor("A", 2, &[(at(0x1000), 64, 5), (at(0x1000 + 100), 64, 3)])
            .unwrap_err()
            .contains("whole number"));
        assert!(operand_tensor("B", 2, &[(at(0x1000), 64, 5), (at(0x3000), 32, 3)]).unwrap_err().starts_with("B:"));
        // fp8 codes: rows of 16 one-byte elements are 16 bytes, rows of 8 are refused.
        assert_eq!(operand_tensor("A", 1, &[(at(0x1000), 16, 2), (at(0x1020), 16, 1)]).unwrap().first_row, vec![0, 2]);
        assert!(operand_tensor("A", 1, &[(at(0x1000), 8, 2)]).unwrap_err().contains("16 bytes"));
        // Rows of 48 bytes from a base that is no multiple of 48: the offsets from the base count.
        assert_eq!(
            operand_tensor("A", 2, &[(at(0x1000), 24, 1), (at(0x1000 + 48), 24, 1)]).unwrap().first_row,
            vec![0, 1]
        );
        // The kernel indexes rows with i32: i32::MAX rows are fine, one more is refused.
        let last = (i32::MAX as u64 - 1) * 16;
        assert_eq!(operand_tensor("A", 1, &[(at(0), 16, 1), (at(last), 16, 1)]).unwrap().rows, i32::MAX as usize);
        assert!(operand_tensor("A", 1, &[(at(0), 16, 1), (at(last), 16, 2)]).unwrap_err().contains("32-bit"));
    }

    /// The fp8 layout: the layers' packed activations (A) and stacked weights (B) form one
    /// tensor each; C rows that are not a multiple of 8 or experts' operands in two buffers are
    /// refused with the reason.
    #[test]
    fn fp8_layout_takes_packed_experts_and_names_refusals() {
        let q = |m: usize, n: usize, k: usize, a_row: usize, b_row: usize| Fp8Problem {
            m,
            n,
            k,
            a: at((a_row * k) as u64),
            b: at((0x10_0000 + b_row * k) as u64),
            c: 0x20_0000,
            scale_a: 0,
            scale_b: 0,
            accumulate: false,
        };
        let (a, b) = fp8_layout(&[q(5, 32, 64, 0, 0), q(0, 32, 64, 5, 32), q(3, 32, 64, 5, 64)]).unwrap();
        assert_eq!((a.rows, a.first_row), (8, vec![0, 0, 5]));
        assert_eq!((b.base, b.rows, b.first_row), (0x10_0000, 96, vec![0, 0, 64]));
        assert!(fp8_layout(&[q(5, 36, 64, 0, 0)]).unwrap_err().contains("problem 0"));
        let mut other = q(3, 32, 64, 5, 32);
        other.b = Operand { addr: 0x30_0000, alloc: 0x30_0000 };
        assert!(fp8_layout(&[q(5, 32, 64, 0, 0), other]).unwrap_err().contains("more than one buffer"));
        // A problem with an empty output reads nothing: its C and operands are not checked (an
        // expert with no tokens, or a zero-width one, next to the others).
        let (mut no_rows, mut no_cols) = (q(0, 36, 64, 5, 32), q(4, 0, 64, 5, 64));
        no_rows.b = Operand { addr: 0x30_0000, alloc: 0x30_0000 };
        no_cols.a = Operand { addr: 0x40_0000, alloc: 0x40_0000 };
        assert!(fp8_layout(&[q(5, 32, 64, 0, 0), no_rows, no_cols]).is_ok());
        // Nor does an empty contraction (k = 0: its rows have no bytes to lay out).
        assert!(fp8_layout(&[q(5, 32, 64, 0, 0), q(3, 32, 0, 5, 32)]).is_ok());
        // Dimensions up to i32::MAX / 2 (the kernel's products of them stay in i32 where it needs).
        let big = i32::MAX as usize / 2;
        assert!(fp8_layout(&[q(big, 32, 16, 0, 0)]).is_ok());
        assert!(fp8_layout(&[q(big + 1, 32, 16, 0, 0)]).unwrap_err().contains("32-bit"));
    }

    /// The kernel source compiles for sm_90a wherever libnvrtc is loadable (no GPU needed),
    /// with every entry point the engine loads and real wgmma instructions. Skips loudly
    /// elsewhere.
    #[test]
    fn persistent_kernels_compile_with_nvrtc_for_sm_90a() {
        if !crate::nvrtc::nvrtc_present() {
            crate::print_skip("SKIP gpu::persistent_kernels_compile_with_nvrtc_for_sm_90a: libnvrtc not found");
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
        for (v, bn) in fp8_kernels() {
            let name = fp8_kernel_name(v, bn);
            assert!(src.contains(&format!(".entry {name}(")), "{name} missing from the PTX");
        }
        assert!(src.contains("wgmma.mma_async.sync.aligned.m64n128k32.f32.e5m2.e4m3"));
        assert!(src.contains("wgmma.mma_async.sync.aligned.m64n256k32.f32.e4m3.e4m3"));
        assert_eq!(fp8_kernels().count(), 12, "2 A formats x 2 outputs x (fast n128, fast n256, split n128)");
    }
}
