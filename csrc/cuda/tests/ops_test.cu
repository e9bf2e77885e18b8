/*
 * ops_test: every op of csrc/cuda/dd_cuda_ops.h against a simple host reference (double, or the
 * CPU backend's dd_cpu_dequant_row for dequant) on random data.  One PASS/FAIL line per op and
 * case, INFO lines with timings, and a final "OPS TESTS PASSED: 0 failure(s)" (exit 0) or
 * "OPS TESTS FAILED: N failure(s)" (exit 1).
 * Build: sh csrc/cuda/tests/build_ops.sh OUTDIR [ARCHS];  run: OUTDIR/ops_test
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <functional>
#include <vector>

#include <cuda_runtime.h>

#include "../dd_cuda.h"
#include "../dd_cuda_ops.h"

extern "C" void dd_cpu_dequant_row(const dd_shape *s, const uint8_t *qweight, const uint16_t *scales,
                                   const uint16_t *zeros, int32_t o, float *w);

/* ---- reporting ------------------------------------------------------------------------------- */
static int g_fail = 0, g_pass = 0;

static void finish_and_exit() {
    printf("OPS TESTS %s: %d failure(s)\n", g_fail ? "FAILED" : "PASSED", g_fail);
    fflush(stdout);
    exit(g_fail ? 1 : 0);
}

static void report(bool ok, const char *op, const char *fmt, ...) {
    printf("%s %-16s ", ok ? "PASS" : "FAIL", op);
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
    if (ok) g_pass++;
    else g_fail++;
}

/* a CUDA runtime failure of the test itself (or a sticky kernel fault): nothing after it is
 * trustworthy, so stop here */
#define CU(call)                                                                                      \
    do {                                                                                              \
        cudaError_t e_ = (call);                                                                      \
        if (e_ != cudaSuccess) {                                                                      \
            printf("FAIL %-16s %s: %s (%s) at line %d\n", "cuda", #call, cudaGetErrorString(e_),      \
                   cudaGetErrorName(e_), __LINE__);                                                   \
            g_fail++;                                                                                 \
            finish_and_exit();                                                                        \
        }                                                                                             \
    } while (0)

/* an op call that must succeed: a failure is reported for `op` and the case is abandoned */
#define OP(op, call)                                                                                  \
    do {                                                                                              \
        dd_status s_ = (call);                                                                        \
        if (s_ != DD_OK) {                                                                            \
            report(false, op, "%s -> %s | %s (line %d)", #call, dd_strerror(s_), dd_cuda_last_error(), \
                   __LINE__);                                                                         \
            CU(cudaDeviceSynchronize());                                                              \
            return;                                                                                   \
        }                                                                                             \
    } while (0)

static void sync_check() { CU(cudaDeviceSynchronize()); }

/* ---- random data ------------------------------------------------------------------------------ */
static uint64_t g_rng = 0x1234567ull;
static uint64_t mix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static uint64_t nexti() { return mix64(g_rng += 0x9E3779B97F4A7C15ull); }
static double unif() { return (double)(nexti() >> 11) * (1.0 / 9007199254740992.0); }
static double gauss() {
    double u1 = unif(), u2 = unif();
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

static float g_h2f[65536];
static inline float h2f(uint16_t h) { return g_h2f[h]; }
static void init_lut() {
    for (int i = 0; i < 65536; i++) g_h2f[i] = dd_half_to_float((uint16_t)i);
}

static std::vector<uint16_t> rand_halves(size_t n, double scale) {
    std::vector<uint16_t> v(n);
    for (auto &x : v) x = dd_float_to_half((float)(gauss() * scale));
    return v;
}
/* large arrays: random fp16 bit patterns with |x| in [1/16, 1), in parallel */
static void fill_fast_halves(uint16_t *p, size_t n, uint64_t seed) {
#pragma omp parallel for schedule(static)
    for (long long b = 0; b < (long long)((n + 3) / 4); b++) {
        const uint64_t r = mix64(seed ^ ((uint64_t)b * 0xD1B54A32D192ED03ull));
        for (int k = 0; k < 4; k++) {
            const size_t i = (size_t)b * 4 + k;
            if (i >= n) break;
            const unsigned v = (unsigned)(r >> (16 * k)) & 0xFFFFu;
            p[i] = (uint16_t)((v & 0x8000u) | ((11u + ((v >> 10) & 3u)) << 10) | (v & 0x3FFu));
        }
    }
}

/* ---- device buffers ---------------------------------------------------------------------------- */
template <typename T>
struct DBuf {
    T *p = nullptr;
    size_t n = 0;
    DBuf() {}
    explicit DBuf(size_t n_) { alloc(n_); }
    void alloc(size_t n_) {
        free_();
        n = n_;
        CU(cudaMalloc((void **)&p, (n ? n : 1) * sizeof(T)));
    }
    /* synchronous (a pageable upload may still be in flight when cudaMemcpy returns, and later work
     * may run on a non-blocking stream) */
    void up(const T *h, size_t cnt) {
        CU(cudaMemcpy(p, h, cnt * sizeof(T), cudaMemcpyHostToDevice));
        CU(cudaDeviceSynchronize());
    }
    void up(const std::vector<T> &h) { up(h.data(), h.size()); }
    void down(T *h, size_t cnt) const { CU(cudaMemcpy(h, p, cnt * sizeof(T), cudaMemcpyDeviceToHost)); }
    std::vector<T> get() const {
        std::vector<T> h(n);
        down(h.data(), n);
        return h;
    }
    void fill_bytes(int v) {
        CU(cudaMemset(p, v, (n ? n : 1) * sizeof(T)));
        CU(cudaDeviceSynchronize());
    }
    void free_() {
        if (p) cudaFree(p);
        p = nullptr;
    }
    ~DBuf() { free_(); }
    DBuf(const DBuf &) = delete;
    DBuf &operator=(const DBuf &) = delete;
};

static const size_t kGuard = 64; /* elements checked untouched after an output */
static DBuf<int32_t> *g_pos = nullptr; /* a device int used as *d_pos */
static void set_pos(int v) { g_pos->up(&v, 1); }

/* ---- timing: `iters` calls captured into one graph, median of 5 replays, us per call ----------- */
static double time_graph(const std::function<dd_status(cudaStream_t)> &fn, int iters) {
    cudaStream_t st;
    if (cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking) != cudaSuccess) return -1;
    cudaGraph_t g = nullptr;
    cudaGraphExec_t ge = nullptr;
    double res = -1;
    if (cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal) != cudaSuccess) goto out;
    {
        dd_status s = DD_OK;
        for (int i = 0; i < iters && s == DD_OK; i++) s = fn(st);
        cudaError_t e = cudaStreamEndCapture(st, &g);
        if (s != DD_OK || e != cudaSuccess) goto out;
    }
    if (cudaGraphInstantiate(&ge, g, 0) != cudaSuccess) goto out;
    {
        cudaEvent_t a, b;
        cudaEventCreate(&a);
        cudaEventCreate(&b);
        cudaGraphLaunch(ge, st); /* warm-up */
        std::vector<double> ts;
        for (int r = 0; r < 5; r++) {
            cudaEventRecord(a, st);
            cudaGraphLaunch(ge, st);
            cudaEventRecord(b, st);
            cudaEventSynchronize(b);
            float ms = 0;
            cudaEventElapsedTime(&ms, a, b);
            ts.push_back(1000.0 * ms / iters);
        }
        std::sort(ts.begin(), ts.end());
        res = ts[2];
        cudaEventDestroy(a);
        cudaEventDestroy(b);
    }
