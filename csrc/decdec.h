/*
 * decdec.h -- the one public header of the decdec C core.
 *
 * Everything that defines a storage format or a selection rule lives here; the CPU backend
 * (csrc/cpu), the CUDA backend (csrc/cuda), the Python binding (csrc/python) and the NumPy
 * tools (decdec/formats.py) all follow this text.  No Python.h, no CUDA headers: plain C99.
 *
 * ------------------------------------------------------------------------------------------
 * LAYER  y[d_out] = W_hat x + sum_{i in S(x)} x[i] * R_hat[i, :]
 *        W is d_out x d_in (PyTorch nn.Linear convention), x has d_in entries.
 *
 * BASE WEIGHT (W_hat): asymmetric uniform quantization along the input dimension, groups of
 * `group_size` (64 or 128) consecutive input channels of one output row, `bits` in {3, 4}.
 *     W_hat[o, j] = scales[o, g] * (q[o, j] - zeros[o, g]),   g = j / group_size
 * scales and zeros are fp16 arrays [d_out, n_groups] (row-major); zeros may be fractional.
 * d_in is padded to d_in_pad = round_up(d_in, 128): padded codes are 0 and the matching x
 * entries are taken as 0, so every kernel sees whole 128-weight blocks.
 * n_groups = d_in_pad / group_size.  d_out must be a multiple of 32 (see residual rows).
 *
 * Packing (row-major, one packed row per output channel, every row 16-byte aligned):
 *   4-bit: row = d_in_pad / 2 bytes.  32-bit little-endian word w holds elements 8w..8w+7,
 *          element 8w+k in bits [4k, 4k+4).  A 16-byte load = 32 consecutive weights.
 *          GPU dequant: (word >> 4i) & 0x000F000F gives elements (i, i+4) as the two halves
 *          of a half2 after OR-ing 0x64006400 (the "1024 + q" fp16 trick).
 *   3-bit: planar.  row = [ lo plane : d_in_pad/4 bytes | hi plane : d_in_pad/8 bytes ]
 *          = 3 * d_in_pad / 8 bytes.  lo plane: word w holds the low two bits of elements
 *          16w..16w+15, element 16w+k in bits [2k, 2k+2).  hi plane: word w holds bit 2 of
 *          elements 32w..32w+31, element 32w+k in bit k.  Both planes are read with
 *          coalesced 16-byte loads (64 weights' low bits, 128 weights' high bits per load).
 *   3-bit FIELDS (a device layout, not a storage format: artifacts stay planar; made by
 *          dd_repack_fields3 for the tensor-core base kernel, same bytes per row).  Per chunk of
 *          32 elements, three little-endian words: w0, w1 at bytes [8c, 8c+8) of the first
 *          d_in_pad/4 bytes of the row, w2 at byte d_in_pad/4 + 4c.  Element 10w + f (f < 5)
 *          in bits [3f, 3f+3) of word w, element 10w + f (5 <= f < 10) in bits
 *          [16 + 3(f-5), 19 + 3(f-5)); element 30: bit b in bit 15 of word b; element 31: bit b
 *          in bit 31 of word b.  So (w & 0x00070007) | 0x64006400 is elements (10w, 10w+5) as
 *          the fp16 pair 1024 + q, and each further mask / shift gives the next pair: two codes
 *          per LOP3, no bit spreading.
 *
 * RESIDUAL CHEATSHEET (R_hat): symmetric 4-bit codes c in -7..7, one fp16 scale per output
 * channel: R_hat[i, o] = rscales[o] * c[i, o].  Stored INPUT-CHANNEL-MAJOR: input channel
 * i's row of d_out codes is one contiguous run of d_out/2 bytes (rows of 16-byte multiples
 * since d_out % 32 == 0).  Nibble = c + 8 (so 8 means 0; nibble 0 is never written);
 * byte j of a row holds output channel 2j in its low nibble and 2j+1 in its high nibble.
 * The scale of each output channel is the MSE-best of DD_RESIDUAL_SCALE_CANDIDATES
 * candidates m*(t+1)/N, t = 0..N-1, m = max_i |R[i, o]| / 7 (decdec/cheatsheet.py).
 *
 * THRESHOLDS: float32 vector t[d_in], non-increasing, finite, >= 0: t[r] is the largest value
 * the r-th largest |x| of the layer input took over the calibration tokens.
 *
 * SELECTION S(x), per chunk of DD_CHUNK = 1024 consecutive input channels:
 *   chunk c covers [1024c, min(1024c+1024, d_in)), length L.  Its quota is
 *       k_c = k_chunk                                    if L == 1024
 *       k_c = (k_chunk * L + 512) / 1024  (integer div;  round half up, at most L)  otherwise
 *   The layer total k = sum_c k_c.  If k == 0 nothing is selected.
 *   Anchors (fp32): a = t[0], b = t[k-1].  32 bucket floors, computed in fp32:
 *       f[i] = a + (b - a) * i / 15           i = 0..15     (f[0] = a, f[15] = b)
 *       f[i] = b * (31 - i) / 16              i = 16..31    (f[31] = 0)
 *   Channel j belongs to bucket B(j) = smallest i with |x[j]| >= f[i]; NaN belongs to none
 *   and is never selected; +-Inf belongs to bucket 0.  (If the floors are not strictly
 *   monotone because a == b, the rule "smallest i" still defines B.)
 *   Each chunk takes whole buckets from 0 upwards while they fit in k_c; in the cut bucket
 *   it takes the members with the LOWEST channel indices first until k_c are taken.  This
 *   tie rule is deterministic, so CPU and GPU select exactly the same set.
 *   Exact selection (for comparison): per chunk the k_c largest |x|, ties to the lower index,
 *   NaN never selected.
 *   Selected indices are reported chunk by chunk, ascending within a chunk.
 * ------------------------------------------------------------------------------------------
 */
