/* Shape arithmetic, status strings, fp16 conversion and bucket floors: shared by every backend. */
#include <math.h>
#include <string.h>

#include "../decdec.h"
#include "../dd_rules.h"

const char *dd_strerror(dd_status status) {
    switch (status) {
    case DD_OK: return "success";
    case DD_ERR_INVALID_ARGUMENT: return "invalid argument";
    case DD_ERR_UNSUPPORTED: return "unsupported configuration";
    case DD_ERR_OUT_OF_MEMORY: return "out of host memory";
    case DD_ERR_CUDA: return "CUDA runtime error";
    case DD_ERR_CUDA_OUT_OF_MEMORY: return "out of GPU memory";
    case DD_ERR_NO_DEVICE: return "no usable CUDA device";
    case DD_ERR_NOT_FINITE: return "non-finite value";
    }
    return "unknown decdec status";
}

dd_status dd_shape_check(const dd_shape *s) {
    if (!s) return DD_ERR_INVALID_ARGUMENT;
    if (s->d_in <= 0 || s->d_out <= 0) return DD_ERR_INVALID_ARGUMENT;
    if (s->d_out % DD_OUT_ALIGN != 0) return DD_ERR_UNSUPPORTED;
    if (s->bits != 3 && s->bits != 4) return DD_ERR_UNSUPPORTED;
    if (s->group_size != 64 && s->group_size != 128) return DD_ERR_UNSUPPORTED;
    /* keep every byte offset well inside int64 and every index inside int32 */
    if (s->d_in > (1 << 20) || s->d_out > (1 << 20)) return DD_ERR_UNSUPPORTED;
    return DD_OK;
}

int32_t dd_d_in_pad(const dd_shape *s) { return (s->d_in + DD_BLOCK - 1) / DD_BLOCK * DD_BLOCK; }

int32_t dd_num_groups(const dd_shape *s) { return dd_d_in_pad(s) / s->group_size; }

size_t dd_qweight_row_bytes(const dd_shape *s) {
    return (size_t)dd_d_in_pad(s) * (size_t)s->bits / 8;
}

size_t dd_residual_row_bytes(const dd_shape *s) { return (size_t)s->d_out / 2; }

int32_t dd_num_chunks(int32_t d_in) { return (d_in + DD_CHUNK - 1) / DD_CHUNK; }

int32_t dd_chunk_quota(int32_t d_in, int32_t chunk, int32_t k_chunk) {
    return dd_rule_chunk_quota(d_in, chunk, k_chunk);
}

int32_t dd_total_quota(int32_t d_in, int32_t k_chunk) {
    if (d_in <= 0 || k_chunk <= 0) return 0;
    if (k_chunk <= DD_CHUNK && d_in <= INT32_MAX - DD_CHUNK) return dd_rule_total_quota(d_in, k_chunk);
    /* outside the closed form's domain: the defining sum, saturated */
    int64_t total = 0;
    const int32_t n_chunks = (int32_t)(((int64_t)d_in + DD_CHUNK - 1) / DD_CHUNK);
    for (int32_t c = 0; c < n_chunks; c++) total += dd_rule_chunk_quota(d_in, c, k_chunk);
    return total > INT32_MAX ? INT32_MAX : (int32_t)total;
}

int32_t dd_n_tb_max(int32_t n_sm) { return n_sm - 1 > 1 ? n_sm - 1 : 1; }

int32_t dd_n_tb_default(int32_t n_sm) {
    const int32_t hi = dd_n_tb_max(n_sm), n = n_sm / 8;
    return n < 1 ? 1 : n > hi ? hi : n;
}

size_t dd_weight_nbytes(const dd_shape *s) {
    if (dd_shape_check(s) != DD_OK) return 0;
    const size_t d_out = (size_t)s->d_out, ng = (size_t)dd_num_groups(s);
    return d_out * dd_qweight_row_bytes(s) + 4 * d_out * ng + 4 * (size_t)s->d_in + 2 * d_out;
}

size_t dd_residual_nbytes(const dd_shape *s) {
    if (dd_shape_check(s) != DD_OK) return 0;
    return (size_t)s->d_in * (size_t)s->d_out / 2;
}

