/*
 * dd_cuda_ops.cu -- the non-linear ops of the decode engine and the dense fp16 GEMV / GEMM of the
 * head and of prefill.  Contract: dd_cuda_ops.h; CPU twin: decdec/model.py (LlamaModel.forward).
 *
 * Every entry point checks its arguments on the host (DD_ERR_INVALID_ARGUMENT / DD_ERR_UNSUPPORTED
 * before any launch), then launches on the given stream; nothing allocates, nothing synchronises
 * the host, every launch is capturable.  Positions are read on the device (*d_pos), so a captured
 * graph replays at the current position: grids are therefore sized for the worst case (max_seq)
 * and blocks whose share of the work is empty at the current position exit cheaply.
 *
 * Design per kernel (numbers for the H200: 132 SMs, 4.8 TB/s HBM, 227 KB shared memory per block):
 *   embed, add_rmsnorm, rope_store_kv, swiglu, advance, dequant: one block per row / a grid-stride
 *     loop; fp32 arithmetic; rmsnorm reduces in fp32 with warp shuffles (one block per row).
 *   attention: flash-decoding.  A block owns one KV head, up to 16 query rows that share it (the GQA
 *     group's heads x a few consecutive tokens) and a contiguous range of 64-key tiles; it runs the
 *     online softmax over its tiles (K/V tiles staged in shared memory, the next tile's loads in
 *     flight in registers while the current one is computed).  At decode (few blocks) the key axis
 *     is split over the 2..8 blocks of a thread-block CLUSTER (sm_90), whose partial (max, sum,
 *     accumulator) triples are combined through distributed shared memory: no global scratch (the
 *     op has no workspace) and no second launch.  Before sm_90 one block does the whole range.
 *   gemv_f16: one lane group (8 or 32 lanes) per 1..4 rows, 16-byte streaming loads of W, x staged
 *     once per block in shared memory, fp32 FMAs, a persistent grid of whole waves.
 *   gemm_f16: WMMA m16n16k16 fp16 -> fp32 on shared-memory tiles filled by cp.async (3-4 stage
 *     pipeline), three tile shapes by n_tok (16x64, 64x64, 128x128); token rows, W rows and the K
 *     tail beyond the matrix are zero-filled by the copy, stores are guarded.
 *   sample_score: one block of 1024 threads.  Pass 1: max, argmax (lowest index on ties) and, when
 *     scored, logsumexp (online, fp64 sums).  KL: a second pass in fp64.  Sampling: the exact
 *     top-p threshold t* (the largest u with sum_{u_i >= u} u_i >= top_p * sum u_i, u_i =
 *     exp((l_i - max) / T)) by a 3-level radix select on the fp32 bit pattern of u (11 + 11 + 10
 *     bits, masses in 40-bit fixed point so the sums are exact and order-free: deterministic),
 *     then a Gumbel-max draw over {u_i >= t*} with noise from a stateless splitmix64 hash of
 *     (seed, p, i).  u of the first ~50K tokens is cached in shared memory between the passes.
 */
#include <limits.h>
#include <math.h>
#include <stdint.h>

#include <atomic>

#include <cooperative_groups.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "dd_cuda_internal.cuh"
#include "dd_cuda_ops.h"

namespace cg = cooperative_groups;

namespace {

constexpr unsigned kFull = 0xffffffffu;

inline cudaStream_t as_stream(void *s) { return reinterpret_cast<cudaStream_t>(s); }
inline bool aligned16(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

/* Whether the current device launches thread-block clusters (sm_90+), cached per device. */
dd_status device_has_clusters(int *has) {
    enum { kMaxDevices = 64 };
    static std::atomic<int> cached[kMaxDevices]; /* 0 unknown, 1 no, 2 yes */
    int dev = 0;
    DD_CK(cudaGetDevice(&dev));
    if (dev >= 0 && dev < kMaxDevices) {
        const int c = cached[dev].load(std::memory_order_relaxed);
        if (c) {
            *has = c == 2;
            return DD_OK;
        }
    }
    int v = 0;
    DD_CK(cudaDeviceGetAttribute(&v, cudaDevAttrClusterLaunch, dev));
    if (dev >= 0 && dev < kMaxDevices) cached[dev].store(v ? 2 : 1, std::memory_order_relaxed);
    *has = v != 0;
    return DD_OK;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
    return v;
}
__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
    return v;
}
__device__ __forceinline__ unsigned long long warp_sum_u64(unsigned long long v) {
#pragma unroll
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
    return v;
}

/* 8 halves of a 16-byte word as floats.  Words are reinterpreted with memcpy (register moves), not
 * through a pointer cast of a local (a strict-aliasing violation an optimiser may exploit). */
__device__ __forceinline__ void unpack8(const uint4 &v, float *f) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        __half2 h;
        memcpy(&h, &w[i], 4);
        const float2 t = __half22float2(h);
        f[2 * i] = t.x;
        f[2 * i + 1] = t.y;
    }
}
/* 8 floats rounded to fp16 (RNE) in one 16-byte word */
__device__ __forceinline__ uint4 pack8(const float *f) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const __half2 h = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
        memcpy(&w[i], &h, 4);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

/* ================================================================================================
 * embed
 * ============================================================================================== */
__global__ void embed_kernel(const __half *__restrict__ table, int vocab, int dim,
                             const int32_t *__restrict__ tokens, const int32_t *__restrict__ pos,
                             float *__restrict__ h) {
    const int t = blockIdx.x;
    const long long p = (long long)*pos + t;
    const int tok = p >= 0 ? tokens[p] : -1;
    float *row = h + (size_t)t * dim;
    if (tok < 0 || tok >= vocab) { /* never produced by the engine: zeros, not a wild read */
        for (int i = threadIdx.x; i < dim; i += blockDim.x) row[i] = 0.f;
        return;
    }
    const __half *src = table + (size_t)tok * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) row[i] = __half2float(src[i]);
}

/* ================================================================================================
 * add + rmsnorm: one block per row, fp32 sum of squares
 * ============================================================================================== */
constexpr int kNormThreads = 256;

__global__ void __launch_bounds__(kNormThreads)
add_rmsnorm_kernel(float *__restrict__ h, const __half *__restrict__ y, const float *__restrict__ w,
                   float eps, int dim, __half *__restrict__ out) {
    __shared__ float red[kNormThreads / 32];
    const int t = blockIdx.x, tid = threadIdx.x;
    float *hr = h + (size_t)t * dim;
    const __half *yr = y ? y + (size_t)t * dim : nullptr;
    float ss = 0.f;
    for (int i = tid; i < dim; i += kNormThreads) {
        float v = hr[i];
        if (yr) {
            v += __half2float(yr[i]);
            hr[i] = v;
        }
        ss += v * v;
    }
    if (!out) return; /* kernel argument: uniform */
    ss = warp_sum(ss);
    if ((tid & 31) == 0) red[tid >> 5] = ss;
    __syncthreads();
    float tot = 0.f;
#pragma unroll
    for (int i = 0; i < kNormThreads / 32; i++) tot += red[i]; /* same order in every thread */
    /* model.py: x / sqrt(mean(x^2) + eps) * w, in that order */
    const float r = sqrtf(tot / (float)dim + eps);
    __half *o = out + (size_t)t * dim;
    for (int i = tid; i < dim; i += kNormThreads) o[i] = __float2half_rn(hr[i] / r * w[i]);
}

/* ================================================================================================
 * RoPE (rotate-half) on q in place and on k, then k and v into the caches
 * ============================================================================================== */
constexpr int kRopeThreads = 256;

