// FP8 quantization kernels (issue 13), bit-exact with the reference quantizers of
// `moe_reference::fp8` (TransformerEngine's rules, see docs/spec/fp8-recipes.md):
//
//   * encode (fp8_common.cuh): `cvt.rn.satfinite.{e4m3,e5m2}x2.f32` (round to nearest even
//     with subnormals, overflow and ±inf saturate to ±max, NaN becomes 0x7F), applied to
//     `x·scale` rounded once in f32 (`__fmul_rn`: never contracted);
//   * amax: `fmaxf(|x|)` from 0, NaN ignored (fmaxf returns the non-NaN operand);
//   * compute_scale_from_amax (TE `recipe_common.cuh`): epsilon floor, amax inf/0/NaN → 1,
//     `__fdiv_rn(fp8_max, amax)`, infinite quotient → value_for_inf, power-of-2 by masking the
//     mantissa; `scale_inv = __frcp_rn(scale)`;
//   * MXFP8: `float_to_e8m0(amax·max_norm_rcp)` (software path of TE's `ptx::float_to_e8m0`),
//     multiplier `exp2f_rcp(e) = 2^(127-e)`.
//
// Launch contract:
//   * `T` is the input dtype (f32, bf16 or fp16 bits); `F` the fp8 format (0 e4m3, 1 e5m2).
//   * `vec` (amax_seg, cast_seg): 1 only when cols % 8 == 0 and x is 16-byte aligned: eight
//     elements per load (the same per-element arithmetic).
//   * `amax_seg`: grid (any, segments), block 256; segment s covers rows
//     [seg_off[s], seg_off[s] + seg_len[s]) of a row-major [rows, cols] tensor; `amax` (one u32
//     per segment, the f32 bits of a non-negative value) must be zeroed before (atomicMax of
//     the bits orders non-negative floats).
//   * `compute_scales`: any 1-D grid covering n; reads amax bits, writes scale and scale_inv of
//     segment i at index i·stride (each scale on its own 256-byte line for cuBLASLt).
//   * `cast_seg`: any 1-D grid, block 256 (grid-stride over rows, or over 8-element chunks with
//     vec); row r uses scale[row_seg[r]·stride]; with vec `out` is 8-byte aligned.
//   * `transpose_seg_u8`: grid (32-row tiles of all segments, ceil(cols/32)), block (32, 8):
//     each segment's [seg_len, cols] rows transposed in place of their bytes (below).
//   * `transpose_seg_u8x16`: the same transpose with 16-byte accesses, grid (32-row tiles of all
//     segments, ceil(cols/128)), block 256; needs cols and every seg_len a multiple of 16 (the
//     fp8 layers' padded experts) and 16-byte aligned buffers.
//   * `block_quant_both128_seg`: `block_tile_quant`'s contract (fp8_common.cuh); the
//     `block_quant_{row,col}128_seg` pair serves widths that are not multiples of 4.
//   * `cast_both_seg`: `block_tile_quant`'s contract with BLOCK false (`seg.tiles` the 128-row
//     tiles): `cast_seg` and the segmented transpose in one pass, for widths that are
//     multiples of 4.
//   * `block_quant`: grid (ceil(R/tile_r), ceil(C/tile_c)), block 256, one block per tile of
//     the logical tensor L: L = x ([R, C] = [rows, cols]) or, with `trans`, L = xᵀ
//     ([R, C] = [cols, rows]); writes L's codes [R, C] row-major and one scale per tile,
//     grid [ceil(R/tile_r), ceil(C/tile_c)] row-major: f32 scale_inv (mode 0) or an E8M0 byte
//     (mode 1, MXFP8). Edge tiles are partial (TE's zero-padding does not change an amax).
// No CUDA headers (NVRTC); compiled after fp8_common.cuh (the dtypes, the encodes, `block_max`,
// the one-pass block tile `block_tile_quant`); the fp8 cvt needs sm_89 or later.

