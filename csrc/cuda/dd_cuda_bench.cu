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

/* Pinned mapped host memory from the one pinned allocator (dd_host_alloc); fails rather than
 * falling back to pageable memory. */
dd_status pinned_alloc(void **p, size_t bytes) {
    int pinned = 0;
    *p = NULL;
    dd_status st = dd_host_alloc(bytes, 1, p, &pinned);
    if (st != DD_OK) return dd_cuda_fail_text(st, "dd_host_alloc(pinned)", __FILE__, __LINE__);
    if (!pinned) {
        dd_host_free(*p, 0);
        *p = NULL;
        return dd_cuda_fail_text(DD_ERR_NO_DEVICE, "pinned memory needs a usable CUDA device", __FILE__, __LINE__);
    }
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
    uint8_t *h_rcodes;         /* pinned, mapped (dd_host_alloc) */
    uint16_t *d_x, *d_y;
    unsigned *d_sink;
    dd_cuda_layer *layer;      /* immutable; calls run on shallow views of it with the weight
                                * pointers of copy i (see layer_view) */
    dd_cuda_workspace *ws;     /* the session's one stream */
    cudaStream_t stream;
    cudaEvent_t e0, e1;
};

extern "C" dd_status dd_cuda_bench_destroy(dd_cuda_bench *b) {
    if (!b) return DD_OK;
    dd_cuda_layer_destroy(b->layer);
    dd_cuda_workspace_destroy(b->ws);
    cudaFree(b->d_copies);
    cudaFree(b->d_x);
    cudaFree(b->d_y);
    cudaFree(b->d_sink);
    dd_host_free(b->h_rcodes, 1);
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
    {
        DD_TRY(dd_cuda_device_limits(&b->n_sm, &smem));
        DD_TRY_CU(cudaStreamCreateWithFlags(&b->stream, cudaStreamNonBlocking));
        DD_TRY_CU(cudaEventCreate(&b->e0));
        DD_TRY_CU(cudaEventCreate(&b->e1));
        DD_TRY_CU(cudaMalloc((void **)&b->d_sink, 4));
        DD_TRY_CU(cudaMalloc((void **)&b->d_copies, b->copy_bytes * (size_t)b->n_copies));
        for (int c = 0; c < b->n_copies; c++) {
            uint8_t *base = b->d_copies + (size_t)c * b->copy_bytes;
            fill_bytes<<<264, 256, 0, b->stream>>>(base, b->q_bytes, (uint32_t)(seed + 3 * c));
            fill_half<<<64, 256, 0, b->stream>>>((__half *)(base + b->q_bytes), ng * s->d_out, 0.002f, 0.02f, (uint32_t)(seed + 3 * c + 1));
            fill_half<<<64, 256, 0, b->stream>>>((__half *)(base + b->q_bytes + b->g_bytes), ng * s->d_out, 0.f, (float)((1 << s->bits) - 1), (uint32_t)(seed + 3 * c + 2));
        }
        DD_TRY_CU(cudaGetLastError());
        /* residual: nibbles 1..15 (codes -7..7), pinned and mapped */
        const size_t r_bytes = (size_t)s->d_in * (size_t)s->d_out / 2;
        DD_TRY(pinned_alloc((void **)&b->h_rcodes, r_bytes));
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
        DD_TRY_CU(cudaMalloc((void **)&b->d_x, hx.size() * 2));
        DD_TRY_CU(cudaMemcpy(b->d_x, hx.data(), hx.size() * 2, cudaMemcpyHostToDevice));
        DD_TRY_CU(cudaMalloc((void **)&b->d_y, (size_t)b->n_x * s->d_out * 2));
        /* the layer object, created from copy 0 (host staging), then pointed at the copies */
        std::vector<uint8_t> hq(b->copy_bytes);
        DD_TRY_CU(cudaStreamSynchronize(b->stream));
        DD_TRY_CU(cudaMemcpy(hq.data(), b->d_copies, b->copy_bytes, cudaMemcpyDeviceToHost));
        std::vector<uint16_t> hrs((size_t)s->d_out);
        for (auto &v : hrs) v = dd_float_to_half(0.0005f + 0.002f * (splitmix(&rs) >> 40) / 16777216.f);
        DD_TRY(dd_cuda_layer_create(s, hq.data(), (const uint16_t *)(hq.data() + b->q_bytes),
                                 (const uint16_t *)(hq.data() + b->q_bytes + b->g_bytes),
                                 b->h_rcodes, hrs.data(), thr.data(), &b->layer));
        DD_TRY(dd_cuda_workspace_create(b->layer->device, s->d_in, s->d_out, &b->ws));
    }
    *out = b;
    return DD_OK;
fail:
    dd_cuda_bench_destroy(b);
    return st;
}

