// Persistent grouped GEMM for Hopper (sm_90a), compiled by NVRTC (gpu/src/persistent.rs).
//
// One launch computes every expert's row-major GEMM C_e[m_e, n_e] = op(A_e)·op(B_e)
// (f32 accumulation, one rounding to the storage dtype, beta = 0): the same function as one
// cublasGemmEx per expert, in another summation order. A fixed grid of one CTA per SM walks
// the flat list of output tiles of all experts (tile t, t + gridDim.x, ...), so small and
// large experts share the machine instead of running one small GEMM at a time.
//
// Per tile (BM x BN, BM = 128): a STAGES-deep ring of shared-memory stages, each holding the
// BM x 64 slice of A and the BN x 64 slice of B, filled with cp.async (16-byte chunks,
// zero-filled past the expert's m, n or k: ragged edges and k = 0 cost nothing special) and
// stored in the 128-byte-swizzled layout that wgmma reads through matrix descriptors. The CTA
// is warp-specialized: one producer warpgroup fills the ring, two consumer warpgroups each own
// 64 rows of the tile and issue wgmma.m64nBNk16 from shared memory; full/empty mbarriers per
// slot hand stages between them (see grouped_gemm_body).
//
// Operand layouts (the `ta`/`tb` of Engine::gemm): A is K-major ([m, k] rows) or M-major
// ([k, m] rows, the weight-gradient GEMMs); B is K-major ([n, k]) or N-major ([k, n]).
// Both are read as stored: K-major tiles are `rows x 64 k` (128 bytes per row, swizzle atoms
// of 8 rows = 1024 bytes); MN-major tiles are blocks of `64 k x 64 mn` (8 KiB each), and wgmma
// transposes them (imm-trans = 1). Requirements, checked on the host: bf16 or f16, every
// contiguous extent (and so every row length) a multiple of 8 elements, 16-byte aligned
// operands.

typedef unsigned long long u64;
typedef unsigned int u32;

// One expert's problem; the host writes the same #[repr(C)] layout.
struct Problem {
    u64 a, b, c;     // device addresses
    int m, n, k;     // C is [m, n]; k may be 0 (C = 0)
    int tile_start;  // index of this problem's first tile in the flat tile list
    int tiles_m;     // ceil(m / BM)
    int pad_;
};

// The whole launch's problem list, passed by value (kernel parameters may take 32 KiB on
// sm_90): no upload, no host synchronisation. Problems with no tiles are left out by the host.
constexpr int MAX_PROBLEMS = 128;
struct ProblemTable {
    int num_problems;
    int total_tiles;
    Problem p[MAX_PROBLEMS];
};

constexpr int BM = 128;
constexpr int BK = 64;
constexpr int THREADS = 384;  // a producer and two consumer warpgroups

__device__ __forceinline__ u32 smem_addr(const void* p) {
    return static_cast<u32>(__cvta_generic_to_shared(p));
}

// cp.async of one 16-byte chunk; `ok = false` writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, bool ok) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(ok ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
// Orders this thread's generic-proxy shared-memory writes (cp.async) before async-proxy
// reads (wgmma) that follow a barrier.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

// Keeps the compiler from moving accumulator accesses across wgmma issue/wait.
template <int N>
__device__ __forceinline__ void fence_regs(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Shared-memory matrix descriptor, 128-byte swizzle. Byte offsets are encoded >> 4.
__device__ __forceinline__ u64 make_desc(u32 addr, u32 lbo, u32 sbo) {
    return static_cast<u64>((addr & 0x3FFFF) >> 4) | (static_cast<u64>(lbo >> 4) << 16) |
           (static_cast<u64>(sbo >> 4) << 32) | (1ull << 62);
}

// GENERATED BEGIN (scripts/gen_wgmma.py)
template <int TA, int TB>
__device__ __forceinline__ void wgmma_m64n128k16_bf16(float (&d)[64], u64 desc_a, u64 desc_b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, %67, %68;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(1), "n"(TA), "n"(TB));
}
template <int TA, int TB>
__device__ __forceinline__ void wgmma_m64n128k16_f16(float (&d)[64], u64 desc_a, u64 desc_b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, %67, %68;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(1), "n"(TA), "n"(TB));
}
template <int TA, int TB>
__device__ __forceinline__ void wgmma_m64n256k16_bf16(float (&d)[128], u64 desc_a, u64 desc_b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1, %131, %132;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(desc_a), "l"(desc_b), "r"(1), "n"(TA), "n"(TB));
}
template <int TA, int TB>
__device__ __forceinline__ void wgmma_m64n256k16_f16(float (&d)[128], u64 desc_a, u64 desc_b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1, %131, %132;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(desc_a), "l"(desc_b), "r"(1), "n"(TA), "n"(TB));
}
// GENERATED END

