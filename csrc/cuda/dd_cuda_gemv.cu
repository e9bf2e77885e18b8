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
#include <string.h>

#include <algorithm>

#include "dd_cuda_dec_device.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr uint32_t kMagic = 0x64006400u;

__device__ __forceinline__ __half2 as_h2(uint32_t v) {
    __half2 h;
    memcpy(&h, &v, 4);
    return h;
}

/* One LOP3 each (LUT = f(0xF0, 0xCC, 0xAA) over the three operands): (a & b) | c = 0xEA,
 * (a & m) | (b & ~m) = 0xCA, (a | b) & m = 0xA8.  Written as PTX because nvcc otherwise splits
 * "(w & mask) | 0x64006400" into two LOP3s (one immediate per LOP3), which cost 2 instructions
 * per weight pair instead of 1 (SASS of v5: 4.0 instructions per 3-bit weight, 2.1 per 4-bit). */
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); /* (a & b) | c */
    return d;
}
__device__ __forceinline__ uint32_t bit_select(uint32_t m, uint32_t a, uint32_t b) {
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0xCA;" : "=r"(d) : "r"(m), "r"(a), "r"(b)); /* (a & m) | (b & ~m) */
    return d;
}
__device__ __forceinline__ uint32_t or_and(uint32_t a, uint32_t b, uint32_t m) {
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0xA8;" : "=r"(d) : "r"(a), "r"(b), "r"(m)); /* (a | b) & m */
    return d;
}

/* 8 codes in nibbles (element k in bits 4k..4k+3) against their 4 staged half2 activations:
 * slots (0,4)/1, (1,5)/16, (2,6)/1, (3,7)/16.  `magic` is 0x64006400 held in a register so each
 * pair is ONE LOP3 (mask | magic), one HSUB2 and one HFMA2. */
__device__ __forceinline__ __half2 nibble_word_dot(uint32_t w, const uint4 &xs, __half2 acc,
                                                   __half2 bias_lo, __half2 bias_hi, uint32_t magic) {
    const uint32_t w2 = w >> 8;
    const __half2 r0 = __hsub2(as_h2(and_or(w, 0x000F000Fu, magic)), bias_lo);
    const __half2 r1 = __hsub2(as_h2(and_or(w, 0x00F000F0u, magic)), bias_hi);
    const __half2 r2 = __hsub2(as_h2(and_or(w2, 0x000F000Fu, magic)), bias_lo);
    const __half2 r3 = __hsub2(as_h2(and_or(w2, 0x00F000F0u, magic)), bias_hi);
    acc = __hfma2(r0, as_h2(xs.x), acc);
    acc = __hfma2(r1, as_h2(xs.y), acc);
    acc = __hfma2(r2, as_h2(xs.z), acc);
    acc = __hfma2(r3, as_h2(xs.w), acc);
    return acc;
}

/* Bits 0..15 of `hiword`'s chosen half spread to the even bit positions (element m -> bit 2m):
 * one PRMT, then three (shift, LOP3) levels. */
__device__ __forceinline__ uint32_t spread16(uint32_t hiword, uint32_t selector) {
    uint32_t t = __byte_perm(hiword, 0u, selector); /* byte0 -> byte0, byte1 -> byte2 */
    t = or_and(t, t << 4, 0x0F0F0F0Fu);
    t = or_and(t, t << 2, 0x33333333u);
    t = or_and(t, t << 1, 0x55555555u);
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

/* The DEC half of the one-launch layer kernel (blocks 0..n_dec-1 of the grid).
 *
 * v5 meeting protocol, per output o, no counters and no fences: cell[o] (fp32) holds kCellEmpty
 * between calls.  Each of the two parties (the base row's lane, the DEC block owning o's column
 * slice) atomicExch-es its fp32 value into the cell; whoever gets a non-empty value back is
 * second, writes y[o] = fp16(y? + (base + delta)) (one rounding) and empties the cell.  The base
 * also reads the cell BEFORE its row group (an early ld.cv): if the delta is already there it
 * finishes the row at once without the exchange; otherwise its exchange result is only looked
 * at after the NEXT row group, so its latency hides under that group's loads.  Real values are
 * canonicalised (NaN -> 0x7FFFFFFF), so the all-ones pattern cannot be mistaken for one. */
constexpr uint32_t kCellEmpty = 0xFFFFFFFFu; /* cudaMemset(0xFF) */
constexpr int kSelCap = DD_FUSED_SEL_CAP;     /* selected rows a DEC block holds (else fork/join) */

struct DecArgs {
    const uint4 *rcodes;       /* device view of the pinned mapped residual */
    const __half *rscales;
    float *cell;               /* d_out meeting cells, kCellEmpty between calls */
    int k_chunk, n_dec, has_base, accumulate;
    unsigned *ticket;          /* non-null: base row groups handed out dynamically (v7), [0] counter,
                                * [1] finished base blocks; both zero between calls */
    unsigned short fh[DD_NUM_BUCKETS]; /* floors rounded up to fp16 (non-increasing) */
};

__device__ __forceinline__ float canon(float v) { return v == v ? v : __uint_as_float(0x7FFFFFFFu); }

/* y[o] from both contributions (fp32 sum, one rounding). */
__device__ __forceinline__ void meet_write(__half *y, int o, float base, float delta, int accumulate) {
    const float s = base + delta;
    y[o] = __float2half_rn(accumulate ? __half2float(y[o]) + s : s);
}

/* DEC's arrival at output o with its delta. */
__device__ __forceinline__ void dec_arrive(const DecArgs &D, __half *y, int o, float delta) {
    delta = canon(delta);
    if (!D.has_base) {
        y[o] = __float2half_rn(D.accumulate ? __half2float(y[o]) + delta : delta);
        return;
    }
    const float other = atomicExch(D.cell + o, delta);
    if (__float_as_uint(other) != kCellEmpty) {
        meet_write(y, o, other, delta, D.accumulate);
        D.cell[o] = __uint_as_float(kCellEmpty);
    }
}

/* zero-copy loads in flight per thread: 8, or 4 in the layer kernel built for 3 blocks/SM (85
 * registers: 8 x 16-byte loads + 32 fp32 sums would spill) */

/* One DEC block: selection of ALL chunks (one warp per chunk, redundantly in every DEC block: x is
 * a few KB in L2, and it saves a grid-wide step), then every selected row's slice of this
 * block's output columns, read zero-copy (all kFetchBatch loads issued before any is used), an
 * in-block reduction, and one arrival per output. */
template <int kFetchBatch>
__device__ void dec_block(const DecArgs &D, const __half *__restrict__ x, __half *__restrict__ y,
                          int d_in, int d_out, unsigned char *smem_raw) {
    using namespace dd_dec;
    int *sidx = reinterpret_cast<int *>(smem_raw);
    float *part = reinterpret_cast<float *>(smem_raw + kSelCap * sizeof(int)); /* 9 x 256 floats */
    __half2 *fh2 = reinterpret_cast<__half2 *>(part + 9 * kDecThreads);
    const int t = threadIdx.x, warp = t >> 5;
    {   /* constant indices only: a run-time index would copy the parameter struct to local memory */
        unsigned short f = 0;
#pragma unroll
        for (int i = 0; i < DD_NUM_BUCKETS; i++)
            if (t == i) f = D.fh[i];
        if (t < DD_NUM_BUCKETS) fh2[t] = __halves2half2(__ushort_as_half(f), __ushort_as_half(f));
    }
    __syncthreads();
    const int n_chunks = (d_in + DD_CHUNK - 1) / DD_CHUNK;
    for (int c = warp; c < n_chunks; c += kDecWarps) {
        const int start = c * DD_CHUNK, quota = chunk_quota(d_in, c, D.k_chunk);
        if (quota) warp_select_chunk(x, start, min(DD_CHUNK, d_in - start), quota, fh2,
                                     sidx + dd_rule_chunk_offset(c, D.k_chunk));
    }
    const int n = dd_rule_total_quota(d_in, D.k_chunk);
    __syncthreads();
    const int units = d_out / 32;
    const int u0 = (int)((long)units * blockIdx.x / D.n_dec), u1 = (int)((long)units * (blockIdx.x + 1) / D.n_dec);
    const int U = u1 - u0;
    /* G threads per column unit, over the rows; lanes over consecutive units of a row so each
     * warp reads contiguous bytes of a row */
    int G = 1;
    while (G < 32 && 2 * G * U <= kDecThreads && 2 * G <= n) G *= 2;
    if (G == 1) {
        for (int ub = 0; ub < U; ub += kDecThreads) {
            const int ul = ub + t, unit = u0 + ul;
            const bool valid = ul < U;
            float acc[32];
#pragma unroll
            for (int i = 0; i < 32; i++) acc[i] = 0.f;
            for (int r0 = 0; valid && r0 < n; r0 += kFetchBatch) {
                uint4 v[kFetchBatch];
                float xv[kFetchBatch];
#pragma unroll
                for (int k = 0; k < kFetchBatch; k++) {
                    const int row = r0 + k < n ? sidx[r0 + k] : -1;
                    xv[k] = 0.f;
                    v[k] = make_uint4(0u, 0u, 0u, 0u);
                    if (row >= 0) {
                        v[k] = D.rcodes[(size_t)row * units + unit];
                        xv[k] = __half2float(x[row]);
                    }
                }
#pragma unroll
                for (int k = 0; k < kFetchBatch; k++)
                    if (xv[k] != 0.f) dd_dec::accumulate_codes(v[k], xv[k], acc);
            }
            /* each lane holds 32 consecutive outputs of its own unit: transpose 8 at a time through
             * this warp's slice of shared memory so the arrivals of a warp are coalesced */
            const int lane = t & 31;
            float *pw = part + (t >> 5) * (8 * 33);
            const int wunit0 = u0 + ub + (t & ~31);
#pragma unroll
            for (int q = 0; q < 4; q++) {
#pragma unroll
                for (int k = 0; k < 8; k++) pw[k * 33 + lane] = acc[q * 8 + k];
                __syncwarp();
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    const int id = j * 32 + lane, wl = id >> 3, k = id & 7;
                    const int uu = wunit0 + wl;
                    if (uu < u1) {
                        const int out = uu * 32 + q * 8 + k;
                        dec_arrive(D, y, out, pw[k * 33 + wl] * __half2float(D.rscales[out]));
                    }
                }
                __syncwarp();
            }
        }
    } else {
        const int sub = t / U, ul = t % U, unit = u0 + ul;
        const bool active = sub < G;
        float acc[32];
#pragma unroll
        for (int i = 0; i < 32; i++) acc[i] = 0.f;
        if (active) {
            for (int r0 = sub; r0 < n; r0 += kFetchBatch * G) {
                uint4 v[kFetchBatch];
                float xv[kFetchBatch];
#pragma unroll
                for (int k = 0; k < kFetchBatch; k++) {
                    const int r = r0 + k * G;
                    const int row = r < n ? sidx[r] : -1;
                    xv[k] = 0.f;
                    v[k] = make_uint4(0u, 0u, 0u, 0u);
                    if (row >= 0) {
                        v[k] = D.rcodes[(size_t)row * units + unit];
                        xv[k] = __half2float(x[row]);
                    }
                }
#pragma unroll
                for (int k = 0; k < kFetchBatch; k++)
                    if (xv[k] != 0.f) dd_dec::accumulate_codes(v[k], xv[k], acc);
            }
        }
        /* sum the G partials of each output through shared memory, 8 outputs a round */
#pragma unroll
        for (int q = 0; q < 4; q++) {
            if (active) {
#pragma unroll
                for (int k = 0; k < 8; k++) part[(k * G + sub) * U + ul] = acc[q * 8 + k];
            }
            __syncthreads();
            for (int o = t; o < 8 * U; o += kDecThreads) {
                const int k = o & 7, uu = o >> 3; /* 8 consecutive outputs per unit: coalesced */
                float sum = 0.f;
                for (int g = 0; g < G; g++) sum += part[(k * G + g) * U + uu];
                const int out = (u0 + uu) * 32 + q * 8 + k;
                dec_arrive(D, y, out, sum * __half2float(D.rscales[out]));
            }
            __syncthreads();
        }
    }
}

