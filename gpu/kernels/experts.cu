// Elementwise kernels of the MoE expert layers (spec §4, §5), one fused pass each way.
//
// Launch contract (all kernels):
//   * `T` is the storage dtype (bf16, fp16 or fp32); every value is computed in f32 inside the
//     kernel and rounded to `T` on store, round-to-nearest-even (spec §4.8).
//   * Row-major buffers; `rows` counts the (padded) token rows of the whole call; `row_expert[r]`
//     is the local expert of row r (needed for per-expert biases).
//   * probs are f32 on the device (every probs dtype is a subset of f32); `probs_dt` says how
//     probs gradients are rounded on store: 0 = f32, 1 = bf16, 2 = fp16.
//   * Elementwise kernels use a grid-stride loop over rows with any 1-D grid (threads over the
//     row's columns, so no per-element index division); row kernels (`act_bwd`,
//     `probs_in_bwd`) take one block of 256 threads per row (grid.x = rows); `col_sum` takes
//     grid = (ceil(cols / 256), experts), block 256.
// No CUDA headers: bf16/fp16 conversions are done in fp8_common.cuh (compiled first), the
// rounding by cvt.rn (round to nearest even; the bf16 form needs sm_80 or later).
// The activation kernels are memory-bound only when their per-element code is short: the
// common case (GLU silu without clamp, offset or separate fc1 bias) takes a path specialized at
// compile time (act_fwd_glu_silu, act_bwd_glu_silu; bit-identical to the general one), which
// measured at the copy roofline on an H100 (docs/performance.md, "Activation kernels").
// `act_fwd_q` is `act_fwd` quantizing its own output for fc2's fp8 input in the same pass
// (issue 13: no extra pass over the activations): mode q = 1 also writes the per-segment amax
// of the stored u (f32 bits, atomicMax, `amax` zeroed before; current scaling then casts with
// the scales computed from it), q = 2 / 3 also the e4m3 / e5m2 codes of u at the segment's
// known scale (delayed scaling: `scale[row_expert[r]·stride]`). The codes and amax are those
// of `fp8.cu`'s amax_seg and cast_seg on the stored u (same values, same encode); with vectors
// `codes` must be 8-byte aligned. `act_bwd_q` is `act_bwd` doing the same for its output da
// (fc1's output gradient, the fp8 dgrad and wgrad GEMMs' operand), the same modes.
// `act_fwd_blk` is `act_fwd` writing the blockwise recipe's two 1x128 operands of u (rowwise
// and columnwise codes and scales) in the same pass, those of `fp8.cu`'s block_quant_row128_seg
// and block_quant_col128_seg on the stored u (launch contract at the kernel).

// Rounds an f32 value to T and back (a store followed by a load).
template <typename T> __device__ __forceinline__ float rnd(float f) { return to_f(from_f<T>(f)); }

__device__ __forceinline__ float rnd_probs(float f, int probs_dt) {
    if (probs_dt == 1) return rnd<bf16_t>(f);
    if (probs_dt == 2) return rnd<f16_t>(f);
    return f;
}

// Activations: 0 silu, 1 gelu (exact erf), 2 quick_gelu, 3 squared_relu.
__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float act_apply(int act, float x) {
    switch (act) {
        case 0: return x * sigmoidf_(x);
        case 1: return x * 0.5f * (1.0f + erff(x * 0.70710678118654752f));
        case 2: return x * sigmoidf_(1.702f * x);
        default: { float r = fmaxf(x, 0.0f); return r * r; }
    }
}
__device__ __forceinline__ float act_deriv(int act, float x) {
    switch (act) {
        case 0: { float s = sigmoidf_(x); return s * (1.0f + x * (1.0f - s)); }
        case 1: {
            float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
            float pdf = expf(-0.5f * x * x) * 0.39894228040143268f;
            return cdf + x * pdf;
        }
        case 2: { float s = sigmoidf_(1.702f * x); return s * (1.0f + 1.702f * x * (1.0f - s)); }
        default: return 2.0f * fmaxf(x, 0.0f);
    }
}

struct ActParams {
    int glu;        // gated linear unit
    int act;        // activation id
    int eager;      // 1: per-op rounding (SequentialMLP, TEGroupedMLP); 0: fp32 chain (GroupedMLP)
    int has_clamp;  // activation_func_clamp_value set (and honoured by the class)
    float clamp;
    float offset;   // glu_linear_offset as the class applies it
};

