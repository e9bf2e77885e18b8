/*
 * Standalone GPU check + benchmark of the CUDA backend against the CPU backend (the oracle).
 *   ./cuda_harness test          correctness (exit 1 on any failure)
 *   ./cuda_harness bench [quick] timing table (JSON lines on stdout, prefixed "JSON ")
 *   ./cuda_harness k2cmp [quick] base kernel 2 beside kernel 0 on the six Llama shapes
 *   ./cuda_harness k2race        base kernel 2 on small shapes (for compute-sanitizer)
 * Build: see csrc/cuda/tests/run_gpu.sh.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vector>
#include <algorithm>

#include <thread>

#include "../dd_cuda_internal.cuh" /* the public API plus the one error helper set (DD_CU) */

static int g_fail = 0;
static int g_n_sm = 0; /* multiprocessors of device 0 */
#define CHECK(cond, ...) do { if (!(cond)) { printf("FAIL %s:%d: ", __FILE__, __LINE__); printf(__VA_ARGS__); printf("\n"); g_fail++; } } while (0)
#define OK(call) do { dd_status s_ = (call); if (s_ != DD_OK) { printf("FAIL %s -> %s | %s\n", #call, dd_strerror(s_), dd_cuda_last_error()); exit(1); } } while (0)

static uint64_t rng = 12345;
static uint64_t nexti() { uint64_t z = (rng += 0x9E3779B97F4A7C15ull); z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull; z = (z ^ (z >> 27)) * 0x94D049BB133111EBull; return z ^ (z >> 31); }
static float unif() { return (nexti() >> 40) / 16777216.f; }
static float gaussf() { float a = 0; for (int i = 0; i < 6; i++) a += unif(); return (a - 3.f) * 1.41421356f; }

struct Layer {
    dd_shape s;
    std::vector<uint8_t> q;
    std::vector<uint16_t> sc, zr, rs;
    std::vector<float> thr;
    uint8_t *rc = nullptr; /* pinned */
    size_t rc_bytes = 0;
};

static void make_layer(Layer &L, int d_in, int d_out, int bits, int gs, float outlier) {
    L.s = {d_in, d_out, bits, gs};
    const size_t rb = dd_qweight_row_bytes(&L.s);
    const int ng = dd_num_groups(&L.s);
    L.q.resize(rb * d_out);
    for (auto &v : L.q) v = (uint8_t)nexti(); /* padded codes too: they must be ignored */
    L.sc.resize((size_t)ng * d_out);
    L.zr.resize((size_t)ng * d_out);
    for (auto &v : L.sc) v = dd_float_to_half(0.002f + 0.02f * unif());
    for (auto &v : L.zr) v = dd_float_to_half(unif() * ((1 << bits) - 1));
    L.rs.resize(d_out);
    for (auto &v : L.rs) v = dd_float_to_half(0.001f + 0.004f * unif());
    L.rc_bytes = (size_t)d_in * d_out / 2;
    OK(dd_cuda_host_alloc_mapped((void **)&L.rc, L.rc_bytes));
    for (size_t i = 0; i < L.rc_bytes; i++) {
        uint8_t lo = 1 + nexti() % 15, hi = 1 + nexti() % 15;
        L.rc[i] = lo | (hi << 4);
    }
    L.thr.assign(d_in, 0.f);
    for (int t = 0; t < 24; t++) {
        std::vector<float> ax(d_in);
        for (int j = 0; j < d_in; j++) ax[j] = fabsf(gaussf() * ((j % 61) == 0 ? outlier : 1.f));
        std::sort(ax.begin(), ax.end(), [](float a, float b) { return a > b; });
        for (int j = 0; j < d_in; j++) L.thr[j] = std::max(L.thr[j], ax[j]);
    }
}

static void make_x(std::vector<uint16_t> &h, std::vector<float> &f, int n, float outlier, int coarse, int n_nan) {
    h.resize(n); f.resize(n);
    for (int j = 0; j < n; j++) {
        float v = gaussf() * ((j % 61) == 0 ? outlier : 1.f);
        if (coarse) v = roundf(v * 2.f) / 2.f; /* many exact ties */
        h[j] = dd_float_to_half(v);
    }
    for (int k = 0; k < n_nan; k++) h[nexti() % n] = 0x7E00;
    for (int j = 0; j < n; j++) f[j] = dd_half_to_float(h[j]);
}

static double rel_err(const std::vector<float> &a, const std::vector<float> &ref, int *nonfinite) {
    double num = 0, den = 0;
    *nonfinite = 0;
    for (size_t i = 0; i < a.size(); i++) {
        if (!std::isfinite(a[i])) { (*nonfinite)++; continue; }
        num += ((double)a[i] - ref[i]) * ((double)a[i] - ref[i]);
        den += (double)ref[i] * ref[i];
    }
    return sqrt(num / (den > 0 ? den : 1));
}

static std::vector<float> download_half(const uint16_t *d, size_t n) {
    std::vector<uint16_t> h(n);
    OK(dd_cuda_memcpy(h.data(), d, n * 2, 1, NULL, 1));
    std::vector<float> f(n);
    for (size_t i = 0; i < n; i++) f[i] = dd_half_to_float(h[i]);
    return f;
}

static int n_tb_cap(int want) { return std::min(want, dd_n_tb_max(g_n_sm)); }

static dd_cuda_run make_run(const dd_cuda_layer *G, int kc, int n_tb, int path, const dd_cuda_variant *var) {
    dd_cuda_run r;
    OK(dd_cuda_run_init(G, kc, n_tb_cap(n_tb), path, var, &r));
    return r;
}

/* CPU oracle of a whole layer call for T tokens */
static std::vector<float> cpu_forward(const Layer &L, int kc, const std::vector<float> &fx, int T) {
    std::vector<float> cy((size_t)T * L.s.d_out);
    OK(dd_cpu_forward(&L.s, L.q.data(), L.sc.data(), L.zr.data(), L.rc, L.rs.data(), L.thr.data(), kc,
                      DD_SELECT_BUCKET, fx.data(), T, cy.data()));
    return cy;
}