#ifndef DECDEC_H
#define DECDEC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DD_FORMAT_VERSION 1
#define DD_CHUNK 1024
#define DD_NUM_BUCKETS 32
#define DD_BLOCK 128               /* d_in is padded to a multiple of this */
#define DD_RESIDUAL_MAX_CODE 7
#define DD_RESIDUAL_NIBBLE_BIAS 8
#define DD_RESIDUAL_SCALE_CANDIDATES 32
#define DD_OUT_ALIGN 32            /* d_out must be a multiple of this */

typedef enum {
    DD_OK = 0,
    DD_ERR_INVALID_ARGUMENT = 1,  /* a size, pointer or value is out of range */
    DD_ERR_UNSUPPORTED = 2,       /* valid but not implemented (bits, group size, arch) */
    DD_ERR_OUT_OF_MEMORY = 3,     /* host allocation failed */
    DD_ERR_CUDA = 4,              /* a CUDA runtime call failed (dd_cuda_last_error tells) */
    DD_ERR_CUDA_OUT_OF_MEMORY = 5,
    DD_ERR_NO_DEVICE = 6,         /* no usable GPU or driver, or built without CUDA */
    DD_ERR_NOT_FINITE = 7         /* thresholds contain NaN/Inf */
} dd_status;

const char *dd_strerror(dd_status status);

typedef enum { DD_SELECT_BUCKET = 0, DD_SELECT_EXACT = 1 } dd_selection;

/* Geometry of one layer; every size below is derived by the dd_* helpers. */
typedef struct {
    int32_t d_in;
    int32_t d_out;
    int32_t bits;        /* 3 or 4 */
    int32_t group_size;  /* 64 or 128 */
} dd_shape;

dd_status dd_shape_check(const dd_shape *s);
int32_t dd_d_in_pad(const dd_shape *s);
int32_t dd_num_groups(const dd_shape *s);
size_t dd_qweight_row_bytes(const dd_shape *s);        /* bytes of one packed output row */
size_t dd_residual_row_bytes(const dd_shape *s);       /* d_out / 2 */
int32_t dd_num_chunks(int32_t d_in);
int32_t dd_chunk_quota(int32_t d_in, int32_t chunk, int32_t k_chunk);
int32_t dd_total_quota(int32_t d_in, int32_t k_chunk);

