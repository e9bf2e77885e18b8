/*
 * dd_rules.h -- the one definition of each rule decdec.h states that more than one backend
 * computes: the chunk quota, the bucket of |x| and the residual row multiply-accumulate.
 *
 * Plain C99 and CUDA: every function is `DD_HD static inline`, i.e. __host__ __device__ when a
 * CUDA compiler reads this file, so csrc/cpu (C) and csrc/cuda (host and device code) call the
 * very same text.  No state, no allocation, no library call beyond <string.h>'s memcpy on the host.
 */
#ifndef DD_RULES_H
#define DD_RULES_H

#include <stdint.h>
#include <string.h>

#include "decdec.h"

#ifdef __CUDACC__
#define DD_HD __host__ __device__ __attribute__((always_inline))
#else
#define DD_HD
#endif
#ifdef __CUDA_ARCH__ /* device pass only: host compilers do not know the pragma */
#define DD_UNROLL _Pragma("unroll")
#else
#define DD_UNROLL
#endif

/* ---- chunk quota (decdec.h "SELECTION") ---------------------------------------------------- */

/* k_c of chunk `chunk`: k_chunk for a whole chunk of DD_CHUNK inputs, else round half up of
 * k_chunk * L / DD_CHUNK, at most L; 0 for a chunk past the end or k_chunk <= 0. */
DD_HD static inline int32_t dd_rule_chunk_quota(int32_t d_in, int32_t chunk, int32_t k_chunk) {
    const int32_t start = chunk * DD_CHUNK;
    const int32_t len = d_in - start < DD_CHUNK ? d_in - start : DD_CHUNK;
    if (len <= 0 || k_chunk <= 0) return 0;
    if (len == DD_CHUNK) return k_chunk;
    const int64_t k = ((int64_t)k_chunk * len + DD_CHUNK / 2) / DD_CHUNK; /* round half up */
    return (int32_t)(k > len ? len : k);
}

/* First output slot of chunk `chunk` in a selection reported chunk by chunk: every chunk before
 * the last one is whole, so each earlier chunk holds exactly k_chunk slots. */
DD_HD static inline int32_t dd_rule_chunk_offset(int32_t chunk, int32_t k_chunk) {
    return chunk * k_chunk;
}

/* The layer total k = sum_c k_c, derived from dd_rule_chunk_quota in closed form (only the last
 * chunk can be partial): (n_chunks - 1) whole chunks + the last one.  Kernels call this instead
 * of looping over chunks.  Domain: 1 <= d_in <= INT32_MAX - DD_CHUNK + 1, 0 <= k_chunk <=
 * DD_CHUNK (what every kernel sees); dd_total_quota (dd_common.c) takes any int32 pair. */
DD_HD static inline int32_t dd_rule_total_quota(int32_t d_in, int32_t k_chunk) {
    const int32_t n_chunks = (d_in + DD_CHUNK - 1) / DD_CHUNK;
    return (n_chunks - 1) * k_chunk + dd_rule_chunk_quota(d_in, n_chunks - 1, k_chunk);
}

/* ---- bucket of |x| (decdec.h: "smallest i with |x| >= f[i]"; NaN: none) -------------------- */

/* The literal rule: a linear scan.  Returns DD_NUM_BUCKETS for NaN. */
DD_HD static inline int dd_rule_bucket_linear(float ax, const float *f) {
    if (!(ax == ax)) return DD_NUM_BUCKETS; /* NaN: no bucket */
    for (int i = 0; i < DD_NUM_BUCKETS; i++)
        if (ax >= f[i]) return i;
    return DD_NUM_BUCKETS; /* unreachable for ax >= 0 since f[31] = 0 */
}

/* Whether the floors are non-increasing (always so for valid, non-increasing thresholds). */
DD_HD static inline int dd_rule_floors_monotone(const float *f) {
    int ok = 1;
    for (int i = 0; i + 1 < DD_NUM_BUCKETS; i++) ok &= f[i] >= f[i + 1];
    return ok;
}

/* The same bucket for NON-INCREASING floors in 5 steps: the number of floors above ax is the
 * first i with ax >= f[i] (f[31] = 0 <= ax, so the count is at most 31). */
DD_HD static inline int dd_rule_bucket_search(float ax, const float *f) {
    if (!(ax == ax)) return DD_NUM_BUCKETS; /* NaN: no bucket */
    int pos = 0;
    DD_UNROLL
    for (int step = 16; step; step >>= 1)
        if (f[pos + step - 1] > ax) pos += step;
    return pos < DD_NUM_BUCKETS ? pos : DD_NUM_BUCKETS;
}

/* bucket_of: the search when the floors are non-increasing (`monotone`), else the scan. */
DD_HD static inline int dd_rule_bucket_of(float ax, const float *f, int monotone) {
    return monotone ? dd_rule_bucket_search(ax, f) : dd_rule_bucket_linear(ax, f);
}

/* ---- residual row multiply-accumulate (decdec.h "RESIDUAL CHEATSHEET") ----------------------
 * A residual row is read as 32-bit little-endian words: word w holds output channels 8w..8w+7,
 * channel 8w+n in bits [4n, 4n+4), code = nibble - DD_RESIDUAL_NIBBLE_BIAS.  The code is made
 * as a float without an int->float conversion: the bits 0x4B000000 | nibble are 2^23 + nibble,
 * so subtracting 2^23 + 8 gives the code exactly. */

DD_HD static inline float dd_rule_bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
#endif
}

/* The centred code of nibble n (0..7) of word `word`, as a float (-8..7; -7..7 in valid data). */
DD_HD static inline float dd_rule_residual_code(uint32_t word, int n) {
    return dd_rule_bits_float(0x4B000000u | ((word >> (4 * n)) & 0xFu)) -
           (8388608.f + (float)DD_RESIDUAL_NIBBLE_BIAS);
}

/* acc[n] += xv * code(word, n) for the 8 output channels of one word.  On the device one fused
 * multiply-add; on the host a multiply and an add (C11 does not contract them), which keeps the
 * CPU backend's results what they always were. */
DD_HD static inline void dd_rule_mac_word(uint32_t word, float xv, float acc[8]) {
    DD_UNROLL
    for (int n = 0; n < 8; n++) {
        const float c = dd_rule_residual_code(word, n);
#ifdef __CUDA_ARCH__
        acc[n] = fmaf(xv, c, acc[n]);
#else
        acc[n] = acc[n] + xv * c;
#endif
    }
}

#endif /* DD_RULES_H */