static void test_layer(int d_in, int d_out, int bits, int gs, const dd_cuda_variant *var = nullptr) {
    Layer L;
    make_layer(L, d_in, d_out, bits, gs, 12.f);
    dd_cuda_layer *G = nullptr;
    OK(dd_cuda_layer_create(&L.s, L.q.data(), L.sc.data(), L.zr.data(), L.rc, L.rs.data(), L.thr.data(), &G));
    dd_cuda_workspace *W = nullptr;
    OK(dd_cuda_workspace_create(dd_cuda_layer_device(G), d_in, d_out, &W));
    const int T = 3;
    std::vector<uint16_t> hx, hxt; std::vector<float> fx, fxt;
    for (int t = 0; t < T; t++) { make_x(hxt, fxt, d_in, 12.f, 0, 0); hx.insert(hx.end(), hxt.begin(), hxt.end()); fx.insert(fx.end(), fxt.begin(), fxt.end()); }
    uint16_t *dx, *dy;
    OK(dd_cuda_malloc((void **)&dx, hx.size() * 2));
    OK(dd_cuda_malloc((void **)&dy, (size_t)T * d_out * 2));
    OK(dd_cuda_memcpy(dx, hx.data(), hx.size() * 2, 0, NULL, 1));
    const int kcs[] = {0, 1, 8, 13, 64, 1024};
    for (int kc : kcs) {
        std::vector<float> cy = cpu_forward(L, kc, fx, T);
        for (int path = 0; path < 3; path++) { /* fused, serial, fork/join */
            for (int n_tb : {1, 16}) {
                const dd_cuda_run R = make_run(G, kc, n_tb, path, var);
                OK(dd_cuda_memset(dy, 0xFF, (size_t)T * d_out * 2, NULL)); /* NaN poison */
                OK(dd_cuda_layer_forward(G, &R, W, dx, dy, T, 0, NULL));
                OK(dd_cuda_device_synchronize());
                std::vector<float> gy = download_half(dy, (size_t)T * d_out);
                int nf = 0;
                double e = rel_err(gy, cy, &nf);
                CHECK(nf == 0 && e < 2e-3, "forward %dx%d b%d g%d k%d path%d ntb%d: rel err %.2e, %d unwritten/non-finite", d_in, d_out, bits, gs, kc, path, R.n_tb, e, nf);
                if (path == 0 && n_tb == 16) printf("forward %5d->%-5d bits %d g%3d k_chunk %4d: rel err vs CPU %.2e\n", d_in, d_out, bits, gs, kc, e);
                /* accumulate: y = y0 + layer(x) */
                if (path == 0 && n_tb == 16) {
                    std::vector<uint16_t> y0((size_t)T * d_out);
                    std::vector<float> f0(y0.size()), ca(cy);
                    for (size_t i = 0; i < y0.size(); i++) { y0[i] = dd_float_to_half(gaussf()); f0[i] = dd_half_to_float(y0[i]); }
                    OK(dd_cuda_memcpy(dy, y0.data(), y0.size() * 2, 0, NULL, 1));
                    OK(dd_cuda_layer_forward(G, &R, W, dx, dy, T, 1, NULL));
                    std::vector<float> ga = download_half(dy, y0.size());
                    for (size_t i = 0; i < y0.size(); i++) ca[i] += f0[i];
                    e = rel_err(ga, ca, &nf);
                    CHECK(nf == 0 && e < 2e-3, "accumulate %dx%d k%d: rel err %.2e", d_in, d_out, kc, e);
                }
            }
        }
    }
    /* selection: identical to the CPU's, with ties and NaNs, through both select kernels (the
     * fused kernel's warp selection and the fork/join block selection) */
    for (int kc : {1, 3, 8, 16, 100, 1024}) {
        for (int path : {DD_PATH_FUSED, DD_PATH_FORKJOIN}) {
            const dd_cuda_run R = make_run(G, kc, 16, path, var);
            for (int trial = 0; trial < 4; trial++) {
                std::vector<uint16_t> h; std::vector<float> f;
                make_x(h, f, d_in, 12.f, trial & 1, trial >= 2 ? 5 + d_in / 50 : 0);
                OK(dd_cuda_memcpy(dx, h.data(), h.size() * 2, 0, NULL, 1));
                const int kt = dd_total_quota(d_in, kc);
                CHECK(kt == R.k_total, "run k_total %d vs dd_total_quota %d", R.k_total, kt);
                if (kt == 0) continue;
                std::vector<int32_t> gi(kt), ci(kt);
                int32_t gn = 0, cn = 0;
                OK(dd_cuda_layer_select(G, &R, W, dx, gi.data(), &gn, NULL));
                OK(dd_cpu_select(f.data(), d_in, L.thr.data(), kc, DD_SELECT_BUCKET, ci.data(), &cn));
                /* GPU pads per chunk with -1; compact before comparing */
                std::vector<int32_t> gc;
                for (int v : gi) if (v >= 0) gc.push_back(v);
                bool same = gn == cn && (int)gc.size() == cn && std::equal(gc.begin(), gc.end(), ci.begin());
                for (int v : gc) if (v >= 0 && v < d_in && h[v] == 0x7E00) same = false;
                CHECK(same, "select %d k%d path %d trial %d: gpu %d vs cpu %d indices differ", d_in, kc, path, trial, gn, cn);
            }
        }
    }
    /* graph capture of whole layer calls.  Capture mode GLOBAL: any unsafe CUDA call made during
     * the capture (by this thread or another) invalidates it -- in particular dd_cuda_run_init
     * between the captured calls must make none (it is host-only). */
    {
        OK(dd_cuda_memcpy(dx, hx.data(), hx.size() * 2, 0, NULL, 1));
        uint16_t *dy2;
        OK(dd_cuda_malloc((void **)&dy2, (size_t)T * d_out * 2));
        cudaStream_t st;
        OK(DD_CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking)));
        cudaGraph_t g; cudaGraphExec_t ge;
        dd_cuda_run R = make_run(G, 8, 16, DD_PATH_FUSED, var);
        OK(DD_CU(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal)));
        OK(dd_cuda_layer_forward(G, &R, W, dx, dy, T, 0, st));
        OK(dd_cuda_run_init(G, 16, n_tb_cap(8), DD_PATH_FUSED, var, &R)); /* settings change mid-capture */
        cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
        OK(DD_CU(cudaStreamIsCapturing(st, &cs)));
        CHECK(cs == cudaStreamCaptureStatusActive, "run_init invalidated the capture (status %d)", (int)cs);
        OK(dd_cuda_layer_forward(G, &R, W, dx, dy2, T, 0, st));
        CHECK(cudaStreamEndCapture(st, &g) == cudaSuccess, "capture");
        CHECK(cudaGraphInstantiate(&ge, g, 0) == cudaSuccess, "instantiate");
        /* the captured calls keep the settings they were captured with */
        OK(dd_cuda_run_init(G, 1, 1, DD_PATH_FORKJOIN, NULL, &R));
        /* many back-to-back replays: the row-group tickets must be back at zero after each (a
         * counter left over would skip rows, which the NaN poison before the last replay shows) */
        for (int r = 0; r < 40; r++) CHECK(cudaGraphLaunch(ge, st) == cudaSuccess, "launch");
        OK(dd_cuda_memset(dy, 0xFF, (size_t)T * d_out * 2, st));
        OK(dd_cuda_memset(dy2, 0xFF, (size_t)T * d_out * 2, st));
        CHECK(cudaGraphLaunch(ge, st) == cudaSuccess, "launch");
        OK(DD_CU(cudaStreamSynchronize(st)));
        std::vector<float> gy = download_half(dy, (size_t)T * d_out), gy2 = download_half(dy2, (size_t)T * d_out);
        int nf; double e = rel_err(gy, cpu_forward(L, 8, fx, T), &nf);
        CHECK(nf == 0 && e < 2e-3, "graph replay (k 8) rel err %.2e nf %d", e, nf);
        e = rel_err(gy2, cpu_forward(L, 16, fx, T), &nf);
        CHECK(nf == 0 && e < 2e-3, "graph replay (k 16, run changed during capture) rel err %.2e nf %d", e, nf);
        cudaGraphExecDestroy(ge); cudaGraphDestroy(g); cudaStreamDestroy(st);
        dd_cuda_free(dy2);
    }
    dd_cuda_free(dx); dd_cuda_free(dy);
    OK(dd_cuda_workspace_destroy(W));
    OK(dd_cuda_layer_destroy(G));
    dd_cuda_host_free(L.rc);
}

/* Regression (issue 7): one layer called concurrently on two streams, each with its own workspace,
 * gives exactly what one stream gives (the fused path is deterministic: y = fp16(base + delta),
 * both fp32 sums in a fixed order).  Before v2 the meeting cells and the row-group tickets
 * lived in the layer and two streams corrupted each other's calls.  Then host threads: each
 * thread its own stream, workspace and run settings, all on one layer. */
