/*
 * dd_cuda_ops.h -- the non-linear ops of the decode engine (csrc/cuda/dd_cuda_ops.cu) and the
 * dense fp16 GEMV/GEMM of the head and of prefill.  Plain C, no CUDA include (fp16 = uint16_t,
 * stream = cudaStream_t as void*, NULL = legacy default stream), like dd_cuda.h.
 *
 * Conventions shared by every op:
 *   - The residual stream h is fp32 [n_tok, dim]; every other activation is fp16, row-major,
 *     [n_tok, width].  n_tok >= 1 rows are consecutive positions *d_pos + t (t = 0..n_tok-1);
 *     *d_pos lives in device memory so a captured CUDA graph replays at the current position.
 *   - Every op is stream-ordered, allocates nothing, never synchronises the host and is
 *     capturable into a CUDA graph.  Each returns DD_ERR_INVALID_ARGUMENT for NULL pointers or
 *     sizes out of range (checked on the host, before any launch), DD_ERR_CUDA for a failed
 *     launch (dd_cuda_last_error names it).
 *   - Positions beyond max_seq are the caller's bug: the engine checks pos + n_tok <= max_seq on
 *     the host before every replay; kernels clamp rather than write out of bounds.
 *   - Pointers read or written with 16-byte vectors (gemv W and x, gemm X, W and Y, the attention
 *     caches, the packed weight of dequant) must be 16-byte aligned (cudaMalloc memory and row
 *     offsets of the stated size multiples are): DD_ERR_INVALID_ARGUMENT otherwise.
 * CPU twin: decdec/model.py (LlamaModel.forward) is the reference of every op.
 */
#ifndef DD_CUDA_OPS_H
#define DD_CUDA_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "../decdec.h"