// z for one element: GLU pair (g, l) or plain a (l unused). Returns z as the class computes it
// (rounded to T when eager, unrounded f32 otherwise).
template <typename T>
__device__ __forceinline__ float act_z(const ActParams& ap, float g, float l) {
    if (ap.glu) {
        float gc = g, lc = l;
        if (ap.has_clamp) {
            gc = rnd<T>(fminf(g, ap.clamp));
            lc = rnd<T>(fminf(fmaxf(l, -ap.clamp), ap.clamp));
        }
        if (ap.eager) {
            float act_g = rnd<T>(act_apply(ap.act, gc));
            float lin = ap.offset != 0.0f ? rnd<T>(lc + ap.offset) : lc;
            return rnd<T>(act_g * lin);
        }
        return act_apply(ap.act, gc) * (lc + ap.offset);
    }
    return ap.eager ? rnd<T>(act_apply(ap.act, g)) : act_apply(ap.act, g);
}

// 16-byte vectors of T (8 bf16/fp16, 4 f32), the access width of the row kernels when a row's
// extent is a multiple of it and every pointer is 16-byte aligned (else they fall back to
// one element per thread). The arithmetic per element is the same either way.
template <typename T> struct Vec { static constexpr int N = 16 / sizeof(T); };
template <typename T>
__device__ __forceinline__ void vload(const T* p, float (&f)[Vec<T>::N]) {
    const uint4 w = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
    for (int i = 0; i < Vec<T>::N; ++i) f[i] = to_f(e[i]);
}
template <typename T>
__device__ __forceinline__ void vstore(T* p, const float (&f)[Vec<T>::N]) {
    uint4 w;
    T* e = reinterpret_cast<T*>(&w);
#pragma unroll
    for (int i = 0; i < Vec<T>::N; ++i) e[i] = from_f<T>(f[i]);
    *reinterpret_cast<uint4*>(p) = w;
}
__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

// One element of the forward activation block: the fc1 bias (SequentialMLP) added and rounded
// into g and l when `bias`, then z as the class computes it (act_z).
template <typename T>
__device__ __forceinline__ float act_fwd_elem(const ActParams& ap, float& g, float& l, bool bias,
                                              float bg, float bl) {
    if (bias) {
        g = rnd<T>(g + bg);
        if (ap.glu) l = rnd<T>(l + bl);
    }
    return act_z<T>(ap, g, l);
}


// The hot path: GLU silu without clamp, offset or fc1 bias, 16-byte vectors; EAGER = per-op
// rounding (SequentialMLP, TEGroupedMLP), else the fp32 chain (GroupedMLP). The same arithmetic
// as act_z / act_bwd_elem with those settings, in the same order (so the same bits), with the
// sigmoid computed once per element and no per-element branches.
// The fp8 side of `act_fwd_q` (Q > 0). Q: 0 none, 1 amax, 2 amax and e4m3 codes, 3 amax and
// e5m2 codes. The amax runs over the rows of one segment at a time: rows are visited in order
// by a whole block, so a segment change is block-uniform and flushes the block's max with one
// atomicMax (only a positive max: amax_seg's rule).
template <int Q>
struct ActFp8 {
    u32* amax;
    const float* scale;
    int stride;
    u8* codes;
    int seg = -1;
    float run = 0.0f;
    float s = 0.0f;
    // Row r of segment `e` starts: flush the previous segment's max when the segment changed.
    __device__ __forceinline__ void row(int e) {
        if (Q == 0) return;
        if (e != seg) {
            flush();
            seg = e;
            run = 0.0f;
        }
        if (Q >= 2) s = scale[(long)e * stride];
    }
    __device__ __forceinline__ void flush() {
        if (Q == 0 || seg < 0) return;
        const float m = block_max(run);
        if (threadIdx.x == 0 && m > 0.0f) atomicMax(amax + seg, __float_as_uint(m));
    }
    // N stored values (already rounded to the storage dtype) at element `at` of the codes.
    template <int N>
    __device__ __forceinline__ void values(const float (&v)[N], long long at) {
        if (Q == 0) return;
#pragma unroll
        for (int i = 0; i < N; ++i) run = fmaxf(run, fabsf(v[i]));
        if constexpr (Q >= 2) {
            constexpr int F = Q - 2;
            if constexpr (N == 1) {
                codes[at] = encode<F>(__fmul_rn(v[0], s));
            } else {
                u32 w[N / 4];
#pragma unroll
                for (int i = 0; i < N / 4; ++i)
                    w[i] = encode2<F>(__fmul_rn(v[4 * i], s), __fmul_rn(v[4 * i + 1], s)) |
                           (encode2<F>(__fmul_rn(v[4 * i + 2], s), __fmul_rn(v[4 * i + 3], s)) << 16);
                if constexpr (N == 8) {
                    reinterpret_cast<uint2*>(codes + at)[0] = make_uint2(w[0], w[1]);
                } else {
                    reinterpret_cast<u32*>(codes + at)[0] = w[0];
                }
            }
        }
    }
};