/* Weights and group parameters of one (lane, ROWS rows, unit) step, loaded ahead of use. */
template <int BITS, int ROWS>
struct Step {
    uint4 lo[ROWS];
    uint2 hi[ROWS];
    __half sc[ROWS], z[ROWS];
};

template <int BITS, int ROWS>
__device__ __forceinline__ void load_step(Step<BITS, ROWS> &st, const uint8_t *__restrict__ qweight,
                                          const __half *__restrict__ scales,
                                          const __half *__restrict__ zeros, int rbase, int u,
                                          size_t row_bytes, int d_in_pad, int n_groups, int group_shift) {
    constexpr int kUnitElems = BITS == 4 ? 32 : 64;
    const int g = (u * kUnitElems) >> group_shift; /* group_size is 64 or 128: no division */
#pragma unroll
    for (int k = 0; k < ROWS; k++) {
        const uint8_t *row = qweight + (size_t)(rbase + k) * row_bytes;
        st.lo[k] = __ldcs(reinterpret_cast<const uint4 *>(row) + u);
        if (BITS == 3) st.hi[k] = __ldcs(reinterpret_cast<const uint2 *>(row + d_in_pad / 4) + u);
        const size_t gi = (size_t)(rbase + k) * n_groups + g;
        st.sc[k] = __ldg(scales + gi);
        st.z[k] = __ldg(zeros + gi);
    }
}

/* Base GEMV blocks (and, with DEC, the DEC blocks 0..n_dec-1 of the same grid). */
/* Blocks per SM the registers must allow: 2 (128 registers; the DEC half needs them at rows 4),
 * 3 for the layer kernel at rows <= 2 (v7: 24 warps per SM like the plain GEMV's 3-4 blocks). */
template <int ROWS, bool DEC>
struct MinBlocks { static constexpr int value = DEC && ROWS <= 2 ? 3 : 2; };