template <int N, bool F16, int TA, int TB>
__device__ __forceinline__ void wgmma(float (&d)[N / 2], u64 da, u64 db) {
    if constexpr (N == 128) {
        if constexpr (F16) wgmma_m64n128k16_f16<TA, TB>(d, da, db);
        else wgmma_m64n128k16_bf16<TA, TB>(d, da, db);
    } else {
        if constexpr (F16) wgmma_m64n256k16_f16<TA, TB>(d, da, db);
        else wgmma_m64n256k16_bf16<TA, TB>(d, da, db);
    }
}

// Two f32 values rounded (to nearest even) to the storage dtype, packed low = x, high = y.
template <bool F16>
__device__ __forceinline__ u32 pack2(float x, float y) {
    u32 r;
    if constexpr (F16) asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(y), "f"(x));
    else asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(y), "f"(x));
    return r;
}

// Issues one loading thread's cp.async chunks of one operand's stage: `R` rows of the tile
// (m or n) by 64 k, spread over `LOADERS` threads.
// K-major: element (r, k) at src[(r0 + r)·ld + k0 + k]; smem row r is 128 bytes (64 k).
// MN-major: element (r, k) at src[(k0 + k)·ld + r0 + r]; smem blocks of 64 k-rows x 64 r.
// Either way the 16-byte chunk index within a 128-byte smem row is XORed with the row's
// index mod 8 (the 128-byte swizzle, a function of the address bits wgmma decodes). Each
// thread keeps one chunk column and walks rows, so its addresses are one base plus a stride.
template <int R, bool MN, int LOADERS>
__device__ __forceinline__ void load_operand(u32 dst, const unsigned char* src, int ld, int r0, int rmax, int k0,
                                             int kmax, int tid) {
    constexpr int CHUNKS = R * 8, ITERS = CHUNKS / LOADERS;
    static_assert(CHUNKS % LOADERS == 0, "tile must split evenly over the loading threads");
    if constexpr (!MN) {
        constexpr int STEP = LOADERS / 8;  // tile rows per iteration
        const int r = tid >> 3, c = tid & 7;
        const bool k_ok = k0 + c * 8 < kmax;
        const unsigned char* p = src + (static_cast<size_t>(r0 + r) * ld + k0 + c * 8) * 2;
        const size_t step = static_cast<size_t>(STEP) * ld * 2;
#pragma unroll
        for (int i = 0; i < ITERS; ++i) {
            const int row = r + i * STEP;
            const bool ok = k_ok && r0 + row < rmax;
            cp_async16(dst + row * 128 + ((c ^ (row & 7)) << 4), ok ? p + i * step : src, ok);
        }
    } else {
        constexpr int CPR = R / 8, STEP = LOADERS / CPR;  // chunks per k-row; k-rows per iteration
        static_assert(LOADERS % CPR == 0, "a k-row must split evenly over the loading threads");
        const int kr = tid / CPR, c = tid % CPR;
        const bool r_ok = r0 + c * 8 < rmax;
        const unsigned char* p = src + (static_cast<size_t>(k0 + kr) * ld + r0 + c * 8) * 2;
        const size_t step = static_cast<size_t>(STEP) * ld * 2;
#pragma unroll
        for (int i = 0; i < ITERS; ++i) {
            const int k = kr + i * STEP;
            const bool ok = r_ok && k0 + k < kmax;
            cp_async16(dst + (c >> 3) * 8192 + k * 128 + (((c & 7) ^ (k & 7)) << 4), ok ? p + i * step : src, ok);
        }
    }
}

