/*
 * DEC on the GPU: bucket selection per 1024-input chunk (decdec.h's rule, bit for bit) and the
 * residual GEMV over the selected rows, read zero-copy from pinned mapped host memory.
 *
 * select_kernel: one block per chunk (grid-strided when capped to n_tb blocks); 256 threads own
 *   4 consecutive inputs each, so thread order is index order and two block scans give the
 *   "lowest index first" fill of the cut bucket and the ascending compaction.  No shared-memory
 *   size depends on k_chunk: selected (index, x) pairs go to a device scratch of d_in slots.
 * fetch_kernel: n_tb blocks split the output columns; a block walks its columns in tiles of
 *   32 units x 32 outputs: lanes over 16-byte column units (each warp reads 512 contiguous bytes
 *   of a row), warps over selected rows, up to kUnroll loads in flight per thread, so every row
 *   byte is read once; the fp32 partial sums meet in shared memory (plain stores, four rounds,
 *   no atomics, no bank conflicts), then one fp16 atomic per output merges into y.
 */
#include <string.h>

#include "dd_cuda_dec_device.cuh"

namespace {

constexpr int kFetchThreads = 512;
constexpr int kUnroll = 4;

/* One block per chunk (grid-strided when capped): the shared select_chunk of
 * dd_cuda_dec_device.cuh, results to the device scratch (the layer call itself never needs this:
 * its fused kernel keeps the selection in shared memory; this kernel serves dd_cuda_layer_select
 * and the legacy two-kernel path kept for measurements). */
/* kByValue: the floors come as the kernel parameter fv (the layer call: settings never touch
 * device memory), else from device memory at fp (dd_cuda_select). */
template <bool kByValue>
__global__ void __launch_bounds__(dd_dec::kDecThreads)
select_kernel(const __half *__restrict__ x, int d_in, const float *__restrict__ fp,
              const dd_dec::FloorsF fv, int k_chunk, int *__restrict__ idx, float *__restrict__ xsel) {
    __shared__ dd_dec::SelectSmem S;
    if (kByValue) dd_dec::load_floors(S, fv);
    else dd_dec::load_floors(S, fp);
    const int n_chunks = (d_in + DD_CHUNK - 1) / DD_CHUNK;
    for (int c = blockIdx.x; c < n_chunks; c += gridDim.x) {
        const int start = c * DD_CHUNK;
        const int len = min(DD_CHUNK, d_in - start);
        const int quota = dd_dec::chunk_quota(d_in, c, k_chunk);
        const int out0 = dd_rule_chunk_offset(c, k_chunk); /* every earlier chunk is whole */
        if (quota == 0) continue;
        const int n = dd_dec::select_chunk(S, x, start, len, quota);
        for (int i = threadIdx.x; i < quota; i += blockDim.x) {
            idx[out0 + i] = i < n ? S.idx[i] : -1; /* -1: NaNs left too few candidates */
            xsel[out0 + i] = i < n ? S.xv[i] : 0.f;
        }
        __syncthreads();
    }
}

/* One warp per chunk: the fused kernel's selection (dd_cuda_dec_device.cuh), for
 * dd_cuda_layer_select, so the tests compare exactly the code the layer call runs. */
struct FloorsHalf { unsigned short h[DD_NUM_BUCKETS]; };

__global__ void __launch_bounds__(dd_dec::kDecThreads)
select_warp_kernel(const __half *__restrict__ x, int d_in, FloorsHalf fh, int k_chunk, int *__restrict__ idx) {
    __shared__ __half2 fh2[DD_NUM_BUCKETS];
    if (threadIdx.x < DD_NUM_BUCKETS)
        fh2[threadIdx.x] = __halves2half2(__ushort_as_half(fh.h[threadIdx.x]), __ushort_as_half(fh.h[threadIdx.x]));
    __syncthreads();
    const int n_chunks = (d_in + DD_CHUNK - 1) / DD_CHUNK;
    const int c = blockIdx.x * dd_dec::kDecWarps + (threadIdx.x >> 5);
    if (c >= n_chunks) return;
    const int start = c * DD_CHUNK, quota = dd_dec::chunk_quota(d_in, c, k_chunk);
    if (quota)
        dd_dec::warp_select_chunk(x, start, min(DD_CHUNK, d_in - start), quota, fh2,
                                  idx + dd_rule_chunk_offset(c, k_chunk));
}

/* Partial sums of one round (8 of a thread's 32 outputs) for every (slot, unit) of a tile. */
constexpr int kRoundVals = 8;

__global__ void __launch_bounds__(kFetchThreads)
fetch_kernel(const uint4 *__restrict__ rcodes, const __half *__restrict__ rscales,
             const int *__restrict__ idx, const float *__restrict__ xsel, int n_sel, int d_out,
             __half *__restrict__ y) {
    __shared__ float part[kRoundVals * kFetchThreads];
    const int units = d_out / 32; /* 16-byte column units per residual row */
    const int per_block = (units + gridDim.x - 1) / gridDim.x;
    const int u_begin = blockIdx.x * per_block;
    const int u_end = min(units, u_begin + per_block);
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    for (int tile = u_begin; tile < u_end; tile += 32) {
        /* lanes over up to 32 consecutive units (coalesced 16-byte reads of each row), lane
         * groups and warps over selected rows ("slots") */
        const int tu = min(32, u_end - tile);
        const int groups_per_warp = 32 / tu;
        int slots = (kFetchThreads / 32) * groups_per_warp;
        if (slots > n_sel) slots = n_sel;
        const int g = lane / tu, ul = lane % tu;
        const int slot = warp * groups_per_warp + g;
        const bool active = g < groups_per_warp && slot < slots;
        float acc[32];
#pragma unroll
        for (int i = 0; i < 32; i++) acc[i] = 0.f;
        if (active) {
            const int unit = tile + ul;
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
                    if (xv[k] != 0.f) dd_dec::accumulate_codes(v[k], xv[k], acc);
            }
        }
        /* reduce over slots without atomics: 4 rounds of 8 values through shared memory */
#pragma unroll
        for (int q = 0; q < 32 / kRoundVals; q++) {
            if (active) {
#pragma unroll
                for (int k = 0; k < kRoundVals; k++) part[(k * slots + slot) * tu + ul] = acc[q * kRoundVals + k];
            }
            __syncthreads();
            for (int o = t; o < kRoundVals * tu; o += blockDim.x) {
                const int k = o / tu, u = o % tu;
                float sum = 0.f;
                for (int sl = 0; sl < slots; sl++) sum += part[(k * slots + sl) * tu + u];
                const int out = (tile + u) * 32 + q * kRoundVals + k;
                atomicAdd(y + out, __float2half_rn(sum * __half2float(rscales[out])));
            }
            __syncthreads();
        }
    }
}

} // namespace