static void test_concurrent(int d_in, int d_out, int bits, const dd_cuda_variant *var, int rounds = 50) {
    Layer L;
    make_layer(L, d_in, d_out, bits, 128, 12.f);
    dd_cuda_layer *G = nullptr;
    OK(dd_cuda_layer_create(&L.s, L.q.data(), L.sc.data(), L.zr.data(), L.rc, L.rs.data(), L.thr.data(), &G));
    const int dev = dd_cuda_layer_device(G);
    const int T = 4, kc = 8;
    std::vector<uint16_t> hx, hxt; std::vector<float> fx, fxt;
    for (int t = 0; t < T; t++) { make_x(hxt, fxt, d_in, 12.f, 0, 0); hx.insert(hx.end(), hxt.begin(), hxt.end()); fx.insert(fx.end(), fxt.begin(), fxt.end()); }
    const size_t ny = (size_t)T * d_out;
    uint16_t *dx, *dy0, *dy1, *dy2;
    OK(dd_cuda_malloc((void **)&dx, hx.size() * 2));
    OK(dd_cuda_memcpy(dx, hx.data(), hx.size() * 2, 0, NULL, 1));
    OK(dd_cuda_malloc((void **)&dy0, ny * 2)); OK(dd_cuda_malloc((void **)&dy1, ny * 2)); OK(dd_cuda_malloc((void **)&dy2, ny * 2));
    dd_cuda_workspace *W1, *W2;
    OK(dd_cuda_workspace_create(dev, d_in, d_out, &W1));
    OK(dd_cuda_workspace_create(dev, d_in, d_out, &W2));
    cudaStream_t s1, s2;
    OK(DD_CU(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking)));
    OK(DD_CU(cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking)));
    const dd_cuda_run R = make_run(G, kc, 16, DD_PATH_FUSED, var);
    CHECK(R.fused_ok, "concurrent test needs the fused path");
    /* reference: one stream, one workspace */
    OK(dd_cuda_layer_forward(G, &R, W1, dx, dy0, T, 0, s1));
    OK(DD_CU(cudaStreamSynchronize(s1)));
    const std::vector<uint16_t> ref = [&] { std::vector<uint16_t> h(ny); OK(dd_cuda_memcpy(h.data(), dy0, ny * 2, 1, NULL, 1)); return h; }();
    int nf; double e = rel_err(download_half(dy0, ny), cpu_forward(L, kc, fx, T), &nf);
    CHECK(nf == 0 && e < 2e-3, "concurrent reference vs CPU rel err %.2e nf %d", e, nf);
    int bad = 0;
    for (int rep = 0; rep < rounds; rep++) {
        OK(dd_cuda_memset(dy1, 0xFF, ny * 2, s1));
        OK(dd_cuda_memset(dy2, 0xFF, ny * 2, s2));
        for (int k = 0; k < 4; k++) { /* interleaved so the two streams' kernels overlap */
            OK(dd_cuda_layer_forward(G, &R, W1, dx, dy1, T, 0, s1));
            OK(dd_cuda_layer_forward(G, &R, W2, dx, dy2, T, 0, s2));
        }
        OK(DD_CU(cudaStreamSynchronize(s1)));
        OK(DD_CU(cudaStreamSynchronize(s2)));
        std::vector<uint16_t> h1(ny), h2(ny);
        OK(dd_cuda_memcpy(h1.data(), dy1, ny * 2, 1, NULL, 1));
        OK(dd_cuda_memcpy(h2.data(), dy2, ny * 2, 1, NULL, 1));
        bad += h1 != ref || h2 != ref;
    }
    CHECK(bad == 0, "two streams + two workspaces on one layer %dx%d b%d: %d of %d rounds differ from one stream", d_in, d_out, bits, bad, rounds);
    /* threads: each its own stream, workspace and k_chunk */
    {
        const int n_thr = 4;
        std::vector<int> errs(n_thr, 0);
        std::vector<std::thread> th;
        for (int i = 0; i < n_thr; i++)
            th.emplace_back([&, i] {
                const int k = 1 + 5 * i;
                dd_cuda_run r;
                dd_cuda_workspace *w = nullptr;
                cudaStream_t s = nullptr;
                uint16_t *y = nullptr;
                if (dd_cuda_set_device(dev) != DD_OK || dd_cuda_run_init(G, k, n_tb_cap(8), DD_PATH_FUSED, var, &r) != DD_OK ||
                    dd_cuda_workspace_create(dev, d_in, d_out, &w) != DD_OK || cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) != cudaSuccess ||
                    dd_cuda_malloc((void **)&y, ny * 2) != DD_OK) { errs[i] = -1; return; }
                for (int rep = 0; rep < (rounds + 1) / 2 && !errs[i]; rep++) {
                    if (dd_cuda_layer_forward(G, &r, w, dx, y, T, 0, s) != DD_OK) errs[i] = -2;
                }
                std::vector<uint16_t> h(ny);
                if (!errs[i] && dd_cuda_memcpy(h.data(), y, ny * 2, 1, s, 1) != DD_OK) errs[i] = -3;
                if (!errs[i]) {
                    std::vector<float> f(ny);
                    for (size_t j = 0; j < ny; j++) f[j] = dd_half_to_float(h[j]);
                    int nf2 = 0;
                    const double e2 = rel_err(f, cpu_forward(L, k, fx, T), &nf2);
                    if (!(nf2 == 0 && e2 < 2e-3)) errs[i] = 1;
                }
                dd_cuda_free(y);
                if (s) cudaStreamDestroy(s);
                dd_cuda_workspace_destroy(w);
            });
        for (auto &t : th) t.join();
        for (int i = 0; i < n_thr; i++) CHECK(errs[i] == 0, "thread %d (k_chunk %d) on a shared layer: error %d", i, 1 + 5 * i, errs[i]);
    }
    printf("concurrent %5d->%-5d bits %d: two streams + %d threads on one layer: %s\n", d_in, d_out, bits, 4, bad ? "DIFFER" : "identical");
    cudaStreamDestroy(s1); cudaStreamDestroy(s2);
    OK(dd_cuda_workspace_destroy(W1)); OK(dd_cuda_workspace_destroy(W2));
    dd_cuda_free(dx); dd_cuda_free(dy0); dd_cuda_free(dy1); dd_cuda_free(dy2);
    OK(dd_cuda_layer_destroy(G));
    dd_cuda_host_free(L.rc);
}

