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

__device__ __forceinline__ int chunk_quota(int d_in, int chunk, int k_chunk) {
    const int start = chunk * DD_CHUNK;
    const int len = min(DD_CHUNK, d_in - start);
    if (len <= 0 || k_chunk <= 0) return 0;
    if (len == DD_CHUNK) return k_chunk;
    const long long k = ((long long)k_chunk * len + DD_CHUNK / 2) / DD_CHUNK;
    return (int)(k > len ? len : k);
}

/* Floors into shared memory and whether they are non-increasing.  Ends with a barrier. */
__device__ __forceinline__ void load_floors(SelectSmem &S, const float *__restrict__ floors) {
    const int t = threadIdx.x;
    if (t < DD_NUM_BUCKETS) S.f[t] = floors[t];
    __syncthreads();
    const int ok = t >= DD_NUM_BUCKETS - 1 || S.f[t] >= S.f[t + 1];
    const int all = __syncthreads_and(ok);
    if (t == 0) S.monotone = all;
    __syncthreads();
}

__device__ __forceinline__ int bucket_of(const SelectSmem &S, float ax) {
    if (!(ax == ax)) return DD_NUM_BUCKETS; /* NaN: no bucket */
    if (S.monotone) {
        /* #floors above ax = the first i with ax >= f[i] (f non-increasing, f[31] = 0) */
        int pos = 0;
#pragma unroll
        for (int step = 16; step; step >>= 1)
            if (S.f[pos + step - 1] > ax) pos += step;
        return pos < DD_NUM_BUCKETS ? pos : DD_NUM_BUCKETS;
    }
    for (int i = 0; i < DD_NUM_BUCKETS; i++)
        if (ax >= S.f[i]) return i;
    return DD_NUM_BUCKETS;
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

} // namespace dd_dec

#endif
