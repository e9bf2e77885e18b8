/*
 * Benchmark support: graph-captured timing of the layer, its parts and a plain streaming read of
 * the same bytes, with weights rotated across enough copies to defeat the 50 MB L2.  Used by
 * decdec/bench.py (`python -m decdec bench kernels|bandwidth`) and csrc/cuda/tests.
 */
#include <algorithm>
#include <stdlib.h>
#include <string.h>
#include <vector>

#include "dd_cuda_internal.cuh"

namespace {

__device__ __forceinline__ uint32_t hash32(uint64_t i, uint32_t seed) {
    uint64_t z = i * 0x9E3779B97F4A7C15ull + seed;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (uint32_t)(z ^ (z >> 31));
}

__global__ void fill_bytes(uint8_t *p, size_t n, uint32_t seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        p[i] = (uint8_t)hash32(i, seed);
}

/* fp16 uniform in [lo, hi) */
__global__ void fill_half(__half *p, size_t n, float lo, float hi, uint32_t seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        p[i] = __float2half_rn(lo + (hi - lo) * (hash32(i, seed) >> 8) * (1.f / 16777216.f));
}

__global__ void __launch_bounds__(256) stream_read(const uint4 *__restrict__ p, size_t n, unsigned *sink) {
    uint32_t acc = 0;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n; i += 4 * stride) {
        const uint4 a = __ldcs(p + i), b = __ldcs(p + i + stride), c = __ldcs(p + i + 2 * stride),
                    d = __ldcs(p + i + 3 * stride);
        acc ^= a.x ^ b.y ^ c.z ^ d.w;
    }
    for (; i < n; i += stride) acc ^= __ldcs(p + i).x;
    if (acc == 0x9e3779b9u) atomicAdd(sink, 1u); /* keeps the loads; practically never true */
}

dd_status launch_read(const void *p, size_t bytes, int n_sm, unsigned *sink, cudaStream_t st) {
    const size_t n = bytes / 16;
    size_t blocks = (n + 255) / 256;
    blocks = std::min<size_t>(blocks, (size_t)n_sm * 8);
    stream_read<<<(unsigned)std::max<size_t>(blocks, 1), 256, 0, st>>>((const uint4 *)p, n, sink);
    DD_CK_LAUNCH("stream_read");
    return DD_OK;
}

__global__ void empty_kernel() {}

uint64_t splitmix(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

float gauss(uint64_t *s) { /* sum of 4 uniforms, centred: cheap, bell-shaped, variance 1/3 */
    float a = 0;
    for (int i = 0; i < 4; i++) a += (splitmix(s) >> 40) * (1.f / 16777216.f);
    return (a - 2.f) * 1.7320508f;
}

} // namespace

struct dd_cuda_bench {
    dd_shape shape;
    int n_sm, n_copies, n_x;
    size_t q_bytes, g_bytes, copy_bytes;
    uint8_t *d_copies;
    uint8_t *h_rcodes;
    uint16_t *d_x, *d_y;
    unsigned *d_sink;
    dd_cuda_layer *layer;
    uint8_t *own_qweight;
    uint16_t *own_scales, *own_zeros;
    cudaStream_t stream;
    cudaEvent_t e0, e1;
};

extern "C" dd_status dd_cuda_bench_destroy(dd_cuda_bench *b) {
    if (!b) return DD_OK;
    if (b->layer) {
        b->layer->d_qweight = b->own_qweight;
        b->layer->d_scales = b->own_scales;
        b->layer->d_zeros = b->own_zeros;
        dd_cuda_layer_destroy(b->layer);
    }
    cudaFree(b->d_copies);
    cudaFree(b->d_x);
    cudaFree(b->d_y);
    cudaFree(b->d_sink);
    if (b->h_rcodes) cudaFreeHost(b->h_rcodes);
    if (b->stream) cudaStreamDestroy(b->stream);
    if (b->e0) cudaEventDestroy(b->e0);
    if (b->e1) cudaEventDestroy(b->e1);
    (void)cudaGetLastError();
    free(b);
    return DD_OK;
}