/* The v2 argument rules: run settings, workspace fit, n_tb and byte rules, quota closed form. */
static void test_api_rules() {
    Layer L;
    make_layer(L, 1000, 96, 4, 128, 4.f);
    dd_cuda_layer *G = nullptr;
    OK(dd_cuda_layer_create(&L.s, L.q.data(), L.sc.data(), L.zr.data(), L.rc, L.rs.data(), L.thr.data(), &G));
    const int n_sm = dd_cuda_layer_n_sm(G);
    CHECK(n_sm == g_n_sm, "layer n_sm %d vs device %d", n_sm, g_n_sm);
    CHECK(dd_cuda_layer_shape(G)->d_in == 1000 && dd_cuda_layer_shape(G)->d_out == 96, "layer shape");
    dd_cuda_run r;
    CHECK(dd_cuda_run_init(G, 8, 0, 0, NULL, &r) == DD_ERR_INVALID_ARGUMENT, "n_tb 0 rejected");
    CHECK(dd_cuda_run_init(G, 8, dd_n_tb_max(n_sm) + 1, 0, NULL, &r) == DD_ERR_INVALID_ARGUMENT, "n_tb > n_tb_max rejected");
    OK(dd_cuda_run_init(G, 8, dd_n_tb_max(n_sm), 0, NULL, &r));
    OK(dd_cuda_run_init(G, 8, dd_n_tb_default(n_sm), 0, NULL, &r));
    CHECK(dd_cuda_run_init(G, -1, 1, 0, NULL, &r) == DD_ERR_INVALID_ARGUMENT, "k_chunk -1 rejected");
    CHECK(dd_cuda_run_init(G, DD_CHUNK + 1, 1, 0, NULL, &r) == DD_ERR_INVALID_ARGUMENT, "k_chunk 1025 rejected");
    CHECK(dd_cuda_run_init(G, 8, 1, 3, NULL, &r) == DD_ERR_INVALID_ARGUMENT, "path 3 rejected");
    dd_cuda_variant v = {};
    v.layer_rows = 3;
    CHECK(dd_cuda_run_init(G, 8, 1, 0, &v, &r) == DD_ERR_INVALID_ARGUMENT, "layer_rows 3 rejected");
    v = {}; v.layer_mode = 4;
    CHECK(dd_cuda_run_init(G, 8, 1, 0, &v, &r) == DD_ERR_INVALID_ARGUMENT, "layer_mode 4 rejected");
    v = {}; v.base_sm = n_sm + 1;
    CHECK(dd_cuda_run_init(G, 8, 1, 0, &v, &r) == DD_ERR_INVALID_ARGUMENT, "base_sm > SMs rejected");
    OK(dd_cuda_run_init(G, 8, 1, 0, NULL, &r));
    CHECK(r.k_total == dd_total_quota(1000, 8) && r.fused_ok, "derived k_total %d fused_ok %d", r.k_total, r.fused_ok);
    /* a workspace too small or a tampered run is refused, never run */
    dd_cuda_workspace *w_small = nullptr, *w = nullptr;
    OK(dd_cuda_workspace_create(dd_cuda_layer_device(G), 999, 96, &w_small));
    OK(dd_cuda_workspace_create(dd_cuda_layer_device(G), 1000, 96, &w));
    uint16_t *dx, *dy;
    OK(dd_cuda_malloc((void **)&dx, 1000 * 2)); OK(dd_cuda_malloc((void **)&dy, 96 * 2));
    OK(dd_cuda_memset(dx, 0, 1000 * 2, NULL));
    CHECK(dd_cuda_layer_forward(G, &r, w_small, dx, dy, 1, 0, NULL) == DD_ERR_INVALID_ARGUMENT, "small workspace rejected");
    dd_cuda_run bad = r; bad.k_total += 1;
    CHECK(dd_cuda_layer_forward(G, &bad, w, dx, dy, 1, 0, NULL) == DD_ERR_INVALID_ARGUMENT, "tampered run rejected");
    bad = r; bad.n_tb = n_sm;
    CHECK(dd_cuda_layer_forward(G, &bad, w, dx, dy, 1, 0, NULL) == DD_ERR_INVALID_ARGUMENT, "run n_tb >= SMs rejected");
    OK(dd_cuda_layer_forward(G, &r, w, dx, dy, 1, 0, NULL));
    OK(dd_cuda_device_synchronize());
    dd_cuda_workspace *w_bad = nullptr;
    CHECK(dd_cuda_workspace_create(dd_cuda_layer_device(G), 0, 96, &w_bad) == DD_ERR_INVALID_ARGUMENT && !w_bad, "empty workspace rejected");
    OK(dd_cuda_workspace_destroy(w_small)); OK(dd_cuda_workspace_destroy(w));
    dd_cuda_free(dx); dd_cuda_free(dy);
    OK(dd_cuda_layer_destroy(G));
    dd_cuda_host_free(L.rc);
    /* n_tb rule and byte rules */
    CHECK(dd_n_tb_max(132) == 131 && dd_n_tb_default(132) == 16, "n_tb rule on 132 SMs");
    CHECK(dd_n_tb_max(16) == 15 && dd_n_tb_default(16) == 2, "n_tb rule on 16 SMs");
    CHECK(dd_n_tb_max(1) == 1 && dd_n_tb_default(1) == 1 && dd_n_tb_default(4) == 1, "n_tb rule on tiny GPUs");
    dd_shape s = {1100, 96, 4, 128};
    CHECK(dd_fetch_nbytes(&s, 8) == (size_t)(8 + 1) * 48, "fetch bytes");
    CHECK(dd_residual_nbytes(&s) == 1100 * 48, "residual bytes");
    CHECK(dd_weight_nbytes(&s) == 96 * dd_qweight_row_bytes(&s) + 4 * 96 * 9 + 4 * 1100 + 2 * 96, "weight bytes");
    /* the quota's closed form equals the defining sum */
    int mism = 0;
    for (int d_in = 1; d_in < 5000; d_in += 7)
        for (int k = 0; k <= DD_CHUNK; k += (k < 20 ? 1 : 37)) {
            int sum = 0;
            for (int c = 0; c < dd_num_chunks(d_in); c++) sum += dd_chunk_quota(d_in, c, k);
            mism += sum != dd_total_quota(d_in, k);
        }
    CHECK(mism == 0, "total quota closed form: %d mismatches", mism);
}

static void test_base_float64(int d_in, int d_out, int bits, int gs, float outlier, const dd_cuda_variant *var = nullptr) {
    /* base GEMV against a float64 reference, large activations included (no fp16 overflow) */
    Layer L;
    make_layer(L, d_in, d_out, bits, gs, 1.f);
    std::vector<uint16_t> hx; std::vector<float> fx;
    make_x(hx, fx, d_in, outlier, 0, 0);
    for (int j = 0; j < d_in; j += 37) { hx[j] = dd_float_to_half(3000.f * (j & 1 ? -1 : 1)); fx[j] = dd_half_to_float(hx[j]); }
    uint8_t *dq; uint16_t *ds, *dz, *dx, *dy;
    OK(dd_cuda_malloc((void **)&dq, L.q.size())); OK(dd_cuda_memcpy(dq, L.q.data(), L.q.size(), 0, NULL, 1));
    OK(dd_cuda_malloc((void **)&ds, L.sc.size() * 2)); OK(dd_cuda_memcpy(ds, L.sc.data(), L.sc.size() * 2, 0, NULL, 1));
    OK(dd_cuda_malloc((void **)&dz, L.zr.size() * 2)); OK(dd_cuda_memcpy(dz, L.zr.data(), L.zr.size() * 2, 0, NULL, 1));
    OK(dd_cuda_malloc((void **)&dx, d_in * 2)); OK(dd_cuda_memcpy(dx, hx.data(), d_in * 2, 0, NULL, 1));
    OK(dd_cuda_malloc((void **)&dy, d_out * 2));
    OK(dd_cuda_memset(dy, 0xFF, d_out * 2, NULL));
    OK(dd_cuda_gemv_base_v(&L.s, dq, ds, dz, dx, dy, 0, 0, var, NULL));
    std::vector<float> gy = download_half(dy, d_out), ref(d_out);
    /* float64 dequantised product */
    const int ng = dd_num_groups(&L.s);
    const size_t rb = dd_qweight_row_bytes(&L.s);
    const int pad = dd_d_in_pad(&L.s);
    for (int o = 0; o < d_out; o++) {
        double acc = 0;
        const uint8_t *row = &L.q[o * rb];
        for (int j = 0; j < d_in; j++) {
            int q;
            if (bits == 4) q = (row[j / 2] >> (4 * (j & 1))) & 15;
            else {
                const int lo = (row[j / 4] >> (2 * (j & 3))) & 3;
                const int hi = (row[pad / 4 + j / 8] >> (j & 7)) & 1;
                q = lo | (hi << 2);
            }
            const int g = j / gs;
            acc += (double)dd_half_to_float(L.sc[o * ng + g]) * (q - (double)dd_half_to_float(L.zr[o * ng + g])) * fx[j];
        }
        ref[o] = (float)acc;
    }
    int nf; double e = rel_err(gy, ref, &nf);
    /* fp16 output alone costs ~3e-4 */
    const int kern = var ? var->base_kernel : 0;
    CHECK(nf == 0 && e < 1.5e-3, "base kernel %d vs float64 %dx%d b%d g%d: rel err %.2e nf %d", kern, d_in, d_out, bits, gs, e, nf);
    printf("base k%d %5d->%-5d bits %d g%3d (|x| up to 3000): rel err vs float64 %.2e\n", kern, d_in, d_out, bits, gs, e);
    dd_cuda_free(dq); dd_cuda_free(ds); dd_cuda_free(dz); dd_cuda_free(dx); dd_cuda_free(dy);
    dd_cuda_host_free(L.rc);
}

/* Base kernel 2 (dd_cuda_variant.base_kernel = 1) against the CPU backend (dd_cpu_gemv_base):
 * every k-split (rule, 1, 2, 4, 8), store and accumulate, aligned and misaligned x (x + 1 element:
 * the staging's scalar path), NaN-poisoned y first so an unwritten output fails.  Also checks that
 * kernel 2 really ran (dd_cuda_gemv_k2_info: no silent fallback to kernel 0). */
