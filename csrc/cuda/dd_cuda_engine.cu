/* The decode engine (dd_cuda_engine.h): allocation, the step's launch sequence, graph capture
 * and replay.  The ops are in dd_cuda_ops.cu, the projections are dd_cuda_layer_forward. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dd_cuda_engine.h"
#include "dd_cuda_internal.cuh"

/* return a failed dd_status expression (DD_CK is for CUDA runtime calls) */
#define ENG_CK(expr)                                                                    \
    do {                                                                                \
        const dd_status eng_st_ = (expr);                                               \
        if (eng_st_ != DD_OK) return eng_st_;                                           \
    } while (0)

/* device-side token state: [0] pos, [1] n_fixed, [2] ref_start */
enum { ST_POS = 0, ST_N_FIXED = 1, ST_REF_START = 2, ST_WORDS = 4 };

struct dd_cuda_engine {
    dd_engine_config c;
    int device;
    cudaStream_t stream;
    const dd_cuda_layer **layers; /* borrowed, [n_layers * DD_LIN_PER_BLOCK] */
    dd_cuda_run *runs;
    dd_cuda_workspace *ws;
    /* owned device memory */
    uint16_t *d_embed, *d_head; /* d_head == d_embed when tied */
    float *d_norms, *d_cos, *d_sin;
    uint16_t *d_kcache, *d_vcache; /* [n_layers, n_kv, max_seq, head_dim] */
    float *d_h;
    uint16_t *d_xn, *d_q, *d_k, *d_v, *d_att, *d_y, *d_gate, *d_up, *d_act;
    uint16_t *d_qkv, *d_gu; /* fused decode: the stacked outputs (q|k|v, gate|up) of one row */
    uint16_t *d_wdeq; /* prefill: one dequantised projection */
    float *d_logits;
    int32_t *d_state, *d_tokens;
    float *d_nll, *d_kl, *d_ref;
    int32_t ref_rows;
    dd_cuda_sampling *d_sampling;
    size_t nbytes;
    /* host mirror of the token state (bounds are checked on the host before every launch) */
    int32_t pos, n_fixed;
    cudaGraphExec_t graph;
    int graph_valid;
    cudaEvent_t ev0, ev1;
};

static dd_status eng_alloc(dd_cuda_engine *e, void **p, size_t bytes) {
    dd_status st = dd_cuda_malloc(p, bytes);
    if (st == DD_OK) e->nbytes += bytes;
    return st;
}

int dd_engine_layers_per_block(const dd_engine_config *c) {
    return c && c->fused ? (int)DD_FLIN_PER_BLOCK : (int)DD_LIN_PER_BLOCK;
}

static size_t lin_out(const dd_engine_config *c, int i) {
    const size_t QD = (size_t)c->n_heads * c->head_dim, KD = (size_t)c->n_kv_heads * c->head_dim;
    if (c->fused) {
        switch (i) {
        case DD_FLIN_QKV: return QD + 2 * KD;
        case DD_FLIN_O: case DD_FLIN_DOWN: return (size_t)c->dim;
        default: return 2 * (size_t)c->ffn_dim;
        }
    }
    switch (i) {
    case DD_LIN_Q: return (size_t)c->n_heads * c->head_dim;
    case DD_LIN_K: case DD_LIN_V: return (size_t)c->n_kv_heads * c->head_dim;
    case DD_LIN_O: case DD_LIN_DOWN: return (size_t)c->dim;
    default: return (size_t)c->ffn_dim;
    }
}
static size_t lin_in(const dd_engine_config *c, int i) {
    if (c->fused) {
        switch (i) {
        case DD_FLIN_O: return (size_t)c->n_heads * c->head_dim;
        case DD_FLIN_DOWN: return (size_t)c->ffn_dim;
        default: return (size_t)c->dim;
        }
    }
    switch (i) {
    case DD_LIN_O: return (size_t)c->n_heads * c->head_dim;
    case DD_LIN_DOWN: return (size_t)c->ffn_dim;
    default: return (size_t)c->dim;
    }
}