template <int BITS, int ROWS, bool DEC>
__global__ void __launch_bounds__(kThreads, MinBlocks<ROWS, DEC>::value)
gemv_base_kernel(const uint8_t *__restrict__ qweight, const __half *__restrict__ scales,
                 const __half *__restrict__ zeros, const __half *__restrict__ x,
                 __half *__restrict__ y, int d_in, int d_in_pad, int d_out, int group_size,
                 int accumulate, int lanes_per_row, DecArgs D) {
    constexpr int kUnitElems = BITS == 4 ? 32 : 64;
    extern __shared__ uint4 smem_u4[];
    if (DEC && (int)blockIdx.x < D.n_dec) {
        dec_block<MinBlocks<ROWS, DEC>::value >= 3 ? 4 : 8>(D, x, y, d_in, d_out, reinterpret_cast<unsigned char *>(smem_u4));
        return;
    }
    const int bid = DEC ? blockIdx.x - D.n_dec : blockIdx.x;
    const int n_blocks = DEC ? gridDim.x - D.n_dec : gridDim.x;
    /* [raw x | staged x | per-segment unscale | per-unit sums], both x arrays 16-byte aligned */
    __half *raw = reinterpret_cast<__half *>(smem_u4);
    __half *xs = raw + d_in_pad;
    float *seg_unscale = reinterpret_cast<float *>(xs + d_in_pad);  /* per 64 inputs */
    float *unit_sum = seg_unscale + d_in_pad / 64;                    /* per unit */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    const int n_units = d_in_pad / kUnitElems;
    const int n_groups = d_in_pad / group_size;
    const int group_shift = group_size == 128 ? 7 : 6;
    const size_t row_bytes = (size_t)d_in_pad * BITS / 8;
    const int rows_per_warp = 32 / lanes_per_row;
    const int sub = lane / lanes_per_row, pl = lane % lanes_per_row;
    const int rows_step = rows_per_warp * ROWS;
    const int total_warps = n_blocks * kWarps;
    const int row_stride = total_warps * rows_step;

    /* ---- the first weights leave for HBM before x is staged, so the staging hides under
     * their latency ---- */
    int row0 = (bid * kWarps + warp) * rows_step;
    /* v7 dynamic hand-out (layer kernel): a warp's first row group is static (its weights leave
     * before x is staged, as above); every later one is a ticket from a per-layer counter, taken
     * one group AHEAD (the atomic's round trip hides under a whole row group) and broadcast at
     * the top of the group that needs it.  Warps on SMs that run faster (alone, or beside an
     * idle DEC block) take more groups, so no warp waits on a static second wave. */
    const bool dynamic = DEC && D.ticket != nullptr;
    const int n_items = (d_out + rows_step - 1) / rows_step;
    const bool tickets = dynamic && total_warps < n_items;
    unsigned pend_ticket = 0;
    if (tickets && lane == 0 && row0 < d_out) pend_ticket = atomicAdd(D.ticket, 1u);
    Step<BITS, ROWS> cur;
    if (row0 + sub * ROWS < d_out && pl < n_units)
        load_step<BITS, ROWS>(cur, qweight, scales, zeros, row0 + sub * ROWS, pl, row_bytes, d_in_pad,
                              n_groups, group_shift);

    /* ---- stage x.  Phase A: raw copy, many 16-byte loads in flight; phase B: every thread owns
     * 8 inputs (one 16-byte vector): segment max / unit sums by shuffles over the 8 (4-bit: 4)
     * threads of a segment (unit), exact power-of-two normalisation, permuted store. ---- */
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
    {
        const int n_vec = d_in_pad / 8; /* multiple of 16: whole segments per warp pass */
        for (int vb = 0; vb < n_vec; vb += kThreads) {
            const int vi = vb + threadIdx.x;
            const bool on = vi < n_vec; /* uniform per 8-lane segment group */
            const uint4 rv = on ? reinterpret_cast<const uint4 *>(raw)[vi] : make_uint4(0u, 0u, 0u, 0u);
            const uint32_t w[4] = {rv.x, rv.y, rv.z, rv.w};
            float f[8], m = 0.f, s = 0.f;
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const float2 p = __half22float2(as_h2(w[k]));
                f[2 * k] = p.x;
                f[2 * k + 1] = p.y;
                m = fmaxf(m, fmaxf(fabsf(p.x), fabsf(p.y))); /* fmaxf skips NaN */
                s += p.x + p.y;
            }
#pragma unroll
            for (int off = 4; off; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
            s += __shfl_xor_sync(0xffffffffu, s, 2);
            s += __shfl_xor_sync(0xffffffffu, s, 1);
            if (BITS == 3) s += __shfl_xor_sync(0xffffffffu, s, 4); /* 64-input unit */
            if (on) {
                int e = 0;
                if (m > 0.f && m <= 3.0e38f) frexpf(m, &e); /* m = f * 2^e, f in [0.5, 1) */
                const float down = ldexpf(1.f, -e);
                const int seg = vi >> 3;
#pragma unroll
                for (int k = 0; k < 8; k++) {
                    float p;
                    const int i = staged_index<BITS>(vi * 8 + k, n_units, &p);
                    xs[i] = __float2half_rn(f[k] * down * p);
                }
                if ((vi & 7) == 0) seg_unscale[seg] = ldexpf(1.f, e);
                if (BITS == 4 && (vi & 3) == 0) unit_sum[vi >> 2] = s;
                if (BITS == 3 && (vi & 7) == 0) unit_sum[seg] = s;
            }
        }
    }
    __syncthreads();

    const float centre = BITS == 4 ? 8.f : 4.f;
    const __half2 bias_lo = __float2half2_rn(1024.f + centre);
    const __half2 bias_hi = __float2half2_rn(1024.f + 16.f * centre);
    const uint4 *xs4 = smem_u4 + d_in_pad / 8;
    uint32_t magic = kMagic; /* a register operand of the LOP3s (asm keeps it one) */
    asm volatile("" : "+r"(magic));

    /* Each lane group owns ROWS rows at once: one staged-x read from shared memory serves ROWS
     * rows of weights.  The step after the current one (next unit, or the first unit of the
     * next row group) is always in flight while the current one is dequantised. */
    /* DEC: this lane's exchange of the previous row group, looked at one group later */
    float pend_base[ROWS], pend_other[ROWS];
    int pend_row = -1;
#pragma unroll
    for (int k = 0; k < ROWS; k++) pend_base[k] = pend_other[k] = 0.f;
    while (row0 < d_out) {
        const int rbase = row0 + sub * ROWS;
        int next_row0 = row0 + row_stride;
        if (dynamic) { /* warp-uniform: row0 is per warp */
            const int t = __shfl_sync(0xffffffffu, (int)pend_ticket, 0);
            const long ni = tickets ? (long)total_warps + (unsigned)t : (long)n_items;
            next_row0 = ni < n_items ? (int)ni * rows_step : d_out;
            /* every ticket taken is looked at: the last one is the first past the end */
            if (lane == 0 && ni < n_items) pend_ticket = atomicAdd(D.ticket, 1u);
        }
        float acc[ROWS], early[ROWS];
#pragma unroll
        for (int k = 0; k < ROWS; k++) acc[k] = 0.f;
        if (DEC && pl == 0 && rbase < d_out) { /* is DEC's delta there already? (L2, not L1) */
#pragma unroll
            for (int k = 0; k < ROWS; k++) early[k] = __ldcv(D.cell + rbase + k);
        }
        if (rbase < d_out) { /* d_out % 32 == 0 and ROWS | 32: the whole group is in range */
            for (int u = pl; u < n_units; u += lanes_per_row) {
                Step<BITS, ROWS> nxt;
                {
                    int nu = u + lanes_per_row, nr = rbase;
                    if (nu >= n_units) { nu = pl; nr = next_row0 + sub * ROWS; }
                    if (nr < d_out)
                        load_step<BITS, ROWS>(nxt, qweight, scales, zeros, nr, nu, row_bytes, d_in_pad,
                                              n_groups, group_shift);
                }
                const int seg = BITS == 4 ? (u >> 1) : u;
                const float unscale = seg_unscale[seg], xsum = unit_sum[u];
                __half2 p[ROWS];
#pragma unroll
                for (int k = 0; k < ROWS; k++) p[k] = __float2half2_rn(0.f);
                if (BITS == 4) {
                    uint4 xv[4];
#pragma unroll
                    for (int v = 0; v < 4; v++) xv[v] = xs4[v * n_units + u];
#pragma unroll
                    for (int k = 0; k < ROWS; k++) {
                        p[k] = nibble_word_dot(cur.lo[k].x, xv[0], p[k], bias_lo, bias_hi, magic);
                        p[k] = nibble_word_dot(cur.lo[k].y, xv[1], p[k], bias_lo, bias_hi, magic);
                        p[k] = nibble_word_dot(cur.lo[k].z, xv[2], p[k], bias_lo, bias_hi, magic);
                        p[k] = nibble_word_dot(cur.lo[k].w, xv[3], p[k], bias_lo, bias_hi, magic);
                    }
                } else {
#pragma unroll
                    for (int w = 0; w < 4; w++) {
                        const uint4 xe = xs4[(2 * w) * n_units + u];
                        const uint4 xo = xs4[(2 * w + 1) * n_units + u];
#pragma unroll
                        for (int k = 0; k < ROWS; k++) {
                            const uint32_t low = w == 0 ? cur.lo[k].x : w == 1 ? cur.lo[k].y : w == 2 ? cur.lo[k].z : cur.lo[k].w;
                            const uint32_t hw = w < 2 ? cur.hi[k].x : cur.hi[k].y;
                            const uint32_t sp = spread16(hw, (w & 1) ? 0x4342u : 0x4140u);
                            /* nibble words: even elements (lo bits | hi bit at +2), odd ones */
                            const uint32_t ce = bit_select(0x33333333u, low, sp << 2);
                            const uint32_t co = bit_select(0x33333333u, low >> 2, sp);
                            p[k] = nibble_word_dot(ce, xe, p[k], bias_lo, bias_hi, magic);
                            p[k] = nibble_word_dot(co, xo, p[k], bias_lo, bias_hi, magic);
                        }
                    }
                }
#pragma unroll
                for (int k = 0; k < ROWS; k++) {
                    const float2 pf = __half22float2(p[k]);
                    const float sc = __half2float(cur.sc[k]), z = __half2float(cur.z[k]);
                    acc[k] += sc * ((pf.x + pf.y) * unscale - (z - centre) * xsum);
                }
                cur = nxt;
            }
        }
#pragma unroll
        for (int k = 0; k < ROWS; k++)
            for (int off = lanes_per_row / 2; off; off >>= 1) acc[k] += __shfl_xor_sync(0xffffffffu, acc[k], off);
        if (pl == 0 && rbase < d_out) {
            if (DEC) {
                if (pend_row >= 0) {
#pragma unroll
                    for (int k = 0; k < ROWS; k++)
                        if (__float_as_uint(pend_other[k]) != kCellEmpty) {
                            meet_write(y, pend_row + k, pend_base[k], pend_other[k], accumulate);
                            D.cell[pend_row + k] = __uint_as_float(kCellEmpty);
                        }
                }
#pragma unroll
                for (int k = 0; k < ROWS; k++) {
                    const float a = canon(acc[k]);
                    pend_base[k] = a;
                    if (__float_as_uint(early[k]) != kCellEmpty) { /* DEC was first: finish now */
                        meet_write(y, rbase + k, a, early[k], accumulate);
                        D.cell[rbase + k] = __uint_as_float(kCellEmpty);
                        pend_other[k] = __uint_as_float(kCellEmpty);
                    } else {
                        pend_other[k] = atomicExch(D.cell + rbase + k, a);
                    }
                }
                pend_row = rbase;
            } else {
#pragma unroll
                for (int k = 0; k < ROWS; k++) {
                    if (accumulate) atomicAdd(y + rbase + k, __float2half_rn(acc[k]));
                    else y[rbase + k] = __float2half_rn(acc[k]);
                }
            }
        }
        row0 = next_row0;
    }
    if (DEC && pend_row >= 0) {
#pragma unroll
        for (int k = 0; k < ROWS; k++)
            if (__float_as_uint(pend_other[k]) != kCellEmpty) {
                meet_write(y, pend_row + k, pend_base[k], pend_other[k], accumulate);
                D.cell[pend_row + k] = __uint_as_float(kCellEmpty);
            }
    }
    if (dynamic) {
        /* the last base block to finish zeroes the counters for the next call (no extra graph
         * node).  Every ticket atomic of this block has returned (each was looked at), so after
         * the barrier and the fence no block touches the counter again in this call. */
        __syncthreads();
        if (threadIdx.x == 0) {
            __threadfence();
            if (atomicAdd(D.ticket + 1, 1u) == (unsigned)n_blocks - 1) {
                atomicExch(D.ticket, 0u);
                atomicExch(D.ticket + 1, 0u);
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

/* Grid geometry and kernel choice of the base GEMV for one shape. */
struct BasePlan {
    void (*kernel)(const uint8_t *, const __half *, const __half *, const __half *, __half *, int,
                   int, int, int, int, int, DecArgs);
    size_t smem;
    int lanes, rows_per_block, per_sm;
};

/* Measurement variants (dd_cuda_variant, carried by the call, never process-global): NULL or
 * zeros = the production rule below.  base_rows / layer_rows: rows per lane group of the plain /
 * layer kernel (0 = rule, 1, 2, 4); base_grid: 0 = fill every usable SM, 1 = whole waves of row
 * groups; layer_mode: see dd_cuda_fused_launch; layer_grid_cap: at most this many base blocks in
 * the layer kernel (0 = no cap; tests: small layers take many tickets each). */
inline bool valid_rows(int r) { return r == 1 || r == 2 || r == 4; }

template <bool DEC>
dd_status plan_base(const dd_shape *s, int n_sm_free, const dd_cuda_variant *v, BasePlan *P) {
    int n_sm = 0, smem_optin = 0;
    dd_status st;
    if ((st = dd_cuda_device_limits(&n_sm, &smem_optin)) != DD_OK) return st;
    const int d_in_pad = dd_d_in_pad(s);
    P->smem = staged_smem_bytes(s->bits, d_in_pad);
    if (DEC) P->smem = std::max(P->smem, kSelCap * sizeof(int) + 9 * dd_dec::kDecThreads * sizeof(float) +
                                              DD_NUM_BUCKETS * sizeof(__half2));
    if (P->smem > (size_t)smem_optin) return DD_ERR_UNSUPPORTED; /* d_in beyond ~48K on sm_86/89 */
    const int n_units = d_in_pad / (s->bits == 4 ? 32 : 64);
    int lanes = 32;
    while (lanes > 1 && lanes / 2 >= n_units) lanes /= 2;
    if (n_sm_free <= 0 || n_sm_free > n_sm) n_sm_free = n_sm;
    /* rows per lane group (measured, H100, docs/KERNELS.md v6): the plain GEMV at most 2 (more row
     * groups than warps by several waves: a short tail; rows 4 was 5-10% slower on 4096x14336 and
     * 8192x28672), as many as keep >= 12 warps per SM busy.  v7: the layer kernel at 3 bits runs rows 2 at 3 blocks/SM (24 warps, MinBlocks), which beat
     * rows 4 at 2 blocks/SM by 6-16 points of DEC overhead; at 4 bits rows 4 stays ahead; both
     * halved while fewer than 4 warps per SM would be busy. */
    int rows = DEC ? (s->bits == 3 ? 2 : 4) : 2;
    const long min_warps = (DEC ? 4L : 12L) * n_sm_free;
    while (rows > 1 && (long)s->d_out / rows * lanes / 32 < min_warps) rows /= 2;
    if (v && DEC && valid_rows(v->layer_rows)) rows = v->layer_rows;
    if (v && !DEC && valid_rows(v->base_rows)) rows = v->base_rows;
    P->lanes = lanes;
    P->rows_per_block = kWarps * (32 / lanes) * rows;
    if (s->bits == 4) P->kernel = rows == 4 ? gemv_base_kernel<4, 4, DEC> : rows == 2 ? gemv_base_kernel<4, 2, DEC> : gemv_base_kernel<4, 1, DEC>;
    else P->kernel = rows == 4 ? gemv_base_kernel<3, 4, DEC> : rows == 2 ? gemv_base_kernel<3, 2, DEC> : gemv_base_kernel<3, 1, DEC>;
    if (P->smem > 48 * 1024)
        DD_CK(cudaFuncSetAttribute(P->kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)P->smem));
    int per_sm = 0;
    DD_CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, P->kernel, kThreads, P->smem));
    P->per_sm = per_sm < 1 ? 1 : per_sm;
    return DD_OK;
}

/* Blocks for `needed` blocks' worth of row groups on at most `cap` resident blocks.  Rule 1:
 * whole waves -- as few blocks as give every warp the same number of row groups (+-1 block). */
long base_blocks(long needed, long cap, int grid_rule) {
    if (needed <= cap) return needed;
    if (grid_rule == 1) {
        const long waves = (needed + cap - 1) / cap;
        return (needed + waves - 1) / waves;
    }
    return cap;
}


/* ==== base kernel 2: the tensor-core GEMV (dd_cuda_variant.base_kernel = 2; docs/KERNELS.md
 * "Base kernel 2").  Same formats, same result up to fp32 rounding, about half the instructions
 * per weight of kernel 0 (whose main loop spends 200 SASS instructions on 64 weights, 3.1 per
 * weight, and is issue-bound on the H200: 69-72% of the issue slots busy at 44-52% of the HBM,
 * while a plain read in the same access pattern reaches 96-100% of the HBM; bench/micro).
 *
 * The trick: mma.sync m16n8k16 as 32 independent 8-element dot products.  Lane (g, c) (g =
 * lane / 4, c = lane % 4) puts into the A fragment its own dequantised-but-not-shifted codes of
 * two rows P (A rows g) and P' = P + 1 (A rows g + 8), and into the B fragment the staged
 * activations of the SAME elements, so column g of C is row P's (row g) and P''s (row g + 8)
 * dot product over the 4 lanes of lane group g -- 4 x 32 = 128 elements, one quantisation group.
 * The other 7 columns are never read.  The codes enter as 1024 + q (LOP3 with the 0x6400 magic)
 * or 1024 + 16 q (the next nibble) against staged x or x / 16, so no HSUB2 and no HFMA2 is left:
 * per 8 weights of a row one LOP3 per pair, a shift per word and a quarter of an mma.  The 1024 x
 * sum(staged x) bias is subtracted per group in fp32 (mma accumulates in fp32), then the group's
 * scale and zero: y_P += s * (C - 1024 * bsum - z * xsum).
 *
 * A pass = the 32 lanes over 32 consecutive chunks of 32 elements (1024 inputs) of the row pair:
 * 4-bit 16 bytes per lane and row (512 contiguous bytes per warp and row), 3-bit 8 bytes of the
 * low plane and 4 of the high plane.  A block's 8 warps split the passes ksplit ways over a tile
 * of 16 / ksplit rows (partial sums reduced in fp32 through shared memory, fixed order); tiles
 * are dealt round-robin to a persistent grid of resident blocks; ksplit is chosen by a cost model
 * (steps on the busiest block).  The next step's weights are in flight while one is computed. */
constexpr int kK2Chunk = 32;              /* inputs per lane per pass */

__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    __trap(); /* decdec is built for sm_80+ only (setup.py): this branch is never compiled for a device */
#endif
}