__global__ void __launch_bounds__(kRopeThreads)
rope_store_kernel(__half *__restrict__ q, const __half *__restrict__ k, const __half *__restrict__ v,
                  const float *__restrict__ cosp, const float *__restrict__ sinp,
                  const int32_t *__restrict__ pos, int n_heads, int n_kv, int hd, int max_seq,
                  __half *__restrict__ kc, __half *__restrict__ vc) {
    const int t = blockIdx.x;
    const long long p = (long long)*pos + t;
    /* out of range is the caller's bug: rotate with the clamped row, store nothing */
    const bool store = p >= 0 && p < max_seq;
    const int pc = p < 0 ? 0 : (p >= max_seq ? max_seq - 1 : (int)p);
    const int half = hd / 2;
    const float *c = cosp + (size_t)pc * half, *s = sinp + (size_t)pc * half;
    __half *qr = q + (size_t)t * n_heads * hd;
    for (int e = threadIdx.x; e < n_heads * half; e += kRopeThreads) {
        const int hh = e / half, i = e - hh * half;
        __half *x = qr + (size_t)hh * hd;
        const float x1 = __half2float(x[i]), x2 = __half2float(x[i + half]);
        const float cv = c[i], sv = s[i];
        x[i] = __float2half_rn(x1 * cv - x2 * sv);
        x[i + half] = __float2half_rn(x2 * cv + x1 * sv);
    }
    if (!store) return;
    const __half *kr = k + (size_t)t * n_kv * hd;
    for (int e = threadIdx.x; e < n_kv * half; e += kRopeThreads) {
        const int hh = e / half, i = e - hh * half;
        const __half *x = kr + (size_t)hh * hd;
        const float x1 = __half2float(x[i]), x2 = __half2float(x[i + half]);
        const float cv = c[i], sv = s[i];
        __half *dst = kc + ((size_t)hh * max_seq + p) * hd;
        dst[i] = __float2half_rn(x1 * cv - x2 * sv);
        dst[i + half] = __float2half_rn(x2 * cv + x1 * sv);
    }
    const __half *vr = v + (size_t)t * n_kv * hd;
    for (int e = threadIdx.x; e < n_kv * hd; e += kRopeThreads) {
        const int hh = e / hd, d = e - hh * hd;
        vc[((size_t)hh * max_seq + p) * hd + d] = vr[e];
    }
}

/* ================================================================================================
 * attention (flash-decoding; key axis split over a thread-block cluster at decode)
 * ============================================================================================== */
constexpr int kAttnThreads = 128;
constexpr int kKT = 64;         /* keys per tile */
constexpr int kAttnRows = 16;   /* query rows per block at most */
constexpr int kMaxCluster = 8;  /* portable cluster size */

struct AttnArgs {
    const __half *q, *kc, *vc;
    const int32_t *pos;
    __half *out;
    int n_tok, n_heads, group, hb, tq, n_hc, max_seq, window, csize;
    float scale;
};

/* Rows r of a block: head hc*hb + r % hb of the group of KV head g, token t0 + r / hb.
 * Thread roles (128 threads):
 *   scores  key kk = tid % 64, rows tid / 64 + 2i: one LDS.128 of its (padded, conflict-free) K row
 *           per 8 dims against broadcast q rows (fp32 in shared memory)
 *   softmax warp w: rows w, w + 4, ...: online max / rescale, probabilities back into s_s
 *   P.V     dim pair tid % (HD/2), rows tid / (HD/2) + NRG*i: V rows read as half2 (consecutive
 *           threads, consecutive words), probabilities as float4 broadcasts */