static dd_status config_check(const dd_engine_config *c) {
    if (!c) return DD_ERR_INVALID_ARGUMENT;
    if (c->dim <= 0 || c->n_layers <= 0 || c->n_heads <= 0 || c->n_kv_heads <= 0 ||
        c->head_dim <= 0 || c->ffn_dim <= 0 || c->vocab <= 0 || c->max_seq <= 0 ||
        c->max_prefill <= 0 || c->sliding_window < 0 || !(c->norm_eps > 0.f) ||
        c->n_heads % c->n_kv_heads || c->head_dim % 2 || c->dim % 16 || c->ffn_dim % 16 ||
        (c->n_heads * c->head_dim) % 16 || c->max_seq > (1 << 24) || c->max_prefill > c->max_seq ||
        c->dim > 65536 || c->ffn_dim > (1 << 20) || c->vocab > (1 << 24) || (c->fused & ~1))
        return DD_ERR_INVALID_ARGUMENT;
    if (c->head_dim != 64 && c->head_dim != 128) return DD_ERR_UNSUPPORTED;
    return DD_OK;
}

dd_status dd_cuda_engine_destroy(dd_cuda_engine *e) {
    if (!e) return DD_OK;
    dd_status first = DD_OK, st;
#define ENG_FREE(p) do { if (p) { st = dd_cuda_free(p); if (first == DD_OK) first = st; } } while (0)
    if (e->stream) { st = DD_CU(cudaStreamSynchronize(e->stream)); if (first == DD_OK) first = st; }
    if (e->graph_valid) { st = DD_CU(cudaGraphExecDestroy(e->graph)); if (first == DD_OK) first = st; }
    if (e->d_head != e->d_embed) ENG_FREE(e->d_head);
    ENG_FREE(e->d_embed); ENG_FREE(e->d_norms); ENG_FREE(e->d_cos); ENG_FREE(e->d_sin);
    ENG_FREE(e->d_kcache); ENG_FREE(e->d_vcache); ENG_FREE(e->d_h); ENG_FREE(e->d_xn);
    ENG_FREE(e->d_q); ENG_FREE(e->d_k); ENG_FREE(e->d_v); ENG_FREE(e->d_att); ENG_FREE(e->d_y);
    ENG_FREE(e->d_gate); ENG_FREE(e->d_up); ENG_FREE(e->d_act); ENG_FREE(e->d_wdeq);
    ENG_FREE(e->d_qkv); ENG_FREE(e->d_gu); ENG_FREE(e->d_logits); ENG_FREE(e->d_state); ENG_FREE(e->d_tokens); ENG_FREE(e->d_nll);
    ENG_FREE(e->d_kl); ENG_FREE(e->d_ref); ENG_FREE(e->d_sampling);
#undef ENG_FREE
    if (e->ws) { st = dd_cuda_workspace_destroy(e->ws); if (first == DD_OK) first = st; }
    if (e->ev0) cudaEventDestroy(e->ev0);
    if (e->ev1) cudaEventDestroy(e->ev1);
    if (e->stream) cudaStreamDestroy(e->stream);
    free(e->layers);
    free(e->runs);
    free(e);
    return first;
}