// The stored values of z (rounded to T) in place.
template <typename T, int N>
__device__ __forceinline__ void round_to(float (&z)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) z[i] = rnd<T>(z[i]);
}

template <typename T, bool EAGER, int Q>
__device__ __forceinline__ void act_fwd_glu_silu(const T* a, const float* p, const int* row_expert, T* u, int rows,
                                                 int n2, ActFp8<Q>& q) {
    constexpr int N = Vec<T>::N;
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* arow = a + r * 2 * n2;
        T* urow = u + r * n2;
        const float pr = p[r];
        q.row(Q > 0 ? row_expert[r] : 0);
        for (int j = threadIdx.x * N; j < n2; j += blockDim.x * N) {
            float g[N], l[N], z[N];
            vload<T>(arow + j, g);
            vload<T>(arow + n2 + j, l);
#pragma unroll
            for (int i = 0; i < N; ++i) {
                const float act = g[i] * sigmoidf_(g[i]);
                z[i] = (EAGER ? rnd<T>(rnd<T>(act) * l[i]) : act * (l[i] + 0.0f)) * pr;
            }
            if (Q > 0) round_to<T>(z);
            vstore<T>(urow + j, z);
            q.values(z, r * n2 + j);
        }
    }
    q.flush();
}
template <typename T, bool EAGER, int Q>
__device__ __forceinline__ float act_bwd_glu_silu(const T* arow, const T* durow, T* darow, float pr, int n2,
                                                  ActFp8<Q>& q, long long at) {
    constexpr int N = Vec<T>::N;
    float acc = 0.0f;
    for (int j = threadIdx.x * N; j < n2; j += blockDim.x * N) {
        float dui[N], g[N], l[N], dg[N], dl[N];
        vload<T>(durow + j, dui);
        vload<T>(arow + j, g);
        vload<T>(arow + n2 + j, l);
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const float s = sigmoidf_(g[i]);
            const float act = g[i] * s, deriv = s * (1.0f + g[i] * (1.0f - s));
            float z;
            if (EAGER) {
                const float dz = rnd<T>(dui[i] * pr);
                const float act_g = rnd<T>(act);
                const float d_act_g = rnd<T>(dz * l[i]);
                dl[i] = rnd<T>(dz * act_g);
                dg[i] = rnd<T>(d_act_g * deriv);
                z = rnd<T>(act_g * l[i]);
            } else {
                const float dz = dui[i] * pr, lin = l[i] + 0.0f;
                dg[i] = rnd<T>(dz * lin * deriv);
                dl[i] = rnd<T>(dz * act);
                z = act * lin;
            }
            acc += dui[i] * z;
        }
        vstore<T>(darow + j, dg);
        vstore<T>(darow + n2 + j, dl);
        q.values(dg, at + j);
        q.values(dl, at + n2 + j);
    }
    return acc;
}
// Forward activation block. a: [rows, n1] fc1 output (n1 = 2*n2 with GLU, n2 otherwise);
// b1: [experts, n1] or null (SequentialMLP's separately added fc1 bias: a <- round(a + b1),
// written back into a for backward); p: [rows] probs as applied after the activation;
// u: [rows, n2] output round(z * p).
template <typename T, int Q>
__device__ void act_fwd(T* a, const T* b1, const float* p, const int* row_expert, T* u,
                        int rows, int n2, ActParams ap, ActFp8<Q> q) {
    constexpr int N = Vec<T>::N;
    const int n1 = ap.glu ? 2 * n2 : n2;
    // With codes, a vector of N codes is stored at once (4 or 8 bytes, aligned by n2 % N == 0).
    const bool vec = n2 % N == 0 && aligned16(a) && aligned16(u) && (b1 == nullptr || aligned16(b1)) &&
                     (Q < 2 || (reinterpret_cast<unsigned long long>(q.codes) & 7ull) == 0);
    if (vec && ap.glu && ap.act == 0 && !ap.has_clamp && ap.offset == 0.0f && b1 == nullptr) {
        if (ap.eager) act_fwd_glu_silu<T, true, Q>(a, p, row_expert, u, rows, n2, q);
        else act_fwd_glu_silu<T, false, Q>(a, p, row_expert, u, rows, n2, q);
        return;
    }
    // Grid-stride over rows, threads over columns: no per-element 64-bit division.
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        T* arow = a + r * n1;
        T* urow = u + r * n2;
        const float pr = p[r];
        const T* brow = b1 != nullptr ? b1 + (long long)row_expert[r] * n1 : nullptr;
        q.row(Q > 0 ? row_expert[r] : 0);
        if (vec) {
            for (int j = threadIdx.x * N; j < n2; j += blockDim.x * N) {
                float g[N], l[N], bg[N], bl[N], z[N];
                vload<T>(arow + j, g);
                if (ap.glu) vload<T>(arow + n2 + j, l);
                if (brow != nullptr) {
                    vload<T>(brow + j, bg);
                    if (ap.glu) vload<T>(brow + n2 + j, bl);
                }
#pragma unroll
                for (int i = 0; i < N; ++i) {
                    if (!ap.glu) l[i] = 0.0f;
                    const bool bias = brow != nullptr;
                    z[i] = act_fwd_elem<T>(ap, g[i], l[i], bias, bias ? bg[i] : 0.0f,
                                           bias && ap.glu ? bl[i] : 0.0f) * pr;
                }
                if (brow != nullptr) {
                    vstore<T>(arow + j, g);
                    if (ap.glu) vstore<T>(arow + n2 + j, l);
                }
                if (Q > 0) round_to<T>(z);
                vstore<T>(urow + j, z);
                q.values(z, r * n2 + j);
            }
        } else {
            for (int j = threadIdx.x; j < n2; j += blockDim.x) {
                float g = to_f(arow[j]);
                float l = ap.glu ? to_f(arow[n2 + j]) : 0.0f;
                const bool bias = brow != nullptr;
                const float z = act_fwd_elem<T>(ap, g, l, bias, bias ? to_f(brow[j]) : 0.0f,
                                                bias && ap.glu ? to_f(brow[n2 + j]) : 0.0f);
                if (bias) {
                    arow[j] = from_f<T>(g);
                    if (ap.glu) arow[n2 + j] = from_f<T>(l);
                }
                const float v[1] = {rnd<T>(z * pr)};
                urow[j] = from_f<T>(v[0]);
                q.values(v, r * n2 + j);
            }
        }
    }
    q.flush();
}

