/*
 * Device-side DEC building blocks shared by the stand-alone selection kernel (dd_cuda_dec.cu)
 * and the one-launch layer kernel (dd_cuda_gemv.cu), so the selection the tests compare with the
 * CPU backend is the very code the layer call runs.
 *
 * select_chunk: decdec.h's bucket selection of one 1024-input chunk by one block of
 * kDecThreads threads (4 consecutive inputs per thread: thread order is index order).
 *   - bucket of |x|: "smallest i with |x| >= f[i]"; when the floors are non-increasing (always,
 *     for non-increasing thresholds; checked per block) a 5-step binary search finds the same i,
 *     else the literal linear scan runs.  NaN: no bucket.
 *   - histogram: warp-aggregated (__match_any_sync) shared-memory adds, so the crowded low
 *     buckets cost one atomic per warp and bucket, not one per input.
 *   - cut bucket and the count taken from it: one warp, shuffle scan over the 32 buckets.
 *   - one block scan of the packed pair (below-cut count << 16 | in-cut count) gives every
 *     selected input its ascending output slot: #below-cut before it + min(#in-cut before it,
 *     taken from cut) -- the "lowest index first" tie rule without a second scan.
 */
#ifndef DD_CUDA_DEC_DEVICE_CUH
#define DD_CUDA_DEC_DEVICE_CUH

#include "dd_cuda_internal.cuh"

namespace dd_dec {

constexpr int kDecThreads = 256;
constexpr int kDecWarps = kDecThreads / 32;

struct SelectSmem {
    float f[DD_NUM_BUCKETS];
    int hist[DD_NUM_BUCKETS];
    int warp_tot[kDecWarps];
    int cut, from, n_sel, monotone;
    int idx[DD_CHUNK];
    float xv[DD_CHUNK];
};

/* decdec.h's chunk quota: the rule of dd_rules.h (shared with the CPU backend). */
__device__ __forceinline__ int chunk_quota(int d_in, int chunk, int k_chunk) {
    return dd_rule_chunk_quota(d_in, chunk, k_chunk);
}

/* The fp32 bucket floors as a kernel parameter (by value: no device memory behind them). */
struct FloorsF { float f[DD_NUM_BUCKETS]; };

/* Floors from device memory into shared memory and whether they are non-increasing.  Ends with
 * a barrier. */
__device__ __forceinline__ void load_floors(SelectSmem &S, const float *__restrict__ floors) {
    const int t = threadIdx.x;
    if (t < DD_NUM_BUCKETS) S.f[t] = floors[t];
    __syncthreads();
    const int ok = t >= DD_NUM_BUCKETS - 1 || S.f[t] >= S.f[t + 1];
    const int all = __syncthreads_and(ok);
    if (t == 0) S.monotone = all;
    __syncthreads();
}

/* Floors (by value) into shared memory and whether they are non-increasing.  Ends with a
 * barrier. */
__device__ __forceinline__ void load_floors(SelectSmem &S, const FloorsF &floors) {
    const int t = threadIdx.x;
    {   /* constant indices only: a run-time index would copy the parameter struct to local memory */
        float f = 0.f;
#pragma unroll
        for (int i = 0; i < DD_NUM_BUCKETS; i++)
            if (t == i) f = floors.f[i];
        if (t < DD_NUM_BUCKETS) S.f[t] = f;
    }
    __syncthreads();
    const int ok = t >= DD_NUM_BUCKETS - 1 || S.f[t] >= S.f[t + 1];
    const int all = __syncthreads_and(ok);
    if (t == 0) S.monotone = all;
    __syncthreads();
}

/* bucket_of of dd_rules.h (the CPU backend calls the same function): the 5-step search when the
 * floors are non-increasing, else the literal scan.  NaN: no bucket. */
__device__ __forceinline__ int bucket_of(const SelectSmem &S, float ax) {
    return dd_rule_bucket_of(ax, S.f, S.monotone);
}

/* Selection of chunk [start, start+len) with `quota` slots: S.idx/S.xv[0..n) ascending, returns
 * n (< quota only when NaNs leave too few candidates).  Needs load_floors() first; every thread
 * of the block must call it; ends with a barrier. */
__device__ __forceinline__ int select_chunk(SelectSmem &S, const __half *__restrict__ x, int start, int len,
                            int quota) {
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    if (t < DD_NUM_BUCKETS) S.hist[t] = 0;
    __syncthreads();
    int b[4];
    float v[4];
#pragma unroll
    for (int e = 0; e < 4; e++) {
        const int j = 4 * t + e;
        v[e] = j < len ? __half2float(x[start + j]) : 0.f;
        b[e] = j < len ? bucket_of(S, fabsf(v[e])) : DD_NUM_BUCKETS + 1;
    }
#pragma unroll
    for (int e = 0; e < 4; e++) {
        const unsigned peers = __match_any_sync(0xffffffffu, b[e]);
        if (b[e] < DD_NUM_BUCKETS && lane == __ffs(peers) - 1) atomicAdd(&S.hist[b[e]], __popc(peers));
    }
    __syncthreads();
    if (warp == 0) {
        const int h = S.hist[lane];
        int incl = h;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const int n = __shfl_up_sync(0xffffffffu, incl, off);
            if (lane >= off) incl += n;
        }
        /* whole buckets while they fit: the prefix sums are non-decreasing */
        const unsigned fits = __ballot_sync(0xffffffffu, incl <= quota);
        const int cut = __popc(fits);
        const int taken = cut ? __shfl_sync(0xffffffffu, incl, (cut - 1) & 31) : 0;
        if (lane == 0) {
            S.cut = cut;
            S.from = cut < DD_NUM_BUCKETS ? quota - taken : 0;
        }
    }
    __syncthreads();
    const int cut = S.cut, from = S.from;
    int lt = 0, eq = 0;
#pragma unroll
    for (int e = 0; e < 4; e++) {
        lt += b[e] < cut;
        eq += b[e] == cut;
    }
    /* block exclusive scan of (lt << 16 | eq) */
    const int packed = (lt << 16) | eq;
    int incl = packed;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const int n = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += n;
    }
    if (lane == 31) S.warp_tot[warp] = incl;
    __syncthreads();
    int before = incl - packed, total = 0;