static void test_base_k2(int d_in, int d_out, int bits, int gs, bool all_splits) {
    dd_shape s = {d_in, d_out, bits, gs};
    const size_t rb = dd_qweight_row_bytes(&s);
    const int ng = dd_num_groups(&s);
    std::vector<uint8_t> q(rb * d_out);
    for (auto &v : q) v = (uint8_t)nexti(); /* padded codes too: they must be ignored */
    std::vector<uint16_t> sc((size_t)ng * d_out), zr((size_t)ng * d_out);
    for (auto &v : sc) v = dd_float_to_half(0.002f + 0.02f * unif());
    for (auto &v : zr) v = dd_float_to_half(unif() * ((1 << bits) - 1));
    std::vector<uint16_t> hx; std::vector<float> fx;
    make_x(hx, fx, d_in, 12.f, 0, 0);
    std::vector<float> cy(d_out);
    OK(dd_cpu_gemv_base(&s, q.data(), sc.data(), zr.data(), fx.data(), 1, cy.data()));
    uint8_t *dq; uint16_t *ds, *dz, *dx, *dy;
    OK(dd_cuda_malloc((void **)&dq, q.size())); OK(dd_cuda_memcpy(dq, q.data(), q.size(), 0, NULL, 1));
    OK(dd_cuda_malloc((void **)&ds, sc.size() * 2)); OK(dd_cuda_memcpy(ds, sc.data(), sc.size() * 2, 0, NULL, 1));
    OK(dd_cuda_malloc((void **)&dz, zr.size() * 2)); OK(dd_cuda_memcpy(dz, zr.data(), zr.size() * 2, 0, NULL, 1));
    OK(dd_cuda_malloc((void **)&dx, (d_in + 8) * 2));
    OK(dd_cuda_malloc((void **)&dy, d_out * 2));
    /* 3-bit: the same codes in the FIELDS layout (decdec.h) for base_kernel 3 */
    uint8_t *dqf = nullptr;
    if (bits == 3) {
        std::vector<uint8_t> qf(q.size());
        OK(dd_repack_fields3(&s, q.data(), qf.data()));
        OK(dd_cuda_malloc((void **)&dqf, qf.size())); OK(dd_cuda_memcpy(dqf, qf.data(), qf.size(), 0, NULL, 1));
    }
    std::vector<uint16_t> y0(d_out);
    std::vector<float> ca(d_out);
    for (int i = 0; i < d_out; i++) { y0[i] = dd_float_to_half(gaussf()); ca[i] = cy[i] + dd_half_to_float(y0[i]); }
    double worst = 0;
    int runs = 0;
    for (int kr = 0; kr < 20; kr++) { /* kernel (2, 3 = FIELDS) x rows per lane (rule / 2) x k-split */
        const int kernel = kr < 10 ? 2 : 3, rows_split = kr % 10;
        if (kernel == 3 && bits != 3) continue;
        static const int kSplits[5] = {0, 1, 2, 4, 8};
        const int rows = rows_split < 5 ? 0 : 2, split = kSplits[rows_split % 5];
        if (!all_splits && split != 0) continue;
        dd_cuda_variant v = {};
        v.base_kernel = kernel;
        v.base_ksplit = split;
        v.base_rows = rows;
        uint8_t *dqk = kernel == 3 ? dqf : dq;
        int ks = 0, per_sm = 0; long blocks = 0, tiles = 0; size_t smem = 0;
        OK(dd_cuda_gemv_k2_info(&s, dq, ds, dz, 0, &v, &ks, &blocks, &tiles, &smem, &per_sm));
        /* kernel 2 is planned for group 128 only; group 64 must fall back to kernel 0 (still checked) */
        CHECK((ks != 0) == (gs == 128), "kernel 2 %s to %dx%d b%d g%d (smem %zu)", ks ? "applies" : "does not apply",
              d_in, d_out, bits, gs, smem);
        if (split && gs == 128) CHECK(ks == split, "kernel 2 k-split %d, asked %d", ks, split);
        if (split == 0)
            printf("k2 plan %5d->%-5d bits %d g%3d rows %d: ksplit %d, %ld blocks for %ld tiles, %d blocks/SM, smem %zu B\n",
                   d_in, d_out, bits, gs, rows ? rows : 4, ks, blocks, tiles, per_sm, smem);
        for (int off : {0, 1}) {
            if (off && split != 0) continue;
            OK(dd_cuda_memcpy(dx + off, hx.data(), d_in * 2, 0, NULL, 1));
            for (int acc : {0, 1}) {
                if (acc) OK(dd_cuda_memcpy(dy, y0.data(), d_out * 2, 0, NULL, 1));
                else OK(dd_cuda_memset(dy, 0xFF, d_out * 2, NULL)); /* NaN poison */
                /* group 64 falls back to kernel 0, which reads planar codes */
                OK(dd_cuda_gemv_base_v(&s, gs == 128 ? dqk : dq, ds, dz, dx + off, dy, acc, 0, &v, NULL));
                OK(dd_cuda_device_synchronize());
                std::vector<float> gy = download_half(dy, d_out);
                int nf = 0;
                const double e = rel_err(gy, acc ? ca : cy, &nf);
                CHECK(nf == 0 && e < 2e-3, "k%d %dx%d b%d g%d rows %d ksplit %d x+%d acc %d: rel err %.2e, %d unwritten/non-finite",
                      kernel, d_in, d_out, bits, gs, rows, ks, off, acc, e, nf);
                worst = std::max(worst, e);
                runs++;
            }
        }
    }
    printf("k2      %5d->%-5d bits %d g%3d: %d runs, worst rel err vs CPU %.2e\n", d_in, d_out, bits, gs, runs, worst);
    if (dqf) dd_cuda_free(dqf);
    dd_cuda_free(dq); dd_cuda_free(ds); dd_cuda_free(dz); dd_cuda_free(dx); dd_cuda_free(dy);
}

static void test_errors() {
    dd_shape bad = {100, 33, 4, 128};
    uint16_t *y = nullptr;
    CHECK(dd_cuda_gemv_base(&bad, (const uint8_t *)8, (const uint16_t *)8, (const uint16_t *)8, (const uint16_t *)8, (uint16_t *)8, 0, 0, NULL) == DD_ERR_UNSUPPORTED, "d_out 33 rejected");
    dd_shape ok = {128, 32, 4, 128};
    CHECK(dd_cuda_gemv_base(&ok, NULL, NULL, NULL, NULL, y, 0, 0, NULL) == DD_ERR_INVALID_ARGUMENT, "null pointers rejected");
    void *p = nullptr;
    dd_status st = dd_cuda_malloc(&p, (size_t)1 << 50);
    CHECK(st == DD_ERR_CUDA_OUT_OF_MEMORY, "huge malloc -> CUDA OOM, got %d", (int)st);
    printf("oom message: %s\n", dd_cuda_last_error());
    int kind, dev;
    int host_var;
    OK(dd_cuda_pointer_kind(&host_var, &kind, &dev));
    CHECK(kind == DD_PTR_HOST, "host pointer kind %d", kind);
    OK(dd_cuda_malloc(&p, 64));
    OK(dd_cuda_pointer_kind(p, &kind, &dev));
    CHECK(kind == DD_PTR_DEVICE && dev == 0, "device pointer kind %d dev %d", kind, dev);
    dd_cuda_free(p);
}

/* One small layer through every path: what compute-sanitizer racecheck runs (the full test
 * suite under racecheck outlasts the device budget). */
static int run_race() {
    test_layer(1000, 96, 3, 128);
    test_layer(2048 + 130, 320, 4, 64);
    dd_cuda_variant cap = {};
    cap.layer_grid_cap = 3; /* many tickets per block */
    test_layer(1000, 320, 3, 128, &cap);
    cap.layer_mode = 3;
    test_concurrent(1000, 320, 3, &cap, 2);
    printf("%s: %d failure(s)\n", g_fail ? "TESTS FAILED" : "TESTS PASSED", g_fail);
    return g_fail ? 1 : 0;
}

