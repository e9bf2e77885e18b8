/*
 * Issue 9 probe: what limits the base GEMV on the H200 -- the access pattern or the math?
 *   gemv_probe access        plain reads of a Llama-shaped weight matrix's bytes in the access
 *                            patterns of the GEMV kernels, no math (graph-captured, rotated past L2)
 *   gemv_probe one DIN DOUT BITS KERNEL [N]
 *                            N launches of the library's base GEMV (kernel 0 or 1) for ncu
 * Build: nvcc -O3 -std=c++17 -arch=sm_90 -Icsrc bench/micro/gemv_probe.cu csrc/cuda/dd_cuda_*.cu <cpu objs>
 * (bench/micro/run_probe.sh).  Measurement only: nothing here is library code.
 */
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <vector>
#include <algorithm>

#include "../../csrc/cuda/dd_cuda.h"

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("CUDA %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); exit(1); } } while (0)

__device__ unsigned g_sink;

/* grid-linear stream (the ceiling): every thread 4 x 16 B in flight */
__global__ void __launch_bounds__(256) p_linear(const uint4 *__restrict__ p, size_t n) {
    uint32_t acc = 0;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n; i += 4 * stride) {
        const uint4 a = __ldcs(p + i), b = __ldcs(p + i + stride), c = __ldcs(p + i + 2 * stride), d = __ldcs(p + i + 3 * stride);
        acc ^= a.x ^ b.y ^ c.z ^ d.w;
    }
    for (; i < n; i += stride) acc ^= __ldcs(p + i).x;
    if (acc == 0x9e3779b9u) atomicAdd(&g_sink, 1u);
}

/* row pattern: L lanes per row, each lane 16 B chunks pl, pl + L, ...; a warp owns (32 / L) * R
 * rows at once (row groups strided over all warps, like kernel 0); D chunks per row in flight */
template <int L, int R, int D>
__global__ void __launch_bounds__(256) p_rows(const uint8_t *__restrict__ base, int d_out, int row_bytes) {
    const int lane = threadIdx.x & 31, warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int n_warps = gridDim.x * blockDim.x / 32;
    const int sub = lane / L, pl = lane % L;
    constexpr int RPW = (32 / L) * R;
    const int n_chunks = row_bytes / 16;
    uint32_t acc = 0;
    for (int rg = warp; rg * RPW < d_out; rg += n_warps) {
        const int r0 = rg * RPW + sub * R;
        for (int c = pl; c < n_chunks; c += L * D) {
            uint4 v[D][R];
#pragma unroll
            for (int d = 0; d < D; d++)
#pragma unroll
                for (int r = 0; r < R; r++) {
                    const int cc = c + d * L;
                    v[d][r] = cc < n_chunks ? __ldcs(reinterpret_cast<const uint4 *>(base + (size_t)(r0 + r) * row_bytes) + cc)
                                            : make_uint4(0, 0, 0, 0);
                }
#pragma unroll
            for (int d = 0; d < D; d++)
#pragma unroll
                for (int r = 0; r < R; r++) acc ^= v[d][r].x ^ v[d][r].w;
        }
    }
    if (acc == 0x9e3779b9u) atomicAdd(&g_sink, 1u);
}

/* slab pattern (a tiled format): warp w streams its own contiguous share, 512 B per step, D deep */
template <int D>
__global__ void __launch_bounds__(256) p_slab(const uint4 *__restrict__ p, size_t n) {
    const int lane = threadIdx.x & 31, warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const size_t n_warps = gridDim.x * blockDim.x / 32;
    const size_t per = (n / 32 + n_warps - 1) / n_warps * 32; /* uint4s per warp */
    const size_t lo = warp * per, hi = lo + per < n ? lo + per : n;
    uint32_t acc = 0;
    for (size_t i = lo + lane; i < hi; i += 32 * D) {
        uint4 v[D];
#pragma unroll
        for (int d = 0; d < D; d++) v[d] = i + 32 * d < hi ? __ldcs(p + i + 32 * d) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int d = 0; d < D; d++) acc ^= v[d].x ^ v[d].w;
    }
    if (acc == 0x9e3779b9u) atomicAdd(&g_sink, 1u);
}

struct Buf {
    uint8_t *d = nullptr;
    size_t bytes = 0, copy = 0;
    int copies = 0;
};

/* graph of `iters` launches over rotating copies; median of reps, microseconds per launch */
template <class F>
static double timeit(const Buf &B, int iters, int reps, F launch) {
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < iters; i++) launch(B.d + (size_t)(i % B.copies) * B.copy, st);
    CK(cudaStreamEndCapture(st, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));
    CK(cudaGraphLaunch(ge, st));
    CK(cudaStreamSynchronize(st));
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    std::vector<double> t;
    for (int r = 0; r < reps; r++) {
        CK(cudaEventRecord(a, st));
        CK(cudaGraphLaunch(ge, st));
        CK(cudaEventRecord(b, st));
        CK(cudaEventSynchronize(b));
        float ms;
        CK(cudaEventElapsedTime(&ms, a, b));
        t.push_back(ms * 1e3 / iters);
    }
    CK(cudaGetLastError());
    std::sort(t.begin(), t.end());
    cudaGraphExecDestroy(ge);
    cudaGraphDestroy(g);
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    cudaStreamDestroy(st);
    return t[t.size() / 2];
}