// mbarrier helpers (shared::cta). Phases start at parity 0; waiting on parity P returns once
// the phase with parity P has completed, so waiting on parity 1 of a fresh barrier returns at
// once (the producer's first pass over the empty slots).
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    u32 done = 0;
    while (!done) {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    }
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// The problem owning `tile`: the last one whose tile_start <= tile (the host leaves out
// problems without tiles).
__device__ __forceinline__ const Problem& find_problem(const ProblemTable& table, int tile) {
    int lo = 0, hi = table.num_problems - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (table.p[mid].tile_start <= tile) lo = mid;
        else hi = mid - 1;
    }
    return table.p[lo];
}

// Warp-specialized persistent loop. Warpgroup 0 produces: for every k-step of every tile this
// CTA owns, it waits for the ring slot to be empty, fills it with cp.async, and — LAG steps
// later, once its own copies of that step have landed (cp.async.wait_group) — fences them
// for the async proxy and arrives on the slot's `full` barrier. Warpgroups 1 and 2 consume:
// each waits on `full`, issues its 64-row half of the tile's wgmmas, keeps one k-step of
// wgmma in flight, and releases the previous step's slot on `empty` when that step's wgmmas
// have completed. The epilogue of one tile overlaps the producer's loads of the next.
template <int BN, int STAGES, bool F16, bool A_MN, bool B_MN>
__device__ __forceinline__ void grouped_gemm_body(const ProblemTable& table) {
    constexpr int LAG = 2;  // k-steps of cp.async the producer keeps in flight before arriving
    static_assert(STAGES >= LAG + 2, "a slot must free up while the producer holds LAG unsignalled steps");
    extern __shared__ unsigned char smem_raw[];
    constexpr u32 A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2, STAGE_BYTES = A_BYTES + B_BYTES;
    const u32 smem = (smem_addr(smem_raw) + 1023u) & ~1023u;  // swizzle atoms are 1024-aligned
    const u32 bars = smem + STAGES * STAGE_BYTES;              // full[STAGES], empty[STAGES]
    const int tid = threadIdx.x, wg = tid >> 7, t = tid & 127;
    const int total_tiles = table.total_tiles;

    if (tid == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(bars + 8 * s, 128);             // full: every producer thread arrives
            mbar_init(bars + 8 * (STAGES + s), 2);    // empty: one thread per consumer warpgroup
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 72;\n" ::: "memory");
        int it = 0;
        for (int tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
            const Problem& p = find_problem(table, tile);
            const int local = tile - p.tile_start;
            const int m0 = (local % p.tiles_m) * BM, n0 = (local / p.tiles_m) * BN;
            const int lda = A_MN ? p.m : p.k, ldb = B_MN ? p.n : p.k;
            const unsigned char* A = reinterpret_cast<const unsigned char*>(p.a);
            const unsigned char* B = reinterpret_cast<const unsigned char*>(p.b);
            const int ktiles = (p.k + BK - 1) / BK;
            for (int kt = 0; kt < ktiles; ++kt, ++it) {
                const int slot = it % STAGES;
                mbar_wait(bars + 8 * (STAGES + slot), ((it / STAGES) & 1) ^ 1);
                const u32 base = smem + slot * STAGE_BYTES;
                load_operand<BM, A_MN, 128>(base, A, lda, m0, p.m, kt * BK, p.k, t);
                load_operand<BN, B_MN, 128>(base + A_BYTES, B, ldb, n0, p.n, kt * BK, p.k, t);
                cp_async_commit();
                if (it >= LAG) {
                    cp_async_wait<LAG>();
                    fence_proxy_async();
                    mbar_arrive(bars + 8 * ((it - LAG) % STAGES));
                }
            }
        }
        cp_async_wait<0>();
        fence_proxy_async();
        for (int j = it - LAG < 0 ? 0 : it - LAG; j < it; ++j) mbar_arrive(bars + 8 * (j % STAGES));
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 208;\n" ::: "memory");
        const int cw = wg - 1;  // consumer warpgroup: rows 64·cw .. 64·cw + 63 of the tile
        float acc[BN / 2];
        int it = 0;
        for (int tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
            const Problem& p = find_problem(table, tile);
            const int local = tile - p.tile_start;
            const int m0 = (local % p.tiles_m) * BM, n0 = (local / p.tiles_m) * BN;
            const int ktiles = (p.k + BK - 1) / BK;
#pragma unroll
            for (int i = 0; i < BN / 2; ++i) acc[i] = 0.0f;
            for (int kt = 0; kt < ktiles; ++kt, ++it) {
                const int slot = it % STAGES;
                mbar_wait(bars + 8 * slot, (it / STAGES) & 1);
                const u32 a_base = smem + slot * STAGE_BYTES, b_base = a_base + A_BYTES;
                fence_regs(acc);
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < BK / 16; ++kk) {
                    const u64 da = A_MN ? make_desc(a_base + cw * 8192 + kk * 2048, 8192, 1024)
                                        : make_desc(a_base + cw * 64 * 128 + kk * 32, 16, 1024);
                    const u64 db =
                        B_MN ? make_desc(b_base + kk * 2048, 8192, 1024) : make_desc(b_base + kk * 32, 16, 1024);
                    wgmma<BN, F16, A_MN ? 1 : 0, B_MN ? 1 : 0>(acc, da, db);
                }
                wgmma_commit();
                wgmma_wait<1>();  // the previous k-step's wgmmas are done: release its slot
                fence_regs(acc);
                if (kt > 0 && t == 0) mbar_arrive(bars + 8 * (STAGES + (it - 1) % STAGES));
            }
            wgmma_wait<0>();
            fence_regs(acc);
            if (ktiles > 0 && t == 0) mbar_arrive(bars + 8 * (STAGES + (it - 1) % STAGES));

            // Epilogue: the m64nBNk16 accumulator layout: warp w of the warpgroup holds rows
            // 16w + lane/4 (+8); register 4j + {0,1} (+{2,3} for the +8 row) holds columns
            // 8j + 2·(lane%4) + {0,1}.
            const int warp = t >> 5, lane = t & 31;
            const int row = m0 + cw * 64 + warp * 16 + (lane >> 2);
            u32* C = reinterpret_cast<u32*>(p.c);
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
                const int col = n0 + j * 8 + (lane & 3) * 2;
                if (col < p.n) {
                    if (row < p.m)
                        C[(static_cast<size_t>(row) * p.n + col) >> 1] = pack2<F16>(acc[4 * j], acc[4 * j + 1]);
                    if (row + 8 < p.m)
                        C[(static_cast<size_t>(row + 8) * p.n + col) >> 1] = pack2<F16>(acc[4 * j + 2], acc[4 * j + 3]);
                }
            }
        }
    }
}