size_t dd_fetch_nbytes(const dd_shape *s, int32_t k_chunk) {
    if (dd_shape_check(s) != DD_OK) return 0;
    return (size_t)dd_total_quota(s->d_in, k_chunk) * (size_t)(s->d_out / 2);
}

void dd_bucket_floors(const float *t, int32_t k_total, float f[DD_NUM_BUCKETS]) {
    /* Written as mul, div, add (never a*b+c) so no compiler contracts it into an FMA: the
     * GPU receives these exact floats from the host, and both backends compare against them. */
    const float a = t[0];
    const float b = t[k_total - 1];
    const float span = b - a;
    for (int i = 0; i < 16; i++) {
        float step = span * (float)i;
        step = step / 15.0f;
        f[i] = a + step;
    }
    f[15] = b;
    for (int i = 16; i < DD_NUM_BUCKETS; i++) {
        float v = b * (float)(31 - i);
        f[i] = v / 16.0f;
    }
}

/* IEEE binary16 <-> binary32, bit exact (round to nearest even), no dependency on F16C. */
float dd_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while ((mant & 0x400u) == 0) { mant <<= 1; exp--; }
            mant &= 0x3ffu;
            bits = sign | (exp << 23) | (mant << 13);
        }
    } else if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

uint16_t dd_float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t abs = x & 0x7fffffffu;
    if (abs >= 0x7f800000u) /* Inf or NaN (keep NaN quiet) */
        return (uint16_t)(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
    if (abs >= 0x477ff000u) /* rounds to >= 65520: overflow to Inf */
        return (uint16_t)(sign | 0x7c00u);
    if (abs < 0x38800000u) { /* result is subnormal or zero */
        if (abs < 0x33000000u) return (uint16_t)sign; /* < half of the smallest subnormal */
        uint32_t e = abs >> 23;
        uint32_t m = (abs & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126 - e; /* 14..24 */
        uint32_t r = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1);
        uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1u))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = abs - 0x38000000u; /* rebias exponent */
    uint32_t out = r >> 13;
    uint32_t rem = r & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (out & 1u))) out++;
    return (uint16_t)(sign | out);
}

/* One row: codes from the planar layout, re-laid out chunk by chunk (decdec.h "3-bit FIELDS"). */
dd_status dd_repack_fields3(const dd_shape *s, const uint8_t *planar, uint8_t *fields) {
    if (dd_shape_check(s) != DD_OK || s->bits != 3 || !planar || !fields) return DD_ERR_INVALID_ARGUMENT;
    const size_t rb = dd_qweight_row_bytes(s);
    const int32_t d_pad = dd_d_in_pad(s), n_chunks = d_pad / 32;
    for (int32_t o = 0; o < s->d_out; o++) {
        const uint8_t *lo = planar + (size_t)o * rb, *hi = lo + d_pad / 4;
        uint8_t *out = fields + (size_t)o * rb;
        for (int32_t c = 0; c < n_chunks; c++) {
            uint32_t w[3] = {0, 0, 0};
            for (int32_t e = 0; e < 32; e++) {
                const int32_t j = 32 * c + e;
                const uint32_t q = ((lo[j >> 2] >> (2 * (j & 3))) & 3u) | (((hi[j >> 3] >> (j & 7)) & 1u) << 2);
                if (e < 30) {
                    const int32_t word = e / 10, f = e % 10;
                    w[word] |= q << (f < 5 ? 3 * f : 16 + 3 * (f - 5));
                } else {
                    const int32_t bit = e == 30 ? 15 : 31;
                    for (int32_t b = 0; b < 3; b++) w[b] |= ((q >> b) & 1u) << bit;
                }
            }
            for (int32_t b = 0; b < 4; b++) {
                out[8 * c + b] = (uint8_t)(w[0] >> (8 * b));
                out[8 * c + 4 + b] = (uint8_t)(w[1] >> (8 * b));
                out[d_pad / 4 + 4 * c + b] = (uint8_t)(w[2] >> (8 * b));
            }
        }
    }
    return DD_OK;
}