template <int HD, int RMAX>
__global__ void __launch_bounds__(kAttnThreads) attn_kernel(const AttnArgs a) {
    constexpr int KS = HD + 8;                   /* padded K row, halves (odd multiple of 16 B) */
    constexpr int CPR = HD / 8;                  /* 16-byte chunks per key row */
    constexpr int LPT = kKT * CPR / kAttnThreads; /* chunks per thread per tile (K and V each) */
    constexpr int RPT = RMAX / 2;                /* score rows per thread */
    constexpr int NRG = kAttnThreads / (HD / 2); /* P.V row groups */
    constexpr int APT = RMAX / NRG;              /* P.V rows per thread */
    static_assert(RMAX % 2 == 0 && RMAX % NRG == 0 && RMAX <= kAttnRows, "rows");
    static_assert(LPT * kAttnThreads == kKT * CPR, "tile chunks");

    __shared__ __align__(16) float q_s[RMAX][HD];
    __shared__ __align__(16) __half k_s[kKT][KS]; /* after the tile loop: P[RMAX][HD] fp32 */
    __shared__ __align__(16) __half v_s[kKT][HD];
    __shared__ __align__(16) float s_s[RMAX][kKT];
    __shared__ float m_s[RMAX], l_s[RMAX], a_s[RMAX];
    __shared__ int lo_s[RMAX], hi_s[RMAX], ok_s[RMAX], off_s[RMAX];
    static_assert(sizeof(k_s) >= sizeof(float) * RMAX * HD, "P aliases k_s");

    const int tid = threadIdx.x;
    int rank = 0, csize = a.csize;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    cg::cluster_group cluster = cg::this_cluster();
    if (csize > 1) rank = (int)cluster.block_rank();
#else
    /* no clusters before sm_90 (the host never asks for one there): rank 0 does everything */
    if (csize > 1) {
        if (blockIdx.x % csize) return;
        csize = 1;
    }
#endif
    const int grp = blockIdx.x / a.csize;
    const int g = grp / a.n_hc, hc = grp - g * a.n_hc;
    const int t0 = blockIdx.y * a.tq;
    const int pos0 = *a.pos;

    if (tid < RMAX) {
        const int r = tid, tl = r / a.hb, hg = hc * a.hb + (r - tl * a.hb);
        const int t = t0 + tl;
        const int ok = tl < a.tq && hg < a.group && t < a.n_tok;
        int lo = 0, hi = -1, off = 0;
        if (ok) {
            long long p = (long long)pos0 + t;
            if (p > a.max_seq - 1) p = a.max_seq - 1; /* caller's bug: clamp, never read past */
            if (p >= 0) {
                hi = (int)p;
                lo = a.window > 0 ? max(0, hi - a.window + 1) : 0;
            }
            off = (t * a.n_heads + g * a.group + hg) * HD;
        }
        ok_s[r] = ok;
        lo_s[r] = lo;
        hi_s[r] = hi;
        off_s[r] = off;
        m_s[r] = -INFINITY;
        l_s[r] = 0.f;
        a_s[r] = 1.f;
    }
    __syncthreads();
    for (int e = tid; e < RMAX * HD; e += kAttnThreads) {
        const int r = e / HD, d = e - r * HD;
        q_s[r][d] = ok_s[r] ? __half2float(a.q[off_s[r] + d]) : 0.f;
    }
    int blo = INT_MAX, bhi = -1;
#pragma unroll
    for (int r = 0; r < RMAX; r++)
        if (ok_s[r] && hi_s[r] >= lo_s[r]) {
            blo = min(blo, lo_s[r]);
            bhi = max(bhi, hi_s[r]);
        }
    const int n_keys = bhi >= 0 ? bhi - blo + 1 : 0;
    const int n_tiles = (n_keys + kKT - 1) / kKT;
    const int my0 = (int)((long long)rank * n_tiles / csize);
    const int my1 = (int)((long long)(rank + 1) * n_tiles / csize);
    const size_t head_base = (size_t)g * a.max_seq;

    float o[APT][2];
#pragma unroll
    for (int i = 0; i < APT; i++) o[i][0] = o[i][1] = 0.f;
    uint4 kr[LPT], vr[LPT];
    auto fetch = [&](int tile) {
        const int j0 = blo + tile * kKT;
#pragma unroll
        for (int c = 0; c < LPT; c++) {
            const int idx = tid + c * kAttnThreads, key = idx / CPR, col = idx - key * CPR;
            const int j = j0 + key;
            if (j <= bhi) { /* keys beyond the block's last visible key are never read */
                const size_t off = (head_base + j) * HD + col * 8;
                kr[c] = __ldg(reinterpret_cast<const uint4 *>(a.kc + off));
                vr[c] = __ldg(reinterpret_cast<const uint4 *>(a.vc + off));
            } else {
                kr[c] = make_uint4(0u, 0u, 0u, 0u);
                vr[c] = make_uint4(0u, 0u, 0u, 0u);
            }
        }
    };
    if (my0 < my1) fetch(my0);
    __syncthreads(); /* q_s complete */

    for (int tile = my0; tile < my1; ++tile) {
#pragma unroll
        for (int c = 0; c < LPT; c++) {
            const int idx = tid + c * kAttnThreads, key = idx / CPR, col = idx - key * CPR;
            *reinterpret_cast<uint4 *>(&k_s[key][col * 8]) = kr[c];
            *reinterpret_cast<uint4 *>(&v_s[key][col * 8]) = vr[c];
        }
        if (tile + 1 < my1) fetch(tile + 1); /* in flight during this tile's arithmetic */
        __syncthreads();

        { /* scores */
            const int kk = tid & (kKT - 1), rg = tid / kKT;
            const int j = blo + tile * kKT + kk;
            float acc[RPT];
#pragma unroll
            for (int i = 0; i < RPT; i++) acc[i] = 0.f;
#pragma unroll
            for (int d8 = 0; d8 < CPR; d8++) {
                float kf[8];
                unpack8(*reinterpret_cast<const uint4 *>(&k_s[kk][d8 * 8]), kf);
#pragma unroll
                for (int i = 0; i < RPT; i++) {
                    const float4 qa = *reinterpret_cast<const float4 *>(&q_s[rg + 2 * i][d8 * 8]);
                    const float4 qb = *reinterpret_cast<const float4 *>(&q_s[rg + 2 * i][d8 * 8 + 4]);
                    float s = acc[i];
                    s = fmaf(qa.x, kf[0], s);
                    s = fmaf(qa.y, kf[1], s);
                    s = fmaf(qa.z, kf[2], s);
                    s = fmaf(qa.w, kf[3], s);
                    s = fmaf(qb.x, kf[4], s);
                    s = fmaf(qb.y, kf[5], s);
                    s = fmaf(qb.z, kf[6], s);
                    s = fmaf(qb.w, kf[7], s);
                    acc[i] = s;
                }
            }
#pragma unroll
            for (int i = 0; i < RPT; i++) {
                const int r = rg + 2 * i;
                s_s[r][kk] = (j >= lo_s[r] && j <= hi_s[r]) ? acc[i] * a.scale : -INFINITY;
            }
        }
        __syncthreads();

        { /* online softmax, one warp per row */
            const int w = tid >> 5, lane = tid & 31;
            for (int r = w; r < RMAX; r += kAttnThreads / 32) {
                const float s0 = s_s[r][lane], s1 = s_s[r][lane + 32];
                const float mo = m_s[r];
                const float mn = fmaxf(mo, warp_max(fmaxf(s0, s1)));
                float p0 = 0.f, p1 = 0.f, alpha = 1.f;
                if (mn != -INFINITY) { /* else nothing visible yet: keep m = -inf, l = 0 */
                    p0 = expf(s0 - mn);
                    p1 = expf(s1 - mn);
                    alpha = expf(mo - mn);
                }
                const float ps = warp_sum(p0 + p1);
                s_s[r][lane] = p0;
                s_s[r][lane + 32] = p1;
                __syncwarp();
                if (lane == 0) {
                    m_s[r] = mn;
                    l_s[r] = l_s[r] * alpha + ps;
                    a_s[r] = alpha;
                }
            }
        }
        __syncthreads();

        { /* P.V */
            const int dp = tid % (HD / 2), rg = tid / (HD / 2);
#pragma unroll
            for (int i = 0; i < APT; i++) {
                const float al = a_s[rg + NRG * i];
                o[i][0] *= al;
                o[i][1] *= al;
            }
#pragma unroll 4
            for (int k = 0; k < kKT; k += 4) {
                float2 vv[4];
#pragma unroll
                for (int u = 0; u < 4; u++) vv[u] = __half22float2(*reinterpret_cast<const __half2 *>(&v_s[k + u][2 * dp]));
#pragma unroll
                for (int i = 0; i < APT; i++) {
                    const float4 pr = *reinterpret_cast<const float4 *>(&s_s[rg + NRG * i][k]);
                    o[i][0] = fmaf(pr.x, vv[0].x, fmaf(pr.y, vv[1].x, fmaf(pr.z, vv[2].x, fmaf(pr.w, vv[3].x, o[i][0]))));
                    o[i][1] = fmaf(pr.x, vv[0].y, fmaf(pr.y, vv[1].y, fmaf(pr.z, vv[2].y, fmaf(pr.w, vv[3].y, o[i][1]))));
                }
            }
        }
        __syncthreads(); /* k_s, v_s, s_s free for the next tile */
    }

    /* partial accumulators into shared memory (P aliases k_s: every read of K is done) */
    float *P = reinterpret_cast<float *>(&k_s[0][0]);
    {
        const int dp = tid % (HD / 2), rg = tid / (HD / 2);
#pragma unroll
        for (int i = 0; i < APT; i++)
            *reinterpret_cast<float2 *>(&P[(rg + NRG * i) * HD + 2 * dp]) = make_float2(o[i][0], o[i][1]);
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (csize > 1) cluster.sync(); /* every rank's (m, l, P) written and visible */
    else __syncthreads();
#else
    __syncthreads();
#endif
    /* combine: rank c of the cluster writes elements c*128 + tid, stepping csize*128 */
    for (int e = rank * kAttnThreads + tid; e < RMAX * HD; e += csize * kAttnThreads) {
        const int r = e / HD, d = e - r * HD;
        if (!ok_s[r]) continue;
        /* two sweeps over the ranks (max, then weighted sums): a few more DSMEM reads, no arrays */
        float M = -INFINITY;
        for (int c = 0; c < csize; c++) {
            const float *mp = m_s;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
            if (csize > 1) mp = cluster.map_shared_rank(&m_s[0], (unsigned)c);
#endif
            M = fmaxf(M, mp[r]);
        }
        float val = 0.f; /* no visible key (position < 0): zeros */
        if (M != -INFINITY) {
            float num = 0.f, den = 0.f;
            for (int c = 0; c < csize; c++) {
                const float *mp = m_s, *lp = l_s, *pp = P;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
                if (csize > 1) {
                    mp = cluster.map_shared_rank(&m_s[0], (unsigned)c);
                    lp = cluster.map_shared_rank(&l_s[0], (unsigned)c);
                    pp = cluster.map_shared_rank(P, (unsigned)c);
                }
#endif
                const float wgt = expf(mp[r] - M); /* -inf (a rank with no visible key) -> 0 */
                num = fmaf(wgt, pp[e], num);
                den = fmaf(wgt, lp[r], den);
            }
            val = num / den;
        }
        a.out[off_s[r] + d] = __float2half_rn(val);
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (csize > 1) cluster.sync(); /* no block leaves while another still reads its shared memory */
#endif
}

/* ================================================================================================
 * swiglu
 * ============================================================================================== */
__device__ __forceinline__ float silu_mul(float g, float u) {
    /* model.py: g / (1 + exp(-clip(g, -88, 88))) * u */
    const float gc = fminf(fmaxf(g, -88.f), 88.f);
    return g / (1.f + expf(-gc)) * u;
}

__global__ void swiglu_kernel(const __half *__restrict__ g, const __half *__restrict__ u, size_t n,
                              __half *__restrict__ o) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        o[i] = __float2half_rn(silu_mul(__half2float(g[i]), __half2float(u[i])));
}

/* pairs: n2 half2 elements (4-byte aligned pointers) */
__global__ void swiglu2_kernel(const __half2 *__restrict__ g, const __half2 *__restrict__ u, size_t n2,
                               __half2 *__restrict__ o) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n2; i += (size_t)gridDim.x * blockDim.x) {
        const float2 gv = __half22float2(g[i]), uv = __half22float2(u[i]);
        o[i] = __floats2half2_rn(silu_mul(gv.x, uv.x), silu_mul(gv.y, uv.y));
    }
}

/* ================================================================================================
 * gemv_f16: y[r] = W[r, :] . x, fp32
 * ============================================================================================== */
constexpr int kGemvThreads = 256;
constexpr int kGemvWarps = kGemvThreads / 32;

/* LPR lanes per row (8 or 32), RPL rows per lane group at a time; a warp covers (32/LPR)*RPL
 * rows per step.  XS: x staged in shared memory (else read through the read-only cache). */
/* acc + w . x over 8 halves, fp32 */
__device__ __forceinline__ float dot8(const uint4 &w, const float *xf, float acc) {
    float wf[8];
    unpack8(w, wf);
#pragma unroll
    for (int k = 0; k < 8; k++) acc = fmaf(wf[k], xf[k], acc);
    return acc;
}