// `act_fwd_blk`: the forward activation block-quantizing its own output for fc2's input under
// the blockwise recipe: u as `act_fwd` writes it (and SequentialMLP's biased a), and both 1x128
// operands of the stored u in the same pass (`block_tile_quant`, its launch contract; also
// a, b1, u 16-byte aligned).
template <typename T>
struct ActSource {
    T* a;
    const T* b1;
    const float* p;
    T* u;
    int n2;
    ActParams ap;
    struct Raw {
        Pack4<sizeof(T)> g, l;
        float pr;
    };
    static constexpr int BATCH = 1;
    __device__ __forceinline__ void begin(int, int) {}
    __device__ __forceinline__ void load(long long r, int c, Raw& raw) {
        const T* arow = a + r * (ap.glu ? 2 * n2 : n2);
        raw.g = load_pack4<T>(arow + c);
        if (ap.glu) raw.l = load_pack4<T>(arow + n2 + c);
        raw.pr = p[r];
    }
    // z = round(act(a + b1)·p), SequentialMLP's fc1 bias (segment s's row of b1) added and
    // written back into a as `act_fwd` does.
    __device__ __forceinline__ void make(const Raw& raw, long long r, int s, int c, float (&z)[4]) {
        const int n1 = ap.glu ? 2 * n2 : n2;
        float g[4], l[4] = {0.0f, 0.0f, 0.0f, 0.0f}, bg[4] = {0.0f, 0.0f, 0.0f, 0.0f}, bl[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        unpack4<T>(raw.g, g);
        if (ap.glu) unpack4<T>(raw.l, l);
        const bool bias = b1 != nullptr;
        if (bias) {
            load4<T>(b1 + (long long)s * n1 + c, bg);
            if (ap.glu) load4<T>(b1 + (long long)s * n1 + n2 + c, bl);
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) z[q] = rnd<T>(act_fwd_elem<T>(ap, g[q], l[q], bias, bg[q], bl[q]) * raw.pr);
        if (bias) {
            store4<T>(a + r * n1 + c, g);
            if (ap.glu) store4<T>(a + r * n1 + n2 + c, l);
        }
        store4<T>(u + r * n2 + c, z);
    }
};

// One element of the backward activation block: from du and the fc1 output (g, l; l unused
// without GLU) the grads dg, dl (dl unused without GLU); returns z, whose product with du
// the probs gradient sums.
template <typename T>
__device__ __forceinline__ float act_bwd_elem(const ActParams& ap, float dui, float pr, float g,
                                              float l, float& dg, float& dl) {
    const float dz = ap.eager ? rnd<T>(dui * pr) : dui * pr;
    if (!ap.glu) {
        dg = dz * act_deriv(ap.act, g);
        dl = 0.0f;
        return ap.eager ? rnd<T>(act_apply(ap.act, g)) : act_apply(ap.act, g);
    }
    float gc = g, lc = l;
    bool gate_mask = true, lin_mask = true;
    if (ap.has_clamp) {
        gc = rnd<T>(fminf(g, ap.clamp));
        lc = rnd<T>(fminf(fmaxf(l, -ap.clamp), ap.clamp));
        gate_mask = g <= ap.clamp;
        lin_mask = (l >= -ap.clamp) && (l <= ap.clamp);
    }
    if (ap.eager) {
        const float act_g = rnd<T>(act_apply(ap.act, gc));
        const float lin = ap.offset != 0.0f ? rnd<T>(lc + ap.offset) : lc;
        const float d_act_g = rnd<T>(dz * lin);
        const float d_lin = rnd<T>(dz * act_g);
        dg = gate_mask ? rnd<T>(d_act_g * act_deriv(ap.act, gc)) : 0.0f;
        dl = lin_mask ? d_lin : 0.0f;
        return rnd<T>(act_g * lin);
    }
    dg = rnd<T>(dz * (lc + ap.offset) * act_deriv(ap.act, gc));
    dl = rnd<T>(dz * act_apply(ap.act, gc));
    return act_apply(ap.act, gc) * (lc + ap.offset);
}

// Backward activation block, one block per row r. Inputs: a [rows, n1] (bias included), du
// [rows, n2] = round(G·W2), p [rows], g [rows, h] and b2 [experts, h] (null without fc2 bias).
// Outputs: da [rows, n1]; dp[r] = round_probs(Σ_j G_rj b2_j + Σ_j du_rj z_rj) when write_dp.
template <typename T, int Q>
__device__ void act_bwd(const T* a, const T* du, const float* p, const T* gout, const T* b2,
                        const int* row_expert, T* da, float* dp, int write_dp, int rows, int n2,
                        int h, ActParams ap, int probs_dt, ActFp8<Q> q) {
    constexpr int N = Vec<T>::N;
    __shared__ float red_act[256];
    __shared__ float red_bias[256];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const int n1 = ap.glu ? 2 * n2 : n2;
    const T* arow = a + (long long)r * n1;
    const T* durow = du + (long long)r * n2;
    T* darow = da + (long long)r * n1;
    const float pr = p[r];
    float acc = 0.0f;
    const long long at = (long long)r * n1;
    q.row(Q > 0 ? row_expert[r] : 0);
    const bool vec = n2 % N == 0 && aligned16(a) && aligned16(du) && aligned16(da) &&
                     (Q < 2 || (reinterpret_cast<unsigned long long>(q.codes) & 7ull) == 0);
    if (vec && ap.glu && ap.act == 0 && !ap.has_clamp && ap.offset == 0.0f) {
        acc = ap.eager ? act_bwd_glu_silu<T, true, Q>(arow, durow, darow, pr, n2, q, at)
                       : act_bwd_glu_silu<T, false, Q>(arow, durow, darow, pr, n2, q, at);
    } else if (vec) {
        for (int j = threadIdx.x * N; j < n2; j += blockDim.x * N) {
            float dui[N], g[N], l[N], dg[N], dl[N];
            vload<T>(durow + j, dui);
            vload<T>(arow + j, g);
            if (ap.glu) vload<T>(arow + n2 + j, l);
#pragma unroll
            for (int i = 0; i < N; ++i) {
                if (!ap.glu) l[i] = 0.0f;
                acc += dui[i] * act_bwd_elem<T>(ap, dui[i], pr, g[i], l[i], dg[i], dl[i]);
            }
            if (Q > 0) {
                round_to<T>(dg);
                round_to<T>(dl);
            }
            vstore<T>(darow + j, dg);
            if (ap.glu) vstore<T>(darow + n2 + j, dl);
            q.values(dg, at + j);
            if (ap.glu) q.values(dl, at + n2 + j);
        }
    } else {
        for (int j = threadIdx.x; j < n2; j += blockDim.x) {
            const float dui = to_f(durow[j]);
            float dg, dl;
            acc += dui * act_bwd_elem<T>(ap, dui, pr, to_f(arow[j]), ap.glu ? to_f(arow[n2 + j]) : 0.0f,
                                         dg, dl);
            darow[j] = from_f<T>(dg);
            if (ap.glu) darow[n2 + j] = from_f<T>(dl);
            const float vg[1] = {rnd<T>(dg)}, vl[1] = {rnd<T>(dl)};
            q.values(vg, at + j);
            if (ap.glu) q.values(vl, at + n2 + j);
        }
    }
    float accb = 0.0f;
    if (b2 != nullptr) {
        const T* grow = gout + (long long)r * h;
        const T* brow = b2 + (long long)row_expert[r] * h;
        for (int j = threadIdx.x; j < h; j += blockDim.x) accb += to_f(grow[j]) * to_f(brow[j]);
    }
    red_act[threadIdx.x] = acc;
    red_bias[threadIdx.x] = accb;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            red_act[threadIdx.x] += red_act[threadIdx.x + s];
            red_bias[threadIdx.x] += red_bias[threadIdx.x + s];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0 && write_dp) dp[r] = rnd_probs(red_bias[0] + red_act[0], probs_dt);
    q.flush();
}

