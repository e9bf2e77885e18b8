/*
 * dd_cuda_engine.h -- a whole Llama-family decoder on one GPU, every projection a DecLinear
 * (dd_cuda_layer), one decode step captured once as a CUDA graph and replayed per token.
 *
 * Plain C like dd_cuda.h.  What the engine owns: the fp16 embeddings and head, the fp32 norms and
 * RoPE tables, the fp16 KV cache, the activations (sized for max_prefill rows), one DecLinear
 * workspace, the token / score buffers and the graph.  What it borrows: the dd_cuda_layer of
 * every projection (immutable; the caller keeps them alive as long as the engine, the Python
 * binding holds references).
 *
 * Token state lives in device memory so the graph replays without the host:
 *   tokens[0 .. max_seq]   given tokens [0, n_fixed) (prompt or text), sampled ones after;
 *   pos                    the position of the token the next step processes;
 *   nll[p], kl[p]          the teacher-forced scores of the logits produced at position p.
 * A step at position p: embed tokens[p] -> n_layers blocks (DecLinear with compensation) ->
 * final norm -> fp16 head -> logits -> sample tokens[p + 1] when p + 1 >= n_fixed, else score
 * nll[p] against tokens[p + 1] (and kl[p] against the reference rows, when set) -> pos = p + 1.
 * Prefill processes rows [pos, pos + n) at once without compensation (dequantised weights on
 * tensor cores, as the paper does), then samples / scores the last row like a step.
 *
 * Thread rule: an engine is used by one host thread at a time (the binding enforces it with a
 * lock and raises on contention).  Everything runs on the engine's own stream.
 */
#ifndef DD_CUDA_ENGINE_H
#define DD_CUDA_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "dd_cuda.h"
#include "dd_cuda_ops.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The projections of one block, in the order the engine takes them: seven separate layers, or
 * (config.fused) four, with q/k/v and gate/up each one layer of stacked output rows.  Fusing is
 * exact for DecDEC: the parts share their input, hence their thresholds (the same calibration
 * statistics) and the selection; every output row keeps its own residual scale.  One larger GEMV
 * then hides one DEC instead of three small ones each paying DEC's fixed latency. */
enum { DD_LIN_Q = 0, DD_LIN_K, DD_LIN_V, DD_LIN_O, DD_LIN_GATE, DD_LIN_UP, DD_LIN_DOWN,
       DD_LIN_PER_BLOCK };
enum { DD_FLIN_QKV = 0, DD_FLIN_O, DD_FLIN_GATE_UP, DD_FLIN_DOWN, DD_FLIN_PER_BLOCK };

typedef struct {
    int32_t dim, n_layers, n_heads, n_kv_heads, head_dim, ffn_dim, vocab;
    float norm_eps;
    int32_t max_seq;        /* KV-cache positions (tokens holds max_seq + 1) */
    int32_t max_prefill;    /* rows one prefill call processes (activations are sized for it) */
    int32_t sliding_window; /* 0 = none */
    int32_t fused;          /* 1: DD_FLIN_* layers (q|k|v and gate|up stacked), 0: DD_LIN_* */
} dd_engine_config;
/* projections per block of a config (DD_LIN_PER_BLOCK or DD_FLIN_PER_BLOCK) */
int dd_engine_layers_per_block(const dd_engine_config *c);

typedef struct dd_cuda_engine dd_cuda_engine;

/* h_embed fp16 [vocab, dim]; h_head fp16 [vocab, dim] or NULL (tied: the embeddings);
 * h_norms fp32 [2 * n_layers + 1, dim] (attn_norm, ffn_norm per block, then the final norm);
 * h_cos / h_sin fp32 [max_seq, head_dim / 2]; layers [n_layers * dd_engine_layers_per_block] in
 * DD_LIN_* (or DD_FLIN_*) order, each of the shape the config implies, all on the current device.  Every layer starts
 * with compensation off (k_chunk 0, the device's default n_tb).  Synchronous. */
dd_status dd_cuda_engine_create(const dd_engine_config *c, const uint16_t *h_embed,
                                const uint16_t *h_head, const float *h_norms, const float *h_cos,
                                const float *h_sin, const dd_cuda_layer *const *layers,
                                dd_cuda_engine **out);
dd_status dd_cuda_engine_destroy(dd_cuda_engine *e);

/* Run settings of every projection: k_chunk[n_layers * layers per block], one n_tb.  Validated
 * all first (nothing changes on error); the graph is captured again at the next decode. */
dd_status dd_cuda_engine_set_runs(dd_cuda_engine *e, const int32_t *k_chunk, int32_t n_tb);
dd_status dd_cuda_engine_set_sampling(dd_cuda_engine *e, float temperature, float top_p,
                                      uint64_t seed);
/* Reference log-probabilities fp32 [rows, vocab] for the positions [start, start + rows) (KL);
 * rows 0 clears them. */
dd_status dd_cuda_engine_set_reference(dd_cuda_engine *e, const float *h_ref_logp, int32_t rows,
                                       int32_t start);

/* New sequence: tokens[0, n) = h_tokens (each in [0, vocab)), n_fixed = n, pos = 0, scores
 * cleared (NaN).  1 <= n <= max_seq + 1. */
dd_status dd_cuda_engine_reset(dd_cuda_engine *e, const int32_t *h_tokens, int32_t n);
/* Prefill n rows (1 <= n, pos + n <= min(n_fixed, max_seq)), in chunks of max_prefill. */
dd_status dd_cuda_engine_prefill(dd_cuda_engine *e, int32_t n);
/* n decode steps (pos + n <= max_seq): graph replays when use_graph, else the same launches
 * eagerly (the reference for graph replay). */
dd_status dd_cuda_engine_decode(dd_cuda_engine *e, int32_t n, int use_graph);
/* Median-free raw timing: *us = the time of n graph-replayed steps from position pos (the
 * sequence's state is overwritten; reset afterwards), CUDA events on the engine's stream. */
dd_status dd_cuda_engine_time_steps(dd_cuda_engine *e, int32_t pos, int32_t n, double *us);

int32_t dd_cuda_engine_pos(const dd_cuda_engine *e);
/* Copies out (synchronising the engine's stream): what in {0 tokens (int32), 1 nll (fp32),
 * 2 kl (fp32)} for [start, start + n); 3 logits (fp32 [vocab], start = n = 0 ignored). */
enum { DD_ENGINE_TOKENS = 0, DD_ENGINE_NLL = 1, DD_ENGINE_KL = 2, DD_ENGINE_LOGITS = 3 };
dd_status dd_cuda_engine_read(dd_cuda_engine *e, int what, int32_t start, int32_t n, void *h_out);
/* Device bytes the engine allocated itself (embeddings, head, norms, tables, KV cache,
 * activations, workspace), not counting the borrowed layers. */
size_t dd_cuda_engine_nbytes(const dd_cuda_engine *e);

#ifdef __cplusplus
}
#endif
#endif /* DD_CUDA_ENGINE_H */
