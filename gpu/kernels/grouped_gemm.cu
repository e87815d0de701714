// Persistent grouped GEMM for Hopper (sm_90a), compiled by NVRTC (gpu/src/persistent.rs).
//
// One launch computes every expert's row-major GEMM C_e[m_e, n_e] = op(A_e)·op(B_e)
// (f32 accumulation, one rounding to the storage dtype, beta = 0): the same function as one
// cublasGemmEx per expert, in another summation order. A fixed grid of one CTA per SM walks
// the flat list of output tiles of all experts in waves of gridDim.x tiles (cta_tile), so
// small and large experts share the machine instead of running one small GEMM at a time.
//
// Operands come through two TMA tensor maps, one over all experts' A and one over all
// experts' B: in the layers each is one packed buffer (tokens of expert e after those of
// expert e-1; weights stacked by expert), so expert e's operand is the same 2-D tensor from
// row a_row (b_row) on. Per tile (BM x BN, BM = 128), a STAGES-deep ring of shared-memory
// stages holds the BM x 64 slice of A and the BN x 64 slice of B, written by the bulk tensor
// copy engine in the 128-byte-swizzled layout that wgmma reads through matrix descriptors.
// The CTA is warp-specialized: one producer thread issues the copies (completing on the
// slot's `full` mbarrier with a byte count), two consumer warpgroups each own 64 rows of the
// tile, issue wgmma.m64nBNk16 from shared memory and release the slot on its `empty` barrier,
// then round the tile into a shared-memory output buffer that three storer warps write out
// with coalesced 16-byte stores while the consumers start the next tile.
//
// Edges. Rows past an expert's m (or n) are rows of the next expert, or zeros past the end
// of the tensor: they are computed and never stored. Columns past k in a K-major operand lie
// past the tensor's row width: zero-filled by TMA. Only a contraction over rows (an MN-major
// operand, the weight-gradient GEMMs, K = the expert's tokens) would pick up the next
// expert's rows: there the consumers zero the rows past k_e of the last k-step in shared
// memory before multiplying. k = 0 writes zeros.
//
// Operand layouts (the `ta`/`tb` of Engine::gemm): A is K-major ([m, k] rows) or M-major
// ([k, m] rows); B is K-major ([n, k]) or N-major ([k, n]). K-major tiles are `rows x 64 k`
// (128 bytes per row, swizzle atoms of 8 rows = 1024 bytes, one TMA box); MN-major tiles are
// blocks of `64 k x 64 mn` (8 KiB each, one TMA box per block), which wgmma transposes
// (imm-trans = 1). Requirements, checked on the host: bf16 or f16, each operand of every
// expert inside one 2-D tensor with 16-byte aligned rows, C rows a multiple of 8 elements.

typedef unsigned long long u64;
typedef unsigned int u32;

// One expert's problem; the host writes the same #[repr(C)] layout.
struct Problem {
    u64 c;           // C's device address (compact [m, n])
    int m, n, k;     // k may be 0 (C = 0)
    int a_row;       // A_e's first row in the A tensor map (an m index if K-major, a k index if MN-major)
    int b_row;       // B_e's first row in the B tensor map (an n index if K-major, a k index if MN-major)
    int tile_start;  // index of this problem's first tile in the flat tile list
    int tiles_m;     // ceil(m / BM)
    int pad_;
};

constexpr int MAX_PROBLEMS = 128;

// A driver tensor map (CUtensorMap): opaque, 128-byte aligned.
struct __align__(128) TensorMap {
    u64 opaque[16];
};

// The whole launch's parameters, passed by value (kernel parameters may take 32 KiB on sm_90):
// no upload, no host synchronisation. Problems with no tiles are left out by the host.
struct __align__(128) Params {
    TensorMap map_a;
    TensorMap map_b;
    int num_problems;
    int total_tiles;
    int pad_[2];
    Problem p[MAX_PROBLEMS];
};

constexpr int BM = 128;
constexpr int BK = 64;
constexpr int THREADS = 384;  // a producer and two consumer warpgroups

__device__ __forceinline__ u32 smem_addr(const void* p) {
    return static_cast<u32>(__cvta_generic_to_shared(p));
}

// Orders this thread's generic-proxy shared-memory writes before async-proxy reads (wgmma)
// that follow a barrier.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

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

