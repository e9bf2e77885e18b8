/* Residual GEMV on the CPU: y += sum over selected input channels i of x[i] * R_hat[i, :].
 * Rows are input-channel-major (decdec.h), so each selected channel is one contiguous read,
 * exactly what the GPU fetches over PCIe. */
#include <stdlib.h>
#include <string.h>

#include "dd_cpu_internal.h"
#include "../dd_rules.h"

/* One residual row times x_i into acc: the word-wise nibble decode and multiply-add of
 * dd_rules.h, the same text the GPU's zero-copy fetch runs. */
DD_HOT static void accumulate_row(const uint8_t *row, float xi, int32_t d_out, float *acc) {
#pragma omp simd
    for (int32_t w = 0; w < d_out / 8; w++) {
        uint32_t word;
        memcpy(&word, row + 4 * (size_t)w, sizeof word);
        dd_rule_mac_word(word, xi, acc + 8 * (size_t)w);
    }
}

dd_status dd_cpu_residual_gemv(const dd_shape *s, const uint8_t *rcodes, const uint16_t *rscales,
                               const float *x, const int32_t *idx, int32_t n, float *y) {
    dd_status st = dd_shape_check(s);
    if (st != DD_OK) return st;
    if (!rcodes || !rscales || !x || !y || n < 0 || (n > 0 && !idx)) return DD_ERR_INVALID_ARGUMENT;
    if (n == 0) return DD_OK;
    const int32_t d_out = s->d_out;
    const size_t row_bytes = dd_residual_row_bytes(s);
    float *acc = (float *)calloc((size_t)d_out, sizeof(float));
    if (!acc) return DD_ERR_OUT_OF_MEMORY;
    for (int32_t k = 0; k < n; k++) {
        const int32_t i = idx[k];
        if (i < 0 || i >= s->d_in) { free(acc); return DD_ERR_INVALID_ARGUMENT; }
        accumulate_row(rcodes + (size_t)i * row_bytes, x[i], d_out, acc);
    }
    /* one scale per output channel: apply once after the sum */
    for (int32_t o = 0; o < d_out; o++) y[o] += dd_half_to_float(rscales[o]) * acc[o];
    free(acc);
    return DD_OK;
}