template <int LPR, int RPL, bool XS>
__global__ void __launch_bounds__(kGemvThreads)
gemv_f16_kernel(const uint4 *__restrict__ W, const uint4 *__restrict__ x, int rows, int nchunk,
                float *__restrict__ y) {
    extern __shared__ uint4 xs[];
    if (XS) {
        for (int c = threadIdx.x; c < nchunk; c += kGemvThreads) xs[c] = __ldg(x + c);
        __syncthreads();
    }
    constexpr int RW = (32 / LPR) * RPL;
    constexpr int U = RPL >= 4 ? 2 : 4; /* 8 (RPL 1: 4) 16-byte loads in flight per lane */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int sg = lane / LPR, lig = lane - sg * LPR;
    const long long tw = (long long)gridDim.x * kGemvWarps;
    for (long long base = ((long long)blockIdx.x * kGemvWarps + warp) * RW; base < rows; base += tw * RW) {
        const uint4 *wr[RPL];
        int r[RPL];
#pragma unroll
        for (int i = 0; i < RPL; i++) {
            r[i] = (int)base + sg * RPL + i;
            wr[i] = W + (size_t)min(r[i], rows - 1) * nchunk; /* tail rows: read a valid row, store nothing */
        }
        float acc[RPL];
#pragma unroll
        for (int i = 0; i < RPL; i++) acc[i] = 0.f;
        /* U chunk steps per pass, all U*RPL loads issued before the first use: the loads in
         * flight do not depend on how ptxas schedules an unrolled loop */
        int c = lig;
        for (; c + (U - 1) * LPR < nchunk; c += U * LPR) {
            uint4 wv[U][RPL];
#pragma unroll
            for (int u = 0; u < U; u++)
#pragma unroll
                for (int i = 0; i < RPL; i++) wv[u][i] = __ldcs(wr[i] + c + u * LPR); /* streamed once */
#pragma unroll
            for (int u = 0; u < U; u++) {
                float xf[8];
                unpack8(XS ? xs[c + u * LPR] : __ldg(x + c + u * LPR), xf);
#pragma unroll
                for (int i = 0; i < RPL; i++) acc[i] = dot8(wv[u][i], xf, acc[i]);
            }
        }
        for (; c < nchunk; c += LPR) { /* the last < U steps */
            float xf[8];
            unpack8(XS ? xs[c] : __ldg(x + c), xf);
#pragma unroll
            for (int i = 0; i < RPL; i++) acc[i] = dot8(__ldcs(wr[i] + c), xf, acc[i]);
        }
#pragma unroll
        for (int i = 0; i < RPL; i++)
#pragma unroll
            for (int o = LPR / 2; o; o >>= 1) acc[i] += __shfl_xor_sync(kFull, acc[i], o);
        if (lig == 0)
#pragma unroll
            for (int i = 0; i < RPL; i++)
                if (r[i] < rows) y[r[i]] = acc[i];
    }
}

typedef void (*gemv_fn)(const uint4 *, const uint4 *, int, int, float *);

template <bool XS>
gemv_fn pick_gemv(int lpr, int rpl) {
    if (lpr == 32) return rpl == 4 ? gemv_f16_kernel<32, 4, XS> : rpl == 2 ? gemv_f16_kernel<32, 2, XS> : gemv_f16_kernel<32, 1, XS>;
    return rpl == 2 ? gemv_f16_kernel<8, 2, XS> : gemv_f16_kernel<8, 1, XS>;
}

/* ================================================================================================
 * gemm_f16: Y[t, r] (+)= X[t, :] . W[r, :] on tensor cores (WMMA, fp32 accumulation)
 * ============================================================================================== */
__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, bool valid) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    const int n = valid ? 16 : 0; /* src-size 0: the 16 bytes are zero-filled, nothing is read */
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

template <int BM, int BN, int BK, int WM, int WN, int STAGES>
struct GemmCfg {
    static constexpr int kThreads = WM * WN * 32;
    static constexpr int kLds = BK + 8; /* halves: 16-byte rows at an odd 16-byte stride (no conflicts) */
    static constexpr int kAEl = BM * kLds, kBEl = BN * kLds, kStageEl = kAEl + kBEl;
    static constexpr size_t kSmem = (size_t)STAGES * kStageEl * sizeof(__half);
    static_assert(kSmem >= (size_t)(kThreads / 32) * 256 * sizeof(float), "epilogue staging fits");
};

/* M = tokens (X row-major [n_tok, cols]), N = W rows (W row-major [rows, cols] = col-major K x N),
 * blockIdx.x walks the token tiles so the blocks sharing a W tile run together (W read once). */
template <int BM, int BN, int BK, int WM, int WN, int STAGES>
__global__ void __launch_bounds__(WM *WN * 32)
gemm_f16_kernel(const __half *__restrict__ X, const __half *__restrict__ W, __half *__restrict__ Y,
                int n_tok, int rows, int cols, int accumulate) {
    using namespace nvcuda;
    using C = GemmCfg<BM, BN, BK, WM, WN, STAGES>;
    constexpr int NT = C::kThreads, LDS = C::kLds, TM = BM / WM, TN = BN / WN, FM = TM / 16, FN = TN / 16;
    constexpr int CPR = BK / 8;
    static_assert(TM % 16 == 0 && TN % 16 == 0 && BK % 16 == 0, "tile shape");
    extern __shared__ __align__(128) unsigned char smem_raw[];
    __half *sm = reinterpret_cast<__half *>(smem_raw);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wm = warp / WN, wn = warp - wm * WN;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int KT = (cols + BK - 1) / BK;

    auto load_tile = [&](int stage, int kt) {
        __half *As = sm + stage * C::kStageEl, *Bs = As + C::kAEl;
        const int k0 = kt * BK;
        for (int c = tid; c < BM * CPR; c += NT) {
            const int r = c / CPR, kc = (c - r * CPR) * 8;
            const int gm = m0 + r, gk = k0 + kc;
            const bool v = gm < n_tok && gk < cols; /* cols % 16 == 0: a chunk is all in or all out */
            cp_async16(As + r * LDS + kc, X + (v ? (size_t)gm * cols + gk : 0), v);
        }
        for (int c = tid; c < BN * CPR; c += NT) {
            const int r = c / CPR, kc = (c - r * CPR) * 8;
            const int gn = n0 + r, gk = k0 + kc;
            const bool v = gn < rows && gk < cols;
            cp_async16(Bs + r * LDS + kc, W + (v ? (size_t)gn * cols + gk : 0), v);
        }
    };

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FM][FN];
#pragma unroll
    for (int i = 0; i < FM; i++)
#pragma unroll
        for (int j = 0; j < FN; j++) wmma::fill_fragment(acc[i][j], 0.f);

#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < KT) load_tile(s, s);
        cp_async_commit(); /* always commit: the group count stays uniform */
    }
    for (int kt = 0; kt < KT; kt++) {
        cp_async_wait<STAGES - 2>(); /* tile kt has landed (for this thread) */
        __syncthreads();             /* ... for every thread; and stage (kt-1) % STAGES is free */
        {
            const int nk = kt + STAGES - 1;
            if (nk < KT) load_tile(nk % STAGES, nk);
            cp_async_commit();
        }
        const __half *As = sm + (kt % STAGES) * C::kStageEl, *Bs = As + C::kAEl;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> af[FM];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> bf[FN];
#pragma unroll
            for (int i = 0; i < FM; i++) wmma::load_matrix_sync(af[i], As + (wm * TM + i * 16) * LDS + kk, LDS);
#pragma unroll
            for (int j = 0; j < FN; j++) wmma::load_matrix_sync(bf[j], Bs + (wn * TN + j * 16) * LDS + kk, LDS);
#pragma unroll
            for (int i = 0; i < FM; i++)
#pragma unroll
                for (int j = 0; j < FN; j++) wmma::mma_sync(acc[i][j], af[i], bf[j], acc[i][j]);
        }
    }
    cp_async_wait<0>();
    __syncthreads(); /* the pipeline buffers become the epilogue's staging */

    float *stg = reinterpret_cast<float *>(smem_raw) + warp * 256;
    const int r = lane >> 1, c8 = (lane & 1) * 8;
#pragma unroll
    for (int i = 0; i < FM; i++)
#pragma unroll
        for (int j = 0; j < FN; j++) {
            wmma::store_matrix_sync(stg, acc[i][j], 16, wmma::mem_row_major);
            __syncwarp();
            const int gm = m0 + wm * TM + i * 16 + r, gn = n0 + wn * TN + j * 16 + c8;
            if (gm < n_tok && gn < rows) { /* rows % 16 == 0: a fragment is all in or all out */
                const float4 v0 = *reinterpret_cast<const float4 *>(stg + r * 16 + c8);
                const float4 v1 = *reinterpret_cast<const float4 *>(stg + r * 16 + c8 + 4);
                float v[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
                uint4 *dst = reinterpret_cast<uint4 *>(Y + (size_t)gm * rows + gn);
                if (accumulate) {
                    float old[8];
                    unpack8(*dst, old);
#pragma unroll
                    for (int k = 0; k < 8; k++) v[k] += old[k];
                }
                *dst = pack8(v);
            }
            __syncwarp();
        }
}

template <int BM, int BN, int BK, int WM, int WN, int STAGES>
dd_status launch_gemm(const __half *X, const __half *W, __half *Y, int n_tok, int rows, int cols,
                      int accumulate, int smem_optin, cudaStream_t st) {
    using C = GemmCfg<BM, BN, BK, WM, WN, STAGES>;
    auto kern = gemm_f16_kernel<BM, BN, BK, WM, WN, STAGES>;
    if (C::kSmem > (size_t)smem_optin) return DD_ERR_UNSUPPORTED;
    if (C::kSmem > 48 * 1024) DD_CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)C::kSmem));
    const long long gy = (rows + BN - 1) / BN, gx = ((long long)n_tok + BM - 1) / BM;
    if (gy > 65535 || gx > 0x7fffffffLL) return DD_ERR_UNSUPPORTED;
    kern<<<dim3((unsigned)gx, (unsigned)gy), C::kThreads, C::kSmem, st>>>(X, W, Y, n_tok, rows, cols, accumulate);
    DD_CK_LAUNCH("gemm_f16_kernel");
    return DD_OK;
}