static int run_tests(int quick) {
    test_errors();
    test_api_rules();
    test_base_float64(4096, 256, 4, 128, 20.f);
    test_base_float64(4096, 256, 3, 128, 20.f);
    test_base_float64(1000, 96, 3, 64, 20.f);
    test_base_float64(1000, 96, 4, 64, 20.f);
    test_base_float64(14336, 64, 3, 128, 20.f);
    const int shapes[][2] = {{576, 192}, {1000, 96}, {1536, 576}, {2048 + 130, 320}, {4096, 1024}, {3000, 32}, {128, 32}, {14336, 256}};
    for (auto &sh : shapes)
        for (int bits : {3, 4})
            for (int gs : {64, 128}) {
                if (quick && gs == 64 && sh[0] > 2000) continue;
                test_layer(sh[0], sh[1], bits, gs);
            }
    /* the layer kernel's dynamic row-group hand-out: every variant, and few base blocks taking
     * many tickets each (env DD_TEST_LAYER_VARIANTS=0 skips) */
    const char *lv = getenv("DD_TEST_LAYER_VARIANTS");
    if (!lv || atoi(lv)) {
        /* (rows, dd_cuda_variant.layer_mode): 1 static, 2 tickets on SMs - n_tb, 3 tickets on
         * every free slot */
        const int var[][2] = {{4, 1}, {2, 2}, {4, 2}, {2, 3}, {4, 3}};
        for (auto &vv : var) {
            printf("layer variant rows %d hand-out %d\n", vv[0], vv[1]);
            for (int cap : {0, 3}) {
                dd_cuda_variant v = {};
                v.layer_rows = vv[0];
                v.layer_mode = vv[1];
                v.layer_grid_cap = cap;
                test_layer(1000, 320, 3, 128, &v);
                test_layer(2048 + 130, 1024, 4, 64, &v);
            }
        }
        test_layer(1024, 32768, 3, 128); /* default variant, tickets on the full grid */
    }
    /* base kernel 2 (measurement variant): every shape above plus the Llama shapes, both bits and
     * group sizes, every k-split on the shapes of at most 4096 x 4096 (env DD_TEST_K2=0 skips) */
    const char *k2 = getenv("DD_TEST_K2");
    if (!k2 || atoi(k2)) {
        dd_cuda_variant v2 = {};
        v2.base_kernel = 2;
        test_base_float64(4096, 256, 4, 128, 20.f, &v2);
        test_base_float64(4096, 256, 3, 128, 20.f, &v2);
        test_base_float64(1000, 96, 3, 64, 20.f, &v2);
        test_base_float64(14336, 64, 3, 128, 20.f, &v2);
        const int k2_shapes[][2] = {{576, 192}, {1000, 96}, {1536, 576}, {2048 + 130, 320}, {4096, 1024}, {3000, 32},
                                    {128, 32}, {14336, 256}, {4096, 4096}, {14336, 4096}, {4096, 14336}, {8192, 28672}};
        for (auto &sh : k2_shapes)
            for (int bits : {3, 4})
                for (int gs : {64, 128}) {
                    if (quick && sh[0] * (long)sh[1] > 4096L * 4096 && gs == 64) continue;
                    test_base_k2(sh[0], sh[1], bits, gs, (long)sh[0] * sh[1] <= 4096L * 4096);
                }
        /* the layer's base GEMV calls (k_chunk 0, serial, fork/join with DEC's atomics beside it) */
        test_layer(1000, 320, 3, 128, &v2);
        test_layer(2048 + 130, 1024, 4, 64, &v2);
    }
    /* issue 7 regression: two streams / threads on one layer, tickets under contention */
    test_concurrent(1024, 32768, 3, nullptr);
    {
        dd_cuda_variant v = {};
        v.layer_mode = 3;
        v.layer_grid_cap = 3;
        test_concurrent(2048 + 130, 1024, 4, &v);
        test_concurrent(1000, 320, 3, &v);
    }
    printf("%s: %d failure(s)\n", g_fail ? "TESTS FAILED" : "TESTS PASSED", g_fail);
    return g_fail ? 1 : 0;
}

static int run_bench(int quick) {
    char name[256];
    OK(dd_cuda_device_name(0, name, sizeof name));
    double hbm, zc, h2d;
    OK(dd_cuda_bench_bandwidth((size_t)2 << 30, 16, &hbm, &zc, &h2d));
    printf("JSON {\"kind\":\"bandwidth\",\"device\":\"%s\",\"hbm_read_gbs\":%.1f,\"zero_copy_gbs_16x512\":%.1f,\"h2d_pinned_gbs\":%.1f}\n", name, hbm, zc, h2d);
    struct { int d_in, d_out; const char *model; } shapes[] = {
        {4096, 4096, "llama3-8b qo"}, {4096, 1024, "llama3-8b kv"}, {4096, 14336, "llama3-8b gate/up"},
        {14336, 4096, "llama3-8b down"}, {8192, 8192, "llama3-70b qo"}, {8192, 28672, "llama3-70b gate/up"},
        {576, 1536, "smollm2-135m up"}, {1536, 576, "smollm2-135m down"}, {576, 576, "smollm2-135m qo"}};
    const int kcs[] = {0, 1, 2, 4, 8, 12, 16, 24, 32, 64};
    const int ntbs[] = {4, 8, 16, 32};
    for (auto &sh : shapes) {
        for (int bits : {3, 4}) {
            dd_shape s = {sh.d_in, sh.d_out, bits, 128};
            dd_cuda_bench *b;
            OK(dd_cuda_bench_create(&s, 0, 7, &b));
            size_t bytes; int copies, n_sm;
            OK(dd_cuda_bench_info(b, &bytes, &copies, &n_sm));
            const int iters = std::max(20, std::min(copies, 400));
            const int reps = 7;
            double t_read, t_base;
            OK(dd_cuda_bench_run(b, DD_BENCH_READ, 0, 0, NULL, iters, reps, &t_read));
            OK(dd_cuda_bench_run(b, DD_BENCH_BASE, 0, 0, NULL, iters, reps, &t_base));
            printf("JSON {\"kind\":\"base\",\"d_in\":%d,\"d_out\":%d,\"bits\":%d,\"model\":\"%s\",\"bytes\":%zu,\"copies\":%d,\"us_read\":%.3f,\"us_base\":%.3f,\"base_over_read\":%.4f,\"base_gbs\":%.1f,\"pct_hbm\":%.1f}\n",
                   sh.d_in, sh.d_out, bits, sh.model, bytes, copies, t_read, t_base, t_read / t_base, bytes / (t_base * 1e3), 100.0 * bytes / (t_base * 1e3) / hbm);
            {
                dd_cuda_variant v2 = {};
                v2.base_kernel = 2;
                double t_k2;
                OK(dd_cuda_bench_run(b, DD_BENCH_BASE, 0, 0, &v2, iters, reps, &t_k2));
                printf("JSON {\"kind\":\"base_k2\",\"d_in\":%d,\"d_out\":%d,\"bits\":%d,\"us_read\":%.3f,\"us_base_k0\":%.3f,\"us_base_k2\":%.3f,\"k2_over_read\":%.4f,\"k2_pct_hbm\":%.1f,\"k2_speedup\":%.4f}\n",
                       sh.d_in, sh.d_out, bits, t_read, t_base, t_k2, t_read / t_k2, 100.0 * bytes / (t_k2 * 1e3) / hbm, t_base / t_k2);
            }
            for (int ntb : ntbs) {
                double t_res, t_dec8;
                OK(dd_cuda_bench_run(b, DD_BENCH_BASE_RESERVED, 0, ntb, NULL, iters, reps, &t_res));
                OK(dd_cuda_bench_run(b, DD_BENCH_DEC_ONLY, 8, ntb, NULL, iters, reps, &t_dec8));
                printf("JSON {\"kind\":\"reserved\",\"d_in\":%d,\"d_out\":%d,\"bits\":%d,\"n_tb\":%d,\"us_base_reserved\":%.3f,\"slowdown\":%.4f,\"us_dec_only_k8\":%.3f}\n",
                       sh.d_in, sh.d_out, bits, ntb, t_res, t_res / t_base - 1, t_dec8);
                for (int kc : kcs) {
                    if (quick && kc != 8 && kc != 16) continue;
                    double t_f;
                    OK(dd_cuda_bench_run(b, DD_BENCH_FUSED, kc, ntb, NULL, iters, reps, &t_f));
                    double t_s = -1;
                    if (kc == 8) OK(dd_cuda_bench_run(b, DD_BENCH_SERIAL, kc, ntb, NULL, iters, reps, &t_s));
                    printf("JSON {\"kind\":\"dec\",\"d_in\":%d,\"d_out\":%d,\"bits\":%d,\"k_chunk\":%d,\"n_tb\":%d,\"us\":%.3f,\"overhead\":%.4f,\"us_serial\":%.3f,\"pct_hbm\":%.1f}\n",
                           sh.d_in, sh.d_out, bits, kc, ntb, t_f, t_f / t_base - 1, t_s, 100.0 * bytes / (t_f * 1e3) / hbm);
                }
            }
            fflush(stdout);
            OK(dd_cuda_bench_destroy(b));
        }
    }
    return 0;
}