out:
    if (ge) cudaGraphExecDestroy(ge);
    if (g) cudaGraphDestroy(g);
    cudaStreamSynchronize(st);
    cudaStreamDestroy(st);
    (void)cudaGetLastError();
    return res;
}

/* ================================================================================================
 * embed
 * ============================================================================================== */
static void test_embed(int vocab, int dim, int n_tok, int pos) {
    char name[96];
    snprintf(name, sizeof name, "vocab %d dim %d n_tok %d pos %d", vocab, dim, n_tok, pos);
    std::vector<uint16_t> table((size_t)vocab * dim);
    fill_fast_halves(table.data(), table.size(), nexti());
    std::vector<int32_t> tokens(pos + n_tok + 4, 0);
    for (int t = 0; t < n_tok; t++) tokens[pos + t] = (int32_t)(nexti() % vocab);
    tokens[pos] = vocab - 1;
    if (n_tok > 2) tokens[pos + 1] = -3;     /* invalid: zeros */
    if (n_tok > 3) tokens[pos + 2] = vocab;  /* invalid: zeros */
    if (n_tok > 4) tokens[pos + 3] = 0;
    DBuf<uint16_t> dt(table.size());
    dt.up(table);
    DBuf<int32_t> dtok(tokens.size());
    dtok.up(tokens);
    DBuf<float> dh((size_t)n_tok * dim);
    dh.fill_bytes(0x7f);
    set_pos(pos);
    OP("embed", dd_cuda_op_embed(dt.p, vocab, dim, dtok.p, g_pos->p, n_tok, dh.p, NULL));
    sync_check();
    std::vector<float> h = dh.get();
    long bad = 0;
    for (int t = 0; t < n_tok; t++) {
        const int tok = tokens[pos + t];
        for (int i = 0; i < dim; i++) {
            const float ref = (tok >= 0 && tok < vocab) ? h2f(table[(size_t)tok * dim + i]) : 0.f;
            if (memcmp(&ref, &h[(size_t)t * dim + i], 4) != 0) bad++;
        }
    }
    report(bad == 0, "embed", "%s: %ld mismatches (bit-exact)", name, bad);
}

/* ================================================================================================
 * add_rmsnorm
 * ============================================================================================== */
static void test_rmsnorm(int dim, int n_tok, bool with_y, bool with_out) {
    char name[96];
    snprintf(name, sizeof name, "dim %d n_tok %d y %d out %d", dim, n_tok, (int)with_y, (int)with_out);
    const float eps = 1e-5f;
    std::vector<float> h((size_t)n_tok * dim), w(dim);
    for (auto &v : h) v = (float)(gauss() * 3.0);
    for (auto &v : w) v = (float)(0.5 + unif());
    std::vector<uint16_t> y = rand_halves((size_t)n_tok * dim, 2.0);
    DBuf<float> dh(h.size()), dw(dim);
    dh.up(h);
    dw.up(w);
    DBuf<uint16_t> dy(y.size()), dout(h.size());
    dy.up(y);
    dout.fill_bytes(0xff);
    OP("add_rmsnorm", dd_cuda_op_add_rmsnorm(dh.p, with_y ? dy.p : NULL, dw.p, eps, dim, n_tok,
                                             with_out ? dout.p : NULL, NULL));
    sync_check();
    std::vector<float> gh = dh.get();
    std::vector<uint16_t> go = dout.get();
    double worst_h = 0, worst_o = 0;
    long bad = 0;
    for (int t = 0; t < n_tok; t++) {
        double ss = 0;
        std::vector<float> hr(dim);
        for (int i = 0; i < dim; i++) {
            float v = h[(size_t)t * dim + i];
            if (with_y) v = v + h2f(y[(size_t)t * dim + i]); /* the same fp32 add */
            hr[i] = v;
            ss += (double)v * v;
            const double e = fabs((double)gh[(size_t)t * dim + i] - v);
            worst_h = std::max(worst_h, e);
            if (e > 1e-6 * fabs(v)) bad++;
        }
        const double r = sqrt(ss / dim + eps);
        for (int i = 0; i < dim && with_out; i++) {
            const double ref = hr[i] / r * w[i];
            const double got = h2f(go[(size_t)t * dim + i]);
            const double e = fabs(got - ref), tol = fabs(ref) / 1024.0 + 1e-5;
            worst_o = std::max(worst_o, e / tol);
            if (!(e <= tol)) bad++;
        }
    }
    if (!with_out) /* out untouched */
        for (auto v : go) if (v != 0xffff) { bad++; break; }
    report(bad == 0, "add_rmsnorm", "%s: h max err %.2e, out max err/tol %.2f, %ld bad", name, worst_h, worst_o, bad);
}

/* ================================================================================================
 * rope_store_kv
 * ============================================================================================== */
static void rope_tables(int max_seq, int hd, std::vector<float> &c, std::vector<float> &s) {
    const int half = hd / 2;
    c.resize((size_t)max_seq * half);
    s.resize((size_t)max_seq * half);
    for (int p = 0; p < max_seq; p++)
        for (int i = 0; i < half; i++) {
            const double inv = 1.0 / pow(10000.0, (double)(2 * i) / hd);
            const double a = (double)p * inv;
            c[(size_t)p * half + i] = (float)cos(a);
            s[(size_t)p * half + i] = (float)sin(a);
        }
}

static bool close_h(uint16_t got, double ref) {
    const double g = h2f(got);
    return fabs(g - ref) <= fabs(ref) / 1024.0 + 1e-6;
}