// Eight consecutive elements from a 16-byte-aligned address, as f32.
__device__ __forceinline__ void load8(const float* p, float v[8]) {
    float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
__device__ __forceinline__ void load8(const bf16_t* p, float v[8]) {
    uint4 a = *reinterpret_cast<const uint4*>(p);
    u32 w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        v[2 * i] = __uint_as_float(w[i] << 16);
        v[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
}
__device__ __forceinline__ void load8(const f16_t* p, float v[8]) {
    uint4 a = *reinterpret_cast<const uint4*>(p);
    u32 w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f16_t lo = {(u16)(w[i] & 0xFFFF)}, hi = {(u16)(w[i] >> 16)};
        v[2 * i] = to_f(lo);
        v[2 * i + 1] = to_f(hi);
    }
}

// TE's ptx::float_to_e8m0, software path.
__device__ __forceinline__ u8 float_to_e8m0(float v) {
    if (is_nan(v)) return 0xFF;
    if (is_inf(v)) return 0xFE;
    if (v == 0.0f) return 0x00;
    u32 bits = __float_as_uint(v);
    u32 e = (bits >> 23) & 0xFF;
    u32 m = bits & 0x7FFFFF;
    if (m > 0 && e != 0xFE && !(e == 0 && m <= 0x400000)) return (u8)(e + 1);
    return (u8)e;
}

// TE's ptx::exp2f_rcp: 2^(127 - e).
__device__ __forceinline__ float exp2f_rcp(u8 e) {
    if (e == 255) return __uint_as_float(0x7FFFFFFFu);
    if (e == 254) return __uint_as_float(0x00400000u);
    return __uint_as_float(((u32)(254 - e)) << 23);
}

template <typename T>
__device__ void amax_seg(const T* x, const int* seg_off, const int* seg_len, int cols, int vec, u32* amax) {
    int s = blockIdx.y;
    long base = (long)seg_off[s] * cols;
    long n = (long)seg_len[s] * cols;
    float acc = 0.0f;
    long stride = (long)gridDim.x * blockDim.x;
    if (vec) {  // cols % 8 == 0: every segment starts 16-byte aligned
        for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n / 8; i += stride) {
            float v[8];
            load8(x + base + 8 * i, v);
#pragma unroll
            for (int j = 0; j < 8; ++j) acc = fmaxf(acc, fabsf(v[j]));
        }
    } else {
        for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
            acc = fmaxf(acc, fabsf(to_f(x[base + i])));
    }
    acc = block_max(acc);
    if (threadIdx.x == 0 && acc > 0.0f) atomicMax(amax + s, __float_as_uint(acc));
}

extern "C" __global__ void compute_scales(const u32* amax, int n, int stride, float fp8_max, int pow2, float eps,
                                          float vinf, float* scale, float* scale_inv) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float s = scale_from_amax(__uint_as_float(amax[i]), fp8_max, pow2, eps, vinf);
    scale[(long)i * stride] = s;
    scale_inv[(long)i * stride] = __frcp_rn(s);
}

// Delayed scaling (TE `DelayedScaling`, `moe_reference::fp8::delayed`): the state of tensor
// t = expert·n_ops + op is `state_scale[t]` and the amax history `history[t·len .. t·len+len]`.
//   * `delayed_scales`: segment s (expert s) takes its operand's scale from the state;
//     scale_inv = 1/scale (f32 division), at index s·stride.
//   * `delayed_record`: folds segment s's amax (f32 bits) into history[0] of its tensor (fmaxf).
//   * `delayed_update`: TE's fused `kernel_bulk` per tensor (one thread each): roll the history
//     when last_amax != 0, amax = fmaxf over the pre-roll window (or last_amax for most_recent),
//     scale = scaled_max / amax when amax is finite and positive, inf → f32 max.
extern "C" __global__ void delayed_scales(const float* state_scale, int op, int n_ops, int segs, int stride,
                                          float* scale, float* scale_inv) {
    int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= segs) return;
    float v = state_scale[(long)s * n_ops + op];
    scale[(long)s * stride] = v;
    scale_inv[(long)s * stride] = __fdiv_rn(1.0f, v);
}