dd_status dd_cuda_engine_create(const dd_engine_config *c, const uint16_t *h_embed,
                                const uint16_t *h_head, const float *h_norms, const float *h_cos,
                                const float *h_sin, const dd_cuda_layer *const *layers,
                                dd_cuda_engine **out) {
    if (!out) return DD_ERR_INVALID_ARGUMENT;
    *out = NULL;
    dd_status st = config_check(c);
    if (st != DD_OK) return st;
    if (!h_embed || !h_norms || !h_cos || !h_sin || !layers) return DD_ERR_INVALID_ARGUMENT;
    int device;
    DD_CK(cudaGetDevice(&device));
    const int per_block = dd_engine_layers_per_block(c);
    const int n_lin = c->n_layers * per_block;
    int32_t max_in = 0, max_out = 0;
    size_t max_w = 0;
    for (int l = 0; l < n_lin; l++) {
        const dd_cuda_layer *L = layers[l];
        if (!L) return DD_ERR_INVALID_ARGUMENT;
        const dd_shape *s = dd_cuda_layer_shape(L);
        const int i = l % per_block;
        if ((size_t)s->d_in != lin_in(c, i) || (size_t)s->d_out != lin_out(c, i) ||
            dd_cuda_layer_device(L) != device)
            return DD_ERR_INVALID_ARGUMENT;
        if (s->d_in > max_in) max_in = s->d_in;
        if (s->d_out > max_out) max_out = s->d_out;
        if ((size_t)s->d_in * s->d_out > max_w) max_w = (size_t)s->d_in * s->d_out;
    }
    dd_cuda_engine *e = (dd_cuda_engine *)calloc(1, sizeof *e);
    if (!e) return DD_ERR_OUT_OF_MEMORY;
    e->c = *c;
    e->device = device;
    e->layers = (const dd_cuda_layer **)malloc(sizeof(*e->layers) * n_lin);
    e->runs = (dd_cuda_run *)malloc(sizeof(*e->runs) * n_lin);
    if (!e->layers || !e->runs) { dd_cuda_engine_destroy(e); return DD_ERR_OUT_OF_MEMORY; }
    memcpy(e->layers, layers, sizeof(*e->layers) * n_lin);
    const int n_tb = dd_n_tb_default(dd_cuda_layer_n_sm(layers[0]));
    for (int l = 0; l < n_lin; l++) {
        st = dd_cuda_run_init(layers[l], 0, n_tb, DD_PATH_FUSED, NULL, &e->runs[l]);
        if (st != DD_OK) { dd_cuda_engine_destroy(e); return st; }
    }
    const size_t D = c->dim, V = c->vocab, P = c->max_prefill, F = c->ffn_dim;
    const size_t QD = (size_t)c->n_heads * c->head_dim, KD = (size_t)c->n_kv_heads * c->head_dim;
    const size_t half = c->head_dim / 2, S = c->max_seq;
    const size_t cache = (size_t)c->n_layers * KD * S;
#define TRY_ALLOC(p, bytes) DD_TRY(eng_alloc(e, (void **)&(p), (bytes)))
    DD_TRY_CU(cudaStreamCreateWithFlags(&e->stream, cudaStreamNonBlocking));
    DD_TRY_CU(cudaEventCreate(&e->ev0));
    DD_TRY_CU(cudaEventCreate(&e->ev1));
    DD_TRY(dd_cuda_workspace_create(device, max_in, max_out, &e->ws));
    TRY_ALLOC(e->d_embed, V * D * 2);
    if (h_head) TRY_ALLOC(e->d_head, V * D * 2); else e->d_head = e->d_embed;
    TRY_ALLOC(e->d_norms, (2 * (size_t)c->n_layers + 1) * D * 4);
    TRY_ALLOC(e->d_cos, S * half * 4);
    TRY_ALLOC(e->d_sin, S * half * 4);
    TRY_ALLOC(e->d_kcache, cache * 2);
    TRY_ALLOC(e->d_vcache, cache * 2);
    TRY_ALLOC(e->d_h, P * D * 4);
    TRY_ALLOC(e->d_xn, P * D * 2);
    TRY_ALLOC(e->d_q, P * QD * 2);
    TRY_ALLOC(e->d_k, P * KD * 2);
    TRY_ALLOC(e->d_v, P * KD * 2);
    TRY_ALLOC(e->d_att, P * QD * 2);
    TRY_ALLOC(e->d_y, P * D * 2);
    TRY_ALLOC(e->d_gate, P * F * 2);
    TRY_ALLOC(e->d_up, P * F * 2);
    TRY_ALLOC(e->d_act, P * F * 2);
    TRY_ALLOC(e->d_wdeq, max_w * 2);
    if (c->fused) {
        TRY_ALLOC(e->d_qkv, (QD + 2 * KD) * 2);
        TRY_ALLOC(e->d_gu, 2 * F * 2);
    }
    TRY_ALLOC(e->d_logits, V * 4);
    TRY_ALLOC(e->d_state, ST_WORDS * 4);
    TRY_ALLOC(e->d_tokens, (S + 1) * 4);
    TRY_ALLOC(e->d_nll, S * 4);
    TRY_ALLOC(e->d_kl, S * 4);
    TRY_ALLOC(e->d_sampling, sizeof(dd_cuda_sampling));
#undef TRY_ALLOC
    DD_TRY(dd_cuda_memcpy(e->d_embed, h_embed, V * D * 2, 0, e->stream, 0));
    if (h_head) DD_TRY(dd_cuda_memcpy(e->d_head, h_head, V * D * 2, 0, e->stream, 0));
    DD_TRY(dd_cuda_memcpy(e->d_norms, h_norms, (2 * (size_t)c->n_layers + 1) * D * 4, 0, e->stream, 0));
    DD_TRY(dd_cuda_memcpy(e->d_cos, h_cos, S * half * 4, 0, e->stream, 0));
    DD_TRY(dd_cuda_memcpy(e->d_sin, h_sin, S * half * 4, 0, e->stream, 0));
    /* a zero cache: positions never written are never read, but sanitizers see defined memory */
    DD_TRY_CU(cudaMemsetAsync(e->d_kcache, 0, cache * 2, e->stream));
    DD_TRY_CU(cudaMemsetAsync(e->d_vcache, 0, cache * 2, e->stream));
    DD_TRY_CU(cudaMemsetAsync(e->d_state, 0, ST_WORDS * 4, e->stream));
    DD_TRY_CU(cudaMemsetAsync(e->d_tokens, 0, (S + 1) * 4, e->stream));
    DD_TRY_CU(cudaStreamSynchronize(e->stream));
    DD_TRY(dd_cuda_engine_set_sampling(e, 0.f, 1.f, 0));
    *out = e;
    return DD_OK;
fail:
    dd_cuda_engine_destroy(e);
    return st;
}

