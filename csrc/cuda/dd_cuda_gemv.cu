/*
 * Base GEMV, batch 1: y = W_hat x for 3- and 4-bit weights in the formats of decdec.h.
 *
 * Design (numbers and versions in docs/KERNELS.md):
 * - One warp (or a power-of-two slice of one, for short rows) per output row, each lane streaming
 *   16-byte loads of its row with evict-first hints; a persistent grid sized to the SMs it may use.
 * - x is staged once per block in shared memory, normalised by a power of two per 64 inputs
 *   (exact), permuted to match the code layout and pre-divided by 16 where the code sits 4 bits
 *   up, so dequantisation is one LOP3 (mask | 0x6400: the fp16 "1024 + q" trick) and one HSUB2
 *   (minus 1024 + centre, exact) per pair of weights, and the product is one HFMA2.
 * - Codes are centred (q - 8 or q - 4) so a 32/64-weight fp16 partial sum is at most 240 in
 *   magnitude on normalised x; it is then scaled back and accumulated in fp32 with the group's
 *   scale and zero: y += s * (sum (q-c) x - (z-c) * sum x).
 * - 3-bit planar rows: the hi plane's 16 bits of a lo word are spread (Morton) and merged with
 *   the lo bits by two LOP3s into two nibble words (even / odd elements), which then take the
 *   4-bit path.
 */
#include <math.h>

#include "dd_cuda_internal.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr uint32_t kMagic = 0x64006400u;

__device__ __forceinline__ __half2 as_h2(uint32_t v) {
    __half2 h;
    memcpy(&h, &v, 4);
    return h;
}

/* 8 codes in nibbles (element k in bits 4k..4k+3) against their 4 staged half2 activations:
 * slots (0,4)/1, (1,5)/16, (2,6)/1, (3,7)/16. */
__device__ __forceinline__ __half2 nibble_word_dot(uint32_t w, const uint4 &xs, __half2 acc,
                                                   __half2 bias_lo, __half2 bias_hi) {
    const uint32_t w2 = w >> 8;
    const __half2 r0 = __hsub2(as_h2((w & 0x000F000Fu) | kMagic), bias_lo);
    const __half2 r1 = __hsub2(as_h2((w & 0x00F000F0u) | kMagic), bias_hi);
    const __half2 r2 = __hsub2(as_h2((w2 & 0x000F000Fu) | kMagic), bias_lo);
    const __half2 r3 = __hsub2(as_h2((w2 & 0x00F000F0u) | kMagic), bias_hi);
    acc = __hfma2(r0, as_h2(xs.x), acc);
    acc = __hfma2(r1, as_h2(xs.y), acc);
    acc = __hfma2(r2, as_h2(xs.z), acc);
    acc = __hfma2(r3, as_h2(xs.w), acc);
    return acc;
}

/* Bits 0..15 of `h16sel`'s chosen half spread to the even bit positions (element m -> bit 2m). */
__device__ __forceinline__ uint32_t spread16(uint32_t hiword, uint32_t selector) {
    uint32_t t = __byte_perm(hiword, 0u, selector); /* byte0 -> byte0, byte1 -> byte2 */
    t = (t | (t << 4)) & 0x0F0F0F0Fu;
    t = (t | (t << 2)) & 0x33333333u;
    t = (t | (t << 1)) & 0x55555555u;
    return t;
}

/* Position of element j's staged activation (one fp16 per element), and the power of two it is
 * pre-divided by.  Layout: [v][unit][slot][half] with v the 16-byte vector within a unit (4 for
 * 4-bit, 8 for 3-bit), so lanes reading consecutive units read consecutive 16-byte vectors
 * (no bank conflicts). */
template <int BITS>
__device__ __forceinline__ int staged_index(int j, int n_units, float *prescale) {
    int u, v, i, hi;
    if (BITS == 4) {
        const int k = j & 7;
        u = j >> 5;
        v = (j & 31) >> 3;
        i = k & 3;
        hi = k >> 2;
    } else {
        const int m = j & 15, a = m >> 1;
        u = j >> 6;
        v = 2 * ((j & 63) >> 4) + (m & 1);
        i = a & 3;
        hi = a >> 2;
    }
    *prescale = (i & 1) ? 0.0625f : 1.0f;
    return ((v * n_units + u) * 4 + i) * 2 + hi;
}