static void test_rope(int H, int KV, int hd, int max_seq, int n_tok, int pos) {
    char name[96];
    snprintf(name, sizeof name, "heads %d/%d hd %d n_tok %d pos %d", H, KV, hd, n_tok, pos);
    const int half = hd / 2;
    std::vector<float> cs, sn;
    rope_tables(max_seq, hd, cs, sn);
    std::vector<uint16_t> q = rand_halves((size_t)n_tok * H * hd, 1.0), k = rand_halves((size_t)n_tok * KV * hd, 1.0),
                          v = rand_halves((size_t)n_tok * KV * hd, 1.0);
    DBuf<float> dc(cs.size()), ds(sn.size());
    dc.up(cs);
    ds.up(sn);
    DBuf<uint16_t> dq(q.size()), dk(k.size()), dv(v.size());
    dq.up(q);
    dk.up(k);
    dv.up(v);
    const size_t cache = (size_t)KV * max_seq * hd;
    DBuf<uint16_t> dkc(cache), dvc(cache);
    dkc.fill_bytes(0x7e); /* 0x7e7e sentinel */
    dvc.fill_bytes(0x7e);
    set_pos(pos);
    OP("rope_store_kv", dd_cuda_op_rope_store_kv(dq.p, dk.p, dv.p, dc.p, ds.p, g_pos->p, n_tok, H, KV, hd, max_seq,
                                                 dkc.p, dvc.p, NULL));
    sync_check();
    std::vector<uint16_t> gq = dq.get(), gk = dkc.get(), gv = dvc.get();
    long bad = 0;
    for (int t = 0; t < n_tok; t++) {
        const int p = pos + t;
        for (int h = 0; h < H; h++)
            for (int i = 0; i < half; i++) {
                const size_t b = ((size_t)t * H + h) * hd;
                const double x1 = h2f(q[b + i]), x2 = h2f(q[b + i + half]);
                const double c = cs[(size_t)p * half + i], s = sn[(size_t)p * half + i];
                if (!close_h(gq[b + i], x1 * c - x2 * s)) bad++;
                if (!close_h(gq[b + i + half], x2 * c + x1 * s)) bad++;
            }
    }
    for (int g = 0; g < KV; g++)
        for (int p = 0; p < max_seq; p++) {
            const int t = p - pos;
            const size_t cb = ((size_t)g * max_seq + p) * hd;
            if (t < 0 || t >= n_tok) {
                for (int d = 0; d < hd; d++)
                    if (gk[cb + d] != 0x7e7e || gv[cb + d] != 0x7e7e) bad++;
                continue;
            }
            const size_t b = ((size_t)t * KV + g) * hd;
            for (int i = 0; i < half; i++) {
                const double x1 = h2f(k[b + i]), x2 = h2f(k[b + i + half]);
                const double c = cs[(size_t)p * half + i], s = sn[(size_t)p * half + i];
                if (!close_h(gk[cb + i], x1 * c - x2 * s)) bad++;
                if (!close_h(gk[cb + i + half], x2 * c + x1 * s)) bad++;
            }
            for (int d = 0; d < hd; d++)
                if (gv[cb + d] != v[b + d]) bad++;
        }
    report(bad == 0, "rope_store_kv", "%s: %ld bad (q, k within 1 fp16 ulp, v exact, other cache rows untouched)", name, bad);
}

/* ================================================================================================
 * attention
 * ============================================================================================== */
struct AttnData {
    int H, KV, hd, max_seq;
    std::vector<uint16_t> kc, vc; /* every position random (host) */
    DBuf<uint16_t> dkc, dvc;
};

static void attn_make(AttnData &A, int H, int KV, int hd, int max_seq) {
    A.H = H;
    A.KV = KV;
    A.hd = hd;
    A.max_seq = max_seq;
    const size_t n = (size_t)KV * max_seq * hd;
    A.kc.resize(n);
    A.vc.resize(n);
    for (size_t i = 0; i < n; i++) {
        A.kc[i] = dd_float_to_half((float)gauss());
        A.vc[i] = dd_float_to_half((float)gauss());
    }
    A.dkc.alloc(n);
    A.dvc.alloc(n);
}

/* Device caches hold the data at positions [lo, hi) and fp16 NaN elsewhere: a kernel that reads
 * (and weights, even by 0) a key outside the visible span produces NaN. */
static void attn_upload(AttnData &A, int lo, int hi) {
    std::vector<uint16_t> k = A.kc, v = A.vc;
    for (int g = 0; g < A.KV; g++)
        for (int j = 0; j < A.max_seq; j++)
            if (j < lo || j >= hi)
                for (int d = 0; d < A.hd; d++) {
                    const size_t i = ((size_t)g * A.max_seq + j) * A.hd + d;
                    k[i] = 0x7E00;
                    v[i] = 0x7E00;
                }
    A.dkc.up(k);
    A.dvc.up(v);
}

static void attn_ref(const AttnData &A, const std::vector<uint16_t> &q, int pos, int n_tok, float scale, int window,
                     std::vector<double> &out) {
    const int H = A.H, hd = A.hd, group = A.H / A.KV;
    out.assign((size_t)n_tok * H * hd, 0.0);
#pragma omp parallel for collapse(2) schedule(dynamic)
    for (int t = 0; t < n_tok; t++)
        for (int h = 0; h < H; h++) {
            const int p = pos + t, g = h / group;
            const int lo = window > 0 ? std::max(0, p - window + 1) : 0;
            std::vector<double> s(p - lo + 1);
            const uint16_t *qr = &q[((size_t)t * H + h) * hd];
            double m = -INFINITY;
            for (int j = lo; j <= p; j++) {
                const uint16_t *kr = &A.kc[((size_t)g * A.max_seq + j) * hd];
                double acc = 0;
                for (int d = 0; d < hd; d++) acc += (double)h2f(qr[d]) * h2f(kr[d]);
                s[j - lo] = acc * (double)scale;
                m = std::max(m, s[j - lo]);
            }
            double z = 0;
            for (auto &x : s) z += (x = exp(x - m));
            double *o = &out[((size_t)t * H + h) * hd];
            for (int j = lo; j <= p; j++) {
                const uint16_t *vr = &A.vc[((size_t)g * A.max_seq + j) * hd];
                const double w = s[j - lo] / z;
                for (int d = 0; d < hd; d++) o[d] += w * h2f(vr[d]);
            }
        }
}

static void test_attention(AttnData &A, int pos, int n_tok, float scale, int window, const char *tag) {
    const int H = A.H, hd = A.hd;
    char name[128];
    snprintf(name, sizeof name, "%s heads %d/%d hd %d n_tok %d len %d window %d scale %.3g", tag, H, A.KV, hd, n_tok,
             pos + n_tok, window, scale);
    std::vector<uint16_t> q = rand_halves((size_t)n_tok * H * hd, 1.0);
    DBuf<uint16_t> dq(q.size()), dout(q.size() + kGuard); /* a guard after the output */
    dq.up(q);
    dout.fill_bytes(0xff);
    attn_upload(A, window > 0 ? std::max(0, pos - window + 1) : 0, pos + n_tok);
    set_pos(pos);
    OP("attention", dd_cuda_op_attention(dq.p, A.dkc.p, A.dvc.p, g_pos->p, n_tok, H, A.KV, hd, A.max_seq, scale,
                                         window, dout.p, NULL));
    sync_check();
    std::vector<uint16_t> go = dout.get();
    std::vector<double> ref;
    attn_ref(A, q, pos, n_tok, scale, window, ref);
    long bad = 0;
    double worst = 0;
    for (size_t i = q.size(); i < go.size(); i++) if (go[i] != 0xffff) bad++;
    for (size_t row = 0; row < (size_t)n_tok * H; row++) {
        double rmax = 0;
        for (int d = 0; d < hd; d++) rmax = std::max(rmax, fabs(ref[row * hd + d]));
        for (int d = 0; d < hd; d++) {
            const double r = ref[row * hd + d], g = h2f(go[row * hd + d]);
            const double tol = 1e-3 * rmax + fabs(r) / 1024.0 + 1e-6;
            const double e = fabs(g - r);
            if (!(e <= tol)) bad++;
            worst = std::max(worst, e / tol);
        }
    }
    report(bad == 0, "attention", "%s: max err/tol %.3f, %ld bad", name, worst, bad);
}

static void attn_timing(AttnData &A, int H, int KV, int hd, int L) {
    attn_upload(A, 0, A.max_seq);
    std::vector<uint16_t> q = rand_halves((size_t)H * hd, 1.0);
    DBuf<uint16_t> dq(q.size()), dout(q.size());
    dq.up(q);
    set_pos(L - 1);
    const float scale = 1.0f / sqrtf((float)hd);
    const double us = time_graph([&](cudaStream_t s) {
        return dd_cuda_op_attention(dq.p, A.dkc.p, A.dvc.p, g_pos->p, 1, H, KV, hd, A.max_seq, scale, 0, dout.p, s);
    }, 20);
    printf("INFO attention decode heads %d/%d hd %d len %d (max_seq %d): %.2f us per call in a graph (K+V %.2f MB)\n", H,
           KV, hd, L, A.max_seq, us, 2.0 * KV * L * hd * 2 / 1e6);
}