static void invalidate_graph(dd_cuda_engine *e) {
    if (e->graph_valid) {
        cudaGraphExecDestroy(e->graph);
        e->graph_valid = 0;
    }
}

dd_status dd_cuda_engine_set_runs(dd_cuda_engine *e, const int32_t *k_chunk, int32_t n_tb) {
    if (!e || !k_chunk) return DD_ERR_INVALID_ARGUMENT;
    const int n_lin = e->c.n_layers * dd_engine_layers_per_block(&e->c);
    dd_cuda_run *runs = (dd_cuda_run *)malloc(sizeof(*runs) * n_lin);
    if (!runs) return DD_ERR_OUT_OF_MEMORY;
    for (int l = 0; l < n_lin; l++) {
        dd_status st = dd_cuda_run_init(e->layers[l], k_chunk[l], n_tb, DD_PATH_FUSED, NULL, &runs[l]);
        if (st != DD_OK) { free(runs); return st; }
    }
    memcpy(e->runs, runs, sizeof(*runs) * n_lin);
    free(runs);
    invalidate_graph(e);
    return DD_OK;
}

dd_status dd_cuda_engine_set_sampling(dd_cuda_engine *e, float temperature, float top_p,
                                      uint64_t seed) {
    if (!e || !(temperature >= 0.f) || !isfinite(temperature) || !(top_p > 0.f) || !(top_p <= 1.f))
        return DD_ERR_INVALID_ARGUMENT;
    dd_cuda_sampling s = {temperature, top_p, seed};
    return dd_cuda_memcpy(e->d_sampling, &s, sizeof s, 0, e->stream, 1);
}

dd_status dd_cuda_engine_set_reference(dd_cuda_engine *e, const float *h_ref_logp, int32_t rows,
                                       int32_t start) {
    if (!e || rows < 0 || start < 0 || (rows && !h_ref_logp) || (int64_t)start + rows > e->c.max_seq)
        return DD_ERR_INVALID_ARGUMENT;
    DD_CK(cudaStreamSynchronize(e->stream));
    if (rows != e->ref_rows) {
        /* the buffer's address is baked into the graph: a new buffer means a new capture */
        invalidate_graph(e);
        if (e->d_ref) {
            dd_status st = dd_cuda_free(e->d_ref);
            e->nbytes -= (size_t)e->ref_rows * e->c.vocab * 4;
            e->d_ref = NULL;
            e->ref_rows = 0;
            if (st != DD_OK) return st;
        }
        if (rows) {
            ENG_CK(eng_alloc(e, (void **)&e->d_ref, (size_t)rows * e->c.vocab * 4));
            e->ref_rows = rows;
        }
    }
    if (rows) ENG_CK(dd_cuda_memcpy(e->d_ref, h_ref_logp, (size_t)rows * e->c.vocab * 4, 0, e->stream, 0));
    int32_t s = start;
    return dd_cuda_memcpy(e->d_state + ST_REF_START, &s, 4, 0, e->stream, 1);
}

