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
//   * scale_from_amax (TE's compute_scale_from_amax), the block quantizers' arguments
//     (`BlockParams`, `BlockSegs`) and `block_tile_quant`, the one-pass both-ways 1x128 block
//     quantizer: `fp8.cu`'s `block_quant_both128_seg` (from a tensor) and `experts.cu`'s
//     `act_fwd_blk` (from the activation it computes) run the same code.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

// The storage dtypes (bf16 and fp16 as their bits) and their f32 conversions, round to
// nearest even on store.
struct bf16_t { u16 bits; };
struct f16_t { u16 bits; };

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(bf16_t v) { return __uint_as_float(((unsigned)v.bits) << 16); }
__device__ __forceinline__ float to_f(f16_t v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}

template <typename T> __device__ __forceinline__ T from_f(float f);
template <> __device__ __forceinline__ float from_f<float>(float f) { return f; }
template <> __device__ __forceinline__ bf16_t from_f<bf16_t>(float f) {
    bf16_t r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(f));
    return r;
}
template <> __device__ __forceinline__ f16_t from_f<f16_t>(float f) {
    f16_t r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(f));
    return r;
}

// Four consecutive values of T (8 bytes for bf16/fp16, 16 for f32; the caller keeps them aligned).
template <typename T>
__device__ __forceinline__ void load4(const T* p, float (&f)[4]) {
    if constexpr (sizeof(T) == 2) {
        const uint2 w = *reinterpret_cast<const uint2*>(p);
        const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
        for (int i = 0; i < 4; ++i) f[i] = to_f(e[i]);
    } else {
        const uint4 w = *reinterpret_cast<const uint4*>(p);
        const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
        for (int i = 0; i < 4; ++i) f[i] = to_f(e[i]);
    }
}
template <typename T>
__device__ __forceinline__ void store4(T* p, const float (&f)[4]) {
    if constexpr (sizeof(T) == 2) {
        uint2 w;
        T* e = reinterpret_cast<T*>(&w);
#pragma unroll
        for (int i = 0; i < 4; ++i) e[i] = from_f<T>(f[i]);
        *reinterpret_cast<uint2*>(p) = w;
    } else {
        uint4 w;
        T* e = reinterpret_cast<T*>(&w);
#pragma unroll
        for (int i = 0; i < 4; ++i) e[i] = from_f<T>(f[i]);
        *reinterpret_cast<uint4*>(p) = w;
    }
}

// Four consecutive values of T as loaded (8 bytes for bf16/fp16, 16 for f32): a load issued
// now and converted later, so that several rows' loads are in flight at once.
template <int BYTES> struct Pack4;
template <> struct Pack4<2> { uint2 v; };
template <> struct Pack4<4> { uint4 v; };
template <typename T>
__device__ __forceinline__ Pack4<sizeof(T)> load_pack4(const T* p) {
    Pack4<sizeof(T)> k;
    k.v = *reinterpret_cast<const decltype(k.v)*>(p);
    return k;
}
template <typename T>
__device__ __forceinline__ void unpack4(const Pack4<sizeof(T)>& k, float (&f)[4]) {
    const T* e = reinterpret_cast<const T*>(&k.v);
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] = to_f(e[i]);
}

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

// The codes of tile rows [e0, e0 + 16) of column j at `mult`, as 16 bytes in row order (one
// columnwise store of `block_tile_quant`).
template <typename T, int F, int PITCH>
__device__ __forceinline__ uint4 encode_column16(const T (*tile)[PITCH], int e0, int j, float mult) {
    u32 wd[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int e = e0 + 4 * i;
        wd[i] = encode2<F>(__fmul_rn(to_f(tile[e][j]), mult), __fmul_rn(to_f(tile[e + 1][j]), mult)) |
                (encode2<F>(__fmul_rn(to_f(tile[e + 2][j]), mult), __fmul_rn(to_f(tile[e + 3][j]), mult)) << 16);
    }
    return make_uint4(wd[0], wd[1], wd[2], wd[3]);
}