extern "C" dd_status dd_cuda_bench_create(const dd_shape *s, size_t rotate_bytes, uint64_t seed,
                                          dd_cuda_bench **out) {
    if (!out) return DD_ERR_INVALID_ARGUMENT;
    *out = NULL;
    dd_status st = dd_shape_check(s);
    if (st != DD_OK) return st;
    dd_cuda_bench *b = (dd_cuda_bench *)calloc(1, sizeof *b);
    if (!b) return DD_ERR_OUT_OF_MEMORY;
    b->shape = *s;
    b->n_x = 16;
    int smem = 0;
    const size_t ng = (size_t)dd_num_groups(s);
    b->q_bytes = dd_qweight_row_bytes(s) * (size_t)s->d_out;
    b->g_bytes = ng * (size_t)s->d_out * 2;
    b->copy_bytes = b->q_bytes + 2 * b->g_bytes;
    if (rotate_bytes == 0) rotate_bytes = (size_t)256 << 20;
    b->n_copies = (int)std::min<size_t>(4096, std::max<size_t>(2, (rotate_bytes + b->copy_bytes - 1) / b->copy_bytes));
    std::vector<float> thr((size_t)s->d_in, 0.f);
    std::vector<uint16_t> hx((size_t)b->n_x * s->d_in);
    uint64_t rs = seed;
#define TRY(x) do { if ((st = (x)) != DD_OK) goto fail; } while (0)
#define TRYCU(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { st = dd_cuda_fail(e_, #x, __FILE__, __LINE__); goto fail; } } while (0)
    {
        TRY(dd_cuda_device_limits(&b->n_sm, &smem));
        TRYCU(cudaStreamCreateWithFlags(&b->stream, cudaStreamNonBlocking));
        TRYCU(cudaEventCreate(&b->e0));
        TRYCU(cudaEventCreate(&b->e1));
        TRYCU(cudaMalloc((void **)&b->d_sink, 4));
        TRYCU(cudaMalloc((void **)&b->d_copies, b->copy_bytes * (size_t)b->n_copies));
        for (int c = 0; c < b->n_copies; c++) {
            uint8_t *base = b->d_copies + (size_t)c * b->copy_bytes;
            fill_bytes<<<264, 256, 0, b->stream>>>(base, b->q_bytes, (uint32_t)(seed + 3 * c));
            fill_half<<<64, 256, 0, b->stream>>>((__half *)(base + b->q_bytes), ng * s->d_out, 0.002f, 0.02f, (uint32_t)(seed + 3 * c + 1));
            fill_half<<<64, 256, 0, b->stream>>>((__half *)(base + b->q_bytes + b->g_bytes), ng * s->d_out, 0.f, (float)((1 << s->bits) - 1), (uint32_t)(seed + 3 * c + 2));
        }
        TRYCU(cudaGetLastError());
        /* residual: nibbles 1..15 (codes -7..7), pinned and mapped */
        const size_t r_bytes = (size_t)s->d_in * (size_t)s->d_out / 2;
        TRYCU(cudaHostAlloc((void **)&b->h_rcodes, r_bytes, cudaHostAllocMapped | cudaHostAllocPortable));
        for (size_t i = 0; i < r_bytes; i += 8) {
            uint64_t v = splitmix(&rs), w = 0;
            for (int k = 0; k < 16; k++) w |= (uint64_t)(1 + ((v >> (4 * k)) & 0xF) % 15) << (4 * k);
            memcpy(b->h_rcodes + i, &w, std::min<size_t>(8, r_bytes - i));
        }
        /* inputs: bell-shaped with a few outlier channels; thresholds: envelope over 32 tokens */
        for (int t = 0; t < 32 + b->n_x; t++) {
            std::vector<float> ax((size_t)s->d_in);
            for (int j = 0; j < s->d_in; j++) {
                float v = gauss(&rs) * ((j % 97) == 0 ? 20.f : 1.f);
                v = dd_half_to_float(dd_float_to_half(v));
                if (t >= 32) hx[(size_t)(t - 32) * s->d_in + j] = dd_float_to_half(v);
                ax[j] = fabsf(v);
            }
            if (t < 32) {
                std::sort(ax.begin(), ax.end(), [](float a, float c) { return a > c; });
                for (int j = 0; j < s->d_in; j++) thr[j] = std::max(thr[j], ax[j]);
            }
        }
        TRYCU(cudaMalloc((void **)&b->d_x, hx.size() * 2));
        TRYCU(cudaMemcpy(b->d_x, hx.data(), hx.size() * 2, cudaMemcpyHostToDevice));
        TRYCU(cudaMalloc((void **)&b->d_y, (size_t)b->n_x * s->d_out * 2));
        /* the layer object, created from copy 0 (host staging), then pointed at the copies */
        std::vector<uint8_t> hq(b->copy_bytes);
        TRYCU(cudaStreamSynchronize(b->stream));
        TRYCU(cudaMemcpy(hq.data(), b->d_copies, b->copy_bytes, cudaMemcpyDeviceToHost));
        std::vector<uint16_t> hrs((size_t)s->d_out);
        for (auto &v : hrs) v = dd_float_to_half(0.0005f + 0.002f * (splitmix(&rs) >> 40) / 16777216.f);
        TRY(dd_cuda_layer_create(s, hq.data(), (const uint16_t *)(hq.data() + b->q_bytes),
                                 (const uint16_t *)(hq.data() + b->q_bytes + b->g_bytes),
                                 b->h_rcodes, hrs.data(), thr.data(), &b->layer));
        b->own_qweight = b->layer->d_qweight;
        b->own_scales = b->layer->d_scales;
        b->own_zeros = b->layer->d_zeros;
    }
    *out = b;
    return DD_OK;
fail:
    dd_cuda_bench_destroy(b);
    return st;
#undef TRY
#undef TRYCU
}

