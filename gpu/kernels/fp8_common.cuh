// The fp8 encodings and block reductions both kernel files use: `fp8.cu` (the quantizers) and
// `experts.cu` (the activation kernel that quantizes its own output, `act_fwd_q`). Each module
// is compiled from this file followed by its own source (`concat!` in gpu/src), so the codes
// the fused activation writes come from the same instructions as the quantizers'.
//
//   * encode: `cvt.rn.satfinite.{e4m3,e5m2}x2.f32` (round to nearest even with subnormals,
//     overflow and ±inf saturate to ±max, NaN becomes 0x7F), applied by the callers to
//     `x·scale` rounded once in f32 (`__fmul_rn`: never contracted). The cvt needs sm_89 or
//     later: on older devices (where `experts.cu` still serves the bf16 layers) the encodes
//     trap, and no fp8 path launches them there.
//   * block_max: max over a block of at most 256 threads, every thread gets it; all threads of
//     the block must call it (it synchronizes).

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 890
#define FP8_CVT(fmt, r, hi, lo) asm("cvt.rn.satfinite." fmt "x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo))
#else
#define FP8_CVT(fmt, r, hi, lo) (__trap(), (r) = 0)
#endif

template <int F> __device__ __forceinline__ u8 encode(float v);
template <> __device__ __forceinline__ u8 encode<0>(float v) {
    u16 r;
    FP8_CVT("e4m3", r, 0.0f, v);
    return (u8)(r & 0xFF);
}
template <> __device__ __forceinline__ u8 encode<1>(float v) {
    u16 r;
    FP8_CVT("e5m2", r, 0.0f, v);
    return (u8)(r & 0xFF);
}

// Two encodes in one cvt: the low byte is `lo`'s code, the high byte `hi`'s (each converted
// independently, bit-identical to `encode`).
template <int F> __device__ __forceinline__ u32 encode2(float lo, float hi);
template <> __device__ __forceinline__ u32 encode2<0>(float lo, float hi) {
    u16 r;
    FP8_CVT("e4m3", r, hi, lo);
    return r;
}
template <> __device__ __forceinline__ u32 encode2<1>(float lo, float hi) {
    u16 r;
    FP8_CVT("e5m2", r, hi, lo);
    return r;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
    return v;
}

// Max over the block (at most 256 threads); every thread gets the result.
__device__ __forceinline__ float block_max(float v) {
    __shared__ float part[8];
    __shared__ float total;
    v = warp_max(v);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        float w = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : 0.0f;
        w = warp_max(w);
        if (threadIdx.x == 0) total = w;
    }
    __syncthreads();
    return total;
}