/* ================================================================================================
 * dequant: W_hat fp16 [d_out, d_in] exactly as dd_cpu_dequant_row (fp32 s * (q - z), then RNE)
 * ============================================================================================== */
__global__ void dequant_kernel(const uint8_t *__restrict__ qw, const __half *__restrict__ sc,
                               const __half *__restrict__ zr, int d_in, int d_in_pad, int d_out, int bits,
                               int gs, size_t row_bytes, int vec, __half *__restrict__ w) {
    const int nb = d_in_pad / 8, ng = d_in_pad / gs;
    const size_t total = (size_t)d_out * nb;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (size_t)gridDim.x * blockDim.x) {
        const int o = (int)(idx / nb), b = (int)(idx - (size_t)o * nb);
        const int j0 = 8 * b;
        if (j0 >= d_in) continue; /* padding */
        const uint8_t *row = qw + (size_t)o * row_bytes;
        unsigned q[8];
        if (bits == 4) {
            const uint32_t word = *reinterpret_cast<const uint32_t *>(row + 4 * (size_t)b);
#pragma unroll
            for (int k = 0; k < 8; k++) q[k] = (word >> (4 * k)) & 15u;
        } else { /* planar: lo plane 2 bits per element, then hi plane 1 bit per element */
            const unsigned l = (unsigned)row[2 * b] | ((unsigned)row[2 * b + 1] << 8);
            const unsigned hb = row[d_in_pad / 4 + b];
#pragma unroll
            for (int k = 0; k < 8; k++) q[k] = ((l >> (2 * k)) & 3u) | (((hb >> k) & 1u) << 2);
        }
        const int g = j0 / gs; /* 8 elements never straddle a group (gs is 64 or 128) */
        const float s = __half2float(sc[(size_t)o * ng + g]), z = __half2float(zr[(size_t)o * ng + g]);
        __half out[8];
#pragma unroll
        for (int k = 0; k < 8; k++) out[k] = __float2half_rn(__fmul_rn(s, __fsub_rn((float)q[k], z)));
        __half *dst = w + (size_t)o * d_in + j0;
        if (vec) {
            uint4 pk; /* the 8 results in one 16-byte store */
            memcpy(&pk, out, 16);
            *reinterpret_cast<uint4 *>(dst) = pk;
        } else {
            for (int k = 0; k < 8 && j0 + k < d_in; k++) dst[k] = out[k];
        }
    }
}

__global__ void advance_kernel(int32_t *pos, int n) { *pos += n; }

/* ================================================================================================
 * sample_score: one block of 1024 threads
 * ============================================================================================== */
constexpr int kSampThreads = 1024;
constexpr int kSampWarps = kSampThreads / 32;
constexpr int kHistBins = 2048;
constexpr float kFixScale = 1099511627776.0f; /* 2^40: u in [0, 1] -> 40-bit fixed point */
constexpr float kGumbelMax = 17.0f;           /* > -log(-log(1 - 2^-24)) = 16.64, the largest noise */

struct SampSmem {
    unsigned long long hist[kHistBins];
    unsigned long long ru[kSampWarps];
    double rd[kSampWarps];
    float rf[kSampWarps];
    int ri[kSampWarps];
    unsigned long long bc_u;
    unsigned bc_digit;
    int pad_;
};

struct SampArgs {
    const float *logits;
    int vocab, ncache;
    const dd_cuda_sampling *params;
    const int32_t *pos, *n_fixed;
    int32_t *tokens;
    float *nll;
    const float *ref;
    const int32_t *ref_start;
    int ref_rows;
    float *kl;
};

__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* u = exp((l - M) / T): ONE definition (no contraction), so every pass sees the same bits. */
__device__ __forceinline__ float samp_x(float l, float M, float invT) { return __fmul_rn(__fsub_rn(l, M), invT); }
__device__ __forceinline__ float samp_u(float l, float M, float invT) {
    return l == l ? expf(samp_x(l, M, invT)) : 0.f; /* NaN logits: never drawn */
}
__device__ __forceinline__ unsigned long long fixp(float u) { return __float2ull_rz(u * kFixScale); }

/* all threads: block sums / argmax (sync before and after the scratch use) */
__device__ double block_sum_d(double v, SampSmem &S) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum_d(v);
    __syncthreads();
    if (lane == 0) S.rd[warp] = v;
    __syncthreads();
    return warp_sum_d(S.rd[lane]);
}
__device__ unsigned long long block_sum_u64(unsigned long long v, SampSmem &S) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum_u64(v);
    __syncthreads();
    if (lane == 0) S.ru[warp] = v;
    __syncthreads();
    return warp_sum_u64(S.ru[lane]);
}
__device__ float block_max_f(float v, SampSmem &S) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) S.rf[warp] = v;
    __syncthreads();
    return warp_max(S.rf[lane]);
}
__device__ int block_or(int v, SampSmem &S) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = __any_sync(kFull, v);
    __syncthreads();
    if (lane == 0) S.ri[warp] = v;
    __syncthreads();
    return __any_sync(kFull, S.ri[lane]);
}
/* larger key wins, equal keys: lower index; (-inf, INT_MAX) is the empty element */
__device__ __forceinline__ void argmax_merge(float &k, int &i, float k2, int i2) {
    if (k2 > k || (k2 == k && i2 < i)) {
        k = k2;
        i = i2;
    }
}
__device__ __forceinline__ void warp_argmax(float &k, int &i) {
#pragma unroll
    for (int o = 16; o; o >>= 1) {
        const float k2 = __shfl_xor_sync(kFull, k, o);
        const int i2 = __shfl_xor_sync(kFull, i, o);
        argmax_merge(k, i, k2, i2);
    }
}
__device__ void block_argmax(float &k, int &i, SampSmem &S) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    warp_argmax(k, i);
    __syncthreads();
    if (lane == 0) {
        S.rf[warp] = k;
        S.ri[warp] = i;
    }
    __syncthreads();
    k = S.rf[lane];
    i = S.ri[lane];
    warp_argmax(k, i);
}

/* Warp-cooperative histogram add (all lanes call; `act` lanes add f into bin d).  When every
 * active lane has the same bin (flat distributions), one atomic for the warp instead of 32
 * serialised ones; the sums are integers, so the order never changes the result. */
__device__ __forceinline__ void hist_add(unsigned long long *hist, bool act, unsigned d, unsigned long long f) {
    if (!__any_sync(kFull, act)) return;
    const unsigned lo = __reduce_min_sync(kFull, act ? d : 0xFFFFFFFFu);
    const unsigned hi = __reduce_max_sync(kFull, act ? d : 0u);
    if (lo == hi) {
        const unsigned long long s = warp_sum_u64(act ? f : 0ull);
        if ((threadIdx.x & 31) == 0) atomicAdd(&hist[lo], s);
    } else if (act) {
        atomicAdd(&hist[d], f);
    }
}

/* One level of the radix select.  level 0: digit = bits >> 21 (u <= 1.0: at most 508, 512 bins),
 * every element; level 1: digit = bits 20..10 (2048 bins) of elements whose bits >> 21 == prefix;
 * level 2: digit = bits 9..0 (1024 bins) of elements whose bits >> 10 == prefix.  Then the
 * largest digit d with above + sum_{d' >= d} hist[d'] >= target; returns it, *above gets the
 * mass of the higher digits added.  Level 0 also returns the total mass in *total. */