// mbarrier helpers (shared::cta). Phases start at parity 0; waiting on parity P returns once
// the phase with parity P has completed, so waiting on parity 1 of a fresh barrier returns at
// once (the producer's first pass over the empty slots).
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
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

// One TMA box (c0 = element index along the contiguous dimension, c1 = row) into shared
// memory, completing `bytes` on `bar`.
__device__ __forceinline__ void tma_load_2d(u32 dst, const TensorMap& map, int c0, int c1, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
        "l"(reinterpret_cast<u64>(&map)), "r"(c0), "r"(c1), "r"(bar)
        : "memory");
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
__device__ __forceinline__ void wgmma_m64n128k32_e4m3_e4m3(float (&d)[64], u64 desc_a, u64 desc_b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}
__device__ __forceinline__ void wgmma_m64n128k32_e5m2_e4m3(float (&d)[64], u64 desc_a, u64 desc_b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.f32.e5m2.e4m3 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}
__device__ __forceinline__ void wgmma_m64n256k32_e4m3_e4m3(float (&d)[128], u64 desc_a, u64 desc_b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k32.f32.e4m3.e4m3 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}
__device__ __forceinline__ void wgmma_m64n256k32_e5m2_e4m3(float (&d)[128], u64 desc_a, u64 desc_b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k32.f32.e5m2.e4m3 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
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

// The problem owning `tile`: the last one whose tile_start <= tile (either kernel's table).
template <class P>
__device__ __forceinline__ const auto& find_problem(const P& params, int tile) {
    int lo = 0, hi = params.num_problems - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (params.p[mid].tile_start <= tile) lo = mid;
        else hi = mid - 1;
    }
    return params.p[lo];
}

// The i-th tile of this CTA, or past total_tiles when it has no more. Waves of gridDim.x
// consecutive tiles, walked forward on even waves and backward on odd ones: the host orders
// the problems by decreasing k (the cost of their tiles), so a CTA that takes one of a
// wave's costlier tiles takes one of the next wave's cheaper ones (the weight-gradient
// GEMMs, whose k is the expert's tokens, balance instead of leaving the CTAs with the extra
// long tiles as the tail).
__device__ __forceinline__ int cta_tile(int i) {
    const int g = gridDim.x, b = blockIdx.x;
    return i * g + ((i & 1) ? g - 1 - b : b);
}

// Issues the TMA boxes of one operand's stage: `R` tile rows (m or n) by 64 k.
template <int R, bool MN>
__device__ __forceinline__ void load_operand(u32 dst, const TensorMap& map, int row0, int r0, int k0, u32 bar) {
    if constexpr (!MN) {
        tma_load_2d(dst, map, k0, row0 + r0, bar);  // box {64 k, R rows}
    } else {
#pragma unroll
        for (int j = 0; j < R / 64; ++j) tma_load_2d(dst + j * 8192, map, r0 + 64 * j, row0 + k0, bar);  // box {64, 64}
    }
}

// Zeroes k-rows [from, 64) of an MN-major operand's stage (R / 64 blocks of 64 k-rows x
// 128 bytes), spread over the 256 consumer threads.
template <int R>
__device__ __forceinline__ void zero_k_tail(unsigned char* tile, int from, int ct) {
    const int rows = 64 - from, chunks = (R / 64) * rows * 8;  // 16-byte chunks
    for (int i = ct; i < chunks; i += 256) {
        const int block = i / (rows * 8), rest = i % (rows * 8);
        *reinterpret_cast<uint4*>(tile + block * 8192 + (from + rest / 8) * 128 + (rest % 8) * 16) = make_uint4(0, 0, 0, 0);
    }
}

