//! The cuBLAS calls of the grouped executor at the device-address level: the one row-major →
//! column-major mapping ([`ColMajorGemm`]), `cublasGemmEx`, the strided-batched call for
//! uniform lists and the grouped-batched call. Every address here comes from an operand the
//! engine checked against its buffer ([`crate::memory::Region::operand`]).

use crate::error::GpuError;
use cudarc::cublas::{result as cublas_result, sys as cublas_sys};
use moe_reference::Dtype;

/// The cuBLAS data type of a dtype.
fn cuda_dtype(dt: Dtype) -> cublas_sys::cudaDataType {
    match dt {
        Dtype::F32 => cublas_sys::cudaDataType::CUDA_R_32F,
        Dtype::Bf16 => cublas_sys::cudaDataType::CUDA_R_16BF,
        Dtype::F16 => cublas_sys::cudaDataType::CUDA_R_16F,
    }
}

/// A row-major GEMM `C[m, n] = op(A)·op(B)` (`A` stored `[m, k]`, `[k, m]` when `ta`; `B`
/// stored `[k, n]`, `[n, k]` when `tb`; `C` compact `[m, n]`) expressed as the column-major
/// cuBLAS call on the same memory: cuBLAS computes `Cᵀ = op(B)ᵀ·op(A)ᵀ`, so its first operand
/// is `B`, its `m` is our `n`, and every leading dimension is a row length. The only place
/// this mapping lives (single GEMMs and every cuBLAS strategy use it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ColMajorGemm {
    /// cuBLAS `transa` (applies to our `B`).
    pub(crate) transa: cublas_sys::cublasOperation_t,
    /// cuBLAS `transb` (applies to our `A`).
    pub(crate) transb: cublas_sys::cublasOperation_t,
    /// cuBLAS `m` (= our `n`).
    pub(crate) m: i32,
    /// cuBLAS `n` (= our `m`).
    pub(crate) n: i32,
    /// cuBLAS `k` (= our `k`).
    pub(crate) k: i32,
    /// cuBLAS `A` pointer (= our `B`).
    pub(crate) a: u64,
    /// Leading dimension of cuBLAS `A`.
    pub(crate) lda: i32,
    /// cuBLAS `B` pointer (= our `A`).
    pub(crate) b: u64,
    /// Leading dimension of cuBLAS `B`.
    pub(crate) ldb: i32,
    /// `C` pointer.
    pub(crate) c: u64,
    /// Leading dimension of `C` (= our `n`).
    pub(crate) ldc: i32,
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
    pub(crate) fn new(
        ta: bool,
        tb: bool,
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        b: u64,
        c: u64,
    ) -> Result<Self, GpuError> {
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
    pub(crate) unsafe fn gemm_ex(
        &self,
        handle: cublas_sys::cublasHandle_t,
        dt: Dtype,
        beta: f32,
    ) -> Result<(), GpuError> {
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

/// `Some((stride_a, stride_b, stride_c))` in elements when the computing problems share one
/// shape and their pointers form arithmetic progressions (uniform routing), for
/// `cublasGemmStridedBatchedEx`.
pub(crate) fn uniform_strides(gemms: &[ColMajorGemm], ds: usize) -> Option<(i64, i64, i64)> {
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

/// One `cublasGemmStridedBatchedEx` over `gemms` (alpha 1, beta 0, COMPUTE_32F) with the
/// element strides of [`uniform_strides`].
///
/// # Safety
/// `strides` must be `uniform_strides(gemms, dt.size_bytes())`, every `gemms` entry must
/// address live device matrices of `dt` of its shape, and `handle` must be a live cuBLAS handle
/// of the current context.
pub(crate) unsafe fn strided_batched(
    handle: cublas_sys::cublasHandle_t,
    dt: Dtype,
    gemms: &[ColMajorGemm],
    (sa, sb, sc): (i64, i64, i64),
) -> Result<(), GpuError> {
    let g = gemms[0];
    let alpha = 1.0f32;
    let beta = 0.0f32;
    let cdt = cuda_dtype(dt);
    // SAFETY: batch i's operands are at g.a + i·sa, g.b + i·sb, g.c + i·sc elements, which the
    // caller's strides make exactly the addresses of `gemms[i]` (live matrices of the shapes
    // given, this fn's contract); alpha/beta are host f32; the handle is live.
    unsafe {
        cublas_result::gemm_strided_batched_ex(
            handle,
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
    Ok(())
}

/// The per-group host arrays of `cublasGemmGroupedBatchedEx`: runs of equal `(m, n, k)` in
/// `gemms` form one group each.
pub(crate) struct Groups {
    ms: Vec<i32>,
    ns: Vec<i32>,
    ks: Vec<i32>,
    ldas: Vec<i32>,
    ldbs: Vec<i32>,
    ldcs: Vec<i32>,
    sizes: Vec<i32>,
}

impl Groups {
    pub(crate) fn of(gemms: &[ColMajorGemm]) -> Groups {
        let mut g =
            Groups { ms: vec![], ns: vec![], ks: vec![], ldas: vec![], ldbs: vec![], ldcs: vec![], sizes: vec![] };
        for x in gemms {
            if g.ms.last() == Some(&x.m) && g.ns.last() == Some(&x.n) && g.ks.last() == Some(&x.k) {
                *g.sizes.last_mut().expect("non-empty") += 1;
            } else {
                g.ms.push(x.m);
                g.ns.push(x.n);
                g.ks.push(x.k);
                g.ldas.push(x.lda);
                g.ldbs.push(x.ldb);
                g.ldcs.push(x.ldc);
                g.sizes.push(1);
            }
        }
        g
    }
}

/// One `cublasGemmGroupedBatchedEx` over `gemms` (alpha 1, beta 0, COMPUTE_32F) whose A, B
/// and C pointer arrays are `gemms.len()` device u64 each, consecutive from `pointers`.
///
/// # Safety
/// `pointers` must address a live device array of the `gemms`' `a` pointers, then their `b`,
/// then their `c` (in order), each `gemms` entry must address live device matrices of `dt` of
/// its shape, and `handle` must be a live cuBLAS handle of the current context.
pub(crate) unsafe fn grouped_batched(
    handle: cublas_sys::cublasHandle_t,
    dt: Dtype,
    gemms: &[ColMajorGemm],
    pointers: u64,
) -> Result<(), GpuError> {
    let g = Groups::of(gemms);
    let groups = g.sizes.len();
    let count = u64::try_from(gemms.len())?;
    let ptr_bytes = std::mem::size_of::<u64>() as u64;
    let transa = vec![gemms[0].transa; groups];
    let transb = vec![gemms[0].transb; groups];
    let alpha = vec![1.0f32; groups];
    let beta = vec![0.0f32; groups];
    let cdt = cuda_dtype(dt);
    // SAFETY: the per-group arrays (transa..ldc, alpha/beta f32, sizes) are host arrays of
    // `groups` entries alive for the call (host pointer mode); the A/B/C pointer arrays are
    // `count` device u64 each, consecutive from `pointers` (cuBLAS requires device memory here:
    // cudarc's safe GroupedGemm passes host arrays and faults), and the pointers they hold
    // address matrices of the shapes given (this fn's contract); `sum(sizes) == count`; the
    // handle is live.
    unsafe {
        cublas_sys::cublasGemmGroupedBatchedEx(
            handle,
            transa.as_ptr(),
            transb.as_ptr(),
            g.ms.as_ptr(),
            g.ns.as_ptr(),
            g.ks.as_ptr(),
            alpha.as_ptr().cast(),
            pointers as *const *const std::ffi::c_void,
            cdt,
            g.ldas.as_ptr(),
            (pointers + count * ptr_bytes) as *const *const std::ffi::c_void,
            cdt,
            g.ldbs.as_ptr(),
            beta.as_ptr().cast(),
            (pointers + 2 * count * ptr_bytes) as *const *mut std::ffi::c_void,
            cdt,
            g.ldcs.as_ptr(),
            i32::try_from(groups)?,
            g.sizes.as_ptr(),
            cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        )
    }
    .result()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