dd_status dd_cuda_engine_reset(dd_cuda_engine *e, const int32_t *h_tokens, int32_t n) {
    if (!e || !h_tokens || n < 1 || n > e->c.max_seq + 1) return DD_ERR_INVALID_ARGUMENT;
    for (int32_t i = 0; i < n; i++)
        if (h_tokens[i] < 0 || h_tokens[i] >= e->c.vocab) return DD_ERR_INVALID_ARGUMENT;
    DD_CK(cudaStreamSynchronize(e->stream));
    ENG_CK(dd_cuda_memcpy(e->d_tokens, h_tokens, (size_t)n * 4, 0, e->stream, 0));
    int32_t st[2] = {0, n};
    ENG_CK(dd_cuda_memcpy(e->d_state, st, sizeof st, 0, e->stream, 0));
    /* NaN (all-ones bytes) marks "not scored" */
    DD_CK(cudaMemsetAsync(e->d_nll, 0xff, (size_t)e->c.max_seq * 4, e->stream));
    DD_CK(cudaMemsetAsync(e->d_kl, 0xff, (size_t)e->c.max_seq * 4, e->stream));
    DD_CK(cudaStreamSynchronize(e->stream));
    e->pos = 0;
    e->n_fixed = n;
    return DD_OK;
}

/* One projection (slot i of block l) for a decode row, with compensation (DecLinear). */
static dd_status linear(dd_cuda_engine *e, int l, int i, const uint16_t *x, uint16_t *y, int n_tok) {
    const int idx = l * dd_engine_layers_per_block(&e->c) + i;
    return dd_cuda_layer_forward(e->layers[idx], &e->runs[idx], e->ws, x, y, n_tok, 0, e->stream);
}

/* The same projection for prefill rows, without compensation: dequantised once, then one tensor-
 * core GEMM per part of its stacked output rows (n_parts 3 for q|k|v, 2 for gate|up, else 1), each
 * into its own [n_tok, width] buffer. */
static dd_status linear_prefill(dd_cuda_engine *e, int l, int i, const uint16_t *x, int n_tok,
                                int n_parts, uint16_t *const *ys, const int32_t *widths) {
    const dd_cuda_layer *L = e->layers[l * dd_engine_layers_per_block(&e->c) + i];
    const dd_shape *s = &L->shape;
    ENG_CK(dd_cuda_op_dequant(s, L->d_qweight, L->d_scales, L->d_zeros, e->d_wdeq, e->stream));
    size_t row0 = 0;
    for (int p = 0; p < n_parts; p++) {
        ENG_CK(dd_cuda_op_gemm_f16(x, e->d_wdeq + row0 * s->d_in, n_tok, widths[p], s->d_in, 0, ys[p],
                                   e->stream));
        row0 += (size_t)widths[p];
    }
    return DD_OK;
}

/* one projection of block l into one output (slot i; prefill or decode) */
static dd_status project1(dd_cuda_engine *e, int l, int i, const uint16_t *x, uint16_t *y, int32_t width,
                          int n_tok, int prefill) {
    return prefill ? linear_prefill(e, l, i, x, n_tok, 1, &y, &width) : linear(e, l, i, x, y, n_tok);
}