// Warp-specialized persistent loop (see the file header). Thread 0 of warpgroup 0 produces;
// warpgroups 1 and 2 consume, keeping one k-step of wgmma in flight and releasing the
// previous step's slot when its wgmmas have completed. The epilogue of one tile overlaps
// the producer's loads of the next.
template <int BN, int STAGES, bool F16, bool A_MN, bool B_MN>
__device__ __forceinline__ void grouped_gemm_body(const Params& params) {
    extern __shared__ unsigned char smem_raw[];
    constexpr u32 A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2, STAGE_BYTES = A_BYTES + B_BYTES;
    constexpr u32 C_ROW = BN * 2, C_BYTES = BM * C_ROW;  // the staged output tile (bf16/f16)
    // Swizzle atoms (and TMA's 128-byte swizzle) need 1024-byte aligned tiles.
    const u32 raw = smem_addr(smem_raw), smem = (raw + 1023u) & ~1023u;
    unsigned char* smem_ptr = smem_raw + (smem - raw);
    const u32 c_tile = smem + STAGES * STAGE_BYTES;
    unsigned char* c_ptr = smem_ptr + STAGES * STAGE_BYTES;
    // full[STAGES], empty[STAGES], c_full, c_empty
    const u32 bars = c_tile + C_BYTES, c_full = bars + 16 * STAGES, c_empty = c_full + 8;
    const int tid = threadIdx.x, wg = tid >> 7, t = tid & 127;
    const int total_tiles = params.total_tiles;

    if (tid == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(bars + 8 * s, 1);             // full: the producer's arrive + the copies' bytes
            mbar_init(bars + 8 * (STAGES + s), 2);  // empty: one thread per consumer warpgroup
        }
        mbar_init(c_full, 256);  // every consumer thread, after writing its part of the tile
        mbar_init(c_empty, 96);  // every storer thread, after reading the tile
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
        if (t < 32) {
            // Warp 0, one thread: the TMA producer.
            if (t != 0) return;
            int it = 0;
            for (int i = 0, tile = cta_tile(0); tile < total_tiles; tile = cta_tile(++i)) {
                const Problem& p = find_problem(params, tile);
                const int local = tile - p.tile_start;
                const int m0 = (local % p.tiles_m) * BM, n0 = (local / p.tiles_m) * BN;
                const int ktiles = (p.k + BK - 1) / BK;
                for (int kt = 0; kt < ktiles; ++kt, ++it) {
                    const int slot = it % STAGES;
                    mbar_wait(bars + 8 * (STAGES + slot), ((it / STAGES) & 1) ^ 1);
                    const u32 full = bars + 8 * slot, base = smem + slot * STAGE_BYTES;
                    mbar_arrive_expect_tx(full, STAGE_BYTES);
                    load_operand<BM, A_MN>(base, params.map_a, p.a_row, m0, kt * BK, full);
                    load_operand<BN, B_MN>(base + A_BYTES, params.map_b, p.b_row, n0, kt * BK, full);
                }
            }
        } else {
            // Warps 1-3: the storers. Each tile's output waits in shared memory (16-byte chunks,
            // chunk index XOR row % 8 so neither side conflicts on banks) and leaves as
            // coalesced 16-byte stores while the consumers already multiply the next tile.
            const int st = t - 32;
            constexpr int CPR = BN / 8;  // 16-byte chunks per row
            int tc = 0;
            for (int i = 0, tile = cta_tile(0); tile < total_tiles; tile = cta_tile(++i), ++tc) {
                const Problem& p = find_problem(params, tile);
                const int local = tile - p.tile_start;
                const int m0 = (local % p.tiles_m) * BM, n0 = (local / p.tiles_m) * BN;
                const int rows = min(BM, p.m - m0), chunks = min(CPR, (p.n - n0) / 8);
                unsigned char* C = reinterpret_cast<unsigned char*>(p.c);
                mbar_wait(c_full, tc & 1);
                for (int i = st; i < BM * CPR; i += 96) {
                    const int r = i / CPR, c = i % CPR;
                    if (r < rows && c < chunks) {
                        const uint4 v = *reinterpret_cast<const uint4*>(c_ptr + r * C_ROW + ((c ^ (r & 7)) << 4));
                        *reinterpret_cast<uint4*>(C + ((static_cast<size_t>(m0 + r) * p.n + n0) + c * 8) * 2) = v;
                    }
                }
                mbar_arrive(c_empty);
            }
        }
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
        const int cw = wg - 1;  // consumer warpgroup: rows 64·cw .. 64·cw + 63 of the tile
        float acc[BN / 2];
        int it = 0, tc = 0;
        for (int i = 0, tile = cta_tile(0); tile < total_tiles; tile = cta_tile(++i), ++tc) {
            const Problem& p = find_problem(params, tile);
            const int ktiles = (p.k + BK - 1) / BK;
#pragma unroll
            for (int i = 0; i < BN / 2; ++i) acc[i] = 0.0f;
            for (int kt = 0; kt < ktiles; ++kt, ++it) {
                const int slot = it % STAGES;
                mbar_wait(bars + 8 * slot, (it / STAGES) & 1);
                const u32 a_base = smem + slot * STAGE_BYTES, b_base = a_base + A_BYTES;
                if constexpr (A_MN || B_MN) {
                    // A contraction over rows: the last k-step's rows past k belong to the next
                    // expert. Zero them (in both operands: 0 x non-finite would still be NaN).
                    const int valid = p.k - kt * BK;
                    if (valid < BK) {
                        unsigned char* stage = smem_ptr + slot * STAGE_BYTES;
                        if constexpr (A_MN) zero_k_tail<BM>(stage, valid, tid - 128);
                        if constexpr (B_MN) zero_k_tail<BN>(stage + A_BYTES, valid, tid - 128);
                        fence_proxy_async();
                        asm volatile("bar.sync 1, 256;\n" ::: "memory");
                    }
                }
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

            // Epilogue: round once and stage the tile for the storers. The m64nBNk16
            // accumulator layout: warp w of the warpgroup holds rows 16w + lane/4 (+8);
            // register 4j + {0,1} (+{2,3} for the +8 row) holds columns 8j + 2·(lane%4) + {0,1},
            // i.e. bytes 4·(lane%4) of 16-byte chunk j.
            mbar_wait(c_empty, (tc & 1) ^ 1);  // the storers have read the previous tile
            const int warp = t >> 5, lane = t & 31;
            const int r = cw * 64 + warp * 16 + (lane >> 2);
            unsigned char* row0 = c_ptr + r * C_ROW + (lane & 3) * 4;
            unsigned char* row8 = row0 + 8 * C_ROW;
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
                const int off = (j ^ (r & 7)) << 4;  // (r + 8) & 7 == r & 7
                *reinterpret_cast<u32*>(row0 + off) = pack2<F16>(acc[4 * j], acc[4 * j + 1]);
                *reinterpret_cast<u32*>(row8 + off) = pack2<F16>(acc[4 * j + 2], acc[4 * j + 3]);
            }
            mbar_arrive(c_full);
        }
    }
}