/* ================================================================================================
 * swiglu
 * ============================================================================================== */
static void test_swiglu(int n, int n_tok) {
    std::vector<uint16_t> g = rand_halves((size_t)n * n_tok, 3.0), u = rand_halves((size_t)n * n_tok, 2.0);
    g[0] = dd_float_to_half(-60000.f); /* clipped exp */
    g[g.size() - 1] = dd_float_to_half(300.f); /* silu(g) = g; |300 u| stays finite in fp16 */
    DBuf<uint16_t> dg(g.size()), du(u.size()), dout(g.size());
    dg.up(g);
    du.up(u);
    OP("swiglu", dd_cuda_op_swiglu(dg.p, du.p, n, n_tok, dout.p, NULL));
    sync_check();
    std::vector<uint16_t> go = dout.get();
    long bad = 0;
    for (size_t i = 0; i < g.size(); i++) {
        const double gv = h2f(g[i]), uv = h2f(u[i]);
        const double ref = gv / (1.0 + exp(-std::min(88.0, std::max(-88.0, gv)))) * uv;
        const double got = h2f(go[i]);
        const bool ok = std::isinf(ref) ? got == ref : fabs(got - ref) <= fabs(ref) / 1024.0 + 1e-6;
        if (!ok) bad++;
    }
    report(bad == 0, "swiglu", "n %d n_tok %d: %ld bad", n, n_tok, bad);
}

/* ================================================================================================
 * gemv_f16
 * ============================================================================================== */
static void test_gemv(int rows, int cols, bool timed) {
    std::vector<uint16_t> W((size_t)rows * cols), x(cols);
    fill_fast_halves(W.data(), W.size(), nexti());
    for (auto &v : x) v = dd_float_to_half((float)gauss());
    DBuf<uint16_t> dW(W.size()), dx(cols);
    dW.up(W);
    dx.up(x);
    DBuf<float> dy(rows + kGuard);
    dy.fill_bytes(0xff);
    OP("gemv_f16", dd_cuda_op_gemv_f16(dW.p, dx.p, rows, cols, dy.p, NULL));
    sync_check();
    std::vector<float> y = dy.get();
    /* every row of small matrices; 3000 random rows and the last 64 of large ones */
    std::vector<int> check;
    if (rows <= 5000) for (int r = 0; r < rows; r++) check.push_back(r);
    else {
        for (int i = 0; i < 3000; i++) check.push_back((int)(nexti() % rows));
        for (int r = rows - 64; r < rows; r++) check.push_back(r);
    }
    long bad = 0;
    double worst = 0;
    for (size_t i = rows; i < y.size(); i++) if (!std::isnan(y[i])) bad++; /* 0xffffffff: NaN */
#pragma omp parallel for reduction(+ : bad) schedule(static)
    for (long i = 0; i < (long)check.size(); i++) {
        const int r = check[i];
        double acc = 0, aabs = 0;
        for (int c = 0; c < cols; c++) {
            const double p = (double)h2f(W[(size_t)r * cols + c]) * h2f(x[c]);
            acc += p;
            aabs += fabs(p);
        }
        const double tol = 2e-5 * aabs + 1e-6, e = fabs((double)y[r] - acc);
        if (!(e <= tol)) bad++;
#pragma omp critical
        worst = std::max(worst, e / tol);
    }
    report(bad == 0, "gemv_f16", "rows %d cols %d: %zu rows checked, max err/tol %.3f, %ld bad", rows, cols,
           check.size(), worst, bad);
    if (timed) {
        const double us = time_graph([&](cudaStream_t s) { return dd_cuda_op_gemv_f16(dW.p, dx.p, rows, cols, dy.p, s); }, 20);
        const double bytes = (double)rows * cols * 2;
        printf("INFO gemv_f16 rows %d cols %d: %.2f us, %.0f GB/s of W\n", rows, cols, us, us > 0 ? bytes / us * 1e-3 : 0.0);
    }
}

/* ================================================================================================
 * gemm_f16
 * ============================================================================================== */
static void test_gemm(int n_tok, int rows, int cols, int accumulate, bool timed) {
    std::vector<uint16_t> X((size_t)n_tok * cols), W((size_t)rows * cols), Y0((size_t)n_tok * rows);
    fill_fast_halves(X.data(), X.size(), nexti());
    fill_fast_halves(W.data(), W.size(), nexti());
    for (auto &v : Y0) v = dd_float_to_half((float)gauss());
    DBuf<uint16_t> dX(X.size()), dW(W.size()), dY(Y0.size() + kGuard);
    dX.up(X);
    dW.up(W);
    dY.fill_bytes(0x7e);
    dY.up(Y0);
    OP("gemm_f16", dd_cuda_op_gemm_f16(dX.p, dW.p, n_tok, rows, cols, accumulate, dY.p, NULL));
    sync_check();
    std::vector<uint16_t> Y = dY.get();
    long bad = 0;
    for (size_t i = Y0.size(); i < Y.size(); i++) if (Y[i] != 0x7e7e) bad++;
    std::vector<std::pair<int, int>> check;
    const double work = (double)n_tok * rows * cols;
    if (work <= 6e8) {
        for (int t = 0; t < n_tok; t++)
            for (int r = 0; r < rows; r++) check.push_back({t, r});
    } else {
        for (int i = 0; i < 20000; i++) check.push_back({(int)(nexti() % n_tok), (int)(nexti() % rows)});
        for (int r = 0; r < rows; r++) {
            check.push_back({0, r});
            check.push_back({n_tok - 1, r});
        }
    }
    double worst = 0;
#pragma omp parallel for reduction(+ : bad) schedule(static)
    for (long i = 0; i < (long)check.size(); i++) {
        const int t = check[i].first, r = check[i].second;
        double acc = 0, aabs = 0;
        for (int c = 0; c < cols; c++) {
            const double p = (double)h2f(X[(size_t)t * cols + c]) * h2f(W[(size_t)r * cols + c]);
            acc += p;
            aabs += fabs(p);
        }
        const double old = accumulate ? h2f(Y0[(size_t)t * rows + r]) : 0.0;
        const double ref = acc + old;
        const double tol = 1e-4 * aabs + fabs(ref) / 1024.0 + fabs(old) / 1024.0 + 1e-5;
        const double e = fabs((double)h2f(Y[(size_t)t * rows + r]) - ref);
        if (!(e <= tol)) bad++;
#pragma omp critical
        worst = std::max(worst, e / tol);
    }
    report(bad == 0, "gemm_f16", "n_tok %d rows %d cols %d acc %d: %zu entries checked, max err/tol %.3f, %ld bad", n_tok,
           rows, cols, accumulate, check.size(), worst, bad);
    if (timed) {
        const double us = time_graph([&](cudaStream_t s) { return dd_cuda_op_gemm_f16(dX.p, dW.p, n_tok, rows, cols, 0, dY.p, s); }, 10);
        printf("INFO gemm_f16 n_tok %d rows %d cols %d: %.1f us, %.1f TFLOP/s\n", n_tok, rows, cols, us,
               us > 0 ? 2.0 * work / us * 1e-6 : 0.0);
    }
}