/* One nibble word of row P (wp) and of row P' (wq) against their staged activations xb =
 * {x(0,4), x(2,6), x(1,5) / 16, x(3,7) / 16} (B pairs adjacent, so no moves): two mma, 8 LOP3,
 * 2 shifts for 16 weights. */
__device__ __forceinline__ void k2_word(float (&c)[4], uint32_t wp, uint32_t wq, const uint4 &xb, uint32_t magic) {
    const uint32_t wp2 = wp >> 8, wq2 = wq >> 8;
    mma_16816(c, and_or(wp, 0x000F000Fu, magic), and_or(wq, 0x000F000Fu, magic), and_or(wp2, 0x000F000Fu, magic),
              and_or(wq2, 0x000F000Fu, magic), xb.x, xb.y);
    mma_16816(c, and_or(wp, 0x00F000F0u, magic), and_or(wq, 0x00F000F0u, magic), and_or(wp2, 0x00F000F0u, magic),
              and_or(wq2, 0x00F000F0u, magic), xb.z, xb.w);
}

/* Staged activation slot of element j (one fp16 each) and its pre-division: [v][chunk][slot][half]
 * with v the nibble word of the chunk (4-bit: word v = elements 8v..8v+7; 3-bit: v = 2 l + parity,
 * the even / odd elements of low-plane word l) and slot 0..3 = nibble pairs (0,4), (2,6), (1,5),
 * (3,7), the last two pre-divided by 16 (their codes enter as 1024 + 16 q); lanes reading
 * consecutive chunks read consecutive 16-byte vectors (no bank conflicts). */