// Kernel names: grouped_gemm_{bf16|f16}_n{128|256}_{a}{b}, with a = k (K-major A) or m
// (M-major A) and b = k (K-major B) or n (N-major B).
#define GROUPED_GEMM(DT, F16, BN, STAGES, AL, A_MN, BL, B_MN)                                   \
    extern "C" __global__ void __launch_bounds__(THREADS, 1)                                  \
        grouped_gemm_##DT##_n##BN##_##AL##BL(const __grid_constant__ Params params) {         \
        grouped_gemm_body<BN, STAGES, F16, A_MN, B_MN>(params);                               \
    }
#define GROUPED_GEMM_LAYOUTS(DT, F16, BN, STAGES) \
    GROUPED_GEMM(DT, F16, BN, STAGES, k, false, k, false) \
    GROUPED_GEMM(DT, F16, BN, STAGES, k, false, n, true)  \
    GROUPED_GEMM(DT, F16, BN, STAGES, m, true, k, false)  \
    GROUPED_GEMM(DT, F16, BN, STAGES, m, true, n, true)

GROUPED_GEMM_LAYOUTS(bf16, false, 128, 5)
GROUPED_GEMM_LAYOUTS(f16, true, 128, 5)
GROUPED_GEMM_LAYOUTS(bf16, false, 256, 3)
GROUPED_GEMM_LAYOUTS(f16, true, 256, 3)

// ---------------------------------------------------------------------------------------------
// The fp8 grouped GEMM (TransformerEngine's per-tensor recipes: current and delayed scaling).
//
// C_e[m_e, n_e] = sa_e·sb_e·(A_e·B_eᵀ) (+ C_e when beta_e = 1), f32 accumulation, one rounding
// to bf16/f16: the function of one cuBLASLt fp8 GEMM per expert with per-tensor scale pointers
// (`Engine::fp8_gemm_op`), sa_e and sb_e the experts' f32 scale_inv read from the device. Both
// operands are K-major (wgmma has no transpose for 8-bit types; the layers' dgrad reads the
// weights' columnwise copies, as for cuBLASLt), A e4m3 or e5m2, B e4m3. The pipeline is the
// bf16 kernel's with 1-byte elements: a k-step is 128 elements = 128 bytes, so a stage's tiles
// have the bf16 K-major tiles' byte layout (rows of 128 bytes, 128-byte swizzle) and each
// wgmma.m64n128k32 advances the descriptors by 32 bytes. Accumulation as TE's GEMM parameters
// ask: fast (SPLIT = false: the tensor cores' accumulator runs the whole K, cuBLASLt's
// FAST_ACCUM) or split (SPLIT = true: each 128-wide k-step accumulates into a fresh partial
// sum that is then added to an f32 accumulator in registers, DeepSeek's promotion; the warpgroup
// waits for each k-step before promoting it. Measured on an H200, a version with two
// alternating partial sums, one k-step's wgmmas in flight while the previous one is promoted,
// ran Mixtral's fp8 forward+backward 21% slower: docs/performance.md).
// Columns past k are zero-filled by TMA (rows of width k), so K-tails need no masking.