// `block_tile_quant`: both 1x128 block operands (rowwise: blocks along a row; columnwise: the
// re-quantization of the transpose, blocks along each segment's rows) of a [rows, cols]
// tensor whose rows come from `src`, in one pass, the codes and scales that
// `block_quant_row128_seg` and `block_quant_col128_seg` write from the same values, bit for
// bit (each block's amax of the same values, the same scale_from_amax and encode).
// The source: `src.begin(s, c)` once per block (segment s, the lane's first column c, when
// c < cols), then per row r `src.load(r, c, raw)` issues the row's loads into a
// `typename Src::Raw` and `src.make(raw, r, s, c, z)` makes the four values at columns
// [c, c + 4), already rounded to T (and may store them, e.g. the activation's u). Each warp
// issues `Src::BATCH` rows' loads before it uses them (a store between them would otherwise
// keep the next row's loads waiting: the compiler cannot move loads past stores that may
// alias): 4 for a plain load, 1 for the activation, whose registers four rows would take
// (measured on an H200: batching it made the blockwise forward slower).
// Launch: grid (the 128-row tiles of `seg.tiles`, ceil(cols/128)), block 256, dynamic shared
// memory BLOCK_TILE_SMEM(sizeof(T)) bytes; cols % 4 == 0 and codes 16-byte aligned. Block
// (t, y) takes rows [x0, x0 + 128) of tile t's segment s and columns [128y, 128y + 128): warp
// w rows w, w + 8, ..., lane four consecutive columns, so a row's 1x128 block is one warp's
// (the warp max is its amax); each row also goes into a [128][BLOCK_TILE_PITCH] tile of T in
// shared memory. Then thread (row half g, column j) takes 64 rows of one column: the two
// halves' maxima meet in `part`, and its codes are 64 consecutive bytes of the columnwise copy.
// Where the tile's 128 rows are all in the segment and each column's 128 codes start 16-byte
// aligned (the layers' padded experts: segment lengths multiples of 16), the codes go through a
// second shared tile ([128 columns][BLOCK_TILE_CODES_PITCH] bytes) and each warp store writes
// four whole 128-byte columns; otherwise each thread stores its own 64 (or fewer) bytes.
#define BLOCK_TILE_PITCH(elem) (128 + 16 / (elem))
#define BLOCK_TILE_CODES_PITCH 144
#define BLOCK_TILE_SMEM(elem) (128 * BLOCK_TILE_PITCH(elem) * (elem) + 128 * BLOCK_TILE_CODES_PITCH)
// With BLOCK false the same tile casts instead at each segment's per-tensor scale
// (`seg_scale[s·stride]`, current or delayed scaling) into the rowwise codes and the
// columnwise copy (`cast_both_seg`: what `cast_seg` then `transpose_seg_u8` write); `bp`,
// `scale_inv`, `scale_inv_t`, `col_scale_off` and `seg.scale_off` are then unused.
template <typename T, int F, bool BLOCK, typename Src>
__device__ void block_tile_quant(Src& src, int cols, BlockParams bp, BlockSegs seg, const long long* col_scale_off,
                                 u8* codes, float* scale_inv, u8* codes_t, float* scale_inv_t,
                                 const float* seg_scale = nullptr, int stride = 0) {
    extern __shared__ __align__(16) unsigned char block_tile_smem[];
    constexpr int PITCH = BLOCK_TILE_PITCH(sizeof(T));
    T(*tile)[PITCH] = reinterpret_cast<T(*)[PITCH]>(block_tile_smem);
    u8(*ctile)[BLOCK_TILE_CODES_PITCH] =
        reinterpret_cast<u8(*)[BLOCK_TILE_CODES_PITCH]>(block_tile_smem + BLOCK_TILE_SMEM(sizeof(T)) - 128 * BLOCK_TILE_CODES_PITCH);
    __shared__ float part[2][128];
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int s = seg.tiles[2 * blockIdx.x], x0 = seg.tiles[2 * blockIdx.x + 1];
    const int n = seg.seg_len[s];
    const long long base = seg.seg_off[s];
    const int c0 = blockIdx.y * 128, c = c0 + 4 * lane;
    const bool col_ok = c < cols;
    const long long row_scales = BLOCK ? seg.scale_off[s] + (long long)blockIdx.y * ((n + 3) / 4 * 4) : 0;
    const float tensor_mult = BLOCK ? 0.0f : seg_scale[(long long)s * stride];
    constexpr int B = Src::BATCH;
    if (col_ok) src.begin(s, c);
#pragma unroll 1
    for (int k0 = w; k0 < 128; k0 += 8 * B) {
        typename Src::Raw raw[B];
#pragma unroll
        for (int i = 0; i < B; ++i)
            if (x0 + k0 + 8 * i < n && col_ok) src.load(base + x0 + k0 + 8 * i, c, raw[i]);
#pragma unroll
    for (int i = 0; i < B; ++i) {
        const int k = k0 + 8 * i;
        float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (x0 + k < n) {  // warp-uniform
            const long long r = base + x0 + k;
            if (col_ok) src.make(raw[i], r, s, c, z);
            float mult = tensor_mult;
            if (BLOCK) {
                float m = 0.0f;
#pragma unroll
                for (int q = 0; q < 4; ++q) m = fmaxf(m, fabsf(z[q]));
                mult = scale_from_amax(warp_max(m), bp.fp8_max, bp.pow2, bp.eps, bp.vinf);
                if (lane == 0) scale_inv[row_scales + x0 + k] = __frcp_rn(mult);
            }
            if (col_ok) {
                const u32 lo = encode2<F>(__fmul_rn(z[0], mult), __fmul_rn(z[1], mult));
                const u32 hi = encode2<F>(__fmul_rn(z[2], mult), __fmul_rn(z[3], mult));
                *reinterpret_cast<u32*>(codes + r * cols + c) = lo | (hi << 16);
            }
        }
        store4<T>(&tile[k][4 * lane], z);  // rows past the segment: zeros (no amax change)
    }
    }
    __syncthreads();
    const int j = threadIdx.x & 127, g = threadIdx.x >> 7, col = c0 + j;
    float mult = tensor_mult;
    if (BLOCK) {
        float m = 0.0f;
#pragma unroll 8
        for (int e = 0; e < 64; ++e) m = fmaxf(m, fabsf(to_f(tile[64 * g + e][j])));
        part[g][j] = m;
        __syncthreads();
        mult = scale_from_amax(fmaxf(part[0][j], part[1][j]), bp.fp8_max, bp.pow2, bp.eps, bp.vinf);
        if (g == 0 && col < cols)
            scale_inv_t[col_scale_off[s] + (long long)(x0 / 128) * ((cols + 3) / 4 * 4) + col] = __frcp_rn(mult);
    }
    // Whole tile, aligned columns: every thread of the block takes the staged path (uniform).
    const bool staged = n - x0 >= 128 && ((base * cols + (long long)x0) & 15) == 0 && (n & 15) == 0 &&
                        (reinterpret_cast<unsigned long long>(codes_t) & 15ull) == 0;
    if (staged) {
#pragma unroll
        for (int v = 0; v < 4; ++v)
            *reinterpret_cast<uint4*>(&ctile[j][64 * g + 16 * v]) =
                encode_column16<T, F, PITCH>(tile, 64 * g + 16 * v, j, mult);
        __syncthreads();
        // Warp w, pass q: columns 32q + 4w + lane/8, 16 bytes each at row 16·(lane % 8).
        const int chunk = lane & 7;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int cj = 32 * q + 4 * w + (lane >> 3);
            if (c0 + cj < cols)
                *reinterpret_cast<uint4*>(codes_t + base * cols + (long long)(c0 + cj) * n + x0 + 16 * chunk) =
                    *reinterpret_cast<const uint4*>(&ctile[cj][16 * chunk]);
        }
        return;
    }
    if (col >= cols) return;
    const int valid = min(64, n - x0 - 64 * g);  // rows of this thread's half in the segment
    u8* out = codes_t + base * cols + (long long)col * n + x0 + 64 * g;
    if (valid == 64 && (reinterpret_cast<unsigned long long>(out) & 15ull) == 0) {
#pragma unroll
        for (int v = 0; v < 4; ++v)
            reinterpret_cast<uint4*>(out)[v] = encode_column16<T, F, PITCH>(tile, 64 * g + 16 * v, j, mult);
    } else {
        for (int e = 0; e < valid; ++e) out[e] = encode<F>(__fmul_rn(to_f(tile[64 * g + e][j]), mult));
    }
}