template <int BITS, int ROWS>
__global__ void __launch_bounds__(kThreads)
gemv_base_kernel(const uint8_t *__restrict__ qweight, const __half *__restrict__ scales,
                 const __half *__restrict__ zeros, const __half *__restrict__ x,
                 __half *__restrict__ y, int d_in, int d_in_pad, int d_out, int group_size,
                 int accumulate, int lanes_per_row) {
    constexpr int kUnitElems = BITS == 4 ? 32 : 64;
    extern __shared__ uint4 smem_u4[];
    /* [raw x | staged x | per-segment unscale | per-unit sums], both x arrays 16-byte aligned */
    __half *raw = reinterpret_cast<__half *>(smem_u4);
    __half *xs = raw + d_in_pad;
    float *seg_unscale = reinterpret_cast<float *>(xs + d_in_pad);  /* per 64 inputs */
    float *unit_sum = seg_unscale + d_in_pad / 64;                    /* per unit */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    (void)lane;

    /* ---- stage x.  Phase A: every thread loads raw x with many loads in flight (one L2 round
     * trip, not one per segment); phase B: one thread per 64-input segment normalises, permutes
     * and sums from shared memory. ---- */
    const int n_seg = d_in_pad / 64;
    if ((((uintptr_t)x) & 15) == 0 && (d_in & 7) == 0) {
        const uint4 *x4 = reinterpret_cast<const uint4 *>(x);
        uint4 *raw4 = reinterpret_cast<uint4 *>(raw);
#pragma unroll 4
        for (int i = threadIdx.x; i < d_in_pad / 8; i += kThreads)
            raw4[i] = i * 8 < d_in ? __ldg(x4 + i) : make_uint4(0u, 0u, 0u, 0u);
    } else {
#pragma unroll 4
        for (int i = threadIdx.x; i < d_in_pad; i += kThreads)
            raw[i] = i < d_in ? x[i] : __float2half_rn(0.f);
    }
    __syncthreads();
    for (int seg = threadIdx.x; seg < n_seg; seg += kThreads) {
        const uint4 *r4 = reinterpret_cast<const uint4 *>(raw) + seg * 8;
        uint4 v[8];
        float m = 0.f;
#pragma unroll
        for (int q = 0; q < 8; q++) {
            v[q] = r4[q];
            const uint32_t w[4] = {v[q].x, v[q].y, v[q].z, v[q].w};
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const float2 f = __half22float2(as_h2(w[k]));
                m = fmaxf(m, fmaxf(fabsf(f.x), fabsf(f.y))); /* fmaxf skips NaN */
            }
        }
        int e = 0;
        if (m > 0.f && m <= 3.0e38f) frexpf(m, &e); /* m = f * 2^e, f in [0.5, 1) */
        const float down = ldexpf(1.f, -e);
        float s0 = 0.f, s1 = 0.f;
#pragma unroll
        for (int q = 0; q < 8; q++) {
            const uint32_t w[4] = {v[q].x, v[q].y, v[q].z, v[q].w};
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const float2 f = __half22float2(as_h2(w[k]));
                const int j = seg * 64 + q * 8 + 2 * k;
                float p0, p1;
                const int i0 = staged_index<BITS>(j, d_in_pad / kUnitElems, &p0);
                const int i1 = staged_index<BITS>(j + 1, d_in_pad / kUnitElems, &p1);
                xs[i0] = __float2half_rn(f.x * down * p0);
                xs[i1] = __float2half_rn(f.y * down * p1);
                if (q < 4) s0 += f.x + f.y;
                else s1 += f.x + f.y;
            }
        }
        seg_unscale[seg] = ldexpf(1.f, e);
        if (BITS == 4) {
            unit_sum[2 * seg] = s0;
            unit_sum[2 * seg + 1] = s1;
        } else {
            unit_sum[seg] = s0 + s1;
        }
    }
    __syncthreads();

    const int n_units = d_in_pad / kUnitElems;
    const int n_groups = d_in_pad / group_size;
    const size_t row_bytes = (size_t)d_in_pad * BITS / 8;
    const int rows_per_warp = 32 / lanes_per_row;
    const int sub = lane / lanes_per_row, pl = lane % lanes_per_row;
    const float centre = BITS == 4 ? 8.f : 4.f;
    const __half2 bias_lo = __float2half2_rn(1024.f + centre);
    const __half2 bias_hi = __float2half2_rn(1024.f + 16.f * centre);
    const uint4 *xs4 = smem_u4 + d_in_pad / 8;
    const int total_warps = gridDim.x * kWarps;

    /* Each lane group owns ROWS rows at once: one staged-x read from shared memory serves ROWS
     * rows of weights (shared-memory traffic per weight byte / ROWS). */
    const int rows_step = rows_per_warp * ROWS;
    for (int row0 = (blockIdx.x * kWarps + warp) * rows_step; row0 < d_out;
         row0 += total_warps * rows_step) {
        const int rbase = row0 + sub * ROWS;
        float acc[ROWS];
#pragma unroll
        for (int k = 0; k < ROWS; k++) acc[k] = 0.f;
        if (rbase < d_out) { /* d_out % 32 == 0 and ROWS | 32: the whole group is in range */
#pragma unroll 2
            for (int u = pl; u < n_units; u += lanes_per_row) {
                uint4 lo[ROWS];
                uint2 hi[ROWS];
#pragma unroll
                for (int k = 0; k < ROWS; k++) {
                    const uint8_t *row = qweight + (size_t)(rbase + k) * row_bytes;
                    lo[k] = __ldcs(reinterpret_cast<const uint4 *>(row) + u);
                    if (BITS == 3) hi[k] = __ldcs(reinterpret_cast<const uint2 *>(row + d_in_pad / 4) + u);
                }
                const int g = u * kUnitElems / group_size;
                const int seg = BITS == 4 ? (u >> 1) : u;
                const float unscale = seg_unscale[seg], xsum = unit_sum[u];
                if (BITS == 4) {
                    uint4 xv[4];
#pragma unroll
                    for (int v = 0; v < 4; v++) xv[v] = xs4[v * n_units + u];
#pragma unroll
                    for (int k = 0; k < ROWS; k++) {
                        __half2 p = __float2half2_rn(0.f);
                        p = nibble_word_dot(lo[k].x, xv[0], p, bias_lo, bias_hi);
                        p = nibble_word_dot(lo[k].y, xv[1], p, bias_lo, bias_hi);
                        p = nibble_word_dot(lo[k].z, xv[2], p, bias_lo, bias_hi);
                        p = nibble_word_dot(lo[k].w, xv[3], p, bias_lo, bias_hi);
                        const float2 pf = __half22float2(p);
                        const size_t gi = (size_t)(rbase + k) * n_groups + g;
                        const float sc = __half2float(scales[gi]), z = __half2float(zeros[gi]);
                        acc[k] += sc * ((pf.x + pf.y) * unscale - (z - centre) * xsum);
                    }
                } else {
                    __half2 p[ROWS];
#pragma unroll
                    for (int k = 0; k < ROWS; k++) p[k] = __float2half2_rn(0.f);
#pragma unroll
                    for (int w = 0; w < 4; w++) {
                        const uint4 xe = xs4[(2 * w) * n_units + u];
                        const uint4 xo = xs4[(2 * w + 1) * n_units + u];
#pragma unroll
                        for (int k = 0; k < ROWS; k++) {
                            const uint32_t low = w == 0 ? lo[k].x : w == 1 ? lo[k].y : w == 2 ? lo[k].z : lo[k].w;
                            const uint32_t hw = w < 2 ? hi[k].x : hi[k].y;
                            const uint32_t sp = spread16(hw, (w & 1) ? 0x4342u : 0x4140u);
                            /* nibble words: even elements (lo bits | hi bit at +2), odd ones */
                            const uint32_t ce = (low & 0x33333333u) | ((sp << 2) & 0xCCCCCCCCu);
                            const uint32_t co = ((low >> 2) & 0x33333333u) | (sp & 0xCCCCCCCCu);
                            p[k] = nibble_word_dot(ce, xe, p[k], bias_lo, bias_hi);
                            p[k] = nibble_word_dot(co, xo, p[k], bias_lo, bias_hi);
                        }
                    }
#pragma unroll
                    for (int k = 0; k < ROWS; k++) {
                        const float2 pf = __half22float2(p[k]);
                        const size_t gi = (size_t)(rbase + k) * n_groups + g;
                        const float sc = __half2float(scales[gi]), z = __half2float(zeros[gi]);
                        acc[k] += sc * ((pf.x + pf.y) * unscale - (z - centre) * xsum);
                    }
                }
            }
        }
#pragma unroll
        for (int k = 0; k < ROWS; k++) {
            float a = acc[k];
            for (int off = lanes_per_row / 2; off; off >>= 1) a += __shfl_xor_sync(0xffffffffu, a, off);
            if (pl == 0 && rbase < d_out) {
                if (accumulate) atomicAdd(y + rbase + k, __float2half_rn(a));
                else y[rbase + k] = __float2half_rn(a);
            }
        }
    }
}