/* Layer-kernel variants side by side (dd_cuda_variant passed to dd_cuda_bench_run). */
static int run_basecmp() {
    /* v7: the layer kernel's row-group hand-out side by side; plain base alone once per shape */
    struct { int d_in, d_out; } shapes[] = {{4096, 14336}, {14336, 4096}, {8192, 28672}, {8192, 8192}};
    /* (layer_rows, layer_mode): 1 static, 2 tickets on SMs - n_tb, 3 tickets on every free slot */
    const int var[][2] = {{4, 1}, {2, 1}, {4, 2}, {2, 2}, {4, 3}, {2, 3}};
    for (auto &sh : shapes) {
        for (int bits : {3, 4}) {
            dd_shape s = {sh.d_in, sh.d_out, bits, 128};
            dd_cuda_bench *b;
            OK(dd_cuda_bench_create(&s, 0, 7, &b));
            size_t bytes; int copies, n_sm;
            OK(dd_cuda_bench_info(b, &bytes, &copies, &n_sm));
            const int iters = std::max(20, std::min(copies, 200)), reps = 5;
            double t_read, t_base;
            OK(dd_cuda_bench_run(b, DD_BENCH_READ, 0, 0, NULL, iters, reps, &t_read));
            OK(dd_cuda_bench_run(b, DD_BENCH_BASE, 0, 0, NULL, iters, reps, &t_base));
            printf("CMP %5d x %5d %db: read %7.2f us, plain base %7.2f us (%5.1f%% of read)\n", sh.d_in, sh.d_out,
                   bits, t_read, t_base, 100 * t_read / t_base);
            for (auto &v : var) {
                dd_cuda_variant lv = {};
                lv.layer_rows = v[0];
                lv.layer_mode = v[1];
                for (int ntb : {4, 8, 16, 32}) {
                    double t[3];
                    const int kc[3] = {1, 8, 16};
                    for (int i = 0; i < 3; i++) OK(dd_cuda_bench_run(b, DD_BENCH_FUSED, kc[i], ntb, &lv, iters, reps, &t[i]));
                    printf("CMP %5d x %5d %db rows %d hand-out %d n_tb %2d: k1 %7.2f us %+6.1f%% | k8 %7.2f us %+6.1f%% | k16 %7.2f us %+6.1f%%\n",
                           sh.d_in, sh.d_out, bits, v[0], v[1], ntb, t[0], 100 * (t[0] / t_base - 1), t[1],
                           100 * (t[1] / t_base - 1), t[2], 100 * (t[2] / t_base - 1));
                }
                fflush(stdout);
            }
            OK(dd_cuda_bench_destroy(b));
        }
    }
    return 0;
}

static int run_probe() {
    /* parts of one 4096x4096 3-bit layer call, event-timed outside graphs (median of 50) */
    for (int d : {4096, 14336}) {
        dd_shape s = {d, 4096, 3, 128};
        dd_cuda_bench *b;
        OK(dd_cuda_bench_create(&s, 0, 11, &b));
        for (int ntb : {8, 16, 32}) {
            double t_dec, t_base;
            OK(dd_cuda_bench_run(b, DD_BENCH_DEC_ONLY, 8, ntb, NULL, 40, 7, &t_dec));
            OK(dd_cuda_bench_run(b, DD_BENCH_BASE, 0, ntb, NULL, 40, 7, &t_base));
            printf("probe %d->4096 3b n_tb %d: dec-only k8 %.2f us, base %.2f us\n", d, ntb, t_dec, t_base);
        }
        OK(dd_cuda_bench_destroy(b));
    }
    return 0;
}

/* Where the time goes: every component of a layer call timed in the same run (graph-captured,
 * weights rotated).  Usage: cuda_harness parts [quick] */
static int run_parts(int quick) {
    char name[256];
    OK(dd_cuda_device_name(0, name, sizeof name));
    printf("parts on %s (v5 fused: warp selection, column-sliced DEC blocks, per-output meeting cells)\n", name);
    struct { int d_in, d_out, bits; } shapes[] = {{4096, 4096, 3}, {4096, 14336, 3}, {14336, 4096, 3}, {8192, 28672, 3}, {8192, 28672, 4}, {4096, 14336, 4}};
    for (auto &sh : shapes) {
        if (quick && sh.bits == 4) continue;
        dd_shape s = {sh.d_in, sh.d_out, sh.bits, 128};
        dd_cuda_bench *b;
        OK(dd_cuda_bench_create(&s, 0, 7, &b));
        size_t bytes; int copies, n_sm;
        OK(dd_cuda_bench_info(b, &bytes, &copies, &n_sm));
        const int iters = std::max(20, std::min(copies, 400)), reps = 9;
        double t_read, t_base, t_base2, t_empty;
        OK(dd_cuda_bench_run(b, DD_BENCH_READ, 0, 0, NULL, iters, reps, &t_read));
        OK(dd_cuda_bench_run(b, DD_BENCH_BASE, 0, 0, NULL, iters, reps, &t_base));
        OK(dd_cuda_bench_run(b, DD_BENCH_EMPTY, 0, 0, NULL, iters, reps, &t_empty));
        OK(dd_cuda_bench_run(b, DD_BENCH_BASE, 0, 0, NULL, iters, reps, &t_base2));
        printf("%5d->%-5d %db: read %.2f us, base %.2f us (again %.2f; %.1f%% of read), empty kernel %.2f us\n", sh.d_in,
               sh.d_out, sh.bits, t_read, t_base, t_base2, 100 * t_read / t_base, t_empty);
        for (int ntb : {8, 16, 32}) {
            double t_res, dec1, dec8, f[5], fj8;
            const int kc[5] = {1, 4, 8, 12, 16};
            OK(dd_cuda_bench_run(b, DD_BENCH_BASE_RESERVED, 0, ntb, NULL, iters, reps, &t_res));
            OK(dd_cuda_bench_run(b, DD_BENCH_DEC_ONLY, 1, ntb, NULL, iters, reps, &dec1));
            OK(dd_cuda_bench_run(b, DD_BENCH_DEC_ONLY, 8, ntb, NULL, iters, reps, &dec8));
            for (int i = 0; i < 5; i++) OK(dd_cuda_bench_run(b, DD_BENCH_FUSED, kc[i], ntb, NULL, iters, reps, &f[i]));
            OK(dd_cuda_bench_run(b, DD_BENCH_FORKJOIN, 8, ntb, NULL, iters, reps, &fj8));
            printf("   n_tb %2d: base reserved %+5.1f%% | dec-only k1 %.2f k8 %.2f us | fused k1 %+5.1f%% k4 %+5.1f%% "
                   "k8 %+5.1f%% k12 %+5.1f%% k16 %+5.1f%% | fork/join k8 %+5.1f%%\n",
                   ntb, 100 * (t_res / t_base - 1), dec1, dec8, 100 * (f[0] / t_base - 1), 100 * (f[1] / t_base - 1),
                   100 * (f[2] / t_base - 1), 100 * (f[3] / t_base - 1), 100 * (f[4] / t_base - 1), 100 * (fj8 / t_base - 1));
        }
        fflush(stdout);
        OK(dd_cuda_bench_destroy(b));
    }
    return 0;
}