template <int BITS, bool FIELDS>
__device__ __forceinline__ int k2_staged_index(int j, int n_chunks, float *prescale) {
    const int ch = j >> 5, jj = j & 31;
    if (FIELDS) { /* 3-bit FIELDS (decdec.h): fp16 pair h = 5 word + (f % 5), multipliers 1, 8, 64, 1, 8 */
        int h, hi;
        float m = 1.0f;
        if (jj < 30) {
            const int word = jj / 10, f = jj % 10, p = f % 5;
            h = 5 * word + p;
            hi = f / 5;
            m = p == 1 || p == 4 ? 8.0f : p == 2 ? 64.0f : 1.0f;
        } else {
            h = 15;
            hi = jj - 30;
        }
        *prescale = 1.0f / m;
        return (((h >> 2) * n_chunks + ch) * 4 + (h & 3)) * 2 + hi;
    }
    int v, a;
    if (BITS == 4) {
        v = jj >> 3;
        a = jj & 7;
    } else {
        const int m = jj & 15;
        v = 2 * (jj >> 4) + (m & 1);
        a = m >> 1;
    }
    const int i = a & 3, hi = a >> 2;          /* nibble pair i = (i, i + 4), element hi of it */
    const int slot = (i >> 1) | ((i & 1) << 1); /* pairs 0, 2 -> slots 0, 1; pairs 1, 3 -> 2, 3 */
    *prescale = (i & 1) ? 0.0625f : 1.0f;
    return ((v * n_chunks + ch) * 4 + slot) * 2 + hi;
}

/* 3-bit FIELDS: the 16 fp16 pairs (1024 + q each) of one row's chunk from its three words, 22
 * instructions for 32 codes: per word 5 LOP3 + 1 shift, then the two spare-bit codes. */
__device__ __forceinline__ void k2_fields_pairs(uint32_t (&h)[16], uint32_t w0, uint32_t w1, uint32_t w2, uint32_t magic) {
    const uint32_t w[3] = {w0, w1, w2};
#pragma unroll
    for (int k = 0; k < 3; k++) {
        const uint32_t t = w[k] >> 9;
        h[5 * k + 0] = and_or(w[k], 0x00070007u, magic);
        h[5 * k + 1] = and_or(w[k], 0x00380038u, magic);
        h[5 * k + 2] = and_or(w[k], 0x01C001C0u, magic);
        h[5 * k + 3] = and_or(t, 0x00070007u, magic);
        h[5 * k + 4] = and_or(t, 0x00380038u, magic);
    }
    h[15] = and_or(w2 >> 13, 0x00040004u, and_or(w1 >> 14, 0x00020002u, and_or(w0 >> 15, 0x00010001u, magic)));
}

/* One step of a lane: NP row pairs x one chunk. */
template <int BITS, int NP>
struct K2Step {
    uint32_t w[2 * NP][BITS == 4 ? 4 : 3]; /* per row: 4-bit the 16-byte chunk; 3-bit low (2 words), high */
    unsigned short s[2 * NP], z[2 * NP];   /* the group's scale and zero, per row */
};

/* Loads of one step: rows row, row + row_bytes, ... (2 NP rows), chunk ch (byte offsets `wo`
 * into the low plane, `ho` into the high plane); sz points at the first row's group. */
template <int BITS, int NP>
__device__ __forceinline__ void k2_load(K2Step<BITS, NP> &st, const uint8_t *row, const unsigned short *sc,
                                        const unsigned short *zr, int row_bytes, int n_groups) {
#pragma unroll
    for (int r = 0; r < 2 * NP; r++) {
        const uint8_t *rr = row + r * row_bytes;
        if (BITS == 4) {
            const uint4 v = __ldcs(reinterpret_cast<const uint4 *>(rr));
            st.w[r][0] = v.x; st.w[r][1] = v.y; st.w[r][2] = v.z; st.w[r][3] = v.w;
        } else {
            const uint2 v = __ldcs(reinterpret_cast<const uint2 *>(rr));
            st.w[r][0] = v.x; st.w[r][1] = v.y;
        }
        st.s[r] = __ldg(sc + r * n_groups);
        st.z[r] = __ldg(zr + r * n_groups);
    }
}
template <int NP>
__device__ __forceinline__ void k2_load_hi(K2Step<3, NP> &st, const uint8_t *hrow, int row_bytes) {
#pragma unroll
    for (int r = 0; r < 2 * NP; r++) st.w[r][2] = __ldcs(reinterpret_cast<const unsigned *>(hrow + r * row_bytes));
}
template <int NP>
__device__ __forceinline__ void k2_load_hi(K2Step<4, NP> &, const uint8_t *, int) {}

/* Shared memory of kernel 2: [staged x : d_in_pad halves | (bsum, xsum, 2^e, -) per group | reduction
 * slots 2 x kWarps x kK2Rows]. */
constexpr int kK2Pairs = 2;               /* most row pairs per warp step (rows share one B read) */
constexpr int kK2Rows = 2 * kK2Pairs;
/* blocks per SM the registers must allow: 4 at one row pair per step (32 warps per SM to hide the
 * mma and shared-memory latencies), 2 at two (cur + next steps of 4 rows in registers) */
template <int NP>
struct K2MinBlocks { static constexpr int value = NP == 1 ? 4 : 2; };
size_t k2_smem_bytes(int d_in_pad, int group_size) {
    return (size_t)d_in_pad * 2 + (size_t)(d_in_pad / group_size) * 16 + 2 * kWarps * kK2Rows * 4;
}

