/* Channel selection on the CPU: the bucketed approximate top-k of decdec.h and an exact top-k
 * for comparison.  Both report indices chunk by chunk, ascending within a chunk. */
#include <math.h>
#include <stdlib.h>

#include "dd_cpu_internal.h"
#include "../dd_rules.h"

static int32_t select_bucket_chunk(const float *x, int32_t start, int32_t len, int32_t quota,
                                   const float f[DD_NUM_BUCKETS], int monotone,
                                   unsigned char *bucket, int32_t *idx) {
    int32_t count[DD_NUM_BUCKETS + 1] = {0};
    for (int32_t j = 0; j < len; j++) {
        bucket[j] = (unsigned char)dd_rule_bucket_of(fabsf(x[start + j]), f, monotone);
        count[bucket[j]]++;
    }
    /* cut = first bucket that no longer fits whole; take all above it, fill the rest from it */
    int32_t taken = 0, cut = 0;
    while (cut < DD_NUM_BUCKETS && taken + count[cut] <= quota) taken += count[cut++];
    int32_t from_cut = cut < DD_NUM_BUCKETS ? quota - taken : 0;
    int32_t n = 0;
    for (int32_t j = 0; j < len; j++) {
        if (bucket[j] < cut) idx[n++] = start + j;
        else if (bucket[j] == cut && from_cut > 0) { idx[n++] = start + j; from_cut--; }
    }
    return n;
}

typedef struct { float ax; int32_t j; } ranked;

static int by_magnitude(const void *pa, const void *pb) {
    const ranked *a = (const ranked *)pa, *b = (const ranked *)pb;
    if (a->ax != b->ax) return a->ax > b->ax ? -1 : 1;
    return a->j < b->j ? -1 : (a->j > b->j);
}

static int by_index(const void *pa, const void *pb) {
    int32_t a = *(const int32_t *)pa, b = *(const int32_t *)pb;
    return (a > b) - (a < b);
}

static int32_t select_exact_chunk(const float *x, int32_t start, int32_t len, int32_t quota,
                                  ranked *scratch, int32_t *idx) {
    int32_t m = 0;
    for (int32_t j = 0; j < len; j++) {
        float ax = fabsf(x[start + j]);
        if (ax == ax) { scratch[m].ax = ax; scratch[m].j = start + j; m++; }
    }
    qsort(scratch, (size_t)m, sizeof(ranked), by_magnitude);
    int32_t n = quota < m ? quota : m;
    for (int32_t i = 0; i < n; i++) idx[i] = scratch[i].j;
    qsort(idx, (size_t)n, sizeof(int32_t), by_index);
    return n;
}

dd_status dd_cpu_select(const float *x, int32_t d_in, const float *thresholds, int32_t k_chunk,
                        dd_selection mode, int32_t *idx, int32_t *n_selected) {
    if (!x || !idx || !n_selected || d_in <= 0) return DD_ERR_INVALID_ARGUMENT;
    if (k_chunk < 0 || k_chunk > DD_CHUNK) return DD_ERR_INVALID_ARGUMENT;
    if (mode != DD_SELECT_BUCKET && mode != DD_SELECT_EXACT) return DD_ERR_INVALID_ARGUMENT;
    *n_selected = 0;
    const int32_t k_total = dd_total_quota(d_in, k_chunk);
    if (k_total == 0) return DD_OK;
    float f[DD_NUM_BUCKETS];
    int monotone = 0;
    if (mode == DD_SELECT_BUCKET) {
        if (!thresholds) return DD_ERR_INVALID_ARGUMENT;
        dd_bucket_floors(thresholds, k_total, f);
        monotone = dd_rule_floors_monotone(f); /* bucket_of as the GPU computes it */
    }
    void *scratch = malloc(mode == DD_SELECT_BUCKET ? (size_t)DD_CHUNK : sizeof(ranked) * DD_CHUNK);
    if (!scratch) return DD_ERR_OUT_OF_MEMORY;
    int32_t n = 0;
    for (int32_t c = 0; c < dd_num_chunks(d_in); c++) {
        const int32_t start = c * DD_CHUNK;
        const int32_t len = d_in - start < DD_CHUNK ? d_in - start : DD_CHUNK;
        const int32_t quota = dd_chunk_quota(d_in, c, k_chunk);
        if (quota == 0) continue;
        n += mode == DD_SELECT_BUCKET
                 ? select_bucket_chunk(x, start, len, quota, f, monotone, (unsigned char *)scratch, idx + n)
                 : select_exact_chunk(x, start, len, quota, (ranked *)scratch, idx + n);
    }
    free(scratch);
    *n_selected = n;
    return DD_OK;
}