__device__ unsigned radix_level(const SampArgs &A, int level, unsigned prefix, float M, float invT,
                                float *ucache, SampSmem &S, unsigned long long *above,
                                unsigned long long *target, float top_p) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int nbins = level == 0 ? 512 : level == 1 ? 2048 : 1024;
    for (int b = tid; b < nbins; b += kSampThreads) S.hist[b] = 0ull;
    __syncthreads();
    unsigned long long tot = 0;
    for (int base = 0; base < A.vocab; base += kSampThreads) { /* block-uniform trip count */
        const int i = base + tid;
        bool act = false;
        unsigned d = 0;
        unsigned long long f = 0;
        if (i < A.vocab) {
            float u;
            if (level == 0) {
                u = samp_u(A.logits[i], M, invT);
                if (i < A.ncache) ucache[i] = u;
            } else {
                u = i < A.ncache ? ucache[i] : samp_u(A.logits[i], M, invT);
            }
            const unsigned bits = __float_as_uint(u);
            f = fixp(u);
            tot += f;
            if (level == 0) {
                d = bits >> 21;
                act = true;
            } else if (level == 1) {
                d = (bits >> 10) & 0x7FFu;
                act = (bits >> 21) == prefix;
            } else {
                d = bits & 0x3FFu;
                act = (bits >> 10) == prefix;
            }
            act = act && f != 0; /* zero mass changes no sum */
        }
        hist_add(S.hist, act, d, f);
    }
    if (level == 0) {
        const unsigned long long Z = block_sum_u64(tot, S); /* includes the barrier after the adds */
        double t = ceil((double)top_p * (double)Z);
        unsigned long long tg = t < 1.0 ? 1ull : (t >= (double)Z ? Z : (unsigned long long)t);
        *target = tg;
    } else {
        __syncthreads();
    }
    const unsigned long long tgt = *target, abv = *above;
    if (warp == 0) {
        const int per = nbins / 32;
        unsigned long long own = 0;
        for (int k = 0; k < per; k++) own += S.hist[lane * per + k];
        unsigned long long suf = own; /* inclusive suffix sum over lanes */
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const unsigned long long v = __shfl_down_sync(kFull, suf, o);
            if (lane + o < 32) suf += v;
        }
        /* lane 0's suffix is the whole prefix class: abv + it >= tgt by the invariant */
        const unsigned okm = __ballot_sync(kFull, abv + suf >= tgt);
        const int L = okm ? 31 - __clz(okm) : 0;
        if (lane == L) {
            unsigned long long acc = abv + (suf - own);
            int d = L * per;
            for (int k = per - 1; k >= 0; k--) {
                const unsigned long long h = S.hist[L * per + k];
                if (acc + h >= tgt) {
                    d = L * per + k;
                    break;
                }
                acc += h;
            }
            S.bc_digit = (unsigned)d;
            S.bc_u = acc;
        }
    }
    __syncthreads();
    const unsigned d = S.bc_digit;
    *above = S.bc_u;
    __syncthreads(); /* bc_* and hist may be reused by the next level */
    return d;
}

__global__ void __launch_bounds__(kSampThreads, 1) sample_score_kernel(const SampArgs A) {
    extern __shared__ __align__(16) unsigned char samp_raw[];
    SampSmem &S = *reinterpret_cast<SampSmem *>(samp_raw);
    float *ucache = reinterpret_cast<float *>(samp_raw + sizeof(SampSmem));
    const int tid = threadIdx.x;
    const int p = *A.pos;
    if (p < 0) return; /* uniform */
    const int nf = *A.n_fixed;
    const bool do_sample = (long long)p + 1 >= nf;
    const bool do_nll = !do_sample && A.nll != nullptr;
    bool do_kl = false;
    long long ref_row = 0;
    if (A.ref) {
        ref_row = (long long)p - *A.ref_start;
        do_kl = ref_row >= 0 && ref_row < A.ref_rows;
    }
    const bool need_lse = do_nll || do_kl;

    /* pass 1: max / argmax (NaN ignored), online logsumexp (-inf skipped, NaN or +inf: bad) */
    float bk = -INFINITY, m = -INFINITY;
    int bi = INT_MAX, bad = 0;
    double s = 0.0;
    for (int i = tid; i < A.vocab; i += kSampThreads) {
        const float l = A.logits[i];
        if (l != l) {
            bad = 1;
            continue;
        }
        argmax_merge(bk, bi, l, i);
        if (need_lse) {
            if (l == INFINITY) bad = 1;
            else if (l > m) {
                s = s * (double)expf(m - l) + 1.0;
                m = l;
            } else if (l != -INFINITY) {
                s += (double)expf(l - m);
            }
        }
    }
    block_argmax(bk, bi, S);
    const float M = bk;
    const int amax = bi == INT_MAX ? 0 : bi; /* all NaN: token 0 */

    if (need_lse) {
        bad = block_or(bad, S);
        const float ml = block_max_f(m, S);
        const double z = block_sum_d(s > 0.0 ? s * (double)expf(m - ml) : 0.0, S);
        const double lse = (double)ml + log(z);
        if (do_nll && tid == 0) {
            const int tok = A.tokens[p + 1];
            const float lt = (tok >= 0 && tok < A.vocab) ? A.logits[tok] : NAN;
            A.nll[p] = bad ? NAN : (float)(lse - (double)lt);
        }
        if (do_kl) {
            const float *r = A.ref + ref_row * (long long)A.vocab;
            double acc = 0.0;
            for (int i = tid; i < A.vocab; i += kSampThreads) {
                const float rv = r[i];
                const float e = expf(rv);
                if (e != 0.f) acc += (double)e * ((double)rv - ((double)A.logits[i] - lse)); /* 0 log 0 = 0 */
            }
            acc = block_sum_d(acc, S);
            if (tid == 0) A.kl[p] = bad ? NAN : (float)acc;
        }
    }
    if (!do_sample) return;

    const float T = A.params->temperature, top_p = A.params->top_p;
    const uint64_t seed = A.params->seed;
    const float invT = 1.0f / T;
    int tok = amax;
    if (T > 0.f && top_p > 0.f && isfinite(invT) && isfinite(M)) {
        unsigned tstar = 1u; /* every u > 0 */
        if (top_p < 1.f) {
            unsigned long long above = 0, target = 0;
            const unsigned d0 = radix_level(A, 0, 0u, M, invT, ucache, S, &above, &target, top_p);
            const unsigned d1 = radix_level(A, 1, d0, M, invT, ucache, S, &above, &target, top_p);
            const unsigned d2 = radix_level(A, 2, (d0 << 11) | d1, M, invT, ucache, S, &above, &target, top_p);
            tstar = (d0 << 21) | (d1 << 10) | d2;
            if (tstar == 0u) tstar = 1u;
        }
        /* Gumbel-max over the nucleus {u >= t*}: argmax x_i + g_i is a draw from softmax(x) restricted
         * to it.  g < 16.64, so a token with x + 17 below the thread's best cannot win: skipped
         * before the hash and the logs. */
        const uint64_t key0 = splitmix64(seed ^ splitmix64(0x632BE59BD9B4E019ull + (uint64_t)(uint32_t)p));
        float gk = -INFINITY;
        int gi = INT_MAX;
        for (int i = tid; i < A.vocab; i += kSampThreads) {
            const float l = A.logits[i];
            if (l != l) continue;
            const float x = samp_x(l, M, invT);
            if (x + kGumbelMax < gk) continue;
            if (__float_as_uint(expf(x)) < tstar) continue; /* outside the nucleus (or u == 0) */
            const uint64_t h = splitmix64(key0 + (uint64_t)i * 0xD1B54A32D192ED03ull);
            const float U = ((float)(h >> 41) + 0.5f) * 1.1920928955078125e-7f; /* (k + 1/2) / 2^23 in (0, 1) */
            const float g = -logf(-logf(U));
            argmax_merge(gk, gi, x + g, i);
        }
        block_argmax(gk, gi, S);
        if (gi != INT_MAX) tok = gi;
    }
    if (tid == 0) A.tokens[p + 1] = tok;
}

/* The largest cluster size <= *csize that the device can co-schedule for attention kernel kidx
 * (an 8-block cluster needs 8 block slots in one GPC: always there on a whole H100/H200, maybe not
 * on a small MIG slice).  Asked once per device and kernel (an occupancy query, no stream work). */
dd_status attn_cluster_cap(void (*kern)(const AttnArgs), int kidx, int *csize) {
    enum { kMaxDevices = 64 };
    static std::atomic<int> cached[kMaxDevices][6]; /* 0 unknown, else the largest size that fits */
    int dev = 0;
    DD_CK(cudaGetDevice(&dev));
    int fits = (dev >= 0 && dev < kMaxDevices) ? cached[dev][kidx].load(std::memory_order_relaxed) : 0;
    if (!fits) {
        fits = 1;
        for (int c = kMaxCluster; c > 1; c /= 2) {
            cudaLaunchConfig_t cfg = {};
            cfg.gridDim = dim3((unsigned)c, 1, 1);
            cfg.blockDim = dim3(kAttnThreads, 1, 1);
            cudaLaunchAttribute attr[1];
            attr[0].id = cudaLaunchAttributeClusterDimension;
            attr[0].val.clusterDim.x = (unsigned)c;
            attr[0].val.clusterDim.y = 1;
            attr[0].val.clusterDim.z = 1;
            cfg.attrs = attr;
            cfg.numAttrs = 1;
            int n = 0;
            if (cudaOccupancyMaxActiveClusters(&n, kern, &cfg) == cudaSuccess && n >= 1) {
                fits = c;
                break;
            }
            (void)cudaGetLastError(); /* a refused size is an answer, not an error */
        }
        if (dev >= 0 && dev < kMaxDevices) cached[dev][kidx].store(fits, std::memory_order_relaxed);
    }
    while (*csize > fits) *csize /= 2;
    return DD_OK;
}

} // namespace