#pragma unroll
    for (int w = 0; w < kDecWarps; w++) {
        const int wt = S.warp_tot[w];
        if (w < warp) before += wt;
        total += wt;
    }
    int lt_before = before >> 16, eq_before = before & 0xFFFF;
#pragma unroll
    for (int e = 0; e < 4; e++) {
        if (b[e] < cut) {
            const int pos = lt_before + min(eq_before, from);
            S.idx[pos] = start + 4 * t + e;
            S.xv[pos] = v[e];
            lt_before++;
        } else if (b[e] == cut) {
            if (eq_before < from) {
                S.idx[lt_before + eq_before] = start + 4 * t + e;
                S.xv[lt_before + eq_before] = v[e];
            }
            eq_before++;
        }
    }
    const int n = (total >> 16) + min(total & 0xFFFF, from);
    __syncthreads();
    return n;
}


/* ---- v5: one WARP selects one chunk (the layer call's path; floors must be non-increasing) ----
 * With non-increasing floors, "bucket <= i" is "|x| >= f[i]", so the cumulative bucket counts are
 * C(i) = #{|x| >= f[i]} (non-decreasing in i) and the cut bucket is the first i with
 * C(i) > quota: a 5-step binary search, each step one compare per input plus one warp reduction,
 * instead of a histogram and block scans.  x is fp16, so |x| >= f  <=>  |x| >= ceil_half(f): the
 * compares run on half2 pairs against the floors rounded UP to fp16 on the host (exact, see
 * dd_cuda_runtime.cu).  NaN fails every compare (no bucket); +-Inf passes f[0] (bucket 0).
 * Lane l owns inputs 32l..32l+31 of the chunk, so lane order is index order and one packed warp
 * scan gives every selected input its ascending slot (lowest index first in the cut bucket). */
constexpr uint32_t kHalfNaN2 = 0x7E007E00u;

/* fh2[i] = (ceil_half(f[i]), same) for i = 0..31.  Writes out_idx[0..quota): selected indices
 * ascending, -1 in slots NaNs left empty.  Every lane of the warp must call it. */
