/* The whole DecLinear layer on the CPU: base GEMV for all tokens, then per token its own
 * selection and residual GEMV (tokens are independent, as at decode). */
#include <stdlib.h>

#include "dd_cpu_internal.h"

dd_status dd_cpu_forward(const dd_shape *s, const uint8_t *qweight, const uint16_t *scales,
                         const uint16_t *zeros, const uint8_t *rcodes, const uint16_t *rscales,
                         const float *thresholds, int32_t k_chunk, dd_selection mode,
                         const float *x, int32_t n_tok, float *y) {
    dd_status st = dd_cpu_gemv_base(s, qweight, scales, zeros, x, n_tok, y);
    if (st != DD_OK || k_chunk == 0 || n_tok == 0) return st;
    const int32_t k_total = dd_total_quota(s->d_in, k_chunk);
    if (k_total == 0) return DD_OK;
    /* the error of the lowest failing token wins (deterministic); written under a critical
     * section, entered only on failure */
    int failed = DD_OK;
    int32_t failed_at = n_tok;
    const int parallel = n_tok >= 8;
    (void)parallel;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel)
#endif
    for (int32_t t = 0; t < n_tok; t++) {
        int32_t *idx = (int32_t *)malloc(sizeof(int32_t) * (size_t)k_total);
        dd_status ts = DD_ERR_OUT_OF_MEMORY;
        if (idx) {
            int32_t n = 0;
            const float *xt = x + (size_t)t * s->d_in;
            ts = dd_cpu_select(xt, s->d_in, thresholds, k_chunk, mode, idx, &n);
            if (ts == DD_OK) ts = dd_cpu_residual_gemv(s, rcodes, rscales, xt, idx, n, y + (size_t)t * s->d_out);
            free(idx);
        }
        if (ts != DD_OK) {
#ifdef _OPENMP
#pragma omp critical(dd_cpu_forward_failed)
#endif
            if (t < failed_at) {
                failed_at = t;
                failed = ts;
            }
        }
    }
    return (dd_status)failed;
}