extern "C" dd_status dd_cuda_bench_info(const dd_cuda_bench *b, size_t *layer_bytes, int *n_copies,
                                        int *n_sm) {
    if (!b) return DD_ERR_INVALID_ARGUMENT;
    if (layer_bytes) *layer_bytes = b->copy_bytes;
    if (n_copies) *n_copies = b->n_copies;
    if (n_sm) *n_sm = b->n_sm;
    return DD_OK;
}

static dd_status enqueue_call(dd_cuda_bench *b, int mode, int i, int32_t n_tb) {
    dd_cuda_layer *L = b->layer;
    const int c = i % b->n_copies, xi = i % b->n_x;
    uint8_t *base = b->d_copies + (size_t)c * b->copy_bytes;
    const uint16_t *x = b->d_x + (size_t)xi * b->shape.d_in;
    uint16_t *y = b->d_y + (size_t)xi * b->shape.d_out;
    L->d_qweight = base;
    L->d_scales = (uint16_t *)(base + b->q_bytes);
    L->d_zeros = (uint16_t *)(base + b->q_bytes + b->g_bytes);
    switch (mode) {
    case DD_BENCH_BASE:
        return dd_cuda_gemv_base(&b->shape, L->d_qweight, L->d_scales, L->d_zeros, x, y, 0, 0, b->stream);
    case DD_BENCH_BASE_RESERVED:
        return dd_cuda_gemv_base(&b->shape, L->d_qweight, L->d_scales, L->d_zeros, x, y, 0,
                                 std::max(1, b->n_sm - n_tb), b->stream);
    case DD_BENCH_FUSED:
    case DD_BENCH_SERIAL:
        return dd_cuda_layer_forward(L, x, y, 1, 0, b->stream);
    case DD_BENCH_READ:
        return launch_read(base, b->copy_bytes, b->n_sm, b->d_sink, b->stream);
    case DD_BENCH_DEC_ONLY: {
        dd_fused_dec dec;
        memset(&dec, 0, sizeof dec);
        dec.rcodes = L->rcodes_dev;
        dec.rscales = L->d_rscales;
        dec.cell = L->d_cell;
        memcpy(dec.floors_half, L->floors_half, sizeof dec.floors_half);
        dec.k_chunk = L->k_chunk;
        dec.n_tb = n_tb;
        return dd_cuda_fused_launch(&b->shape, L->d_qweight, L->d_scales, L->d_zeros, &dec, x, y, 0,
                                    b->stream);
    }
    case DD_BENCH_FUSED_FULL:
    case DD_BENCH_FORKJOIN:
        return dd_cuda_layer_forward(L, x, y, 1, 0, b->stream);
    case DD_BENCH_EMPTY:
        empty_kernel<<<1, 32, 0, b->stream>>>();
        DD_CK_LAUNCH("empty_kernel");
        return DD_OK;
    case DD_BENCH_DEC_LEGACY: {
        dd_status st = dd_cuda_select(b->shape.d_in, x, L->d_floors, L->k_chunk, L->d_idx, L->d_xsel, n_tb, b->stream);
        if (st != DD_OK) return st;
        return dd_cuda_dec_fetch(&b->shape, L->rcodes_dev, L->d_rscales, L->d_idx, L->d_xsel, L->k_total, n_tb, y, b->stream);
    }
    }
    return DD_ERR_INVALID_ARGUMENT;
}