// out[r, c] = round(x[r, c] * p[r]) (moe_apply_probs_on_input, spec §4.7).
template <typename T>
__device__ void scale_rows(const T* x, const float* p, T* out, int rows, int cols) {
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const float pr = p[r];
        for (int c = threadIdx.x; c < cols; c += blockDim.x) out[r * cols + c] = from_f<T>(to_f(x[r * cols + c]) * pr);
    }
}

// Backward of the probs-on-input scaling, one block per row r: dp[r] = round_probs(Σ_c dx'_rc
// x_rc), then dx_rc = round(dx'_rc * p_r) in place.
template <typename T>
__device__ void probs_in_bwd(T* dx, const T* x, const float* p, float* dp, int rows, int cols,
                             int probs_dt) {
    __shared__ float red[256];
    const int r = blockIdx.x;
    if (r >= rows) return;
    T* row = dx + (long long)r * cols;
    const T* xrow = x + (long long)r * cols;
    float acc = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) acc += to_f(row[c]) * to_f(xrow[c]);
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
        __syncthreads();
    }
    for (int c = threadIdx.x; c < cols; c += blockDim.x) row[c] = from_f<T>(to_f(row[c]) * p[r]);
    if (threadIdx.x == 0) dp[r] = rnd_probs(red[0], probs_dt);
}