extern "C" __global__ void delayed_record(const u32* amax, int op, int n_ops, int segs, int len, float* history) {
    int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= segs) return;
    float* h = history + ((long)s * n_ops + op) * len;
    h[0] = fmaxf(h[0], __uint_as_float(amax[s]));
}

extern "C" __global__ void delayed_update(float* history, float* scale, const float* scaled_max, int n, int n_ops,
                                          int len, int most_recent) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    float* h = history + (long)t * len;
    float last = h[0];
    float window = 0.0f;
    if (last != 0.0f) {
        for (int i = 0; i < len; ++i) {
            float a = i < len - 1 ? h[i + 1] : last;  // h[i + 1] is read before it is written
            window = fmaxf(window, a);
            h[i] = i > 0 ? a : 0.0f;
        }
    }
    float amax = most_recent ? last : window;
    float sc = scale[t];
    if (!is_inf(amax) && !is_nan(amax) && amax > 0.0f) sc = __fdiv_rn(scaled_max[t % n_ops], amax);
    if (is_inf(sc)) sc = 3.40282347e38f;
    scale[t] = sc;
}

template <typename T, int F>
__device__ void cast_seg(const T* x, const int* row_seg, int rows, int cols, const float* scale, int stride, int vec,
                         u8* out) {
    if (vec) {  // cols % 8 == 0: eight elements of one row per step, one 8-byte store
        long chunks = (long)rows * cols / 8;
        for (long c = (long)blockIdx.x * blockDim.x + threadIdx.x; c < chunks; c += (long)gridDim.x * blockDim.x) {
            long r = c * 8 / cols;
            float s = scale[(long)row_seg[r] * stride];
            float v[8];
            load8(x + 8 * c, v);
            uint2 w;
            w.x = encode2<F>(__fmul_rn(v[0], s), __fmul_rn(v[1], s)) | (encode2<F>(__fmul_rn(v[2], s), __fmul_rn(v[3], s)) << 16);
            w.y = encode2<F>(__fmul_rn(v[4], s), __fmul_rn(v[5], s)) | (encode2<F>(__fmul_rn(v[6], s), __fmul_rn(v[7], s)) << 16);
            reinterpret_cast<uint2*>(out)[c] = w;
        }
        return;
    }
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        float s = scale[(long)row_seg[r] * stride];
        long base = (long)r * cols;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) out[base + c] = encode<F>(__fmul_rn(to_f(x[base + c]), s));
    }
}

// The 32x32 tile at (r0, c0) of the transpose of a row-major [rows, cols] byte matrix into
// [cols, rows].
__device__ __forceinline__ void transpose_tile(const u8* in, int rows, int cols, u8* out, int r0, int c0) {
    __shared__ u8 tile[32][33];
    for (int i = threadIdx.y; i < 32; i += 8) {
        int r = r0 + i, c = c0 + threadIdx.x;
        if (r < rows && c < cols) tile[i][threadIdx.x] = in[(long)r * cols + c];
    }
    __syncthreads();
    for (int i = threadIdx.y; i < 32; i += 8) {
        int c = c0 + i, r = r0 + threadIdx.x;
        if (r < rows && c < cols) out[(long)c * rows + r] = tile[threadIdx.x][i];
    }
}

// Every segment in one launch: grid (row tiles of all segments, ceil(cols/32)), block (32, 8);
// `tiles` holds (segment, first row within the segment) of each 32-row tile, segment by segment.
// Segment s (rows [seg_off, seg_off + seg_len) of a row-major [rows, cols] tensor) becomes its
// [cols, seg_len] transpose at byte seg_off·cols of `out`.
extern "C" __global__ void transpose_seg_u8(const u8* in, const int* seg_off, const int* seg_len, const int* tiles,
                                            int cols, u8* out) {
    int s = tiles[2 * blockIdx.x], r0 = tiles[2 * blockIdx.x + 1];
    long off = (long)seg_off[s] * cols;
    transpose_tile(in + off, seg_len[s], cols, out + off, r0, blockIdx.y * 32);
}