/* ================================================================================================
 * dequant
 * ============================================================================================== */
static void test_dequant(int d_in, int d_out, int bits, int gs) {
    dd_shape s = {d_in, d_out, bits, gs};
    const size_t rb = dd_qweight_row_bytes(&s);
    const int ng = dd_num_groups(&s), d_in_pad = dd_d_in_pad(&s);
    std::vector<uint8_t> q(rb * d_out);
    for (auto &v : q) v = (uint8_t)nexti(); /* padded codes too: ignored */
    std::vector<uint16_t> sc((size_t)d_out * ng), zr((size_t)d_out * ng);
    for (auto &v : sc) v = dd_float_to_half((float)(0.002 + 0.02 * unif()));
    for (auto &v : zr) v = dd_float_to_half((float)(unif() * ((1 << bits) - 1)));
    sc[0] = dd_float_to_half(1e-6f); /* fp16 subnormal scale: exercises the exact rounding */
    DBuf<uint8_t> dq(q.size());
    dq.up(q);
    DBuf<uint16_t> dsc(sc.size()), dzr(zr.size()), dw((size_t)d_out * d_in + 8);
    dsc.up(sc);
    dzr.up(zr);
    dw.fill_bytes(0x7e);
    OP("dequant", dd_cuda_op_dequant(&s, dq.p, dsc.p, dzr.p, dw.p, NULL));
    sync_check();
    std::vector<uint16_t> w = dw.get();
    std::vector<float> row(d_in_pad);
    long bad = 0;
    for (int o = 0; o < d_out; o++) {
        dd_cpu_dequant_row(&s, q.data(), sc.data(), zr.data(), o, row.data());
        for (int j = 0; j < d_in; j++)
            if (w[(size_t)o * d_in + j] != dd_float_to_half(row[j])) bad++;
    }
    for (int k = 0; k < 8; k++)
        if (w[(size_t)d_out * d_in + k] != 0x7e7e) bad++; /* nothing written past the end */
    report(bad == 0, "dequant", "d_in %d d_out %d bits %d group %d: %ld mismatches vs dd_cpu_dequant_row (bit-exact)", d_in,
           d_out, bits, gs, bad);
}

/* ================================================================================================
 * sample_score
 * ============================================================================================== */
struct HostDist {
    std::vector<double> p;     /* softmax((l - max) / T), NaN logits prob 0 */
    std::vector<double> above; /* mass of tokens with strictly larger p */
};
static HostDist host_dist(const std::vector<float> &l, double T) {
    HostDist D;
    const size_t V = l.size();
    double M = -INFINITY;
    for (float v : l) if (v == v) M = std::max(M, (double)v);
    D.p.assign(V, 0.0);
    double z = 0;
    for (size_t i = 0; i < V; i++) if (l[i] == l[i]) z += (D.p[i] = exp(((double)l[i] - M) / T));
    for (auto &v : D.p) v /= z;
    std::vector<size_t> idx(V);
    for (size_t i = 0; i < V; i++) idx[i] = i;
    std::sort(idx.begin(), idx.end(), [&](size_t a, size_t b) { return D.p[a] > D.p[b]; });
    D.above.assign(V, 0.0);
    double cum = 0;
    for (size_t k = 0; k < V;) {
        size_t e = k;
        while (e < V && D.p[idx[e]] == D.p[idx[k]]) e++;
        double grp = 0;
        for (size_t m = k; m < e; m++) {
            D.above[idx[m]] = cum;
            grp += D.p[idx[m]];
        }
        cum += grp;
        k = e;
    }
    return D;
}

struct SampBufs {
    DBuf<float> logits, nll, kl, ref;
    DBuf<dd_cuda_sampling> params;
    DBuf<int32_t> nfixed, refstart, tokens;
    int vocab = 0;
};
static void samp_setup(SampBufs &B, const std::vector<float> &l, int n_tok_slots) {
    B.vocab = (int)l.size();
    B.logits.alloc(l.size());
    B.logits.up(l);
    B.params.alloc(1);
    B.nfixed.alloc(1);
    B.refstart.alloc(1);
    B.tokens.alloc(n_tok_slots);
    B.tokens.fill_bytes(0x55); /* 0x55555555 sentinel */
    B.nll.alloc(n_tok_slots);
    B.nll.fill_bytes(0x55);
    B.kl.alloc(n_tok_slots);
    B.kl.fill_bytes(0x55);
}
static void samp_params(SampBufs &B, float T, float top_p, uint64_t seed, int n_fixed) {
    dd_cuda_sampling s;
    memset(&s, 0, sizeof s);
    s.temperature = T;
    s.top_p = top_p;
    s.seed = seed;
    B.params.up(&s, 1);
    B.nfixed.up(&n_fixed, 1);
}
static const int32_t kSentinel = 0x55555555;

static std::vector<float> rand_logits(int V, double sigma) {
    std::vector<float> l(V);
    for (auto &v : l) v = (float)(gauss() * sigma);
    return l;
}

static void test_greedy(int V) {
    std::vector<float> l = rand_logits(V, 3.0);
    float mx = -INFINITY;
    for (float v : l) mx = std::max(mx, v);
    const int a = (int)(nexti() % (V / 2)), b = V / 2 + (int)(nexti() % (V / 2));
    l[a] = l[b] = mx + 1.f; /* tie: the lower index wins */
    l[(a + 7) % V] = NAN;  /* NaN is never the argmax */
    SampBufs B;
    samp_setup(B, l, 64);
    const int p = 10;
    set_pos(p);
    long bad = 0;
    for (int variant = 0; variant < 2; variant++) {
        /* T = 0 (tie: lowest index); or T > 0 with top_p tiny and the tie broken (nucleus = the top
         * token alone) */
        if (variant == 1) {
            std::vector<float> l1 = l;
            l1[b] = mx + 0.5f;
            B.logits.up(l1);
        }
        samp_params(B, variant ? 0.7f : 0.f, variant ? 1e-9f : 0.9f, 99, 5);
        B.tokens.fill_bytes(0x55);
        OP("sample_score", dd_cuda_op_sample_score(B.logits.p, V, B.params.p, g_pos->p, B.nfixed.p, B.tokens.p, B.nll.p,
                                                   NULL, B.refstart.p, 0, B.kl.p, NULL));
        sync_check();
        std::vector<int32_t> tk = B.tokens.get();
        if (tk[p + 1] != a) bad++;
        for (int i = 0; i < 64; i++) if (i != p + 1 && tk[i] != kSentinel) bad++;
    }
    std::vector<float> nl = B.nll.get();
    if (memcmp(&nl[p], &kSentinel, 4) != 0) bad++; /* sampling positions are not scored */
    report(bad == 0, "sample_score", "greedy vocab %d (tie at %d/%d, a NaN): %ld bad", V, a, b, bad);
}