template <int BITS, int NP, bool FIELDS>
__global__ void __launch_bounds__(kThreads, K2MinBlocks<NP>::value)
gemv_k2_kernel(const uint8_t *__restrict__ qweight, const unsigned short *__restrict__ scales,
               const unsigned short *__restrict__ zeros, const __half *__restrict__ x, __half *__restrict__ y,
               int d_in, int d_in_pad, int d_out, int accumulate, int ksplit) {
    constexpr int R = 2 * NP;
    extern __shared__ uint4 smem_u4[];
    __half *xs = reinterpret_cast<__half *>(smem_u4);
    const int n_chunks = d_in_pad / kK2Chunk, n_groups = d_in_pad / 128;
    float4 *gsum = reinterpret_cast<float4 *>(xs + d_in_pad);
    float *red = reinterpret_cast<float *>(gsum + n_groups); /* [2][kWarps][R] (sized for kK2Rows) */
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2;
    const int row_bytes = d_in_pad * BITS / 8; /* < 2^31: d_in_pad <= the shared-memory limit */
    const int n_pass = (n_chunks + 31) / 32;
    const int rg = warp / ksplit, ks = warp - rg * ksplit;
    const int tile_rows = R * (kWarps / ksplit);
    const int n_tiles = d_out / tile_rows;
    const int S = (n_pass + ksplit - 1) / ksplit;                /* passes per tile per warp */
    const int my_tiles = (n_tiles - (int)blockIdx.x + (int)gridDim.x - 1) / (int)gridDim.x;
    const int n_steps = my_tiles * S;
    const bool useful = lane == 4 * g + (g >> 1);                /* holds C[g][g] and C[g + 8][g] */
    const int chunk0 = ks * S * 32 + lane;                        /* this lane's chunk at s = 0 */

    /* producer: the next step to load, pass ks S + l_s of the tile at l_row.  Counters and
     * pointer increments, not divisions (step i = tile blockIdx + (i / S) gridDim, s = i % S). */
    int l_i = 0, l_s = 0;
    const size_t row0 = (size_t)blockIdx.x * tile_rows + R * rg;
    const uint8_t *l_w = qweight + row0 * row_bytes + (size_t)chunk0 * (BITS == 4 ? 16 : 8);
    const uint8_t *l_h = qweight + row0 * row_bytes + d_in_pad / 4 + (size_t)chunk0 * 4;
    const unsigned short *l_sc = scales + row0 * n_groups + (chunk0 >> 2), *l_zr = zeros + row0 * n_groups + (chunk0 >> 2);
    const size_t tile_w = (size_t)gridDim.x * tile_rows * row_bytes, tile_g = (size_t)gridDim.x * tile_rows * n_groups;
    auto load_next = [&](K2Step<BITS, NP> &st) {
        if (l_i < n_steps && chunk0 + 32 * l_s < n_chunks) {
            k2_load<BITS, NP>(st, l_w, l_sc, l_zr, row_bytes, n_groups);
            k2_load_hi<NP>(st, l_h, row_bytes);
        }
        l_i++;
        if (++l_s == S) { /* next tile: back to this warp's first pass */
            l_s = 0;
            l_w += tile_w - (size_t)(S - 1) * 32 * (BITS == 4 ? 16 : 8);
            l_h += tile_w - (size_t)(S - 1) * 32 * 4;
            l_sc += tile_g - (size_t)(S - 1) * 8;
            l_zr += tile_g - (size_t)(S - 1) * 8;
        } else {
            l_w += 32 * (BITS == 4 ? 16 : 8);
            l_h += 32 * 4;
            l_sc += 8;
            l_zr += 8;
        }
    };

    K2Step<BITS, NP> cur;
    load_next(cur);

    /* ---- stage x while the first weights are in flight: every thread 8 inputs (one vector) ---- */
    {
        const bool vec = (((uintptr_t)x) & 15) == 0 && (d_in & 7) == 0;
        const int n_vec = d_in_pad / 8; /* multiple of 16: whole groups per 16 threads */
        for (int vb = 0; vb < n_vec; vb += kThreads) {
            const int vi = vb + tid;
            uint4 rv = make_uint4(0u, 0u, 0u, 0u);
            if (vi < n_vec && vi * 8 < d_in) {
                if (vec) {
                    rv = __ldg(reinterpret_cast<const uint4 *>(x) + vi);
                } else {
                    unsigned short e[8];
#pragma unroll
                    for (int k = 0; k < 8; k++) {
                        const int j = vi * 8 + k;
                        e[k] = j < d_in ? __half_as_ushort(x[j]) : (unsigned short)0;
                    }
                    rv = make_uint4(e[0] | ((uint32_t)e[1] << 16), e[2] | ((uint32_t)e[3] << 16),
                                    e[4] | ((uint32_t)e[5] << 16), e[6] | ((uint32_t)e[7] << 16));
                }
            }
            const uint32_t w[4] = {rv.x, rv.y, rv.z, rv.w};
            /* exact power-of-two normalisation per group (16 threads x 8 inputs): the group's
             * largest |x| becomes [0.5, 1), so x / 16 or x / 64 stays normal in fp16 */
            float f[8], mx = 0.f;
#pragma unroll
            for (int k = 0; k < 8; k++) {
                f[k] = __half2float(__ushort_as_half((unsigned short)(w[k >> 1] >> (16 * (k & 1)))));
                mx = fmaxf(mx, fabsf(f[k])); /* fmaxf skips NaN */
            }
#pragma unroll
            for (int off = 8; off; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
            int e = 0;
            if (mx > 0.f && mx <= 3.0e38f) frexpf(mx, &e);
            const float down = ldexpf(1.f, -e);
            float bsum = 0.f, xsum = 0.f;
#pragma unroll
            for (int k = 0; k < 8; k++) {
                float p;
                const int idx = k2_staged_index<BITS, FIELDS>(vi * 8 + k, n_chunks, &p);
                const __half b = __float2half_rn(f[k] * down * p);
                if (vi < n_vec) xs[idx] = b;
                const float bf = __half2float(b);
                bsum += bf;
                xsum += bf / p; /* what the codes are multiplied by (p a power of two: exact) */
            }
#pragma unroll
            for (int off = 8; off; off >>= 1) {
                bsum += __shfl_xor_sync(0xffffffffu, bsum, off);
                xsum += __shfl_xor_sync(0xffffffffu, xsum, off);
            }
            if (vi < n_vec && (vi & 15) == 0) gsum[vi >> 4] = make_float4(bsum, xsum, ldexpf(1.f, e), 0.f);
        }
    }
    __syncthreads();

    const uint4 *xs4 = reinterpret_cast<const uint4 *>(xs);
    uint32_t magic = kMagic;
    asm volatile("" : "+r"(magic));
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.f;
    int par = 0;
    int c_s = 0, c_P = blockIdx.x * tile_rows + R * rg; /* consumer: pass ks S + c_s of rows c_P.. */
    for (int i = 0; i < n_steps; i++) {
        const int ch = chunk0 + 32 * c_s, pass = ks * S + c_s;
        K2Step<BITS, NP> nxt;
        load_next(nxt);
        if (pass < n_pass) { /* warp-uniform */
            const bool valid = ch < n_chunks; /* uniform per lane group (n_chunks % 4 == 0) */
            const uint4 *xb = xs4 + (valid ? ch : 0);
            /* two independent accumulator chains per row pair (words 0-1 / 2-3): half the mma
             * dependency chain, added once per step */
            float c[NP][4], d[NP][4];
#pragma unroll
            for (int q = 0; q < NP; q++)
#pragma unroll
                for (int e = 0; e < 4; e++) c[q][e] = d[q][e] = 0.f;
            if (BITS == 4) {
#pragma unroll
                for (int v = 0; v < 4; v++) {
                    const uint4 b = xb[v * n_chunks];
#pragma unroll
                    for (int q = 0; q < NP; q++) k2_word(v < 2 ? c[q] : d[q], cur.w[2 * q][v], cur.w[2 * q + 1][v], b, magic);
                }
            } else if (FIELDS) {
#pragma unroll
                for (int q = 0; q < NP; q++) {
                    uint32_t hp[16], hq[16];
                    k2_fields_pairs(hp, cur.w[2 * q][0], cur.w[2 * q][1], cur.w[2 * q][2], magic);
                    k2_fields_pairs(hq, cur.w[2 * q + 1][0], cur.w[2 * q + 1][1], cur.w[2 * q + 1][2], magic);
#pragma unroll
                    for (int v = 0; v < 4; v++) {
                        const uint4 b = xb[v * n_chunks];
                        float(&acc4)[4] = v < 2 ? c[q] : d[q];
                        mma_16816(acc4, hp[4 * v], hq[4 * v], hp[4 * v + 1], hq[4 * v + 1], b.x, b.y);
                        mma_16816(acc4, hp[4 * v + 2], hq[4 * v + 2], hp[4 * v + 3], hq[4 * v + 3], b.z, b.w);
                    }
                }
            } else {
#pragma unroll
                for (int l = 0; l < 2; l++) {
                    const uint32_t sel = l ? 0x4342u : 0x4140u;
                    const uint4 be = xb[(2 * l) * n_chunks], bo = xb[(2 * l + 1) * n_chunks];
#pragma unroll
                    for (int q = 0; q < NP; q++) {
                        const uint32_t sp = spread16(cur.w[2 * q][2], sel), sq = spread16(cur.w[2 * q + 1][2], sel);
                        const uint32_t lp = cur.w[2 * q][l], lq = cur.w[2 * q + 1][l];
                        k2_word(l ? d[q] : c[q], bit_select(0x33333333u, lp, sp << 2), bit_select(0x33333333u, lq, sq << 2), be, magic);
                        k2_word(l ? d[q] : c[q], bit_select(0x33333333u, lp >> 2, sp), bit_select(0x33333333u, lq >> 2, sq), bo, magic);
                    }
                }
            }
#pragma unroll
            for (int q = 0; q < NP; q++)
#pragma unroll
                for (int e = 0; e < 4; e++) c[q][e] += d[q][e];
            if (valid && useful) {
                const float4 gs = gsum[ch >> 2]; /* (sum B, sum x, 2^e) of the group, normalised */
#pragma unroll
                for (int q = 0; q < NP; q++) {
                    const float cp = (g & 1) ? c[q][1] : c[q][0], cq = (g & 1) ? c[q][3] : c[q][2];
                    const float2 s2 = __half22float2(__halves2half2(__ushort_as_half(cur.s[2 * q]), __ushort_as_half(cur.s[2 * q + 1])));
                    const float2 z2 = __half22float2(__halves2half2(__ushort_as_half(cur.z[2 * q]), __ushort_as_half(cur.z[2 * q + 1])));
                    acc[2 * q] = fmaf(s2.x * gs.z, fmaf(-z2.x, gs.y, fmaf(-1024.f, gs.x, cp)), acc[2 * q]);
                    acc[2 * q + 1] = fmaf(s2.y * gs.z, fmaf(-z2.y, gs.y, fmaf(-1024.f, gs.x, cq)), acc[2 * q + 1]);
                }
            }
        }
        if (c_s == S - 1) { /* end of this block's tile: uniform over the block */
            const int P = c_P;
#pragma unroll
            for (int r = 0; r < R; r++)
#pragma unroll
                for (int off = 16; off; off >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], off);
            if (ksplit == 1) {
                if (lane < R) {
                    float a = acc[0];
#pragma unroll
                    for (int r = 1; r < R; r++) a = lane == r ? acc[r] : a;
                    if (accumulate) atomicAdd(y + P + lane, __float2half_rn(a));
                    else y[P + lane] = __float2half_rn(a);
                }
            } else {
                float *rb = red + par * (kWarps * R);
                if (lane == 0) {
#pragma unroll
                    for (int r = 0; r < R; r++) rb[warp * R + r] = acc[r];
                }
                __syncthreads(); /* every thread reaches it: n_steps and S are block-uniform */
                if (ks == 0 && lane < R) {
                    float a = 0.f;
                    for (int j = 0; j < ksplit; j++) a += rb[(rg * ksplit + j) * R + lane]; /* fixed order */
                    if (accumulate) atomicAdd(y + P + lane, __float2half_rn(a));
                    else y[P + lane] = __float2half_rn(a);
                }
                par ^= 1;
            }
#pragma unroll
            for (int r = 0; r < R; r++) acc[r] = 0.f;
            c_s = 0;
            c_P += gridDim.x * tile_rows;
        } else {
            c_s++;
        }
        cur = nxt;
    }
}