// transpose_seg_u8 with 16-byte loads and stores: a block moves a 32-row x 128-column tile (4
// KiB; the byte kernel's 1 KiB tiles left the copy bound by block scheduling). Thread t loads
// 16 bytes of row t / 8 into shared memory, then packs column j = t / 2's bytes of rows
// 16·(t % 2) .. +15 into one 16-byte store of the transposed row j. With seg_len and cols
// multiples of 16, every 16-row group and 16-byte chunk is wholly inside or wholly outside the
// segment.
extern "C" __global__ void __launch_bounds__(256) transpose_seg_u8x16(const u8* in, const int* seg_off, const int* seg_len,
                                                                       const int* tiles, int cols, u8* out) {
    constexpr int STRIDE = 144;  // bytes per shared row: 128 + 16 of padding
    __shared__ __align__(16) u8 tile[32 * STRIDE];
    const int s = tiles[2 * blockIdx.x], r0 = tiles[2 * blockIdx.x + 1];
    const int rows = seg_len[s], c0 = blockIdx.y * 128, t = threadIdx.x;
    const long off = (long)seg_off[s] * cols;
    {
        const int r = t >> 3, c = c0 + 16 * (t & 7);
        if (r0 + r < rows && c < cols)
            *reinterpret_cast<uint4*>(tile + r * STRIDE + 16 * (t & 7)) =
                *reinterpret_cast<const uint4*>(in + off + (long)(r0 + r) * cols + c);
    }
    __syncthreads();
    const int j = t >> 1, h = t & 1;
    if (c0 + j < cols && r0 + 16 * h < rows) {
        u32 w[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const u8* col = tile + (16 * h + 4 * q) * STRIDE + j;
            w[q] = (u32)col[0] | ((u32)col[STRIDE] << 8) | ((u32)col[2 * STRIDE] << 16) | ((u32)col[3 * STRIDE] << 24);
        }
        *reinterpret_cast<uint4*>(out + off + (long)(c0 + j) * rows + r0 + 16 * h) = make_uint4(w[0], w[1], w[2], w[3]);
    }
}

template <typename T, int F>
__device__ void block_quant(const T* x, int rows, int cols, BlockParams bp, u8* codes, float* scale_inv, u8* e8m0) {
    int R = bp.trans ? cols : rows, C = bp.trans ? rows : cols;
    int ti = blockIdx.y, tj = blockIdx.x;
    int r0 = ti * bp.tile_r, c0 = tj * bp.tile_c;
    int th = min(bp.tile_r, R - r0), tw = min(bp.tile_c, C - c0);
    int n = th * tw;
    float acc = 0.0f;
    for (int k = threadIdx.x; k < n; k += blockDim.x) {
        int i = r0 + k / tw, j = c0 + k % tw;
        long src = bp.trans ? (long)j * cols + i : (long)i * cols + j;
        acc = fmaxf(acc, fabsf(to_f(x[src])));
    }
    float amax = block_max(acc);
    int grid_c = (C + bp.tile_c - 1) / bp.tile_c;
    float mult;
    if (bp.mode == 0) {
        mult = scale_from_amax(amax, bp.fp8_max, bp.pow2, bp.eps, bp.vinf);
        if (threadIdx.x == 0) scale_inv[(long)ti * grid_c + tj] = __frcp_rn(mult);
    } else {
        u8 e = float_to_e8m0(__fmul_rn(amax, bp.max_norm_rcp));
        mult = exp2f_rcp(e);
        if (threadIdx.x == 0) e8m0[(long)ti * grid_c + tj] = e;
    }
    for (int k = threadIdx.x; k < n; k += blockDim.x) {
        int i = r0 + k / tw, j = c0 + k % tw;
        long src = bp.trans ? (long)j * cols + i : (long)i * cols + j;
        codes[(long)i * C + j] = encode<F>(__fmul_rn(to_f(x[src]), mult));
    }
}

