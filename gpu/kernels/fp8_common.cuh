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
//   * scale_from_amax (TE's compute_scale_from_amax) and the block quantizers' arguments
//     (`BlockParams`, `BlockSegs`): the 1x128 block quantizers of `fp8.cu` and the activation
//     that block-quantizes its own output (`act_fwd_blk` in `experts.cu`) compute each block's
//     scale by the same code.

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

__device__ __forceinline__ bool is_inf(float v) { return (__float_as_uint(v) & 0x7FFFFFFFu) == 0x7F800000u; }
__device__ __forceinline__ bool is_nan(float v) { return (__float_as_uint(v) & 0x7FFFFFFFu) > 0x7F800000u; }

// TE's compute_scale_from_amax.
__device__ __forceinline__ float scale_from_amax(float amax, float fp8_max, int pow2, float eps, float vinf) {
    if (amax < eps) amax = eps;
    if (is_inf(amax) || amax == 0.0f || is_nan(amax)) return 1.0f;
    float scale = __fdiv_rn(fp8_max, amax);
    if (is_inf(scale)) scale = vinf;
    if (pow2) scale = __uint_as_float(__float_as_uint(scale) & 0xFF800000u);
    return scale;
}

struct BlockParams {
    int tile_r;         // tile rows of the logical tensor
    int tile_c;         // tile cols of the logical tensor
    int trans;          // 1: the logical tensor is xᵀ
    int mode;           // 0: f32 scale_inv per tile; 1: E8M0 per tile (MXFP8)
    int pow2;           // power-of-2 scales (mode 0)
    float fp8_max;      // largest finite value of the format
    float eps;          // amax epsilon (mode 0)
    float vinf;         // value_for_inf: the input dtype's largest finite value (mode 0)
    float max_norm_rcp; // (float)(1.0 / fp8_max) (mode 1)
};

// The segments of `block_quant_{row,col}128_seg` (every local expert's rows of one activation or
// gradient tensor quantized in one launch each way, as `block_quant_{row,col}128` would quantize
// each segment alone; the scales written straight into each segment's cuBLASLt layout, whose
// padding entries the caller zeroes):
//   * row_seg[r], seg_off[s], seg_len[s]: the segment of row r, the first row and the row count
//     of segment s;
//   * tiles: (segment, first row within it) of every 128-row tile, segment by segment (the
//     columnwise grid's x);
//   * scale_off: the first f32 of segment s's rowwise scales (rowwise kernel) or of its
//     columnwise scales (columnwise kernel).
struct BlockSegs {
    const int* row_seg;
    const int* seg_off;
    const int* seg_len;
    const int* tiles;
    const long long* scale_off;
};