// a[r, c] = b[row_expert[r], c]: TEGroupedMLP's fc1 bias, pre-filled so that the GEMM with
// beta = 1 rounds x·W1ᵀ + b1 once (bias inside the GEMM, spec §4.2).
template <typename T>
__device__ void fill_bias_rows(T* a, const T* b, const int* row_expert, int rows, int cols) {
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* brow = b + (long long)row_expert[r] * cols;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) a[r * cols + c] = brow[c];
    }
}

// y[r, c] = round(y[r, c] + b2[e, c] * p[r]) with the sum in f32 (spec §4.5.1 step 7, §4.6).
// With probs in the storage dtype (bf16/fp16 router, `probs_in_storage`), b2·p is itself a
// storage-dtype op and is rounded before the add (spec §4.8).
template <typename T>
__device__ void fc2_bias_fwd(T* y, const T* b2, const float* p, const int* row_expert, int rows,
                             int cols, int probs_in_storage) {
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* brow = b2 + (long long)row_expert[r] * cols;
        const float pr = p[r];
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            float bias = to_f(brow[c]) * pr;
            if (probs_in_storage) bias = rnd<T>(bias);
            y[r * cols + c] = from_f<T>(to_f(y[r * cols + c]) + bias);
        }
    }
}

// out[e, c] = round(Σ_{r in segment e} w_r · grad[r, c]) with w = p (null: w = 1), f32 sum.
// Segment e is rows [seg_off[e], seg_off[e] + seg_len[e]); an empty segment writes exact zeros.
template <typename T>
__device__ void col_sum(const T* grad, const float* p, const int* seg_off, const int* seg_len,
                        T* out, int cols) {
    const int e = blockIdx.y;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    const long long start = seg_off[e];
    const int n = seg_len[e];
    float acc = 0.0f;
    for (int i = 0; i < n; ++i) {
        float v = to_f(grad[(start + i) * cols + c]);
        acc += p != nullptr ? p[start + i] * v : v;
    }
    out[(long long)e * cols + c] = from_f<T>(acc);
}