struct Fp8Problem {
    u64 c;        // C's device address (compact [m, n])
    u64 scale_a;  // device address of A_e's f32 scale_inv
    u64 scale_b;  // device address of B_e's f32 scale_inv
    int m, n, k;
    int a_row, b_row;
    int tile_start;
    int tiles_m;
    int beta;  // 0: C = s·AB; 1: C = s·AB + C (C read before it is written)
};

struct __align__(128) Fp8Params {
    TensorMap map_a;
    TensorMap map_b;
    int num_problems;
    int total_tiles;
    int pad_[2];
    Fp8Problem p[MAX_PROBLEMS];
};

// Output tiles 128 x 128 (5 stages) or, fast accumulation only (a split partial sum would
// double the 128 accumulator registers), 128 x 256 (3 stages: better operand reuse for lists
// with enough tiles, as in the bf16 kernel).
constexpr int FP8_STAGES_128 = 5;
constexpr int FP8_STAGES_256 = 3;
constexpr int FP8_BK = 128;  // elements (= bytes) per k-step

template <bool F16>
__device__ __forceinline__ float2 unpack2(u32 v) {
    float2 r;
    if constexpr (F16) {
        asm("{\n.reg .b16 lo, hi;\nmov.b32 {lo, hi}, %2;\ncvt.f32.f16 %0, lo;\ncvt.f32.f16 %1, hi;\n}\n"
            : "=f"(r.x), "=f"(r.y)
            : "r"(v));
    } else {
        r.x = __uint_as_float(v << 16);
        r.y = __uint_as_float(v & 0xFFFF0000u);
    }
    return r;
}

template <int BN, bool A_E5M2>
__device__ __forceinline__ void wgmma_fp8(float (&d)[BN / 2], u64 da, u64 db, int scale_d) {
    if constexpr (BN == 128) {
        if constexpr (A_E5M2) wgmma_m64n128k32_e5m2_e4m3(d, da, db, scale_d);
        else wgmma_m64n128k32_e4m3_e4m3(d, da, db, scale_d);
    } else {
        if constexpr (A_E5M2) wgmma_m64n256k32_e5m2_e4m3(d, da, db, scale_d);
        else wgmma_m64n256k32_e4m3_e4m3(d, da, db, scale_d);
    }
}

// Issues one k-step (4 x k32) of warpgroup `cw`'s 64 rows into `d` from the stage at a_base /
// b_base; `fresh`: the first wgmma overwrites d (a split-accumulation partial sum).
template <int BN, bool A_E5M2>
__device__ __forceinline__ void fp8_k_step(float (&d)[BN / 2], u32 a_base, u32 b_base, int cw, bool fresh) {
    fence_regs(d);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < FP8_BK / 32; ++kk) {
        wgmma_fp8<BN, A_E5M2>(d, make_desc(a_base + cw * 64 * 128 + kk * 32, 16, 1024),
                              make_desc(b_base + kk * 32, 16, 1024), (fresh && kk == 0) ? 0 : 1);
    }
    wgmma_commit();
}

template <int N>
__device__ __forceinline__ void add_into(float (&acc)[N], float (&part)[N]) {
#pragma unroll
    for (int j = 0; j < N; ++j) acc[j] += part[j];
}