extern "C" dd_status dd_cuda_bench_run(dd_cuda_bench *b, int mode, int32_t k_chunk, int32_t n_tb,
                                       int iters, int reps, double *us_per_call) {
    if (!b || !us_per_call || iters < 1 || reps < 1) return DD_ERR_INVALID_ARGUMENT;
    dd_status st;
    if ((st = dd_cuda_layer_set_k_chunk(b->layer, k_chunk)) != DD_OK) return st;
    if (mode == DD_BENCH_FUSED || mode == DD_BENCH_SERIAL || mode == DD_BENCH_DEC_ONLY ||
        mode == DD_BENCH_BASE_RESERVED || mode == DD_BENCH_FORKJOIN || mode == DD_BENCH_DEC_LEGACY ||
        mode == DD_BENCH_FUSED_FULL)
        if ((st = dd_cuda_layer_set_n_tb(b->layer, n_tb)) != DD_OK) return st;
    dd_cuda_layer_set_serial(b->layer, mode == DD_BENCH_SERIAL ? DD_PATH_SERIAL
                                       : mode == DD_BENCH_FORKJOIN ? DD_PATH_FORKJOIN : DD_PATH_FUSED);
    b->layer->base_sm = mode == DD_BENCH_FUSED_FULL ? b->n_sm : 0;
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    std::vector<float> ms;
    DD_CK(cudaStreamBeginCapture(b->stream, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < iters; i++) {
        st = enqueue_call(b, mode, i, n_tb);
        if (st != DD_OK) {
            cudaStreamEndCapture(b->stream, &graph);
            if (graph) cudaGraphDestroy(graph);
            (void)cudaGetLastError();
            return st;
        }
    }
    DD_CK(cudaStreamEndCapture(b->stream, &graph));
    cudaError_t e = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    if (e != cudaSuccess) return dd_cuda_fail(e, "cudaGraphInstantiate", __FILE__, __LINE__);
    for (int r = 0; r < reps + 2 && e == cudaSuccess; r++) {
        e = cudaEventRecord(b->e0, b->stream);
        if (e == cudaSuccess) e = cudaGraphLaunch(exec, b->stream);
        if (e == cudaSuccess) e = cudaEventRecord(b->e1, b->stream);
        if (e == cudaSuccess) e = cudaEventSynchronize(b->e1);
        float t = 0;
        if (e == cudaSuccess) e = cudaEventElapsedTime(&t, b->e0, b->e1);
        if (r >= 2) ms.push_back(t); /* two warm-up replays */
    }
    cudaGraphExecDestroy(exec);
    if (e != cudaSuccess) return dd_cuda_fail(e, "graph replay", __FILE__, __LINE__);
    std::sort(ms.begin(), ms.end());
    *us_per_call = ms[ms.size() / 2] * 1000.0 / iters;
    return DD_OK;
}

extern "C" dd_status dd_cuda_bench_bandwidth(size_t bytes, int zero_copy_blocks, double *hbm_gbs,
                                             double *zero_copy_gbs, double *h2d_gbs) {
    if (!hbm_gbs || !zero_copy_gbs || !h2d_gbs || bytes < (1 << 20)) return DD_ERR_INVALID_ARGUMENT;
    int n_sm = 0, smem = 0;
    dd_status st = dd_cuda_device_limits(&n_sm, &smem);
    if (st != DD_OK) return st;
    void *d = NULL, *h = NULL, *hd = NULL;
    unsigned *sink = NULL;
    cudaEvent_t e0 = NULL, e1 = NULL;
    float ms = 0;
    const size_t zc_bytes = std::min<size_t>(bytes, (size_t)1 << 30);
#define TRYCU(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { st = dd_cuda_fail(e_, #x, __FILE__, __LINE__); goto done; } } while (0)
    TRYCU(cudaMalloc(&d, bytes));
    TRYCU(cudaMalloc((void **)&sink, 4));
    TRYCU(cudaMemset(d, 1, bytes));
    TRYCU(cudaHostAlloc(&h, zc_bytes, cudaHostAllocMapped));
    memset(h, 1, zc_bytes);
    TRYCU(cudaHostGetDevicePointer(&hd, h, 0));
    TRYCU(cudaEventCreate(&e0));
    TRYCU(cudaEventCreate(&e1));
    for (int it = 0; it < 2; it++) stream_read<<<n_sm * 8, 256>>>((const uint4 *)d, bytes / 16, sink);
    TRYCU(cudaEventRecord(e0));
    for (int it = 0; it < 10; it++) stream_read<<<n_sm * 8, 256>>>((const uint4 *)d, bytes / 16, sink);
    TRYCU(cudaGetLastError());
    TRYCU(cudaEventRecord(e1));
    TRYCU(cudaEventSynchronize(e1));
    TRYCU(cudaEventElapsedTime(&ms, e0, e1));
    *hbm_gbs = 10.0 * bytes / (ms * 1e6);
    stream_read<<<zero_copy_blocks * 2, 256>>>((const uint4 *)hd, zc_bytes / 16 / 8, sink);
    TRYCU(cudaGetLastError());
    TRYCU(cudaEventRecord(e0));
    stream_read<<<zero_copy_blocks * 2, 256>>>((const uint4 *)hd, zc_bytes / 16, sink);
    TRYCU(cudaGetLastError());
    TRYCU(cudaEventRecord(e1));
    TRYCU(cudaEventSynchronize(e1));
    TRYCU(cudaEventElapsedTime(&ms, e0, e1));
    *zero_copy_gbs = zc_bytes / (ms * 1e6);
    TRYCU(cudaEventRecord(e0));
    TRYCU(cudaMemcpyAsync(d, h, zc_bytes, cudaMemcpyHostToDevice, 0));
    TRYCU(cudaEventRecord(e1));
    TRYCU(cudaEventSynchronize(e1));
    TRYCU(cudaEventElapsedTime(&ms, e0, e1));
    *h2d_gbs = zc_bytes / (ms * 1e6);
done:
    if (e0) cudaEventDestroy(e0);
    if (e1) cudaEventDestroy(e1);
    if (h) cudaFreeHost(h);
    cudaFree(d);
    cudaFree(sink);
    (void)cudaGetLastError();
    return st;
#undef TRYCU
}