// out[i] = round(scale * U(-1, 1)) from a counter-based hash of (seed, i): deterministic random
// weights and inputs generated on the device (benches, sampled verification). 1-D grid-stride.
__device__ __forceinline__ unsigned long long splitmix64(unsigned long long x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}
template <typename T>
__device__ void init_uniform(T* out, long long n, unsigned long long seed, float scale) {
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < n;
         idx += (long long)gridDim.x * blockDim.x) {
        unsigned long long r = splitmix64(seed ^ splitmix64((unsigned long long)idx));
        float u = (float)(r >> 40) * (1.0f / 16777216.0f);  // [0, 1), 24 bits
        out[idx] = from_f<T>((2.0f * u - 1.0f) * scale);
    }
}

#define INSTANTIATE(T, S)                                                                        \
    extern "C" __global__ void act_fwd_##S(T* a, const T* b1, const float* p,                    \
                                           const int* row_expert, T* u, int rows, int n2,        \
                                           ActParams ap) {                                       \
        act_fwd<T, 0>(a, b1, p, row_expert, u, rows, n2, ap, ActFp8<0>{});                      \
    }                                                                                            \
    extern "C" __global__ void act_fwd_q_##S(T* a, const T* b1, const float* p,                  \
                                             const int* row_expert, T* u, int rows, int n2,      \
                                             ActParams ap, int q, u32* amax, const float* scale, \
                                             int stride, u8* codes) {                            \
        if (q == 1) act_fwd<T, 1>(a, b1, p, row_expert, u, rows, n2, ap, ActFp8<1>{amax});       \
        if (q == 2)                                                                              \
            act_fwd<T, 2>(a, b1, p, row_expert, u, rows, n2, ap,                                 \
                          ActFp8<2>{amax, scale, stride, codes});                                \
        if (q == 3)                                                                              \
            act_fwd<T, 3>(a, b1, p, row_expert, u, rows, n2, ap,                                 \
                          ActFp8<3>{amax, scale, stride, codes});                                \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(256, sizeof(T) == 2 ? 5 : 4) act_fwd_blk_##S##_e4m3( \
        T* a, const T* b1, const float* p, T* u, int n2, ActParams ap, BlockParams bp,           \
        BlockSegs seg, const long long* col_scale_off, u8* codes, float* scale_inv, u8* codes_t, \
        float* scale_inv_t) {                                                                    \
        ActSource<T> src{a, b1, p, u, n2, ap};                                                   \
        block_tile_quant<T, 0, true>(src, n2, bp, seg, col_scale_off, codes, scale_inv, codes_t, \
                               scale_inv_t);                                                     \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(256, sizeof(T) == 2 ? 5 : 4) act_fwd_blk_##S##_e5m2( \
        T* a, const T* b1, const float* p, T* u, int n2, ActParams ap, BlockParams bp,           \
        BlockSegs seg, const long long* col_scale_off, u8* codes, float* scale_inv, u8* codes_t, \
        float* scale_inv_t) {                                                                    \
        ActSource<T> src{a, b1, p, u, n2, ap};                                                   \
        block_tile_quant<T, 1, true>(src, n2, bp, seg, col_scale_off, codes, scale_inv, codes_t, \
                               scale_inv_t);                                                     \
    }                                                                                            \
    extern "C" __global__ void act_bwd_##S(const T* a, const T* du, const float* p,              \
                                           const T* gout, const T* b2, const int* row_expert,    \
                                           T* da, float* dp, int write_dp, int rows, int n2,     \
                                           int h, ActParams ap, int probs_dt) {                  \
        act_bwd<T, 0>(a, du, p, gout, b2, row_expert, da, dp, write_dp, rows, n2, h, ap,         \
                      probs_dt, ActFp8<0>{});                                                    \
    }                                                                                            \
    extern "C" __global__ void act_bwd_q_##S(const T* a, const T* du, const float* p,            \
                                             const T* gout, const T* b2, const int* row_expert,  \
                                             T* da, float* dp, int write_dp, int rows, int n2,   \
                                             int h, ActParams ap, int probs_dt, int q,           \
                                             u32* amax, const float* scale, int stride,          \
                                             u8* codes) {                                        \
        if (q == 1)                                                                              \
            act_bwd<T, 1>(a, du, p, gout, b2, row_expert, da, dp, write_dp, rows, n2, h, ap,     \
                          probs_dt, ActFp8<1>{amax});                                            \
        if (q == 2)                                                                              \
            act_bwd<T, 2>(a, du, p, gout, b2, row_expert, da, dp, write_dp, rows, n2, h, ap,     \
                          probs_dt, ActFp8<2>{amax, scale, stride, codes});                      \
        if (q == 3)                                                                              \
            act_bwd<T, 3>(a, du, p, gout, b2, row_expert, da, dp, write_dp, rows, n2, h, ap,     \
                          probs_dt, ActFp8<3>{amax, scale, stride, codes});                      \
    }                                                                                            \
    extern "C" __global__ void scale_rows_##S(const T* x, const float* p, T* out, int rows,      \
                                              int cols) {                                        \
        scale_rows<T>(x, p, out, rows, cols);                                                    \
    }                                                                                            \
    extern "C" __global__ void probs_in_bwd_##S(T* dx, const T* x, const float* p, float* dp,    \
                                                int rows, int cols, int probs_dt) {              \
        probs_in_bwd<T>(dx, x, p, dp, rows, cols, probs_dt);                                     \
    }                                                                                            \
    extern "C" __global__ void fill_bias_rows_##S(T* a, const T* b, const int* row_expert,       \
                                                  int rows, int cols) {                          \
        fill_bias_rows<T>(a, b, row_expert, rows, cols);                                         \
    }                                                                                            \
    extern "C" __global__ void fc2_bias_fwd_##S(T* y, const T* b2, const float* p,               \
                                                const int* row_expert, int rows, int cols,       \
                                                int probs_in_storage) {                          \
        fc2_bias_fwd<T>(y, b2, p, row_expert, rows, cols, probs_in_storage);                     \
    }                                                                                            \
    extern "C" __global__ void col_sum_##S(const T* grad, const float* p, const int* seg_off,    \
                                           const int* seg_len, T* out, int cols) {               \
        col_sum<T>(grad, p, seg_off, seg_len, out, cols);                                        \
    }                                                                                            \
    extern "C" __global__ void init_uniform_##S(T* out, long long n, unsigned long long seed,     \
                                                float scale) {                                   \
        init_uniform<T>(out, n, seed, scale);                                                    \
    }

INSTANTIATE(float, f32)
INSTANTIATE(bf16_t, bf16)
INSTANTIATE(f16_t, f16)