/* Kernel 2's plan for one call: applies = false when it does not (group size not 128, pointers not
 * 16-byte (qweight) / 2-byte aligned, shared memory beyond the device): the caller runs kernel 0. */
struct K2Plan {
    bool applies;
    int ksplit, per_sm, rows;
    long blocks, tiles;
    size_t smem;
    void (*kernel)(const uint8_t *, const unsigned short *, const unsigned short *, const __half *, __half *, int,
                   int, int, int, int);
};

dd_status plan_k2(const dd_shape *s, const void *d_qweight, const void *d_scales, const void *d_zeros,
                  int n_sm_free, const dd_cuda_variant *v, K2Plan *P) {
    memset(P, 0, sizeof *P);
    if (s->group_size != 128 || (((uintptr_t)d_qweight) & 15) || (((uintptr_t)d_scales) & 1) ||
        (((uintptr_t)d_zeros) & 1))
        return DD_OK;
    int n_sm = 0, smem_optin = 0;
    dd_status st;
    if ((st = dd_cuda_device_limits(&n_sm, &smem_optin)) != DD_OK) return st;
    if (n_sm_free <= 0 || n_sm_free > n_sm) n_sm_free = n_sm;
    const int d_in_pad = dd_d_in_pad(s);
    P->smem = k2_smem_bytes(d_in_pad, s->group_size);
    if (P->smem > (size_t)smem_optin) return DD_OK;
    /* rows per lane and step: base_rows 2 = one row pair (4 blocks per SM), else (0 rule, 4) two */
    const int np = v && v->base_rows == 2 ? 1 : 2;
    P->rows = 2 * np;
    /* base_kernel 3: the caller's 3-bit qweight is in the FIELDS layout (decdec.h) */
    const bool fields = v && v->base_kernel == 3 && s->bits == 3;
    P->kernel = s->bits == 4 ? (np == 1 ? gemv_k2_kernel<4, 1, false> : gemv_k2_kernel<4, 2, false>)
                : fields     ? (np == 1 ? gemv_k2_kernel<3, 1, true> : gemv_k2_kernel<3, 2, true>)
                             : (np == 1 ? gemv_k2_kernel<3, 1, false> : gemv_k2_kernel<3, 2, false>);
    if (P->smem > 48 * 1024)
        DD_CK(cudaFuncSetAttribute(P->kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)P->smem));
    DD_CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&P->per_sm, P->kernel, kThreads, P->smem));
    if (P->per_sm < 1) return DD_OK;
    const long slots = (long)n_sm_free * P->per_sm;
    const long n_pass = (d_in_pad / kK2Chunk + 31) / 32;
    /* k-split rule: the fewest steps on the busiest block, ceil(tiles / blocks) x ceil(passes /
     * ksplit), plus 5% of a step per tile for the shared-memory reduction; ties to the smaller split */
    const int vk = v ? v->base_ksplit : 0;
    int ksplit = vk == 1 || vk == 2 || vk == 4 || vk == 8 ? vk : 0;
    if (!ksplit) {
        double best = 1e30;
        for (int k = 1; k <= 8; k *= 2) {
            const long tiles = (long)s->d_out / (P->rows * (kWarps / k));
            const long blocks = std::min(tiles, slots);
            const long per_block = (tiles + blocks - 1) / blocks;
            const double cost = (double)per_block * (double)((n_pass + k - 1) / k) + (k > 1 ? 0.05 * per_block : 0.0);
            if (cost < best - 1e-9) { best = cost; ksplit = k; }
        }
    }
    P->ksplit = ksplit;
    P->tiles = (long)s->d_out / (P->rows * (kWarps / ksplit));
    P->blocks = std::min(P->tiles, slots);
    P->applies = true;
    return DD_OK;
}

dd_status gemv_k2_launch(const dd_shape *s, const uint8_t *d_qweight, const uint16_t *d_scales,
                         const uint16_t *d_zeros, const uint16_t *d_x, uint16_t *d_y, int accumulate,
                         int n_sm_free, const dd_cuda_variant *v, cudaStream_t stream, bool *launched) {
    *launched = false;
    K2Plan P;
    dd_status st = plan_k2(s, d_qweight, d_scales, d_zeros, n_sm_free, v, &P);
    if (st != DD_OK || !P.applies) return st;
    P.kernel<<<(unsigned)P.blocks, kThreads, P.smem, stream>>>(
        d_qweight, reinterpret_cast<const unsigned short *>(d_scales), reinterpret_cast<const unsigned short *>(d_zeros),
        reinterpret_cast<const __half *>(d_x), reinterpret_cast<__half *>(d_y), s->d_in, dd_d_in_pad(s), s->d_out,
        accumulate, P.ksplit);
    DD_CK_LAUNCH("gemv_k2_kernel");
    *launched = true;
    return DD_OK;
}

} // namespace