static void test_score(int V) {
    std::vector<float> l = rand_logits(V, 2.5);
    l[3] = -INFINITY; /* a masked token */
    const int p = 10, ref_start = 8, ref_rows = 5;
    std::vector<float> ref((size_t)ref_rows * V);
    for (float &v : ref) v = (float)(gauss() * 3.0); /* rows other than p - ref_start: noise */
    { /* the row of p: log_softmax of perturbed logits */
        std::vector<double> r(V);
        double m = -INFINITY;
        for (int i = 0; i < V; i++) m = std::max(m, r[i] = l[i] + 0.3 * gauss());
        double z = 0;
        for (int i = 0; i < V; i++) if (std::isfinite(r[i])) z += exp(r[i] - m);
        for (int i = 0; i < V; i++) ref[(size_t)(p - ref_start) * V + i] = (float)(r[i] - m - log(z));
        ref[(size_t)(p - ref_start) * V + 5] = -INFINITY; /* a token the reference rules out */
    }
    SampBufs B;
    samp_setup(B, l, 64);
    B.ref.alloc(ref.size());
    B.ref.up(ref);
    B.refstart.up(&ref_start, 1);
    std::vector<int32_t> tokens(64, 0);
    int target = (int)(nexti() % V);
    if (target == 3) target = 4; /* not the masked (-inf) token */
    tokens[p + 1] = target;
    B.tokens.up(tokens);
    samp_params(B, 0.8f, 0.9f, 5, 100); /* p + 1 < n_fixed: scoring, no sampling */
    set_pos(p);
    OP("sample_score", dd_cuda_op_sample_score(B.logits.p, V, B.params.p, g_pos->p, B.nfixed.p, B.tokens.p, B.nll.p, B.ref.p,
                                               B.refstart.p, ref_rows, B.kl.p, NULL));
    sync_check();
    /* host, double */
    double M = -INFINITY;
    for (float v : l) M = std::max(M, (double)v);
    double z = 0;
    for (float v : l) z += exp((double)v - M);
    const double lse = M + log(z);
    const double nll_ref = lse - l[target];
    double kl_ref = 0;
    const float *r = &ref[(size_t)(p - ref_start) * V];
    for (int i = 0; i < V; i++) {
        const double e = exp((double)r[i]);
        if (e != 0) kl_ref += e * ((double)r[i] - ((double)l[i] - lse));
    }
    std::vector<float> nl = B.nll.get(), kl = B.kl.get();
    std::vector<int32_t> tk = B.tokens.get();
    long bad = 0;
    const double enll = fabs(nl[p] - nll_ref), ekl = fabs(kl[p] - kl_ref);
    if (!(enll <= 1e-4 * fabs(nll_ref) + 1e-6)) bad++;
    if (!(ekl <= 1e-4 * fabs(kl_ref) + 1e-7)) bad++;
    if (tk[p + 1] != target) bad++; /* never overwritten below n_fixed */
    for (int i = 0; i < 64; i++) {
        if (i != p && memcmp(&nl[i], &kSentinel, 4) != 0) bad++;
        if (i != p && memcmp(&kl[i], &kSentinel, 4) != 0) bad++;
    }
    report(bad == 0, "sample_score", "nll/kl vocab %d: nll %.6f (ref %.6f), kl %.6g (ref %.6g): %ld bad", V, nl[p], nll_ref,
           kl[p], kl_ref, bad);

    /* outside the reference rows: kl untouched; NaN logit: nll NaN */
    B.nll.fill_bytes(0x55);
    B.kl.fill_bytes(0x55);
    const int p2 = 13; /* p2 - ref_start = 5 = ref_rows */
    tokens[p2 + 1] = target;
    B.tokens.up(tokens);
    std::vector<float> l2 = l;
    l2[V / 2] = NAN;
    B.logits.up(l2);
    set_pos(p2);
    OP("sample_score", dd_cuda_op_sample_score(B.logits.p, V, B.params.p, g_pos->p, B.nfixed.p, B.tokens.p, B.nll.p, B.ref.p,
                                               B.refstart.p, ref_rows, B.kl.p, NULL));
    sync_check();
    nl = B.nll.get();
    kl = B.kl.get();
    bad = 0;
    if (!std::isnan(nl[p2])) bad++;
    for (int i = 0; i < 64; i++) if (memcmp(&kl[i], &kSentinel, 4) != 0) bad++;
    report(bad == 0, "sample_score", "vocab %d: NaN logit -> nll NaN, kl only inside ref rows: %ld bad", V, bad);
}

/* n_draws draws at positions 0..n_draws-1 (dd_cuda_op_advance between them, one seed): every draw
 * in the host nucleus; with check_freq, empirical frequencies against the renormalised nucleus. */
static void test_topp(const std::vector<float> &l, float T, float top_p, int n_draws, bool check_freq, const char *tag) {
    const int V = (int)l.size();
    HostDist D = host_dist(l, T);
    /* the host nucleus: tokens whose strictly-larger mass is below top_p.  For the frequency
     * tests top_p is moved off borderline values (a cumulative mass within 1e-3 of it). */
    double margin = 1.0;
    for (int tries = 0; tries < 50; tries++) {
        margin = 1.0;
        for (int i = 0; i < V; i++) margin = std::min(margin, fabs(D.above[i] - (double)top_p));
        if (!check_freq || top_p >= 1.f || margin >= 1e-3) break;
        top_p = std::min(1.f, top_p + 0.003f);
    }
    double nmass = 0;
    int nsize = 0;
    for (int i = 0; i < V; i++)
        if (D.above[i] < top_p) {
            nmass += D.p[i];
            nsize++;
        }
    SampBufs B;
    samp_setup(B, l, n_draws + 2);
    samp_params(B, T, top_p, 0xC0FFEEull, 0);
    set_pos(0);
    for (int i = 0; i < n_draws; i++) {
        OP("sample_score", dd_cuda_op_sample_score(B.logits.p, V, B.params.p, g_pos->p, B.nfixed.p, B.tokens.p, NULL, NULL,
                                                   B.refstart.p, 0, NULL, NULL));
        OP("advance", dd_cuda_op_advance(g_pos->p, 1, NULL));
    }
    sync_check();
    std::vector<int32_t> tk = B.tokens.get();
    int pos_after = 0;
    g_pos->down(&pos_after, 1);
    long bad = 0, outside = 0;
    std::vector<int> cnt(V, 0);
    for (int i = 1; i <= n_draws; i++) {
        const int t = tk[i];
        if (t < 0 || t >= V) {
            bad++;
            continue;
        }
        cnt[t]++;
        if (!(D.above[t] < (double)top_p + 1e-6)) outside++; /* 1e-6: fp32 vs double at the boundary */
    }
    if (tk[0] != kSentinel) bad++;
    if (pos_after != n_draws) bad++;
    double worst = 0;
    if (check_freq) {
        for (int i = 0; i < V; i++) {
            const double q = D.above[i] < top_p ? D.p[i] / nmass : 0.0;
            const double f = (double)cnt[i] / n_draws;
            const double tol = 4.0 * sqrt(q * (1 - q) / n_draws) + 0.005;
            if (fabs(f - q) > tol) bad++;
            worst = std::max(worst, fabs(f - q) / tol);
        }
    }
    /* determinism: the same (seed, p) again gives the same token */
    set_pos(n_draws / 2);
    B.tokens.fill_bytes(0x55);
    OP("sample_score", dd_cuda_op_sample_score(B.logits.p, V, B.params.p, g_pos->p, B.nfixed.p, B.tokens.p, NULL, NULL,
                                               B.refstart.p, 0, NULL, NULL));
    sync_check();
    int32_t again = 0;
    CU(cudaMemcpy(&again, B.tokens.p + n_draws / 2 + 1, 4, cudaMemcpyDeviceToHost));
    if (again != tk[n_draws / 2 + 1]) bad++;
    report(bad == 0 && outside == 0, "sample_score",
           "%s vocab %d T %.2f top_p %.3f: %d draws, nucleus %d tokens (margin %.1e), %ld outside, freq max dev/tol %.2f, %ld bad",
           tag, V, T, top_p, n_draws, nsize, margin, outside, worst, bad);
}