template <int BN, bool A_E5M2, bool F16, bool SPLIT>
__device__ __forceinline__ void grouped_gemm_fp8_body(const Fp8Params& params) {
    static_assert(BN == 128 || (BN == 256 && !SPLIT), "tile widths: 128, or 256 with fast accumulation");
    extern __shared__ unsigned char smem_raw[];
    constexpr int STAGES = BN == 128 ? FP8_STAGES_128 : FP8_STAGES_256;
    constexpr u32 A_BYTES = BM * FP8_BK, B_BYTES = BN * FP8_BK, STAGE_BYTES = A_BYTES + B_BYTES;
    constexpr u32 C_ROW = BN * 2, C_BYTES = BM * C_ROW;
    const u32 raw = smem_addr(smem_raw), smem = (raw + 1023u) & ~1023u;
    unsigned char* smem_ptr = smem_raw + (smem - raw);
    const u32 c_tile = smem + STAGES * STAGE_BYTES;
    unsigned char* c_ptr = smem_ptr + STAGES * STAGE_BYTES;
    const u32 bars = c_tile + C_BYTES, c_full = bars + 16 * STAGES, c_empty = c_full + 8;
    const int tid = threadIdx.x, wg = tid >> 7, t = tid & 127;
    const int total_tiles = params.total_tiles;

    if (tid == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(bars + 8 * s, 1);
            mbar_init(bars + 8 * (STAGES + s), 2);
        }
        mbar_init(c_full, 256);
        mbar_init(c_empty, 96);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
        if (t < 32) {
            if (t != 0) return;
            int it = 0;
            for (int i = 0, tile = cta_tile(0); tile < total_tiles; tile = cta_tile(++i)) {
                const Fp8Problem& p = find_problem(params, tile);
                const int local = tile - p.tile_start;
                const int m0 = (local % p.tiles_m) * BM, n0 = (local / p.tiles_m) * BN;
                const int ktiles = (p.k + FP8_BK - 1) / FP8_BK;
                for (int kt = 0; kt < ktiles; ++kt, ++it) {
                    const int slot = it % STAGES;
                    mbar_wait(bars + 8 * (STAGES + slot), ((it / STAGES) & 1) ^ 1);
                    const u32 full = bars + 8 * slot, base = smem + slot * STAGE_BYTES;
                    mbar_arrive_expect_tx(full, STAGE_BYTES);
                    tma_load_2d(base, params.map_a, kt * FP8_BK, p.a_row + m0, full);            // box {128 k, BM rows}
                    tma_load_2d(base + A_BYTES, params.map_b, kt * FP8_BK, p.b_row + n0, full);  // box {128 k, BN rows}
                }
            }
        } else {
            // The storers, as in the bf16 kernel.
            const int st = t - 32;
            constexpr int CPR = BN / 8;
            int tc = 0;
            for (int i = 0, tile = cta_tile(0); tile < total_tiles; tile = cta_tile(++i), ++tc) {
                const Fp8Problem& p = find_problem(params, tile);
                const int local = tile - p.tile_start;
                const int m0 = (local % p.tiles_m) * BM, n0 = (local / p.tiles_m) * BN;
                const int rows = min(BM, p.m - m0), chunks = min(CPR, (p.n - n0) / 8);
                unsigned char* C = reinterpret_cast<unsigned char*>(p.c);
                mbar_wait(c_full, tc & 1);
                for (int i = st; i < BM * CPR; i += 96) {
                    const int r = i / CPR, c = i % CPR;
                    if (r < rows && c < chunks) {
                        const uint4 v = *reinterpret_cast<const uint4*>(c_ptr + r * C_ROW + ((c ^ (r & 7)) << 4));
                        *reinterpret_cast<uint4*>(C + ((static_cast<size_t>(m0 + r) * p.n + n0) + c * 8) * 2) = v;
                    }
                }
                mbar_arrive(c_empty);
            }
        }
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
        const int cw = wg - 1;
        float acc[BN / 2];
        float part[SPLIT ? BN / 2 : 1];  // split accumulation: the k-step's partial sum
        int it = 0, tc = 0;
        for (int i = 0, tile = cta_tile(0); tile < total_tiles; tile = cta_tile(++i), ++tc) {
            const Fp8Problem& p = find_problem(params, tile);
            const int ktiles = (p.k + FP8_BK - 1) / FP8_BK;
#pragma unroll
            for (int j = 0; j < BN / 2; ++j) acc[j] = 0.0f;
            for (int kt = 0; kt < ktiles; ++kt, ++it) {
                const int slot = it % STAGES;
                mbar_wait(bars + 8 * slot, (it / STAGES) & 1);
                const u32 a_base = smem + slot * STAGE_BYTES, b_base = a_base + A_BYTES;
                if constexpr (SPLIT) {
                    // Wait for this k-step's wgmmas, release its slot, promote (the other
                    // consumer warpgroup's wgmmas keep the tensor cores busy meanwhile).
                    fp8_k_step<BN, A_E5M2>(part, a_base, b_base, cw, true);
                    wgmma_wait<0>();
                    fence_regs(part);
                    if (t == 0) mbar_arrive(bars + 8 * (STAGES + slot));
                    add_into(acc, part);
                } else {
                    fp8_k_step<BN, A_E5M2>(acc, a_base, b_base, cw, false);
                    wgmma_wait<1>();
                    fence_regs(acc);
                    if (kt > 0 && t == 0) mbar_arrive(bars + 8 * (STAGES + (it - 1) % STAGES));
                }
            }
            if constexpr (!SPLIT) {
                wgmma_wait<0>();
                fence_regs(acc);
                if (ktiles > 0 && t == 0) mbar_arrive(bars + 8 * (STAGES + (it - 1) % STAGES));
            }

            // Epilogue: scale, add C when beta = 1, round once, stage for the storers (the
            // accumulator layout is the bf16 kernel's).
            const float s = *reinterpret_cast<const float*>(p.scale_a) * *reinterpret_cast<const float*>(p.scale_b);
            const int local = tile - p.tile_start;
            const int m0 = (local % p.tiles_m) * BM, n0 = (local / p.tiles_m) * BN;
            mbar_wait(c_empty, (tc & 1) ^ 1);
            const int warp = t >> 5, lane = t & 31;
            const int r = cw * 64 + warp * 16 + (lane >> 2);
            unsigned char* row0 = c_ptr + r * C_ROW + (lane & 3) * 4;
            unsigned char* row8 = row0 + 8 * C_ROW;
            const unsigned char* C = reinterpret_cast<const unsigned char*>(p.c);
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
                float v[4] = {acc[4 * j] * s, acc[4 * j + 1] * s, acc[4 * j + 2] * s, acc[4 * j + 3] * s};
                if (p.beta) {
                    const int col = n0 + 8 * j + 2 * (lane & 3);
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const int row = m0 + r + 8 * h;
                        if (row < p.m && col < p.n) {
                            const float2 old = unpack2<F16>(
                                *reinterpret_cast<const u32*>(C + (static_cast<size_t>(row) * p.n + col) * 2));
                            v[2 * h] += old.x;
                            v[2 * h + 1] += old.y;
                        }
                    }
                }
                const int off = (j ^ (r & 7)) << 4;
                *reinterpret_cast<u32*>(row0 + off) = pack2<F16>(v[0], v[1]);
                *reinterpret_cast<u32*>(row8 + off) = pack2<F16>(v[2], v[3]);
            }
            mbar_arrive(c_full);
        }
    }
}