dd_status dd_cuda_gemv_base_v(const dd_shape *s, const uint8_t *d_qweight, const uint16_t *d_scales,
                              const uint16_t *d_zeros, const uint16_t *d_x, uint16_t *d_y,
                              int accumulate, int n_sm_free, const dd_cuda_variant *v, void *stream) {
    dd_status st = dd_shape_check(s);
    if (st != DD_OK) return st;
    if (!d_qweight || !d_scales || !d_zeros || !d_x || !d_y) return DD_ERR_INVALID_ARGUMENT;
    int n_sm = 0, smem_optin = 0;
    if ((st = dd_cuda_device_limits(&n_sm, &smem_optin)) != DD_OK) return st;
    if (n_sm_free <= 0 || n_sm_free > n_sm) n_sm_free = n_sm;
    if (v && (v->base_kernel == 2 || v->base_kernel == 3)) { /* measurement variant: kernel 2 (3: 3-bit
                                                              * FIELDS layout), else kernel 0 below */
        bool launched = false;
        if ((st = gemv_k2_launch(s, d_qweight, d_scales, d_zeros, d_x, d_y, accumulate, n_sm_free, v,
                                 (cudaStream_t)stream, &launched)) != DD_OK || launched)
            return st;
    }
    BasePlan P;
    if ((st = plan_base<false>(s, n_sm_free, v, &P)) != DD_OK) return st;
    const long blocks = base_blocks(((long)s->d_out + P.rows_per_block - 1) / P.rows_per_block,
                                    (long)n_sm_free * P.per_sm, v ? v->base_grid : 0);
    DecArgs none = {};
    P.kernel<<<(unsigned)blocks, kThreads, P.smem, (cudaStream_t)stream>>>(
        d_qweight, reinterpret_cast<const __half *>(d_scales),
        reinterpret_cast<const __half *>(d_zeros), reinterpret_cast<const __half *>(d_x),
        reinterpret_cast<__half *>(d_y), s->d_in, dd_d_in_pad(s), s->d_out, s->group_size, accumulate,
        P.lanes, none);
    DD_CK_LAUNCH("gemv_base_kernel");
    return DD_OK;
}

dd_status dd_cuda_gemv_k2_info(const dd_shape *s, const void *d_qweight, const void *d_scales,
                               const void *d_zeros, int n_sm_free, const dd_cuda_variant *v, int *ksplit,
                               long *blocks, long *tiles, size_t *smem, int *per_sm) {
    dd_status st = dd_shape_check(s);
    if (st != DD_OK) return st;
    K2Plan P;
    if ((st = plan_k2(s, d_qweight, d_scales, d_zeros, n_sm_free, v, &P)) != DD_OK) return st;
    *ksplit = P.applies ? P.ksplit : 0;
    *blocks = P.blocks;
    *tiles = P.tiles;
    *smem = P.smem;
    *per_sm = P.per_sm;
    return DD_OK;
}

extern "C" dd_status dd_cuda_gemv_base(const dd_shape *s, const uint8_t *d_qweight,
                                       const uint16_t *d_scales, const uint16_t *d_zeros,
                                       const uint16_t *d_x, uint16_t *d_y, int accumulate,
                                       int n_sm_free, void *stream) {
    return dd_cuda_gemv_base_v(s, d_qweight, d_scales, d_zeros, d_x, d_y, accumulate, n_sm_free,
                               NULL, stream);
}

/* The whole layer in one launch: blocks 0..n_dec-1 select and fetch residual rows, the rest run
 * the base GEMV; both add into the layer's fp32 accumulator and the last contributor of each
 * 32-output tile writes y.  with_base 0: DEC alone (y = delta, or y += delta). */
dd_status dd_cuda_fused_launch(const dd_shape *s, const uint8_t *d_qweight, const uint16_t *d_scales,
                               const uint16_t *d_zeros, const dd_fused_dec *dec,
                               const dd_cuda_variant *v, const uint16_t *d_x, uint16_t *d_y,
                               int accumulate, void *stream) {
    int n_sm = 0, smem_optin = 0;
    dd_status st;
    if ((st = dd_cuda_device_limits(&n_sm, &smem_optin)) != DD_OK) return st;
    const int units = s->d_out / 32;
    if (dd_total_quota(s->d_in, dec->k_chunk) > kSelCap || dec->k_chunk < 1) return DD_ERR_UNSUPPORTED;
    const int n_dec = std::min(units, dec->n_tb < 1 ? 1 : dec->n_tb); /* disjoint column slices */
    const int v_base_sm = v ? v->base_sm : 0;
    int base_sm = v_base_sm > 0 && v_base_sm <= n_sm ? v_base_sm : std::max(1, n_sm - n_dec);
    BasePlan P;
    if ((st = plan_base<true>(s, base_sm, v, &P)) != DD_OK) return st;
    long blocks = 0;
    /* row-group hand-out, numbered here as before v2: 0 static (v6), 1 dynamic tickets on a grid
     * for SMs - n_tb, 2 dynamic tickets filling every block slot the DEC blocks leave (DEC blocks'
     * SMs too), 3 the rule (static one wave on every free slot when it fits, dynamic from 4 waves
     * on, else static as v6).  dd_cuda_variant.layer_mode numbers them 0 rule, 1 static,
     * 2 tickets on SMs - n_tb, 3 tickets on every free slot. */
    const int v_mode = v ? v->layer_mode : 0;
    int mode = v_mode >= 1 && v_mode <= 3 ? v_mode - 1 : 3;
    if (dec->with_base) {
        const long needed = ((long)s->d_out + P.rows_per_block - 1) / P.rows_per_block;
        const long fill = std::max(1L, (long)n_sm * P.per_sm - n_dec); /* every slot DEC leaves */
        if (mode == 3) {
            /* one wave on every free slot (DEC blocks' SMs too) when it fits: no warp runs a second
             * row group (8192x8192 4b: +33% -> +7%); many waves: dynamic tickets on those slots
             * (8192x28672 3b: +4.0% -> +0.0%); in between static as v6 (tickets cost more there) */
            if (needed <= fill && v_base_sm <= 0) mode = 0, blocks = needed;
            else if (needed >= 4 * fill && v_base_sm <= 0) mode = 2;
            else mode = 0;
        }
        if (blocks) {
        } else if (mode == 2 && v_base_sm <= 0) blocks = std::min(needed, fill);
        else if (mode >= 1) blocks = std::min(needed, (long)base_sm * P.per_sm);
        else blocks = base_blocks(needed, (long)base_sm * P.per_sm, v ? v->base_grid : 0);
        if (v && v->layer_grid_cap > 0) blocks = std::min(blocks, (long)v->layer_grid_cap);
    }
    DecArgs D;
    D.rcodes = reinterpret_cast<const uint4 *>(dec->rcodes);
    D.rscales = reinterpret_cast<const __half *>(dec->rscales);
    D.cell = dec->cell;
    D.k_chunk = dec->k_chunk;
    D.n_dec = n_dec;
    D.has_base = dec->with_base ? 1 : 0;
    D.accumulate = accumulate;
    D.ticket = mode >= 1 && dec->with_base ? dec->ticket : nullptr;
    for (int i = 0; i < DD_NUM_BUCKETS; i++) D.fh[i] = dec->floors_half[i];
    P.kernel<<<(unsigned)(blocks + n_dec), kThreads, P.smem, (cudaStream_t)stream>>>(
        d_qweight, reinterpret_cast<const __half *>(d_scales),
        reinterpret_cast<const __half *>(d_zeros), reinterpret_cast<const __half *>(d_x),
        reinterpret_cast<__half *>(d_y), s->d_in, dd_d_in_pad(s), s->d_out, s->group_size, accumulate,
        P.lanes, D);
    DD_CK_LAUNCH("gemv_base_kernel<DEC>");
    return DD_OK;
}