static dd_status launch_select(int32_t d_in, const uint16_t *d_x, const float *d_floors,
                               const float *h_floors, int32_t k_chunk, int32_t *d_idx, float *d_xsel,
                               int max_blocks, void *stream) {
    if (d_in <= 0 || !d_x || !(d_floors || h_floors) || !d_idx || !d_xsel) return DD_ERR_INVALID_ARGUMENT;
    if (k_chunk < 0 || k_chunk > DD_CHUNK) return DD_ERR_INVALID_ARGUMENT;
    if (k_chunk == 0) return DD_OK;
    dd_dec::FloorsF fv;
    if (h_floors) memcpy(fv.f, h_floors, sizeof fv.f);
    else memset(fv.f, 0, sizeof fv.f);
    int blocks = dd_num_chunks(d_in);
    if (max_blocks > 0 && blocks > max_blocks) blocks = max_blocks;
    if (h_floors)
        select_kernel<true><<<blocks, dd_dec::kDecThreads, 0, (cudaStream_t)stream>>>(
            reinterpret_cast<const __half *>(d_x), d_in, nullptr, fv, k_chunk, d_idx, d_xsel);
    else
        select_kernel<false><<<blocks, dd_dec::kDecThreads, 0, (cudaStream_t)stream>>>(
            reinterpret_cast<const __half *>(d_x), d_in, d_floors, fv, k_chunk, d_idx, d_xsel);
    DD_CK_LAUNCH("select_kernel");
    return DD_OK;
}

dd_status dd_cuda_select_floors(int32_t d_in, const uint16_t *d_x, const float floors[DD_NUM_BUCKETS],
                                int32_t k_chunk, int32_t *d_idx, float *d_xsel, int max_blocks,
                                void *stream) {
    if (!floors) return DD_ERR_INVALID_ARGUMENT;
    return launch_select(d_in, d_x, NULL, floors, k_chunk, d_idx, d_xsel, max_blocks, stream);
}

extern "C" dd_status dd_cuda_select(int32_t d_in, const uint16_t *d_x, const float *d_floors,
                                    int32_t k_chunk, int32_t *d_idx, float *d_xsel,
                                    int max_blocks, void *stream) {
    if (!d_floors) return DD_ERR_INVALID_ARGUMENT;
    return launch_select(d_in, d_x, d_floors, NULL, k_chunk, d_idx, d_xsel, max_blocks, stream);
}

dd_status dd_cuda_select_fused(int32_t d_in, const uint16_t *d_x, const uint16_t *floors_half,
                               int32_t k_chunk, int32_t *d_idx, void *stream) {
    if (d_in <= 0 || !d_x || !floors_half || !d_idx || k_chunk < 0 || k_chunk > DD_CHUNK)
        return DD_ERR_INVALID_ARGUMENT;
    if (k_chunk == 0) return DD_OK;
    FloorsHalf fh;
    memcpy(fh.h, floors_half, sizeof fh.h);
    const int blocks = (dd_num_chunks(d_in) + dd_dec::kDecWarps - 1) / dd_dec::kDecWarps;
    select_warp_kernel<<<blocks, dd_dec::kDecThreads, 0, (cudaStream_t)stream>>>(
        reinterpret_cast<const __half *>(d_x), d_in, fh, k_chunk, d_idx);
    DD_CK_LAUNCH("select_warp_kernel");
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
    fetch_kernel<<<n_tb, kFetchThreads, 0, (cudaStream_t)stream>>>(
        reinterpret_cast<const uint4 *>(rcodes_mapped), reinterpret_cast<const __half *>(d_rscales),
        d_idx, d_xsel, n_sel, s->d_out, reinterpret_cast<__half *>(d_y));
    DD_CK_LAUNCH("fetch_kernel");
    return DD_OK;
}