// Kernel names: grouped_gemm_{bf16|f16}_n{128|256}_{a}{b}, with a = k (K-major A) or m
// (M-major A) and b = k (K-major B) or n (N-major B).
#define GROUPED_GEMM(DT, F16, BN, STAGES, AL, A_MN, BL, B_MN)                                              \
    extern "C" __global__ void __launch_bounds__(THREADS, 1)                                             \
        grouped_gemm_##DT##_n##BN##_##AL##BL(const __grid_constant__ ProblemTable table) {                \
        grouped_gemm_body<BN, STAGES, F16, A_MN, B_MN>(table);                                           \
    }
#define GROUPED_GEMM_LAYOUTS(DT, F16, BN, STAGES) \
    GROUPED_GEMM(DT, F16, BN, STAGES, k, false, k, false) \
    GROUPED_GEMM(DT, F16, BN, STAGES, k, false, n, true)  \
    GROUPED_GEMM(DT, F16, BN, STAGES, m, true, k, false)  \
    GROUPED_GEMM(DT, F16, BN, STAGES, m, true, n, true)

GROUPED_GEMM_LAYOUTS(bf16, false, 128, 5)
GROUPED_GEMM_LAYOUTS(f16, true, 128, 5)
GROUPED_GEMM_LAYOUTS(bf16, false, 256, 4)
GROUPED_GEMM_LAYOUTS(f16, true, 256, 4)