static int n_sm;

template <int L, int R, int D>
static double t_rows(const Buf &B, int d_out, int row_bytes, int per_sm) {
    return timeit(B, 100, 7, [&](uint8_t *p, cudaStream_t st) {
        p_rows<L, R, D><<<n_sm * per_sm, 256, 0, st>>>(p, d_out, row_bytes);
    });
}

static int run_access() {
    struct { int d_in, d_out, bits; } shapes[] = {{8192, 28672, 3}, {8192, 28672, 4}, {14336, 4096, 3}, {4096, 14336, 3}, {4096, 4096, 4}};
    for (auto &s : shapes) {
        const int row_bytes = s.d_in * s.bits / 8;
        Buf B;
        B.copy = ((size_t)row_bytes * s.d_out + 4095) / 4096 * 4096;
        B.copies = (int)std::max<size_t>(2, (size_t)(400 << 20) / B.copy + 1);
        B.bytes = B.copy * B.copies;
        CK(cudaMalloc(&B.d, B.bytes));
        CK(cudaMemset(B.d, 0x5a, B.bytes));
        const size_t n4 = (size_t)row_bytes * s.d_out / 16;
        const double mb = (double)row_bytes * s.d_out / 1e6;
        auto gbs = [&](double us) { return mb * 1e6 / (us * 1e3) / 1e3; }; /* GB/s -> TB/s below */
        const double lin = timeit(B, 100, 7, [&](uint8_t *p, cudaStream_t st) { p_linear<<<n_sm * 8, 256, 0, st>>>((const uint4 *)p, n4); });
        const double slab4 = timeit(B, 100, 7, [&](uint8_t *p, cudaStream_t st) { p_slab<4><<<n_sm * 4, 256, 0, st>>>((const uint4 *)p, n4); });
        const double slab8 = timeit(B, 100, 7, [&](uint8_t *p, cudaStream_t st) { p_slab<8><<<n_sm * 2, 256, 0, st>>>((const uint4 *)p, n4); });
        printf("ACCESS %5d x %5d %db (%.1f MB, rows of %d B): linear %.2f us (%.2f TB/s) | slab D4 x4/SM %.2f (%.2f) | slab D8 x2/SM %.2f (%.2f)\n",
               s.d_in, s.d_out, s.bits, mb, row_bytes, lin, gbs(lin), slab4, gbs(slab4), slab8, gbs(slab8));
        struct { const char *name; double t; } v[] = {
            {"L32 R1 D1 x8", t_rows<32, 1, 1>(B, s.d_out, row_bytes, 8)},
            {"L32 R2 D1 x3", t_rows<32, 2, 1>(B, s.d_out, row_bytes, 3)},
            {"L32 R2 D2 x3", t_rows<32, 2, 2>(B, s.d_out, row_bytes, 3)},
            {"L32 R2 D4 x2", t_rows<32, 2, 4>(B, s.d_out, row_bytes, 2)},
            {"L32 R1 D4 x4", t_rows<32, 1, 4>(B, s.d_out, row_bytes, 4)},
            {"L32 R1 D4 x8", t_rows<32, 1, 4>(B, s.d_out, row_bytes, 8)},
            {"L8  R1 D4 x4", t_rows<8, 1, 4>(B, s.d_out, row_bytes, 4)},
            {"L4  R1 D4 x4", t_rows<4, 1, 4>(B, s.d_out, row_bytes, 4)},
            {"L4  R2 D2 x4", t_rows<4, 2, 2>(B, s.d_out, row_bytes, 4)},
            {"L4  R1 D8 x2", t_rows<4, 1, 8>(B, s.d_out, row_bytes, 2)},
        };
        for (auto &x : v) printf("ACCESS   rows %s: %.2f us (%.2f TB/s, %.0f%% of linear)\n", x.name, x.t, gbs(x.t), 100 * lin / x.t);
        fflush(stdout);
        CK(cudaFree(B.d));
    }
    return 0;
}

/* N launches of the library's base GEMV on one shape (for ncu: --kernel-name regex:gemv) */
static int run_one(int d_in, int d_out, int bits, int kernel, int n) {
    dd_shape s = {d_in, d_out, bits, 128};
    dd_cuda_bench *b;
    if (dd_cuda_bench_create(&s, 0, 7, &b) != DD_OK) { printf("bench_create failed: %s\n", dd_cuda_last_error()); return 1; }
    dd_cuda_variant v = {};
    v.base_kernel = kernel;
    double t;
    if (dd_cuda_bench_run(b, DD_BENCH_BASE, 0, 0, &v, n, 1, &t) != DD_OK) { printf("run failed: %s\n", dd_cuda_last_error()); return 1; }
    printf("ONE %d x %d %db kernel %d: %.2f us\n", d_in, d_out, bits, kernel, t);
    dd_cuda_bench_destroy(b);
    return 0;
}

int main(int argc, char **argv) {
    CK(cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, 0));
    if (argc > 1 && !strcmp(argv[1], "access")) return run_access();
    if (argc > 5 && !strcmp(argv[1], "one"))
        return run_one(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]), atoi(argv[5]), argc > 6 ? atoi(argv[6]) : 5);
    printf("usage: gemv_probe access | one DIN DOUT BITS KERNEL [N]\n");
    return 2;
}
