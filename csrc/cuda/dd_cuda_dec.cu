/*
 * DEC on the GPU: bucket selection per 1024-input chunk (decdec.h's rule, bit for bit) and the
 * residual GEMV over the selected rows, read zero-copy from pinned mapped host memory.
 *
 * select_kernel: one block per chunk (grid-strided when capped to n_tb blocks); 256 threads own
 *   4 consecutive inputs each, so thread order is index order and two block scans give the
 *   "lowest index first" fill of the cut bucket and the ascending compaction.  No shared-memory
 *   size depends on k_chunk: selected (index, x) pairs go to a device scratch of d_in slots.
 * fetch_kernel: n_tb blocks split the output columns; a block walks its columns in tiles of
 *   kTileUnits x 32 outputs, its threads spread over (selected row, 16-byte column unit) so that
 *   every row's bytes are read once, up to kUnroll loads in flight per thread; fp32 partial sums
 *   meet in shared memory (atomics), then one fp16 atomic per output pair merges into y.
 */
#include <cub/block/block_scan.cuh>

#include "dd_cuda_internal.cuh"

namespace {

constexpr int kSelectThreads = 256;
constexpr int kFetchThreads = 512;
constexpr int kTileUnits = 64; /* 2048 outputs, 8 KB of shared fp32 */
constexpr int kUnroll = 4;

__device__ __forceinline__ int chunk_quota(int d_in, int chunk, int k_chunk) {
    const int start = chunk * DD_CHUNK;
    const int len = min(DD_CHUNK, d_in - start);
    if (len <= 0 || k_chunk <= 0) return 0;
    if (len == DD_CHUNK) return k_chunk;
    const long long k = ((long long)k_chunk * len + DD_CHUNK / 2) / DD_CHUNK;
    return (int)(k > len ? len : k);
}

__global__ void __launch_bounds__(kSelectThreads)
select_kernel(const __half *__restrict__ x, int d_in, const float *__restrict__ floors,
              int k_chunk, int *__restrict__ idx, float *__restrict__ xsel) {
    typedef cub::BlockScan<int, kSelectThreads> Scan;
    __shared__ typename Scan::TempStorage scan_tmp;
    __shared__ float f[DD_NUM_BUCKETS];
    __shared__ int hist[DD_NUM_BUCKETS + 1];
    __shared__ int s_cut, s_from;
    const int t = threadIdx.x;
    if (t < DD_NUM_BUCKETS) f[t] = floors[t];
    const int n_chunks = (d_in + DD_CHUNK - 1) / DD_CHUNK;
    for (int c = blockIdx.x; c < n_chunks; c += gridDim.x) {
        const int start = c * DD_CHUNK;
        const int len = min(DD_CHUNK, d_in - start);
        const int quota = chunk_quota(d_in, c, k_chunk);
        const int out0 = c * k_chunk; /* every earlier chunk is whole */
        if (t <= DD_NUM_BUCKETS) hist[t] = 0;
        __syncthreads();
        int b[4];
        float v[4];
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int j = 4 * t + e;
            b[e] = DD_NUM_BUCKETS + 1; /* past the chunk: no bucket */
            v[e] = 0.f;
            if (j < len) {
                v[e] = __half2float(x[start + j]);
                const float ax = fabsf(v[e]);
                int bucket = DD_NUM_BUCKETS; /* NaN: no bucket, never selected */
                if (ax == ax) {
                    /* smallest i with |x| >= f[i], exactly as the CPU scans */
                    for (int i = 0; i < DD_NUM_BUCKETS; i++)
                        if (ax >= f[i]) { bucket = i; break; }
                }
                b[e] = bucket;
                if (bucket < DD_NUM_BUCKETS) atomicAdd(&hist[bucket], 1);
            }
        }
        __syncthreads();
        if (t == 0) {
            int taken = 0, cut = 0;
            while (cut < DD_NUM_BUCKETS && taken + hist[cut] <= quota) taken += hist[cut++];
            s_cut = cut;
            s_from = cut < DD_NUM_BUCKETS ? quota - taken : 0;
        }
        __syncthreads();
        const int cut = s_cut, from_cut = s_from;
        int n_cut = 0;
#pragma unroll
        for (int e = 0; e < 4; e++) n_cut += b[e] == cut;
        int rank = 0;
        Scan(scan_tmp).ExclusiveSum(n_cut, rank);
        __syncthreads();
        bool sel[4];
        int n_sel = 0;
#pragma unroll
        for (int e = 0; e < 4; e++) {
            sel[e] = b[e] < cut || (b[e] == cut && rank < from_cut);
            if (b[e] == cut) rank++;
            n_sel += sel[e];
        }
        int pos = 0, total = 0;
        Scan(scan_tmp).ExclusiveSum(n_sel, pos, total);
#pragma unroll
        for (int e = 0; e < 4; e++) {
            if (sel[e]) {
                idx[out0 + pos] = start + 4 * t + e;
                xsel[out0 + pos] = v[e];
                pos++;
            }
        }
        for (int i = total + t; i < quota; i += blockDim.x) { /* NaNs left too few candidates */
            idx[out0 + i] = -1;
            xsel[out0 + i] = 0.f;
        }
        __syncthreads();
    }
}