#define INSTANTIATE_IN(T, S)                                                                                    \
    extern "C" __global__ void amax_seg_##S(const T* x, const int* seg_off, const int* seg_len, int cols,      \
                                            int vec, u32* amax) {                                               \
        amax_seg<T>(x, seg_off, seg_len, cols, vec, amax);                                                     \
    }                                                                                                           \
    extern "C" __global__ void cast_seg_##S##_e4m3(const T* x, const int* row_seg, int rows, int cols,         \
                                                   const float* scale, int stride, int vec, u8* out) {          \
        cast_seg<T, 0>(x, row_seg, rows, cols, scale, stride, vec, out);                                        \
    }                                                                                                           \
    extern "C" __global__ void cast_seg_##S##_e5m2(const T* x, const int* row_seg, int rows, int cols,         \
                                                   const float* scale, int stride, int vec, u8* out) {          \
        cast_seg<T, 1>(x, row_seg, rows, cols, scale, stride, vec, out);                                        \
    }                                                                                                           \
    extern "C" __global__ void block_quant_##S##_e4m3(const T* x, int rows, int cols, BlockParams bp,          \
                                                      u8* codes, float* scale_inv, u8* e8m0) {                  \
        block_quant<T, 0>(x, rows, cols, bp, codes, scale_inv, e8m0);                                          \
    }                                                                                                           \
    extern "C" __global__ void block_quant_##S##_e5m2(const T* x, int rows, int cols, BlockParams bp,          \
                                                      u8* codes, float* scale_inv, u8* e8m0) {                  \
        block_quant<T, 1>(x, rows, cols, bp, codes, scale_inv, e8m0);                                          \
    }

INSTANTIATE_IN(float, f32)
INSTANTIATE_IN(bf16_t, bf16)
INSTANTIATE_IN(f16_t, f16)

// 1x128 tiles (f32 scales, `mode` 0), the activations' and gradients' block shape, with
// coalesced access; the same per-tile arithmetic as `block_quant` (an amax is a max, so its
// reduction order does not change it), so the same bits.
//   * rowwise (`block_quant_row128`): grid (ceil(rows/8), ceil(cols/128)), block 256: warp w
//     quantizes tile (blockIdx.x·8 + w, blockIdx.y), four consecutive elements per lane.
//   * columnwise (`block_quant_col128`, the logical tensor L = xᵀ, [cols, rows]): grid
//     (ceil(rows/128), ceil(cols/32)), block 256: a 128-row x 32-column patch of x through
//     shared memory, warp w quantizes L rows (x columns) blockIdx.y·32 + 4w .. + 4.
// Codes of L row-major, scale_inv on the [rows_L, ceil(cols_L/128)] grid as `block_quant`.
// The `_seg` forms (`BlockSegs` above): rowwise the same grid over all rows; columnwise grid
// (128-row tiles of all segments, ceil(cols/32)), segment s's L = x_sᵀ [cols, len_s] at byte
// seg_off[s]·cols.
template <typename T, int F>
__device__ void block_quant_row128(const T* x, int rows, int cols, BlockParams bp, u8* codes, float* scale_inv,
                                   const BlockSegs* seg = nullptr) {
    int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int r = blockIdx.x * 8 + w, c0 = blockIdx.y * 128 + lane * 4;
    if (r >= rows) return;
    float v[4];
    float acc = 0.0f;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        v[q] = c0 + q < cols ? to_f(x[(long)r * cols + c0 + q]) : 0.0f;
        acc = fmaxf(acc, fabsf(v[q]));
    }
    float amax = warp_max(acc);
    float mult = scale_from_amax(amax, bp.fp8_max, bp.pow2, bp.eps, bp.vinf);
    if (lane == 0) {
        long at;
        if (seg == nullptr) {
            at = (long)r * ((cols + 127) / 128) + blockIdx.y;
        } else {  // segment s's GEMM layout [ceil(cols/128), round_up(len_s, 4)]
            int s = seg->row_seg[r];
            int ld = (seg->seg_len[s] + 3) / 4 * 4;
            at = seg->scale_off[s] + (long)blockIdx.y * ld + (r - seg->seg_off[s]);
        }
        scale_inv[at] = __frcp_rn(mult);
    }