/* ================================================================================================
 * host entry points
 * ============================================================================================== */

extern "C" dd_status dd_cuda_op_embed(const uint16_t *d_table, int32_t vocab, int32_t dim,
                                      const int32_t *d_tokens, const int32_t *d_pos, int32_t n_tok,
                                      float *d_h, void *stream) {
    if (!d_table || !d_tokens || !d_pos || !d_h) return DD_ERR_INVALID_ARGUMENT;
    if (vocab < 1 || dim < 1 || n_tok < 1) return DD_ERR_INVALID_ARGUMENT;
    embed_kernel<<<n_tok, 256, 0, as_stream(stream)>>>(reinterpret_cast<const __half *>(d_table), vocab, dim,
                                                       d_tokens, d_pos, d_h);
    DD_CK_LAUNCH("embed_kernel");
    return DD_OK;
}

extern "C" dd_status dd_cuda_op_add_rmsnorm(float *d_h, const uint16_t *d_y, const float *d_w, float eps,
                                            int32_t dim, int32_t n_tok, uint16_t *d_out, void *stream) {
    if (!d_h || (d_out && !d_w)) return DD_ERR_INVALID_ARGUMENT;
    if (dim < 1 || n_tok < 1 || !(eps >= 0.f) || !isfinite(eps)) return DD_ERR_INVALID_ARGUMENT;
    if (!d_y && !d_out) return DD_OK; /* nothing to add, nothing to normalise */
    add_rmsnorm_kernel<<<n_tok, kNormThreads, 0, as_stream(stream)>>>(
        d_h, reinterpret_cast<const __half *>(d_y), d_w, eps, dim, reinterpret_cast<__half *>(d_out));
    DD_CK_LAUNCH("add_rmsnorm_kernel");
    return DD_OK;
}

extern "C" dd_status dd_cuda_op_rope_store_kv(uint16_t *d_q, const uint16_t *d_k, const uint16_t *d_v,
                                              const float *d_cos, const float *d_sin, const int32_t *d_pos,
                                              int32_t n_tok, int32_t n_heads, int32_t n_kv, int32_t head_dim,
                                              int32_t max_seq, uint16_t *d_kcache, uint16_t *d_vcache,
                                              void *stream) {
    if (!d_q || !d_k || !d_v || !d_cos || !d_sin || !d_pos || !d_kcache || !d_vcache) return DD_ERR_INVALID_ARGUMENT;
    if (n_tok < 1 || n_heads < 1 || n_kv < 1 || max_seq < 1) return DD_ERR_INVALID_ARGUMENT;
    if (head_dim < 2 || head_dim % 2 || head_dim > 4096) return DD_ERR_INVALID_ARGUMENT;
    if ((long long)n_heads * head_dim > 0x7fffffffLL) return DD_ERR_INVALID_ARGUMENT;
    rope_store_kernel<<<n_tok, kRopeThreads, 0, as_stream(stream)>>>(
        reinterpret_cast<__half *>(d_q), reinterpret_cast<const __half *>(d_k), reinterpret_cast<const __half *>(d_v),
        d_cos, d_sin, d_pos, n_heads, n_kv, head_dim, max_seq, reinterpret_cast<__half *>(d_kcache),
        reinterpret_cast<__half *>(d_vcache));
    DD_CK_LAUNCH("rope_store_kernel");
    return DD_OK;
}

extern "C" dd_status dd_cuda_op_attention(const uint16_t *d_q, const uint16_t *d_kcache,
                                          const uint16_t *d_vcache, const int32_t *d_pos, int32_t n_tok,
                                          int32_t n_heads, int32_t n_kv, int32_t head_dim, int32_t max_seq,
                                          float scale, int32_t window, uint16_t *d_out, void *stream) {
    if (!d_q || !d_kcache || !d_vcache || !d_pos || !d_out) return DD_ERR_INVALID_ARGUMENT;
    if (n_tok < 1 || n_heads < 1 || n_kv < 1 || n_heads % n_kv || max_seq < 1 || window < 0) return DD_ERR_INVALID_ARGUMENT;
    if (head_dim < 1 || !isfinite(scale)) return DD_ERR_INVALID_ARGUMENT;
    if (head_dim != 64 && head_dim != 128) return DD_ERR_UNSUPPORTED;
    /* 16-byte K/V loads; output and q offsets are int */
    if (!aligned16(d_kcache) || !aligned16(d_vcache)) return DD_ERR_INVALID_ARGUMENT;
    if ((long long)n_tok * n_heads * head_dim > 0x7fffffffLL) return DD_ERR_INVALID_ARGUMENT;

    AttnArgs a;
    a.q = reinterpret_cast<const __half *>(d_q);
    a.kc = reinterpret_cast<const __half *>(d_kcache);
    a.vc = reinterpret_cast<const __half *>(d_vcache);
    a.pos = d_pos;
    a.out = reinterpret_cast<__half *>(d_out);
    a.n_tok = n_tok;
    a.n_heads = n_heads;
    a.group = n_heads / n_kv;
    a.hb = a.group < kAttnRows ? a.group : kAttnRows; /* heads of the group per block */
    a.n_hc = (a.group + a.hb - 1) / a.hb;
    a.tq = n_tok == 1 ? 1 : kAttnRows / a.hb; /* tokens per block: up to 16 rows share each K/V tile */
    if (a.tq > n_tok) a.tq = n_tok;
    a.max_seq = max_seq;
    a.window = window;
    a.scale = scale;
    const int R = a.hb * a.tq;
    const int rmax = R <= 4 ? 4 : R <= 8 ? 8 : 16;
    const long long ntt = (n_tok + a.tq - 1) / a.tq;
    if (ntt > 65535) return DD_ERR_UNSUPPORTED;

    int n_sm = 0, smem_optin = 0, clusters = 0;
    dd_status st = dd_cuda_device_limits(&n_sm, &smem_optin);
    if (st != DD_OK) return st;
    if ((st = device_has_clusters(&clusters)) != DD_OK) return st;
    /* split the key axis over a cluster while the grid would leave most SMs idle (decode) */
    const long long base = (long long)n_kv * a.n_hc * ntt;
    int csize = 1;
    if (clusters)
        while (csize < kMaxCluster && base * csize < 2LL * n_sm && (long long)csize * kKT < max_seq) csize *= 2;
    if ((long long)n_kv * a.n_hc * csize > 0x7fffffffLL) return DD_ERR_UNSUPPORTED;

    const int kidx = (head_dim == 64 ? 0 : 3) + (rmax == 4 ? 0 : rmax == 8 ? 1 : 2);
    void (*const kerns[6])(const AttnArgs) = {attn_kernel<64, 4>,  attn_kernel<64, 8>,  attn_kernel<64, 16>,
                                              attn_kernel<128, 4>, attn_kernel<128, 8>, attn_kernel<128, 16>};
    void (*const kern)(const AttnArgs) = kerns[kidx];
    if (csize > 1 && (st = attn_cluster_cap(kern, kidx, &csize)) != DD_OK) return st;
    a.csize = csize;

    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((unsigned)((long long)n_kv * a.n_hc * csize), (unsigned)ntt, 1);
    cfg.blockDim = dim3(kAttnThreads, 1, 1);
    cfg.dynamicSmemBytes = 0;
    cfg.stream = as_stream(stream);
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = (unsigned)csize;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = csize > 1 ? 1 : 0;
    DD_CK(cudaLaunchKernelEx(&cfg, kern, a));
    return DD_OK;
}

extern "C" dd_status dd_cuda_op_swiglu(const uint16_t *d_gate, const uint16_t *d_up, int32_t n, int32_t n_tok,
                                       uint16_t *d_out, void *stream) {
    if (!d_gate || !d_up || !d_out || n < 1 || n_tok < 1) return DD_ERR_INVALID_ARGUMENT;
    int n_sm = 0, smem_optin = 0;
    dd_status st = dd_cuda_device_limits(&n_sm, &smem_optin);
    if (st != DD_OK) return st;
    const size_t total = (size_t)n * (size_t)n_tok;
    const bool pairs = total % 2 == 0 && ((reinterpret_cast<uintptr_t>(d_gate) | reinterpret_cast<uintptr_t>(d_up) |
                                            reinterpret_cast<uintptr_t>(d_out)) & 3u) == 0;
    const size_t work = pairs ? total / 2 : total;
    size_t blocks = (work + 255) / 256;
    const size_t cap = (size_t)n_sm * 16;
    if (blocks > cap) blocks = cap;
    if (pairs)
        swiglu2_kernel<<<(unsigned)blocks, 256, 0, as_stream(stream)>>>(
            reinterpret_cast<const __half2 *>(d_gate), reinterpret_cast<const __half2 *>(d_up), work,
            reinterpret_cast<__half2 *>(d_out));
    else
        swiglu_kernel<<<(unsigned)blocks, 256, 0, as_stream(stream)>>>(
            reinterpret_cast<const __half *>(d_gate), reinterpret_cast<const __half *>(d_up), work,
            reinterpret_cast<__half *>(d_out));
    DD_CK_LAUNCH("swiglu_kernel");
    return DD_OK;
}