/* Base kernel 2 beside kernel 0 (production) on the six Llama shapes of bench/results/kernels.md,
 * same bench session (same weights, same rotation): read of the same bytes, kernel 0, kernel 2 by
 * rule and at every k-split, both on every SM and on SMs - 16 (what DEC leaves).
 * Usage: cuda_harness k2cmp [quick]   (quick: group 128 only) */
static int run_k2cmp(int quick) {
    char name[256];
    OK(dd_cuda_device_name(0, name, sizeof name));
    double hbm, zc, h2d;
    OK(dd_cuda_bench_bandwidth((size_t)2 << 30, 16, &hbm, &zc, &h2d));
    printf("k2cmp on %s, HBM read %.0f GB/s\n", name, hbm);
    struct { int d_in, d_out; } shapes[] = {{4096, 4096}, {4096, 1024}, {4096, 14336}, {14336, 4096}, {8192, 8192}, {8192, 28672}};
    for (int gs : {128, 64}) {
        if (quick && gs == 64) continue;
        for (auto &sh : shapes)
            for (int bits : {3, 4}) {
                dd_shape s = {sh.d_in, sh.d_out, bits, gs};
                dd_cuda_bench *b;
                OK(dd_cuda_bench_create(&s, 0, 7, &b));
                size_t bytes; int copies, n_sm;
                OK(dd_cuda_bench_info(b, &bytes, &copies, &n_sm));
                const int iters = std::max(20, std::min(copies, 400)), reps = 7;
                double t_read, t0, t0r;
                OK(dd_cuda_bench_run(b, DD_BENCH_READ, 0, 0, NULL, iters, reps, &t_read));
                OK(dd_cuda_bench_run(b, DD_BENCH_BASE, 0, 0, NULL, iters, reps, &t0));
                OK(dd_cuda_bench_run(b, DD_BENCH_BASE_RESERVED, 0, 16, NULL, iters, reps, &t0r));
                dd_cuda_variant v = {};
                v.base_kernel = 2;
                int ks = 0, per_sm = 0; long blocks = 0, tiles = 0; size_t smem = 0;
                /* the plan for a 16/4-aligned allocation (what the session's copies are) */
                OK(dd_cuda_gemv_k2_info(&s, (const void *)256, (const void *)256, (const void *)256, 0, &v, &ks,
                                        &blocks, &tiles, &smem, &per_sm));
                double t1, t1r, tk[4];
                OK(dd_cuda_bench_run(b, DD_BENCH_BASE, 0, 0, &v, iters, reps, &t1));
                OK(dd_cuda_bench_run(b, DD_BENCH_BASE_RESERVED, 0, 16, &v, iters, reps, &t1r));
                double t2r, t3 = 0, t3r = 0;
                {   /* one row pair per lane and step (4 blocks per SM) */
                    dd_cuda_variant vr = v;
                    vr.base_rows = 2;
                    OK(dd_cuda_bench_run(b, DD_BENCH_BASE, 0, 0, &vr, iters, reps, &t2r));
                }
                if (bits == 3) { /* the FIELDS layout (random codes either way: the timing is the layout's) */
                    dd_cuda_variant vf = v;
                    vf.base_kernel = 3;
                    OK(dd_cuda_bench_run(b, DD_BENCH_BASE, 0, 0, &vf, iters, reps, &t3));
                    vf.base_rows = 2;
                    OK(dd_cuda_bench_run(b, DD_BENCH_BASE, 0, 0, &vf, iters, reps, &t3r));
                }
                const int splits[4] = {1, 2, 4, 8};
                for (int i = 0; i < 4; i++) {
                    dd_cuda_variant vs = v;
                    vs.base_ksplit = splits[i];
                    OK(dd_cuda_bench_run(b, DD_BENCH_BASE, 0, 0, &vs, iters, reps, &tk[i]));
                }
                printf("K2CMP %5d x %5d %db g%3d: read %6.2f | k0 %6.2f us (%5.1f%% of read) | k2 %6.2f us (%5.1f%% of read, "
                       "%5.1f%% HBM, x%.2f) ksplit %d grid %ld/%ld tiles %d/SM smem %zu | split1 %6.2f 2 %6.2f 4 %6.2f 8 %6.2f | "
                       "SMs-16: k0 %6.2f k2 %6.2f | rows 2: %6.2f us (%5.1f%% of read) | fields3 %6.2f (%5.1f%%) rows 2 %6.2f (%5.1f%%)\n",
                       sh.d_in, sh.d_out, bits, gs, t_read, t0, 100 * t_read / t0, t1, 100 * t_read / t1,
                       100.0 * bytes / (t1 * 1e3) / hbm, t0 / t1, ks, blocks, tiles, per_sm, smem, tk[0], tk[1], tk[2], tk[3],
                       t0r, t1r, t2r, 100 * t_read / t2r, t3, t3 > 0 ? 100 * t_read / t3 : 0.0, t3r,
                       t3r > 0 ? 100 * t_read / t3r : 0.0);
                printf("JSON {\"kind\":\"k2cmp\",\"d_in\":%d,\"d_out\":%d,\"bits\":%d,\"group_size\":%d,\"bytes\":%zu,\"us_read\":%.3f,"
                       "\"us_k0\":%.3f,\"us_k2\":%.3f,\"k0_over_read\":%.4f,\"k2_over_read\":%.4f,\"k2_pct_hbm\":%.1f,\"ksplit\":%d,"
                       "\"blocks\":%ld,\"tiles\":%ld,\"per_sm\":%d,\"smem\":%zu,\"us_k2_split1\":%.3f,\"us_k2_split2\":%.3f,"
                       "\"us_k2_split4\":%.3f,\"us_k2_split8\":%.3f,\"us_k0_sm_minus16\":%.3f,\"us_k2_sm_minus16\":%.3f,\"us_k2_rows2\":%.3f,\"us_k3_fields\":%.3f,\"us_k3_fields_rows2\":%.3f}\n",
                       sh.d_in, sh.d_out, bits, gs, bytes, t_read, t0, t1, t_read / t0, t_read / t1,
                       100.0 * bytes / (t1 * 1e3) / hbm, ks, blocks, tiles, per_sm, smem, tk[0], tk[1], tk[2], tk[3], t0r, t1r, t2r, t3, t3r);
                fflush(stdout);
                OK(dd_cuda_bench_destroy(b));
            }
    }
    return 0;
}

/* kernel 2 on small shapes only, every k-split: what compute-sanitizer memcheck / racecheck run. */
static int run_k2race() {
    for (int bits : {3, 4}) {
        test_base_k2(1000, 96, bits, 128, true);
        test_base_k2(576, 192, bits, 128, true);
        test_base_k2(2048 + 130, 320, bits, 128, true);
        test_base_k2(4096, 1024, bits, 128, true);
    }
    printf("%s: %d failure(s)\n", g_fail ? "TESTS FAILED" : "TESTS PASSED", g_fail);
    return g_fail ? 1 : 0;
}

int main(int argc, char **argv) {
    if (dd_cuda_device_count() <= 0) { printf("no CUDA device\n"); return 2; }
    OK(DD_CU(cudaDeviceGetAttribute(&g_n_sm, cudaDevAttrMultiProcessorCount, 0)));
    const int quick = argc > 2 && strcmp(argv[2], "quick") == 0;
    if (argc > 1 && strcmp(argv[1], "bench") == 0) return run_bench(quick);
    if (argc > 1 && strcmp(argv[1], "probe") == 0) return run_probe();
    if (argc > 1 && strcmp(argv[1], "basecmp") == 0) return run_basecmp();
    if (argc > 1 && strcmp(argv[1], "parts") == 0) return run_parts(quick);
    if (argc > 1 && strcmp(argv[1], "race") == 0) return run_race();
    if (argc > 1 && strcmp(argv[1], "k2cmp") == 0) return run_k2cmp(quick);
    if (argc > 1 && strcmp(argv[1], "k2race") == 0) return run_k2race();
    return run_tests(quick);
}