__device__ __forceinline__ void warp_select_chunk(const __half *__restrict__ x, int start, int len,
                                                  int quota, const __half2 *fh2, int *out_idx) {
    const int lane = threadIdx.x & 31, j0 = 32 * lane;
    __half2 v[16];
    if ((((uintptr_t)(x + start)) & 15) == 0 && j0 + 32 <= len) {
        const uint4 *p = reinterpret_cast<const uint4 *>(x + start + j0);
#pragma unroll
        for (int q = 0; q < 4; q++) {
            const uint4 w = __ldg(p + q);
            const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const uint32_t a = ws[r] & 0x7FFF7FFFu; /* |x|; NaN stays NaN */
                memcpy(&v[4 * q + r], &a, 4);
            }
        }
    } else {
#pragma unroll
        for (int e = 0; e < 16; e++) {
            uint32_t a = kHalfNaN2; /* out of range: never counted, never selected */
            const int j = j0 + 2 * e;
            if (j < len) a = (a & 0xFFFF0000u) | (__half_as_ushort(x[start + j]) & 0x7FFFu);
            if (j + 1 < len) a = (a & 0x0000FFFFu) | ((uint32_t)(__half_as_ushort(x[start + j + 1]) & 0x7FFFu) << 16);
            memcpy(&v[e], &a, 4);
        }
    }
    /* binary search for the cut: first i with C(i) > quota (32 if none) */
    int lo = 0, hi = DD_NUM_BUCKETS, taken = 0;
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        const __half2 f = fh2[mid];
        __half2 c[4]; /* four independent sums: the adds do not wait on each other */
#pragma unroll
        for (int q = 0; q < 4; q++) c[q] = __float2half2_rn(0.f);
#pragma unroll
        for (int e = 0; e < 16; e++) c[e & 3] = __hadd2(c[e & 3], __hge2(v[e], f)); /* 1.0 per hit: exact */
        const __half2 cs = __hadd2(__hadd2(c[0], c[1]), __hadd2(c[2], c[3])); /* <= 16 per half */
        const int mine = (int)(__low2float(cs) + __high2float(cs));
        const int cnt = __reduce_add_sync(0xffffffffu, mine);
        if (cnt > quota) hi = mid;
        else { lo = mid + 1; taken = cnt; }
    }
    const int cut = lo, from = cut < DD_NUM_BUCKETS ? quota - taken : 0;
    /* per-lane masks: below the cut (bucket < cut) and in the cut bucket */
    uint32_t mlt = 0, mge = 0;
    const __half2 flt = fh2[cut > 0 ? cut - 1 : 0], fge = fh2[cut < DD_NUM_BUCKETS ? cut : DD_NUM_BUCKETS - 1];
#pragma unroll
    for (int e = 0; e < 16; e++) {
        const unsigned a = __hge2_mask(v[e], flt), b = __hge2_mask(v[e], fge);
        mlt |= ((a & 1u) | ((a >> 15) & 2u)) << (2 * e);
        mge |= ((b & 1u) | ((b >> 15) & 2u)) << (2 * e);
    }
    if (cut == 0) mlt = 0;
    const uint32_t meq = cut < DD_NUM_BUCKETS ? (mge & ~mlt) : 0u;
    const int packed = (__popc(mlt) << 16) | __popc(meq);
    int incl = packed;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const int n = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += n;
    }
    const int total = __shfl_sync(0xffffffffu, incl, 31), before = incl - packed;
    const int lt_before = before >> 16, eq_before = before & 0xFFFF;
    int t_eq = from - eq_before;
    t_eq = t_eq < 0 ? 0 : (t_eq > __popc(meq) ? __popc(meq) : t_eq);
    uint32_t keep = 0, m = meq;
    for (int i = 0; i < t_eq; i++) { keep |= m & (0u - m); m &= m - 1; }
    uint32_t sel = mlt | keep;
    int pos = lt_before + min(eq_before, from);
    while (sel) {
        out_idx[pos++] = start + j0 + __ffs(sel) - 1;
        sel &= sel - 1;
    }
    const int n = (total >> 16) + min(total & 0xFFFF, from);
    for (int i = n + lane; i < quota; i += 32) out_idx[i] = -1;
}

/* One zero-copy residual vector (32 output channels' nibbles, 4 words) times x_i, into 32 fp32
 * sums: acc[8w+n] += xv * code(word w, nibble n) -- dd_rules.h's word decode + FMA, the text the
 * CPU backend's residual GEMV runs too.  Every fetch loop (fused DEC blocks, fetch_kernel) feeds
 * its loaded vectors through this. */
__device__ __forceinline__ void accumulate_codes(const uint4 &v, float xv, float acc[32]) {
    dd_rule_mac_word(v.x, xv, acc);
    dd_rule_mac_word(v.y, xv, acc + 8);
    dd_rule_mac_word(v.z, xv, acc + 16);
    dd_rule_mac_word(v.w, xv, acc + 24);
}

} // namespace dd_dec

#endif