#ifdef __cplusplus
extern "C" {
#endif

/* h[t, :] = fp32(table[tokens[*d_pos + t], :]), table fp16 [vocab, dim].  Token ids outside
 * [0, vocab) (never produced by the engine; the host validates what it uploads) give zeros. */
dd_status dd_cuda_op_embed(const uint16_t *d_table, int32_t vocab, int32_t dim,
                           const int32_t *d_tokens, const int32_t *d_pos, int32_t n_tok,
                           float *d_h, void *stream);

/* When d_y != NULL: h[t] += fp32(y[t]) (the residual add of the previous projection).
 * Then out[t] = fp16(h[t] / sqrt(mean(h[t]^2) + eps) * w), w fp32 [dim].  d_out may be NULL
 * (add only; d_w is then not read).  eps: finite, >= 0. */
dd_status dd_cuda_op_add_rmsnorm(float *d_h, const uint16_t *d_y, const float *d_w, float eps,
                                 int32_t dim, int32_t n_tok, uint16_t *d_out, void *stream);

/* Rotate-half RoPE on q in place ([n_tok, n_heads*head_dim] fp16) and on k, then store k and v
 * ([n_tok, n_kv*head_dim] fp16) into the layer's caches at positions *d_pos + t.
 * Caches: fp16 [n_kv, max_seq, head_dim].  cos/sin: fp32 [max_seq, head_dim/2] (angles computed
 * in float64 on the host, as model.py does).  Rotation arithmetic in fp32.  head_dim even.
 * A position outside [0, max_seq) stores nothing (q is rotated with the clamped row). */
dd_status dd_cuda_op_rope_store_kv(uint16_t *d_q, const uint16_t *d_k, const uint16_t *d_v,
                                   const float *d_cos, const float *d_sin, const int32_t *d_pos,
                                   int32_t n_tok, int32_t n_heads, int32_t n_kv, int32_t head_dim,
                                   int32_t max_seq, uint16_t *d_kcache, uint16_t *d_vcache,
                                   void *stream);

/* Causal grouped-query attention over the cache: query row t (position p = *d_pos + t) of head
 * h attends to keys j in [max(0, p - window + 1), p] of kv head h / (n_heads / n_kv)
 * (window 0 = unlimited).  scores in fp32, softmax in fp32, out fp16 [n_tok, n_heads*head_dim].
 * head_dim: 64, 128 (others DD_ERR_UNSUPPORTED).  Any length up to max_seq.  Only keys in the
 * visible span are read.  A row with no visible key (p < 0) gets zeros. */
dd_status dd_cuda_op_attention(const uint16_t *d_q, const uint16_t *d_kcache,
                               const uint16_t *d_vcache, const int32_t *d_pos, int32_t n_tok,
                               int32_t n_heads, int32_t n_kv, int32_t head_dim, int32_t max_seq,
                               float scale, int32_t window, uint16_t *d_out, void *stream);

/* out[t, i] = fp16(silu(gate[t, i]) * up[t, i]) in fp32 arithmetic; all fp16 [n_tok, n]. */
dd_status dd_cuda_op_swiglu(const uint16_t *d_gate, const uint16_t *d_up, int32_t n, int32_t n_tok,
                            uint16_t *d_out, void *stream);

/* y[r] = sum_c W[r, c] x[c] in fp32 (fp16 W [rows, cols] row-major, fp16 x [cols]), fp32 y
 * [rows]: the fp16 head.  Streams W at HBM speed (16-byte loads, several rows per warp).
 * cols % 8 == 0. */
dd_status dd_cuda_op_gemv_f16(const uint16_t *d_w, const uint16_t *d_x, int32_t rows, int32_t cols,
                              float *d_y, void *stream);

/* Y[t, r] = sum_c X[t, c] W[r, c] (+ Y[t, r] when accumulate) for prefill, on tensor cores
 * (fp16 inputs, fp32 accumulation, fp16 Y [n_tok, rows]).  rows % 16 == 0, cols % 16 == 0, any
 * n_tok >= 1. */
dd_status dd_cuda_op_gemm_f16(const uint16_t *d_x, const uint16_t *d_w, int32_t n_tok, int32_t rows,
                              int32_t cols, int accumulate, uint16_t *d_y, void *stream);

/* W_hat fp16 [d_out, d_in] (d_in unpadded) from the packed base weight of decdec.h, exactly as
 * dd_cpu_dequant_row (the CPU twin) computes it. */
dd_status dd_cuda_op_dequant(const dd_shape *s, const uint8_t *d_qweight, const uint16_t *d_scales,
                             const uint16_t *d_zeros, uint16_t *d_w, void *stream);

/* Sampling parameters, read from device memory at every replay. */
typedef struct {
    float temperature;  /* 0 = greedy (argmax, lowest index on ties) */
    float top_p;        /* (0, 1]: smallest set of most probable tokens whose mass >= top_p */
    uint64_t seed;      /* with the position, the counter of a stateless RNG */
} dd_cuda_sampling;

/* After the logits of the token at position p = *d_pos (fp32 [vocab]):
 *   if p + 1 >= *d_n_fixed: tokens[p + 1] = sample(logits) (tokens below n_fixed are the given
 *                            prompt / text and are never overwritten);
 *   if p + 1 <  *d_n_fixed and d_nll: nll[p] = logsumexp(logits) - logits[tokens[p + 1]];
 *   if d_ref_logp and p >= *d_ref_start and p - *d_ref_start < ref_rows:
 *        kl[p] = sum_v exp(r_v) (r_v - logp_v) with r = ref_logp[p - *d_ref_start] (fp32 [vocab],
 *        log-probabilities of the reference model at that position), logp = log_softmax(logits).
 * One block per call, deterministic.  The RNG draw depends only on (seed, p).
 * Details: temperature <= 0 (or top_p <= 0) is greedy; top_p >= 1 samples the whole distribution;
 * tokens tied with the nucleus' smallest probability are all in it.  NaN logits are never drawn
 * nor the argmax (all NaN: token 0); a NaN or +Inf logit makes nll / kl NaN; a -Inf logit is a
 * token of probability 0; a reference -Inf log-probability contributes 0 to kl (0 log 0). */
dd_status dd_cuda_op_sample_score(const float *d_logits, int32_t vocab,
                                  const dd_cuda_sampling *d_params, const int32_t *d_pos,
                                  const int32_t *d_n_fixed, int32_t *d_tokens, float *d_nll,
                                  const float *d_ref_logp, const int32_t *d_ref_start,
                                  int32_t ref_rows, float *d_kl, void *stream);

/* *d_pos += n (the last node of a captured step).  n >= 0. */
dd_status dd_cuda_op_advance(int32_t *d_pos, int32_t n, void *stream);

#ifdef __cplusplus
}
#endif
#endif /* DD_CUDA_OPS_H */