#pragma unroll
    for (int q = 0; q < 4; ++q)
        if (c0 + q < cols) codes[(long)r * cols + c0 + q] = encode<F>(__fmul_rn(v[q], mult));
}

template <typename T, int F>
__device__ void block_quant_col128(const T* x, int rows, int cols, BlockParams bp, u8* codes, float* scale_inv,
                                   const BlockSegs* seg = nullptr) {
    __shared__ float patch[128][33];
    int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    // The rows of this tile: x rows [base + x0, base + min(x0 + 128, n)) of a tensor of n rows
    // (one segment of `seg`: its codes [cols, n] at byte base·cols, its scales in its GEMM
    // layout at scale_off; else the whole x).
    int x0 = blockIdx.x * 128, i0 = blockIdx.y * 32, n = rows;
    long base = 0;
    float* scales = scale_inv;
    if (seg != nullptr) {
        int s = seg->tiles[2 * blockIdx.x];
        x0 = seg->tiles[2 * blockIdx.x + 1];
        n = seg->seg_len[s];
        base = seg->seg_off[s];
        scales = scale_inv + seg->scale_off[s];
        codes += base * cols;
    }
    for (int k = w; k < 128; k += 8) {
        int xr = x0 + k, xc = i0 + lane;
        patch[k][lane] = xr < n && xc < cols ? to_f(x[(base + xr) * cols + xc]) : 0.0f;
    }
    __syncthreads();
    int grid_c = (n + 127) / 128;
    int ld = (cols + 3) / 4 * 4;
    for (int q = 0; q < 4; ++q) {
        int col = w * 4 + q, i = i0 + col;  // L row i = x column i
        if (i >= cols) break;
        float v[4];
        float acc = 0.0f;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            v[e] = patch[lane * 4 + e][col];
            acc = fmaxf(acc, fabsf(v[e]));
        }
        float amax = warp_max(acc);
        float mult = scale_from_amax(amax, bp.fp8_max, bp.pow2, bp.eps, bp.vinf);
        if (lane == 0) {
            // Whole tensor: the [cols, ceil(n/128)] grid; a segment: its GEMM layout
            // [ceil(n/128), round_up(cols, 4)].
            long at = seg == nullptr ? (long)i * grid_c + blockIdx.x : (long)(x0 / 128) * ld + i;
            scales[at] = __frcp_rn(mult);
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            int xr = x0 + lane * 4 + e;
            if (xr < n) codes[(long)i * n + xr] = encode<F>(__fmul_rn(v[e], mult));
        }
    }
}

// `block_quant_both128_seg`: both segmented 1x128 operands of x in one pass (`block_tile_quant`,
// its launch contract; x 16-byte aligned): the codes and scales `block_quant_row128_seg` and
// `block_quant_col128_seg` write, bit for bit, reading x once.
template <typename T>
struct LoadSource {
    const T* x;
    int cols;
    typedef Pack4<sizeof(T)> Raw;
    static constexpr int BATCH = 4;
    __device__ __forceinline__ void begin(int, int) {}
    __device__ __forceinline__ void load(long long r, int c, Raw& raw) { raw = load_pack4<T>(x + r * cols + c); }
    __device__ __forceinline__ void make(const Raw& raw, long long, int, int, float (&z)[4]) { unpack4<T>(raw, z); }
};