extern "C" dd_status dd_cuda_bench_info(const dd_cuda_bench *b, size_t *layer_bytes, int *n_copies,
                                        int *n_sm) {
    if (!b) return DD_ERR_INVALID_ARGUMENT;
    if (layer_bytes) *layer_bytes = b->copy_bytes;
    if (n_copies) *n_copies = b->n_copies;
    if (n_sm) *n_sm = b->n_sm;
    return DD_OK;
}

/* The session's layer with the weight pointers of copy c: a shallow copy valid for one call
 * (the layer object itself is never modified; only the original is destroyed). */
static dd_cuda_layer layer_view(const dd_cuda_bench *b, int c) {
    dd_cuda_layer v = *b->layer;
    const uint8_t *base = b->d_copies + (size_t)c * b->copy_bytes;
    v.d_qweight = base;
    v.d_scales = (const uint16_t *)(base + b->q_bytes);
    v.d_zeros = (const uint16_t *)(base + b->q_bytes + b->g_bytes);
    for (void *&p : v.own_dev) p = NULL;
    v.own_thresholds = NULL;
    return v;
}

static dd_status enqueue_call(dd_cuda_bench *b, int mode, int i, const dd_cuda_run *run) {
    const int c = i % b->n_copies, xi = i % b->n_x;
    const dd_cuda_layer L = layer_view(b, c);
    const dd_cuda_variant *v = &run->variant;
    const uint16_t *x = b->d_x + (size_t)xi * b->shape.d_in;
    uint16_t *y = b->d_y + (size_t)xi * b->shape.d_out;
    switch (mode) {
    case DD_BENCH_BASE:
        return dd_cuda_gemv_base_v(&b->shape, L.d_qweight, L.d_scales, L.d_zeros, x, y, 0, 0, v, b->stream);
    case DD_BENCH_BASE_RESERVED:
        return dd_cuda_gemv_base_v(&b->shape, L.d_qweight, L.d_scales, L.d_zeros, x, y, 0,
                                   std::max(1, b->n_sm - run->n_tb), v, b->stream);
    case DD_BENCH_FUSED:
    case DD_BENCH_SERIAL:
    case DD_BENCH_FUSED_FULL:
    case DD_BENCH_FORKJOIN:
        return dd_cuda_layer_forward(&L, run, b->ws, x, y, 1, 0, b->stream);
    case DD_BENCH_READ:
        return launch_read(L.d_qweight, b->copy_bytes, b->n_sm, b->d_sink, b->stream);
    case DD_BENCH_DEC_ONLY: {
        dd_fused_dec dec;
        memset(&dec, 0, sizeof dec);
        dec.rcodes = L.rcodes_dev;
        dec.rscales = L.d_rscales;
        dec.cell = b->ws->d_cell;
        dec.ticket = reinterpret_cast<unsigned *>(b->ws->d_cell + b->ws->max_d_out);
        memcpy(dec.floors_half, run->floors_half, sizeof dec.floors_half);
        dec.k_chunk = run->k_chunk;
        dec.n_tb = run->n_tb;
        return dd_cuda_fused_launch(&b->shape, L.d_qweight, L.d_scales, L.d_zeros, &dec, v, x, y, 0,
                                    b->stream);
    }
    case DD_BENCH_EMPTY:
        empty_kernel<<<1, 32, 0, b->stream>>>();
        DD_CK_LAUNCH("empty_kernel");
        return DD_OK;
    case DD_BENCH_DEC_LEGACY: {
        dd_status st = dd_cuda_select_floors(b->shape.d_in, x, run->floors, run->k_chunk, b->ws->d_idx,
                                             b->ws->d_xsel, run->n_tb, b->stream);
        if (st != DD_OK) return st;
        return dd_cuda_dec_fetch(&b->shape, L.rcodes_dev, L.d_rscales, b->ws->d_idx, b->ws->d_xsel,
                                 run->k_total, run->n_tb, y, b->stream);
    }
    }
    return DD_ERR_INVALID_ARGUMENT;
}