// Kernel names: grouped_gemm_fp8_{e4m3|e5m2}_{bf16|f16}_{fast|split}_n{128|256} (A's format,
// C's dtype, the accumulation, the tile width); B is e4m3.
#define GROUPED_GEMM_FP8(AF, A_E5M2, DT, F16, ACC, SPLIT, BN)                                     \
    extern "C" __global__ void __launch_bounds__(THREADS, 1)                                    \
        grouped_gemm_fp8_##AF##_##DT##_##ACC##_n##BN(const __grid_constant__ Fp8Params params) { \
        grouped_gemm_fp8_body<BN, A_E5M2, F16, SPLIT>(params);                                  \
    }
#define GROUPED_GEMM_FP8_ACC(AF, A_E5M2, DT, F16)          \
    GROUPED_GEMM_FP8(AF, A_E5M2, DT, F16, fast, false, 128) \
    GROUPED_GEMM_FP8(AF, A_E5M2, DT, F16, fast, false, 256) \
    GROUPED_GEMM_FP8(AF, A_E5M2, DT, F16, split, true, 128)

GROUPED_GEMM_FP8_ACC(e4m3, false, bf16, false)
GROUPED_GEMM_FP8_ACC(e4m3, false, f16, true)
GROUPED_GEMM_FP8_ACC(e5m2, true, bf16, false)
GROUPED_GEMM_FP8_ACC(e5m2, true, f16, true)