size_t staged_smem_bytes(int bits, int d_in_pad) {
    const int unit = bits == 4 ? 32 : 64;
    /* staged x, per-segment unscale, per-unit sums, raw x (16-byte aligned: d_in_pad % 128 == 0) */
    return (size_t)d_in_pad * 2 + (size_t)(d_in_pad / 64) * 4 + (size_t)(d_in_pad / unit) * 4 +
           (size_t)d_in_pad * 2;
}

} // namespace

extern "C" dd_status dd_cuda_gemv_base(const dd_shape *s, const uint8_t *d_qweight,
                                       const uint16_t *d_scales, const uint16_t *d_zeros,
                                       const uint16_t *d_x, uint16_t *d_y, int accumulate,
                                       int n_sm_free, void *stream) {
    dd_status st = dd_shape_check(s);
    if (st != DD_OK) return st;
    if (!d_qweight || !d_scales || !d_zeros || !d_x || !d_y) return DD_ERR_INVALID_ARGUMENT;
    int n_sm = 0, smem_optin = 0;
    if ((st = dd_cuda_device_limits(&n_sm, &smem_optin)) != DD_OK) return st;
    const int d_in_pad = dd_d_in_pad(s);
    const size_t smem = staged_smem_bytes(s->bits, d_in_pad);
    if (smem > (size_t)smem_optin) return DD_ERR_UNSUPPORTED; /* d_in beyond ~48K on sm_86/89 */
    const int n_units = d_in_pad / (s->bits == 4 ? 32 : 64);
    int lanes = 32;
    while (lanes > 1 && lanes / 2 >= n_units) lanes /= 2;
    if (n_sm_free <= 0 || n_sm_free > n_sm) n_sm_free = n_sm;
    /* rows per lane group: as many as keep >= 12 warps per usable SM busy */
    const long groups = (long)s->d_out / 1; /* row groups of ROWS rows */
    int rows = 4;
    while (rows > 1 && groups / rows * lanes / 32 < 12L * n_sm_free) rows /= 2;
    const int rows_per_block = kWarps * (32 / lanes) * rows;
    void (*kernel)(const uint8_t *, const __half *, const __half *, const __half *, __half *, int,
                   int, int, int, int, int);
    if (s->bits == 4) kernel = rows == 4 ? gemv_base_kernel<4, 4> : rows == 2 ? gemv_base_kernel<4, 2> : gemv_base_kernel<4, 1>;
    else kernel = rows == 4 ? gemv_base_kernel<3, 4> : rows == 2 ? gemv_base_kernel<3, 2> : gemv_base_kernel<3, 1>;
    if (smem > 48 * 1024) DD_CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                     (int)smem));
    int per_sm = 0;
    DD_CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
    if (per_sm < 1) per_sm = 1;
    long blocks = ((long)s->d_out + rows_per_block - 1) / rows_per_block;
    if (blocks > (long)n_sm_free * per_sm) blocks = (long)n_sm_free * per_sm;
    kernel<<<(unsigned)blocks, kThreads, smem, (cudaStream_t)stream>>>(
        d_qweight, reinterpret_cast<const __half *>(d_scales),
        reinterpret_cast<const __half *>(d_zeros), reinterpret_cast<const __half *>(d_x),
        reinterpret_cast<__half *>(d_y), s->d_in, d_in_pad, s->d_out, s->group_size, accumulate,
        lanes);
    DD_CK_LAUNCH("gemv_base_kernel");
    return DD_OK;
}