/* acc[8w+n] += xv * (nibble n of word w - 8); the float trick 2^23 + nibble avoids I2F. */
__device__ __forceinline__ void accumulate_codes(const uint4 &v, float xv, float acc[32]) {
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int w = 0; w < 4; w++) {
#pragma unroll
        for (int n = 0; n < 8; n++) {
            const float c = __uint_as_float(0x4B000000u | ((words[w] >> (4 * n)) & 0xFu)) - 8388616.f;
            acc[8 * w + n] = fmaf(xv, c, acc[8 * w + n]);
        }
    }
}

__global__ void __launch_bounds__(kFetchThreads)
fetch_kernel(const uint4 *__restrict__ rcodes, const __half *__restrict__ rscales,
             const int *__restrict__ idx, const float *__restrict__ xsel, int n_sel, int d_out,
             __half *__restrict__ y, int y_pairs_aligned) {
    __shared__ float red[kTileUnits * 32];
    const int units = d_out / 32; /* 16-byte column units per residual row */
    const int per_block = (units + gridDim.x - 1) / gridDim.x;
    const int u_begin = blockIdx.x * per_block;
    const int u_end = min(units, u_begin + per_block);
    const int t = threadIdx.x;
    for (int tile = u_begin; tile < u_end; tile += kTileUnits) {
        const int tu = min(kTileUnits, u_end - tile);
        const int slots = blockDim.x / tu;
        for (int i = t; i < tu * 32; i += blockDim.x) red[i] = 0.f;
        __syncthreads();
        const int slot = t / tu, unit = tile + t % tu;
        if (slot < slots && slot < n_sel) {
            float acc[32];
#pragma unroll
            for (int i = 0; i < 32; i++) acc[i] = 0.f;
            for (int r0 = slot; r0 < n_sel; r0 += kUnroll * slots) {
                uint4 v[kUnroll];
                float xv[kUnroll];
#pragma unroll
                for (int k = 0; k < kUnroll; k++) {
                    const int r = r0 + k * slots;
                    const int row = r < n_sel ? idx[r] : -1;
                    xv[k] = 0.f;
                    v[k] = make_uint4(0u, 0u, 0u, 0u);
                    if (row >= 0) {
                        xv[k] = xsel[r];
                        v[k] = rcodes[(size_t)row * units + unit];
                    }
                }
#pragma unroll
                for (int k = 0; k < kUnroll; k++)
                    if (xv[k] != 0.f) accumulate_codes(v[k], xv[k], acc);
            }
            float *dst = red + (unit - tile) * 32;
#pragma unroll
            for (int i = 0; i < 32; i++) atomicAdd(dst + i, acc[i]);
        }
        __syncthreads();
        const int o0 = tile * 32;
        if (y_pairs_aligned) {
            for (int p = t; p < tu * 16; p += blockDim.x) {
                const int o = o0 + 2 * p;
                const float a = red[2 * p] * __half2float(rscales[o]);
                const float b = red[2 * p + 1] * __half2float(rscales[o + 1]);
                atomicAdd(reinterpret_cast<__half2 *>(y + o), __floats2half2_rn(a, b));
            }
        } else {
            for (int p = t; p < tu * 32; p += blockDim.x)
                atomicAdd(y + o0 + p, __float2half_rn(red[p] * __half2float(rscales[o0 + p])));
        }
        __syncthreads();
    }
}

} // namespace

extern "C" dd_status dd_cuda_select(int32_t d_in, const uint16_t *d_x, const float *d_floors,
                                    int32_t k_chunk, int32_t *d_idx, float *d_xsel,
                                    int max_blocks, void *stream) {
    if (d_in <= 0 || !d_x || !d_floors || !d_idx || !d_xsel) return DD_ERR_INVALID_ARGUMENT;
    if (k_chunk < 0 || k_chunk > DD_CHUNK) return DD_ERR_INVALID_ARGUMENT;
    if (k_chunk == 0) return DD_OK;
    int blocks = dd_num_chunks(d_in);
    if (max_blocks > 0 && blocks > max_blocks) blocks = max_blocks;
    select_kernel<<<blocks, kSelectThreads, 0, (cudaStream_t)stream>>>(
        reinterpret_cast<const __half *>(d_x), d_in, d_floors, k_chunk, d_idx, d_xsel);
    DD_CK_LAUNCH("select_kernel");
    return DD_OK;
}

extern "C" dd_status dd_cuda_dec_fetch(const dd_shape *s, const uint8_t *rcodes_mapped,
                                       const uint16_t *d_rscales, const int32_t *d_idx,
                                       const float *d_xsel, int32_t n_sel, int n_tb,
                                       uint16_t *d_y, void *stream) {
    dd_status st = dd_shape_check(s);
    if (st != DD_OK) return st;
    if (!rcodes_mapped || !d_rscales || !d_idx || !d_xsel || !d_y || n_sel < 0)
        return DD_ERR_INVALID_ARGUMENT;
    if (((uintptr_t)rcodes_mapped & 15) != 0) return DD_ERR_INVALID_ARGUMENT;
    if (n_sel == 0) return DD_OK;
    const int units = s->d_out / 32;
    if (n_tb < 1) n_tb = 1;
    if (n_tb > units) n_tb = units;
    const int aligned = ((uintptr_t)d_y & 3) == 0;
    fetch_kernel<<<n_tb, kFetchThreads, 0, (cudaStream_t)stream>>>(
        reinterpret_cast<const uint4 *>(rcodes_mapped), reinterpret_cast<const __half *>(d_rscales),
        d_idx, d_xsel, n_sel, s->d_out, reinterpret_cast<__half *>(d_y), aligned);
    DD_CK_LAUNCH("fetch_kernel");
    return DD_OK;
}