/* The launches of one step over n_tok rows at positions [pos, pos + n_tok). */
static dd_status enqueue_rows(dd_cuda_engine *e, int n_tok, int prefill) {
    const dd_engine_config *c = &e->c;
    const size_t D = c->dim, KD = (size_t)c->n_kv_heads * c->head_dim;
    const size_t QD = (size_t)c->n_heads * c->head_dim;
    const size_t layer_cache = KD * c->max_seq;
    const float scale = 1.f / sqrtf((float)c->head_dim);
    cudaStream_t s = e->stream;
    int32_t *d_pos = e->d_state + ST_POS;
    ENG_CK(dd_cuda_op_embed(e->d_embed, c->vocab, c->dim, e->d_tokens, d_pos, n_tok, e->d_h, s));
    for (int l = 0; l < c->n_layers; l++) {
        const float *attn_norm = e->d_norms + (size_t)(2 * l) * D;
        const float *ffn_norm = e->d_norms + (size_t)(2 * l + 1) * D;
        uint16_t *kc = e->d_kcache + (size_t)l * layer_cache, *vc = e->d_vcache + (size_t)l * layer_cache;
        ENG_CK(dd_cuda_op_add_rmsnorm(e->d_h, l ? e->d_y : NULL, attn_norm, c->norm_eps, c->dim, n_tok,
                                      e->d_xn, s));
        /* q, k, v: separate buffers, or (fused decode) the parts of one stacked output row */
        uint16_t *q = e->d_q, *k = e->d_k, *v = e->d_v, *gate = e->d_gate, *up = e->d_up;
        if (c->fused && !prefill) {
            q = e->d_qkv; k = q + QD; v = k + KD;
            gate = e->d_gu; up = gate + c->ffn_dim;
            ENG_CK(linear(e, l, DD_FLIN_QKV, e->d_xn, e->d_qkv, n_tok));
        } else if (c->fused) {
            uint16_t *ys[3] = {q, k, v};
            const int32_t w[3] = {(int32_t)QD, (int32_t)KD, (int32_t)KD};
            ENG_CK(linear_prefill(e, l, DD_FLIN_QKV, e->d_xn, n_tok, 3, ys, w));
        } else {
            ENG_CK(project1(e, l, DD_LIN_Q, e->d_xn, q, (int32_t)QD, n_tok, prefill));
            ENG_CK(project1(e, l, DD_LIN_K, e->d_xn, k, (int32_t)KD, n_tok, prefill));
            ENG_CK(project1(e, l, DD_LIN_V, e->d_xn, v, (int32_t)KD, n_tok, prefill));
        }
        ENG_CK(dd_cuda_op_rope_store_kv(q, k, v, e->d_cos, e->d_sin, d_pos, n_tok, c->n_heads,
                                        c->n_kv_heads, c->head_dim, c->max_seq, kc, vc, s));
        ENG_CK(dd_cuda_op_attention(q, kc, vc, d_pos, n_tok, c->n_heads, c->n_kv_heads, c->head_dim,
                                    c->max_seq, scale, c->sliding_window, e->d_att, s));
        ENG_CK(project1(e, l, c->fused ? (int)DD_FLIN_O : (int)DD_LIN_O, e->d_att, e->d_y, c->dim, n_tok, prefill));
        ENG_CK(dd_cuda_op_add_rmsnorm(e->d_h, e->d_y, ffn_norm, c->norm_eps, c->dim, n_tok, e->d_xn, s));
        if (c->fused && !prefill) {
            ENG_CK(linear(e, l, DD_FLIN_GATE_UP, e->d_xn, e->d_gu, n_tok));
        } else if (c->fused) {
            uint16_t *ys[2] = {gate, up};
            const int32_t w[2] = {c->ffn_dim, c->ffn_dim};
            ENG_CK(linear_prefill(e, l, DD_FLIN_GATE_UP, e->d_xn, n_tok, 2, ys, w));
        } else {
            ENG_CK(project1(e, l, DD_LIN_GATE, e->d_xn, gate, c->ffn_dim, n_tok, prefill));
            ENG_CK(project1(e, l, DD_LIN_UP, e->d_xn, up, c->ffn_dim, n_tok, prefill));
        }
        ENG_CK(dd_cuda_op_swiglu(gate, up, c->ffn_dim, n_tok, e->d_act, s));
        ENG_CK(project1(e, l, c->fused ? (int)DD_FLIN_DOWN : (int)DD_LIN_DOWN, e->d_act, e->d_y, c->dim, n_tok, prefill));
    }
    ENG_CK(dd_cuda_op_add_rmsnorm(e->d_h, e->d_y, e->d_norms + (size_t)(2 * c->n_layers) * D,
                                 c->norm_eps, c->dim, n_tok, e->d_xn, s));
    /* the head, sampling and scoring see only the last row */
    if (n_tok > 1) ENG_CK(dd_cuda_op_advance(d_pos, n_tok - 1, s));
    ENG_CK(dd_cuda_op_gemv_f16(e->d_head, e->d_xn + (size_t)(n_tok - 1) * D, c->vocab, c->dim,
                              e->d_logits, s));
    ENG_CK(dd_cuda_op_sample_score(e->d_logits, c->vocab, e->d_sampling, d_pos, e->d_state + ST_N_FIXED,
                                  e->d_tokens, e->d_nll, e->d_ref, e->d_state + ST_REF_START,
                                  e->ref_rows, e->d_kl, s));
    return dd_cuda_op_advance(d_pos, 1, s);
}