/* ================================================================================================
 * argument checks and capture
 * ============================================================================================== */
static void test_args() {
    DBuf<uint16_t> a(1 << 16), b(1 << 16), c(1 << 16);
    DBuf<float> f(1 << 16);
    long bad = 0;
    auto expect = [&](dd_status got, dd_status want, const char *what) {
        if (got != want) {
            printf("  %s: got %s, want %s\n", what, dd_strerror(got), dd_strerror(want));
            bad++;
        }
    };
    expect(dd_cuda_op_attention(a.p, b.p, c.p, g_pos->p, 1, 8, 2, 96, 64, 1.f, 0, a.p, NULL), DD_ERR_UNSUPPORTED, "head_dim 96");
    expect(dd_cuda_op_attention(a.p, b.p, c.p, g_pos->p, 1, 9, 2, 64, 64, 1.f, 0, a.p, NULL), DD_ERR_INVALID_ARGUMENT, "9 % 2");
    expect(dd_cuda_op_attention(NULL, b.p, c.p, g_pos->p, 1, 8, 2, 64, 64, 1.f, 0, a.p, NULL), DD_ERR_INVALID_ARGUMENT, "NULL q");
    expect(dd_cuda_op_gemv_f16(a.p, b.p, 16, 12, f.p, NULL), DD_ERR_INVALID_ARGUMENT, "gemv cols 12");
    expect(dd_cuda_op_gemm_f16(a.p, b.p, 4, 24, 32, 0, c.p, NULL), DD_ERR_INVALID_ARGUMENT, "gemm rows 24");
    expect(dd_cuda_op_gemm_f16(a.p, b.p, 0, 32, 32, 0, c.p, NULL), DD_ERR_INVALID_ARGUMENT, "gemm n_tok 0");
    expect(dd_cuda_op_swiglu(a.p, b.p, 0, 1, c.p, NULL), DD_ERR_INVALID_ARGUMENT, "swiglu n 0");
    expect(dd_cuda_op_add_rmsnorm(f.p, a.p, NULL, 1e-5f, 64, 1, b.p, NULL), DD_ERR_INVALID_ARGUMENT, "rmsnorm w NULL");
    expect(dd_cuda_op_rope_store_kv(a.p, b.p, c.p, f.p, f.p, g_pos->p, 1, 2, 2, 7, 16, a.p, b.p, NULL),
           DD_ERR_INVALID_ARGUMENT, "rope odd head_dim");
    expect(dd_cuda_op_embed(a.p, 0, 8, (const int32_t *)b.p, g_pos->p, 1, f.p, NULL), DD_ERR_INVALID_ARGUMENT, "embed vocab 0");
    expect(dd_cuda_op_sample_score(f.p, 0, NULL, g_pos->p, g_pos->p, (int32_t *)a.p, NULL, NULL, NULL, 0, NULL, NULL),
           DD_ERR_INVALID_ARGUMENT, "sample NULL params");
    expect(dd_cuda_op_advance(NULL, 1, NULL), DD_ERR_INVALID_ARGUMENT, "advance NULL");
    dd_shape s = {100, 40, 3, 128}; /* d_out % 32 != 0 */
    expect(dd_cuda_op_dequant(&s, (const uint8_t *)a.p, b.p, c.p, a.p, NULL), DD_ERR_UNSUPPORTED, "dequant d_out 40");
    sync_check();
    report(bad == 0, "arguments", "host-side checks: %ld unexpected statuses", bad);
}

static void test_advance() {
    set_pos(5);
    OP("advance", dd_cuda_op_advance(g_pos->p, 3, NULL));
    OP("advance", dd_cuda_op_advance(g_pos->p, 0, NULL));
    sync_check();
    int v = 0;
    g_pos->down(&v, 1);
    report(v == 8, "advance", "5 + 3 + 0 = %d", v);
}

/* The decode tail captured into a graph (ThreadLocal mode, as the engine does) and replayed at two
 * positions: attention (a cluster launch on sm_90), gemv, gemm (large-tile config: raised shared
 * memory), sample_score (raised shared memory), advance; every result equals the eager one. */