extern "C" dd_status dd_cuda_op_gemv_f16(const uint16_t *d_w, const uint16_t *d_x, int32_t rows, int32_t cols,
                                         float *d_y, void *stream) {
    if (!d_w || !d_x || !d_y || rows < 1 || cols < 8 || cols % 8) return DD_ERR_INVALID_ARGUMENT;
    if (!aligned16(d_w) || !aligned16(d_x)) return DD_ERR_INVALID_ARGUMENT; /* 16-byte loads */
    int n_sm = 0, smem_optin = 0;
    dd_status st = dd_cuda_device_limits(&n_sm, &smem_optin);
    if (st != DD_OK) return st;
    const int nchunk = cols / 8;
    const int lpr = nchunk >= 128 ? 32 : 8;
    /* as many rows per lane group as still keep >= 12 warps per SM busy */
    int rpl = lpr == 32 ? 4 : 2;
    while (rpl > 1 && ((long long)rows + (32 / lpr) * rpl - 1) / ((32 / lpr) * rpl) < 12LL * n_sm) rpl /= 2;
    const size_t xs_bytes = (size_t)nchunk * 16;
    const bool xs = xs_bytes <= 48 * 1024; /* else x through the read-only cache */
    const size_t smem = xs ? xs_bytes : 0;
    gemv_fn kern = xs ? pick_gemv<true>(lpr, rpl) : pick_gemv<false>(lpr, rpl);
    int per_sm = 0;
    DD_CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, kGemvThreads, smem));
    if (per_sm < 1) per_sm = 1;
    const long long rows_per_step = (long long)kGemvWarps * (32 / lpr) * rpl;
    const long long steps = ((long long)rows + rows_per_step - 1) / rows_per_step;
    const long long cap = (long long)per_sm * n_sm;
    long long blocks = steps;
    if (steps > cap) { /* whole waves: every warp gets the same number of row steps (+-1) */
        const long long waves = (steps + cap - 1) / cap;
        blocks = (steps + waves - 1) / waves;
    }
    kern<<<(unsigned)blocks, kGemvThreads, smem, as_stream(stream)>>>(reinterpret_cast<const uint4 *>(d_w),
                                                                     reinterpret_cast<const uint4 *>(d_x), rows,
                                                                     nchunk, d_y);
    DD_CK_LAUNCH("gemv_f16_kernel");
    return DD_OK;
}

extern "C" dd_status dd_cuda_op_gemm_f16(const uint16_t *d_x, const uint16_t *d_w, int32_t n_tok, int32_t rows,
                                         int32_t cols, int accumulate, uint16_t *d_y, void *stream) {
    if (!d_x || !d_w || !d_y || n_tok < 1 || rows < 16 || cols < 16 || rows % 16 || cols % 16)
        return DD_ERR_INVALID_ARGUMENT;
    if (!aligned16(d_x) || !aligned16(d_w) || !aligned16(d_y)) return DD_ERR_INVALID_ARGUMENT; /* cp.async / 16-byte stores */
    int n_sm = 0, smem_optin = 0;
    dd_status st = dd_cuda_device_limits(&n_sm, &smem_optin);
    if (st != DD_OK) return st;
    const __half *X = reinterpret_cast<const __half *>(d_x), *W = reinterpret_cast<const __half *>(d_w);
    __half *Y = reinterpret_cast<__half *>(d_y);
    const int acc = accumulate ? 1 : 0;
    cudaStream_t s = as_stream(stream);
    if (n_tok <= 16) return launch_gemm<16, 64, 64, 1, 4, 4>(X, W, Y, n_tok, rows, cols, acc, smem_optin, s);
    if (n_tok <= 64) return launch_gemm<64, 64, 32, 2, 2, 4>(X, W, Y, n_tok, rows, cols, acc, smem_optin, s);
    return launch_gemm<128, 128, 32, 2, 4, 3>(X, W, Y, n_tok, rows, cols, acc, smem_optin, s);
}

extern "C" dd_status dd_cuda_op_dequant(const dd_shape *s, const uint8_t *d_qweight, const uint16_t *d_scales,
                                        const uint16_t *d_zeros, uint16_t *d_w, void *stream) {
    dd_status st = dd_shape_check(s);
    if (st != DD_OK) return st;
    if (!d_qweight || !d_scales || !d_zeros || !d_w) return DD_ERR_INVALID_ARGUMENT;
    if (!aligned16(d_qweight)) return DD_ERR_INVALID_ARGUMENT; /* decdec.h: 16-byte aligned rows */
    int n_sm = 0, smem_optin = 0;
    if ((st = dd_cuda_device_limits(&n_sm, &smem_optin)) != DD_OK) return st;
    const int d_in_pad = dd_d_in_pad(s);
    const size_t total = (size_t)s->d_out * (size_t)(d_in_pad / 8);
    size_t blocks = (total + 255) / 256;
    const size_t cap = (size_t)n_sm * 32;
    if (blocks > cap) blocks = cap;
    const int vec = s->d_in % 8 == 0 && aligned16(d_w);
    dequant_kernel<<<(unsigned)blocks, 256, 0, as_stream(stream)>>>(
        d_qweight, reinterpret_cast<const __half *>(d_scales), reinterpret_cast<const __half *>(d_zeros), s->d_in,
        d_in_pad, s->d_out, s->bits, s->group_size, dd_qweight_row_bytes(s), vec, reinterpret_cast<__half *>(d_w));
    DD_CK_LAUNCH("dequant_kernel");
    return DD_OK;
}

extern "C" dd_status dd_cuda_op_sample_score(const float *d_logits, int32_t vocab, const dd_cuda_sampling *d_params,
                                             const int32_t *d_pos, const int32_t *d_n_fixed, int32_t *d_tokens,
                                             float *d_nll, const float *d_ref_logp, const int32_t *d_ref_start,
                                             int32_t ref_rows, float *d_kl, void *stream) {
    if (!d_logits || !d_params || !d_pos || !d_n_fixed || !d_tokens) return DD_ERR_INVALID_ARGUMENT;
    if (vocab < 1 || vocab > (1 << 24)) return DD_ERR_INVALID_ARGUMENT; /* fixed-point masses fit 64 bits */
    if (d_ref_logp && (!d_ref_start || !d_kl || ref_rows < 0)) return DD_ERR_INVALID_ARGUMENT;
    int n_sm = 0, smem_optin = 0;
    dd_status st = dd_cuda_device_limits(&n_sm, &smem_optin);
    if (st != DD_OK) return st;
    /* the u cache takes what shared memory the device gives one block (1 KB left for the system) */
    long long room = ((long long)smem_optin - (long long)sizeof(SampSmem) - 1024) / (long long)sizeof(float);
    if (room < 0) room = 0;
    const int ncache = (int)(room < vocab ? room : vocab);
    const size_t smem = sizeof(SampSmem) + (size_t)ncache * sizeof(float);
    if (smem > (size_t)smem_optin) return DD_ERR_UNSUPPORTED;
    if (smem > 48 * 1024)
        DD_CK(cudaFuncSetAttribute(sample_score_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    SampArgs A;
    A.logits = d_logits;
    A.vocab = vocab;
    A.ncache = ncache;
    A.params = d_params;
    A.pos = d_pos;
    A.n_fixed = d_n_fixed;
    A.tokens = d_tokens;
    A.nll = d_nll;
    A.ref = d_ref_logp;
    A.ref_start = d_ref_start;
    A.ref_rows = ref_rows;
    A.kl = d_kl;
    sample_score_kernel<<<1, kSampThreads, smem, as_stream(stream)>>>(A);
    DD_CK_LAUNCH("sample_score_kernel");
    return DD_OK;
}

extern "C" dd_status dd_cuda_op_advance(int32_t *d_pos, int32_t n, void *stream) {
    if (!d_pos || n < 0) return DD_ERR_INVALID_ARGUMENT;
    advance_kernel<<<1, 1, 0, as_stream(stream)>>>(d_pos, n);
    DD_CK_LAUNCH("advance_kernel");
    return DD_OK;
}