/* n_tb, the thread blocks DEC may hold beside the base GEMV: one rule for C and Python.
 * A GPU of n_sm multiprocessors takes 1..dd_n_tb_max(n_sm); the default is dd_n_tb_default(n_sm)
 * (16 on the 132-SM H100/H200, 2 on a 16-SM MIG slice).  A CPU layer takes 1..DD_N_TB_LIMIT
 * (kept for when its weights go to a GPU; the CPU ignores it). */
#define DD_N_TB_LIMIT 1024
int32_t dd_n_tb_max(int32_t n_sm);      /* max(1, n_sm - 1) */
int32_t dd_n_tb_default(int32_t n_sm);  /* clamp(n_sm / 8, 1, dd_n_tb_max(n_sm)) */

/* Byte accounting, one rule (DecLinear's properties and decdec.pipeline report these). */
size_t dd_weight_nbytes(const dd_shape *s);   /* GPU-resident: qweight + scales + zeros + residual
                                               * scales + thresholds */
size_t dd_residual_nbytes(const dd_shape *s); /* the cheatsheet's codes (host, pinned) */
size_t dd_fetch_nbytes(const dd_shape *s, int32_t k_chunk); /* residual bytes fetched per token */

/* 3-bit planar -> 3-bit FIELDS (layout above), d_out rows of dd_qweight_row_bytes each; `fields`
 * must not overlap `planar`.  DD_ERR_INVALID_ARGUMENT unless s is a valid 3-bit shape. */
dd_status dd_repack_fields3(const dd_shape *s, const uint8_t *planar, uint8_t *fields);

/* Bucket floors (fp32) from thresholds for a layer total k (k >= 1). */
void dd_bucket_floors(const float *thresholds, int32_t k_total, float floors[DD_NUM_BUCKETS]);

/* ---- CPU backend (csrc/cpu) : every op has a CUDA twin in csrc/cuda ------------------ */

/* y[n_tok, d_out] = W_hat x for n_tok tokens; x is [n_tok, d_in] fp32. Overwrites y. */
dd_status dd_cpu_gemv_base(const dd_shape *s, const uint8_t *qweight, const uint16_t *scales,
                           const uint16_t *zeros, const float *x, int32_t n_tok, float *y);

/* Selection for one token.  idx receives at most dd_total_quota(d_in, k_chunk) indices;
 * *n_selected the count actually taken (smaller only when NaNs leave too few candidates). */
dd_status dd_cpu_select(const float *x, int32_t d_in, const float *thresholds, int32_t k_chunk,
                        dd_selection mode, int32_t *idx, int32_t *n_selected);

/* y[d_out] += sum_n x[idx[n]] * R_hat[idx[n], :]  for one token. */
dd_status dd_cpu_residual_gemv(const dd_shape *s, const uint8_t *rcodes, const uint16_t *rscales,
                               const float *x, const int32_t *idx, int32_t n, float *y);

/* The whole layer for n_tok tokens, each compensated on its own (as at decode). */
dd_status dd_cpu_forward(const dd_shape *s, const uint8_t *qweight, const uint16_t *scales,
                         const uint16_t *zeros, const uint8_t *rcodes, const uint16_t *rscales,
                         const float *thresholds, int32_t k_chunk, dd_selection mode,
                         const float *x, int32_t n_tok, float *y);

/* ---- Host memory and device discovery (csrc/dd_host.c) ---------------------------------- */

/* Residual storage: pinned + mapped (cudaHostAllocMapped) when want_pinned and a usable GPU
 * exists, so ONE buffer serves the CPU backend and the GPU's zero-copy fetch; otherwise 64-byte
 * aligned pageable memory.  *is_pinned tells which (pass it back to dd_host_free). */
dd_status dd_host_alloc(size_t bytes, int want_pinned, void **ptr, int *is_pinned);
void dd_host_free(void *ptr, int is_pinned);
/* Number of usable CUDA devices: 0 when built without CUDA or with no driver/GPU. */
int dd_cuda_device_count(void);
/* Whether this build contains the CUDA backend. */
int dd_built_with_cuda(void);

/* fp16 <-> fp32 (IEEE binary16, round to nearest even). */
float dd_half_to_float(uint16_t h);
uint16_t dd_float_to_half(float f);

#ifdef __cplusplus
}
#endif
#endif /* DECDEC_H */