static void test_capture(AttnData &A) {
    const int H = A.H, hd = A.hd, rows = 4096, cols = 1024, V = 4096;
    std::vector<uint16_t> q = rand_halves((size_t)H * hd, 1.0);
    std::vector<uint16_t> W((size_t)rows * cols), X((size_t)128 * cols);
    fill_fast_halves(W.data(), W.size(), 11);
    fill_fast_halves(X.data(), X.size(), 12);
    std::vector<float> l = rand_logits(V, 2.0);
    DBuf<uint16_t> dq(q.size()), dout(q.size()), dW(W.size()), dX(X.size()), dY((size_t)128 * rows);
    dq.up(q);
    dW.up(W);
    dX.up(X);
    DBuf<float> dy(rows);
    SampBufs B;
    samp_setup(B, l, A.max_seq + 2);
    samp_params(B, 1.0f, 0.9f, 7, 0);
    const int p0 = 1000;
    attn_upload(A, 0, A.max_seq);
    auto step = [&](cudaStream_t s) -> dd_status {
        dd_status st;
        if ((st = dd_cuda_op_attention(dq.p, A.dkc.p, A.dvc.p, g_pos->p, 1, H, A.KV, hd, A.max_seq, 0.088f, 0, dout.p, s))) return st;
        if ((st = dd_cuda_op_gemv_f16(dW.p, dX.p, rows, cols, dy.p, s))) return st;
        if ((st = dd_cuda_op_gemm_f16(dX.p, dW.p, 128, rows, cols, 0, dY.p, s))) return st;
        if ((st = dd_cuda_op_sample_score(B.logits.p, V, B.params.p, g_pos->p, B.nfixed.p, B.tokens.p, NULL, NULL,
                                          B.refstart.p, 0, NULL, s)))
            return st;
        return dd_cuda_op_advance(g_pos->p, 1, s);
    };
    /* eager at p0 and p0 + 1 */
    set_pos(p0);
    OP("capture", step(NULL));
    sync_check();
    std::vector<uint16_t> att0 = dout.get(), Y0 = dY.get();
    std::vector<float> y0 = dy.get();
    OP("capture", step(NULL));
    sync_check();
    std::vector<uint16_t> att1 = dout.get();
    std::vector<int32_t> tk_eager = B.tokens.get();
    /* captured */
    cudaStream_t st;
    CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    cudaGraph_t g = nullptr;
    cudaGraphExec_t ge = nullptr;
    CU(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
    const dd_status cs = step(st);
    const cudaError_t ce = cudaStreamEndCapture(st, &g);
    if (cs != DD_OK || ce != cudaSuccess) {
        report(false, "capture", "capture failed: %s | %s | %s", dd_strerror(cs), cudaGetErrorString(ce), dd_cuda_last_error());
        if (g) cudaGraphDestroy(g);
        cudaStreamDestroy(st);
        (void)cudaGetLastError();
        return;
    }
    CU(cudaGraphInstantiate(&ge, g, 0));
    B.tokens.fill_bytes(0x55);
    dout.fill_bytes(0);
    dY.fill_bytes(0);
    dy.fill_bytes(0);
    set_pos(p0);
    CU(cudaGraphLaunch(ge, st));
    CU(cudaStreamSynchronize(st));
    long bad = 0;
    if (dout.get() != att0) bad++;
    if (dY.get() != Y0) bad++;
    if (dy.get() != y0) bad++;
    CU(cudaGraphLaunch(ge, st));
    CU(cudaStreamSynchronize(st));
    if (dout.get() != att1) bad++;
    std::vector<int32_t> tk = B.tokens.get();
    if (tk[p0 + 1] != tk_eager[p0 + 1] || tk[p0 + 2] != tk_eager[p0 + 2]) bad++;
    int v = 0;
    g_pos->down(&v, 1);
    if (v != p0 + 2) bad++;
    report(bad == 0, "capture", "graph of attention+gemv+gemm+sample_score+advance replayed twice: %ld mismatches vs eager",
           bad);
    cudaGraphExecDestroy(ge);
    cudaGraphDestroy(g);
    cudaStreamDestroy(st);
}

/* ================================================================================================ */
int main() {
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev < 1) {
        printf("FAIL %-16s no CUDA device\n", "setup");
        g_fail++;
        finish_and_exit();
    }
    cudaDeviceProp prop;
    CU(cudaGetDeviceProperties(&prop, 0));
    printf("INFO device %s, %d SMs, cc %d.%d\n", prop.name, prop.multiProcessorCount, prop.major, prop.minor);
    init_lut();
    g_pos = new DBuf<int32_t>(1);

    test_args();
    test_advance();

    test_embed(49152, 576, 5, 3);
    test_embed(128256, 4096, 1, 0);

    test_rmsnorm(576, 1, true, true);
    test_rmsnorm(576, 5, true, true);
    test_rmsnorm(4096, 5, false, true);
    test_rmsnorm(4096, 1, true, false);
    test_rmsnorm(100, 3, true, true);

    test_rope(9, 3, 64, 300, 1, 299);
    test_rope(9, 3, 64, 300, 7, 0);
    test_rope(32, 8, 128, 300, 7, 150);
    test_rope(32, 8, 128, 300, 1, 0);

    {
        AttnData A;
        attn_make(A, 9, 3, 64, 2048);
        for (int L : {1, 7, 300, 2048}) test_attention(A, L - 1, 1, 0.125f, 0, "decode");
        test_attention(A, 299, 1, 1.0f, 0, "decode peaky");
        test_attention(A, 2047, 1, 0.125f, 100, "decode window");
        test_attention(A, 0, 7, 0.125f, 0, "prefill");
        test_attention(A, 236, 64, 0.125f, 0, "prefill");
        test_attention(A, 236, 64, 0.125f, 50, "prefill window");
        test_attention(A, 1536, 512, 0.125f, 0, "prefill");
        attn_timing(A, 9, 3, 64, 500);
    }
    {
        AttnData A;
        attn_make(A, 32, 8, 128, 2048);
        const float sc = 0.08838834764f;
        for (int L : {1, 7, 300, 2048}) test_attention(A, L - 1, 1, sc, 0, "decode");
        test_attention(A, 1999, 1, sc, 0, "decode");
        test_attention(A, 299, 1, 1.0f, 0, "decode peaky");
        test_attention(A, 2047, 1, sc, 100, "decode window");
        test_attention(A, 0, 7, sc, 0, "prefill");
        test_attention(A, 10, 5, sc, 0, "prefill");
        test_attention(A, 1984, 64, sc, 0, "prefill");
        test_attention(A, 1000, 300, sc, 128, "prefill window");
        attn_timing(A, 32, 8, 128, 512);
        attn_timing(A, 32, 8, 128, 2048);
        test_capture(A);
    }

    test_swiglu(1536, 3);
    test_swiglu(15, 3);
    test_swiglu(14336, 1);

    test_gemv(37, 24, false);
    test_gemv(200, 1024, false);
    test_gemv(1000, 32768, false);
    test_gemv(49152, 576, true);
    test_gemv(4096, 14336, true);
    test_gemv(128256, 4096, true);

    test_gemm(1, 4096, 4096, 0, false);
    test_gemm(5, 1040, 592, 0, false);
    test_gemm(5, 1040, 592, 1, false);
    test_gemm(17, 2048, 1024, 0, false);
    test_gemm(64, 2048, 1024, 0, false);
    test_gemm(37, 80, 48, 1, false);
    test_gemm(512, 1040, 592, 1, false);
    test_gemm(512, 1024, 4096, 0, false);
    test_gemm(512, 4096, 14336, 0, true);

    for (int bits : {3, 4})
        for (int gs : {64, 128}) {
            test_dequant(576, 64, bits, gs);
            test_dequant(4096, 96, bits, gs);
            test_dequant(100, 32, bits, gs);
        }

    test_greedy(49152);
    test_greedy(128256);
    test_score(49152);
    test_score(128256);
    {
        std::vector<float> l = rand_logits(50, 1.5);
        test_topp(l, 0.8f, 0.75f, 2000, true, "freq");
        test_topp(l, 1.3f, 1.0f, 2000, true, "freq full");
        std::vector<float> l2 = rand_logits(1000, 2.0);
        test_topp(l2, 1.0f, 0.5f, 1000, false, "nucleus");
        test_topp(rand_logits(49152, 2.0), 1.0f, 0.9f, 50, false, "nucleus");
        test_topp(rand_logits(128256, 2.0), 1.0f, 0.9f, 50, false, "nucleus");
        test_topp(rand_logits(128256, 3.0), 0.6f, 0.5f, 50, false, "nucleus");
        std::vector<float> flat(49152, 0.f); /* ties everywhere: one bin for the whole vocabulary */
        flat[7] = flat[100] = flat[40000] = 5.f;
        test_topp(flat, 1.0f, 0.9f, 50, false, "ties");
    }
    { /* sampling timings (one block) */
        std::vector<float> l = rand_logits(128256, 2.0);
        SampBufs B;
        samp_setup(B, l, 4);
        set_pos(1);
        for (int mode = 0; mode < 3; mode++) {
            samp_params(B, mode ? 1.f : 0.f, mode == 2 ? 0.9f : 1.f, 3, 0);
            const double us = time_graph([&](cudaStream_t s) {
                return dd_cuda_op_sample_score(B.logits.p, 128256, B.params.p, g_pos->p, B.nfixed.p, B.tokens.p, NULL, NULL,
                                               B.refstart.p, 0, NULL, s);
            }, 20);
            printf("INFO sample_score vocab 128256 %s: %.2f us\n", mode == 0 ? "greedy" : mode == 1 ? "T 1 top_p 1" : "T 1 top_p 0.9",
                   us);
        }
    }
    sync_check();
    finish_and_exit();
}