static dd_status capture(dd_cuda_engine *e) {
    cudaGraph_t g = NULL;
    DD_CK(cudaStreamBeginCapture(e->stream, cudaStreamCaptureModeThreadLocal));
    dd_status st = enqueue_rows(e, 1, 0);
    cudaError_t end = cudaStreamEndCapture(e->stream, &g);
    if (st != DD_OK) { if (g) cudaGraphDestroy(g); return st; }
    if (end != cudaSuccess) return dd_cuda_fail(end, "cudaStreamEndCapture", __FILE__, __LINE__);
    cudaError_t inst = cudaGraphInstantiate(&e->graph, g, 0);
    cudaGraphDestroy(g);
    if (inst != cudaSuccess) return dd_cuda_fail(inst, "cudaGraphInstantiate", __FILE__, __LINE__);
    e->graph_valid = 1;
    return DD_OK;
}

dd_status dd_cuda_engine_prefill(dd_cuda_engine *e, int32_t n) {
    if (!e || n < 1) return DD_ERR_INVALID_ARGUMENT;
    const int32_t limit = e->n_fixed < e->c.max_seq ? e->n_fixed : e->c.max_seq;
    if ((int64_t)e->pos + n > limit) return DD_ERR_INVALID_ARGUMENT;
    while (n > 0) {
        const int32_t rows = n < e->c.max_prefill ? n : e->c.max_prefill;
        ENG_CK(enqueue_rows(e, rows, 1));
        e->pos += rows;
        n -= rows;
    }
    return DD_OK;
}

dd_status dd_cuda_engine_decode(dd_cuda_engine *e, int32_t n, int use_graph) {
    if (!e || n < 0 || (int64_t)e->pos + n > e->c.max_seq) return DD_ERR_INVALID_ARGUMENT;
    if (use_graph && n && !e->graph_valid) ENG_CK(capture(e));
    for (int32_t i = 0; i < n; i++) {
        if (use_graph) DD_CK(cudaGraphLaunch(e->graph, e->stream));
        else ENG_CK(enqueue_rows(e, 1, 0));
        e->pos++;
    }
    return DD_OK;
}

dd_status dd_cuda_engine_time_steps(dd_cuda_engine *e, int32_t pos, int32_t n, double *us) {
    if (!e || !us || pos < 0 || n < 1 || (int64_t)pos + n > e->c.max_seq) return DD_ERR_INVALID_ARGUMENT;
    if (!e->graph_valid) ENG_CK(capture(e));
    /* positions past n_fixed sample their next token: the state stays in range by construction */
    int32_t st[2] = {pos, e->n_fixed};
    ENG_CK(dd_cuda_memcpy(e->d_state, st, sizeof st, 0, e->stream, 1));
    e->pos = pos;
    DD_CK(cudaEventRecord(e->ev0, e->stream));
    for (int32_t i = 0; i < n; i++) DD_CK(cudaGraphLaunch(e->graph, e->stream));
    DD_CK(cudaEventRecord(e->ev1, e->stream));
    DD_CK(cudaEventSynchronize(e->ev1));
    float ms = 0.f;
    DD_CK(cudaEventElapsedTime(&ms, e->ev0, e->ev1));
    e->pos = pos + n;
    *us = 1000.0 * ms;
    return DD_OK;
}

int32_t dd_cuda_engine_pos(const dd_cuda_engine *e) { return e ? e->pos : -1; }

size_t dd_cuda_engine_nbytes(const dd_cuda_engine *e) { return e ? e->nbytes : 0; }

dd_status dd_cuda_engine_read(dd_cuda_engine *e, int what, int32_t start, int32_t n, void *h_out) {
    if (!e || !h_out) return DD_ERR_INVALID_ARGUMENT;
    DD_CK(cudaStreamSynchronize(e->stream));
    if (what == DD_ENGINE_LOGITS)
        return dd_cuda_memcpy(h_out, e->d_logits, (size_t)e->c.vocab * 4, 1, e->stream, 1);
    const int32_t len = what == DD_ENGINE_TOKENS ? e->c.max_seq + 1 : e->c.max_seq;
    if (start < 0 || n < 0 || (int64_t)start + n > len) return DD_ERR_INVALID_ARGUMENT;
    if (n == 0) return DD_OK;
    const void *src = what == DD_ENGINE_TOKENS ? (const void *)(e->d_tokens + start)
                    : what == DD_ENGINE_NLL ? (const void *)(e->d_nll + start)
                    : what == DD_ENGINE_KL ? (const void *)(e->d_kl + start) : NULL;
    if (!src) return DD_ERR_INVALID_ARGUMENT;
    return dd_cuda_memcpy(h_out, src, (size_t)n * 4, 1, e->stream, 1);
}