extern "C" dd_status dd_cuda_bench_run(dd_cuda_bench *b, int mode, int32_t k_chunk, int32_t n_tb,
                                       const dd_cuda_variant *variant, int iters, int reps,
                                       double *us_per_call) {
    if (!b || !us_per_call || iters < 1 || reps < 1) return DD_ERR_INVALID_ARGUMENT;
    if (mode < DD_BENCH_BASE || mode > DD_BENCH_EMPTY) return DD_ERR_INVALID_ARGUMENT;
    /* modes without DEC ignore n_tb (any value; their run gets the default) */
    const bool uses_n_tb = mode == DD_BENCH_FUSED || mode == DD_BENCH_SERIAL || mode == DD_BENCH_DEC_ONLY ||
                           mode == DD_BENCH_BASE_RESERVED || mode == DD_BENCH_FORKJOIN ||
                           mode == DD_BENCH_DEC_LEGACY || mode == DD_BENCH_FUSED_FULL;
    dd_cuda_variant v;
    memset(&v, 0, sizeof v);
    if (variant) v = *variant;
    if (mode == DD_BENCH_FUSED_FULL) v.base_sm = b->n_sm; /* base grid for every SM */
    const int32_t path = mode == DD_BENCH_SERIAL ? DD_PATH_SERIAL
                         : mode == DD_BENCH_FORKJOIN ? DD_PATH_FORKJOIN : DD_PATH_FUSED;
    dd_cuda_run run;
    dd_status st = dd_cuda_run_init(b->layer, k_chunk, uses_n_tb ? n_tb : dd_n_tb_default(b->n_sm), path,
                                    &v, &run);
    if (st != DD_OK) return st;
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    std::vector<float> ms;
    DD_CK(cudaStreamBeginCapture(b->stream, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < iters; i++) {
        st = enqueue_call(b, mode, i, &run);
        if (st != DD_OK) {
            if (cudaStreamEndCapture(b->stream, &graph) == cudaSuccess && graph) cudaGraphDestroy(graph);
            (void)cudaGetLastError();
            return st;
        }
    }
    DD_CK(cudaStreamEndCapture(b->stream, &graph));
    st = DD_CU(cudaGraphInstantiate(&exec, graph, 0));
    cudaGraphDestroy(graph);
    if (st != DD_OK) return st;
    for (int r = 0; r < reps + 2 && st == DD_OK; r++) {
        float t = 0;
        st = DD_CU(cudaEventRecord(b->e0, b->stream));
        if (st == DD_OK) st = DD_CU(cudaGraphLaunch(exec, b->stream));
        if (st == DD_OK) st = DD_CU(cudaEventRecord(b->e1, b->stream));
        if (st == DD_OK) st = DD_CU(cudaEventSynchronize(b->e1));
        if (st == DD_OK) st = DD_CU(cudaEventElapsedTime(&t, b->e0, b->e1));
        if (st == DD_OK && r >= 2) ms.push_back(t); /* two warm-up replays */
    }
    cudaGraphExecDestroy(exec);
    if (st != DD_OK) return st;
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
    DD_TRY_CU(cudaMalloc(&d, bytes));
    DD_TRY_CU(cudaMalloc((void **)&sink, 4));
    DD_TRY_CU(cudaMemset(d, 1, bytes));
    DD_TRY(pinned_alloc(&h, zc_bytes));
    memset(h, 1, zc_bytes);
    DD_TRY_CU(cudaHostGetDevicePointer(&hd, h, 0));
    DD_TRY_CU(cudaEventCreate(&e0));
    DD_TRY_CU(cudaEventCreate(&e1));
    for (int it = 0; it < 2; it++) stream_read<<<n_sm * 8, 256>>>((const uint4 *)d, bytes / 16, sink);
    DD_TRY_CU(cudaEventRecord(e0));
    for (int it = 0; it < 10; it++) stream_read<<<n_sm * 8, 256>>>((const uint4 *)d, bytes / 16, sink);
    DD_TRY_CU(cudaGetLastError());
    DD_TRY_CU(cudaEventRecord(e1));
    DD_TRY_CU(cudaEventSynchronize(e1));
    DD_TRY_CU(cudaEventElapsedTime(&ms, e0, e1));
    *hbm_gbs = 10.0 * bytes / (ms * 1e6);
    stream_read<<<zero_copy_blocks * 2, 256>>>((const uint4 *)hd, zc_bytes / 16 / 8, sink);
    DD_TRY_CU(cudaGetLastError());
    DD_TRY_CU(cudaEventRecord(e0));
    stream_read<<<zero_copy_blocks * 2, 256>>>((const uint4 *)hd, zc_bytes / 16, sink);
    DD_TRY_CU(cudaGetLastError());
    DD_TRY_CU(cudaEventRecord(e1));
    DD_TRY_CU(cudaEventSynchronize(e1));
    DD_TRY_CU(cudaEventElapsedTime(&ms, e0, e1));
    *zero_copy_gbs = zc_bytes / (ms * 1e6);
    DD_TRY_CU(cudaEventRecord(e0));
    DD_TRY_CU(cudaMemcpyAsync(d, h, zc_bytes, cudaMemcpyHostToDevice, 0));
    DD_TRY_CU(cudaEventRecord(e1));
    DD_TRY_CU(cudaEventSynchronize(e1));
    DD_TRY_CU(cudaEventElapsedTime(&ms, e0, e1));
    *h2d_gbs = zc_bytes / (ms * 1e6);
fail:
    if (e0) cudaEventDestroy(e0);
    if (e1) cudaEventDestroy(e1);
    dd_host_free(h, 1);
    cudaFree(d);
    cudaFree(sink);
    (void)cudaGetLastError();
    return st;
}