#define BLOCK128_KERNELS(T, S)                                                                                       \
    extern "C" __global__ void block_quant_row128_##S##_e4m3(const T* x, int rows, int cols, BlockParams bp,         \
                                                             u8* codes, float* scale_inv) {                           \
        block_quant_row128<T, 0>(x, rows, cols, bp, codes, scale_inv);                                                \
    }                                                                                                                 \
    extern "C" __global__ void block_quant_row128_##S##_e5m2(const T* x, int rows, int cols, BlockParams bp,         \
                                                             u8* codes, float* scale_inv) {                           \
        block_quant_row128<T, 1>(x, rows, cols, bp, codes, scale_inv);                                                \
    }                                                                                                                 \
    extern "C" __global__ void block_quant_col128_##S##_e4m3(const T* x, int rows, int cols, BlockParams bp,         \
                                                             u8* codes, float* scale_inv) {                           \
        block_quant_col128<T, 0>(x, rows, cols, bp, codes, scale_inv);                                                \
    }                                                                                                                 \
    extern "C" __global__ void block_quant_col128_##S##_e5m2(const T* x, int rows, int cols, BlockParams bp,         \
                                                             u8* codes, float* scale_inv) {                           \
        block_quant_col128<T, 1>(x, rows, cols, bp, codes, scale_inv);                                                \
    }
#define BLOCK128_SEG_KERNELS(T, S, F, N)                                                                             \
    extern "C" __global__ void __launch_bounds__(256) block_quant_both128_seg_##S##_##N(                             \
        const T* x, int cols, BlockParams bp, BlockSegs seg, const long long* col_scale_off, u8* codes,              \
        float* scale_inv, u8* codes_t, float* scale_inv_t) {                                                         \
        LoadSource<T> src{x, cols};                                                                                   \
        block_tile_quant<T, F, true>(src, cols, bp, seg, col_scale_off, codes, scale_inv, codes_t, scale_inv_t);     \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(256) cast_both_seg_##S##_##N(                                       \
        const T* x, int cols, BlockSegs seg, const float* scale, int stride, u8* codes, u8* codes_t) {               \
        LoadSource<T> src{x, cols};                                                                                   \
        block_tile_quant<T, F, false>(src, cols, BlockParams{}, seg, nullptr, codes, nullptr, codes_t, nullptr,      \
                                      scale, stride);                                                                 \
    }                                                                                                                 \
    extern "C" __global__ void block_quant_row128_seg_##S##_##N(const T* x, int rows, int cols, BlockParams bp,      \
                                                                BlockSegs seg, u8* codes, float* scale_inv) {         \
        block_quant_row128<T, F>(x, rows, cols, bp, codes, scale_inv, &seg);                                          \
    }                                                                                                                 \
    extern "C" __global__ void block_quant_col128_seg_##S##_##N(const T* x, int rows, int cols, BlockParams bp,      \
                                                                BlockSegs seg, u8* codes, float* scale_inv) {         \
        block_quant_col128<T, F>(x, rows, cols, bp, codes, scale_inv, &seg);                                          \
    }
BLOCK128_SEG_KERNELS(float, f32, 0, e4m3)
BLOCK128_SEG_KERNELS(float, f32, 1, e5m2)
BLOCK128_SEG_KERNELS(bf16_t, bf16, 0, e4m3)
BLOCK128_SEG_KERNELS(bf16_t, bf16, 1, e5m2)
BLOCK128_SEG_KERNELS(f16_t, f16, 0, e4m3)
BLOCK128_SEG_KERNELS(f16_t, f16, 1, e5m2)
BLOCK128_KERNELS(float, f32)
BLOCK128_KERNELS(bf16_t, bf16)
BLOCK128_KERNELS(f16_t, f16)

// `block_scales_gemm`: the f32 scale grid `in` [gr, gc] (row-major, as `block_quant` writes it)
// into cuBLASLt's block-scale layout: `out[i·ld + j]` (trans 0, 128×128 blocks:
// [ceil(rows/128), ld ≥ ceil(K/128)]) or `out[j·ld + i]` (trans 1, 1×128 blocks:
// [ceil(K/128), ld ≥ rows]); padding entries are left as they are. Grid-stride, block 256.
extern "C" __global__ void block_scales_gemm(const float* in, int gr, int gc, int trans, int ld, float* out) {
    long n = (long)gr * gc;
    for (long t = (long)blockIdx.x * blockDim.x + threadIdx.x; t < n; t += (long)gridDim.x * blockDim.x) {
        long i = t / gc, j = t % gc;
        out[trans ? j * ld + i : i * ld + j] = in[t];
    }
}
