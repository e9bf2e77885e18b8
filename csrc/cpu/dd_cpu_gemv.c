/* Base GEMV on the CPU: y = W_hat x for a few tokens.  The reference every GPU kernel is tested
 * against; also the path users without a GPU take.  Rows are dequantized once per call into fp32
 * (DD_ROWS at a time) and reused across all tokens of the call, so a 512-token prefill costs one
 * dequantization, not 512. */
#include <stdlib.h>
#include <string.h>

#include "dd_cpu_internal.h"

#define DD_ROWS 4

DD_HOT void dd_cpu_dequant_row(const dd_shape *s, const uint8_t *qweight, const uint16_t *scales,
                               const uint16_t *zeros, int32_t o, float *w) {
    const int32_t d_in_pad = dd_d_in_pad(s);
    const int32_t n_groups = dd_num_groups(s);
    const uint8_t *row = qweight + (size_t)o * dd_qweight_row_bytes(s);
    if (s->bits == 4) {
        for (int32_t j = 0; j < d_in_pad / 2; j++) {
            w[2 * j] = (float)(row[j] & 0xf);
            w[2 * j + 1] = (float)(row[j] >> 4);
        }
    } else {
        /* 8 weights at a time: two lo-plane bytes and one hi-plane byte, constant shifts */
        const uint8_t *lo = row;
        const uint8_t *hi = row + d_in_pad / 4;
        for (int32_t b = 0; b < d_in_pad / 8; b++) {
            const unsigned l = (unsigned)lo[2 * b] | ((unsigned)lo[2 * b + 1] << 8);
            const unsigned h = hi[b];
            float *wb = w + 8 * b;
            for (int k = 0; k < 8; k++) wb[k] = (float)(((l >> (2 * k)) & 3u) | (((h >> k) & 1u) << 2));
        }
    }
    for (int32_t g = 0; g < n_groups; g++) {
        const float sc = dd_half_to_float(scales[(size_t)o * n_groups + g]);
        const float z = dd_half_to_float(zeros[(size_t)o * n_groups + g]);
        float *wg = w + (size_t)g * s->group_size;
        for (int32_t j = 0; j < s->group_size; j++) wg[j] = sc * (wg[j] - z);
    }
}

/* out[r] = w_r . x for up to DD_ROWS rows (stride apart) and one token. */
DD_HOT static void dot_rows(const float *w, int32_t stride, int32_t n_rows, const float *x,
                            int32_t n, float *out) {
    for (int32_t r = 0; r < n_rows; r++) {
        const float *wr = w + (size_t)r * stride;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int32_t j = 0; j < n; j++) acc += wr[j] * x[j];
        out[r] = acc;
    }
}

/* 4 rows x 2 tokens per pass: 6 loads feed 8 multiply-adds, so the loop is bound by arithmetic,
 * not by loads (one row against one token would load twice per multiply-add). */
DD_HOT static void dot_4x2(const float *w, int32_t stride, const float *x0, const float *x1,
                           int32_t n, float *y0, float *y1) {
    const float *w0 = w, *w1 = w + stride, *w2 = w + 2 * (size_t)stride, *w3 = w + 3 * (size_t)stride;
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f, b0 = 0.f, b1 = 0.f, b2 = 0.f, b3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)
    for (int32_t j = 0; j < n; j++) {
        const float u = x0[j], v = x1[j];
        a0 += w0[j] * u; a1 += w1[j] * u; a2 += w2[j] * u; a3 += w3[j] * u;
        b0 += w0[j] * v; b1 += w1[j] * v; b2 += w2[j] * v; b3 += w3[j] * v;
    }
    y0[0] = a0; y0[1] = a1; y0[2] = a2; y0[3] = a3;
    y1[0] = b0; y1[1] = b1; y1[2] = b2; y1[3] = b3;
}

dd_status dd_cpu_gemv_base(const dd_shape *s, const uint8_t *qweight, const uint16_t *scales,
                           const uint16_t *zeros, const float *x, int32_t n_tok, float *y) {
    dd_status st = dd_shape_check(s);
    if (st != DD_OK) return st;
    if (!qweight || !scales || !zeros || !x || !y || n_tok < 0) return DD_ERR_INVALID_ARGUMENT;
    const int32_t d_in = s->d_in, d_out = s->d_out, d_in_pad = dd_d_in_pad(s);
    const int32_t n_blocks = (d_out + DD_ROWS - 1) / DD_ROWS;
    int failed = 0;
    /* threads only pay off past a few million multiply-adds (a single decode token of a small
     * layer would lose more to waking them than it gains) */
    const int parallel = (double)n_tok * d_out * d_in > 4e6;
    (void)parallel;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel)
#endif
    for (int32_t blk = 0; blk < n_blocks; blk++) {
        float *w = (float *)malloc(sizeof(float) * (size_t)d_in_pad * DD_ROWS);
        if (!w) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            failed = 1;
            continue;
        }
        const int32_t o0 = blk * DD_ROWS;
        const int32_t rows = d_out - o0 < DD_ROWS ? d_out - o0 : DD_ROWS;
        for (int32_t r = 0; r < rows; r++)
            dd_cpu_dequant_row(s, qweight, scales, zeros, o0 + r, w + (size_t)r * d_in_pad);
        /* padded columns multiply zero-extended x: skipping them is the same sum */
        int32_t t = 0;
        if (rows == DD_ROWS)
            for (; t + 1 < n_tok; t += 2)
                dot_4x2(w, d_in_pad, x + (size_t)t * d_in, x + (size_t)(t + 1) * d_in, d_in,
                        y + (size_t)t * d_out + o0, y + (size_t)(t + 1) * d_out + o0);
        for (; t < n_tok; t++) {
            float out[DD_ROWS];
            dot_rows(w, d_in_pad, rows, x + (size_t)t * d_in, d_in, out);
            memcpy(y + (size_t)t * d_out + o0, out, sizeof(float) * (size_t)rows);
        }
        free(w);
    }
    return failed ? DD_ERR_OUT_OF_MEMORY : DD_OK;
}
