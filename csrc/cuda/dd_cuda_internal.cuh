/* Shared by the csrc/cuda translation units: the one set of error helpers, the layer and
 * workspace structs, and the internal launch entry points. */
#ifndef DD_CUDA_INTERNAL_CUH
#define DD_CUDA_INTERNAL_CUH

#include <cuda_runtime.h>
#include <cuda_fp16.h>

#include "dd_cuda.h"
#include "../dd_rules.h"

/* ---- errors: the one set used everywhere in csrc/cuda ----------------------------------------
 * dd_cuda_fail records the failing call for dd_cuda_last_error() (per host thread) and maps the
 * CUDA error to a dd_status.
 *   DD_CU(call)        the call's dd_status (DD_OK on cudaSuccess), recording a failure
 *   DD_CK(call)        return the dd_status from the enclosing function on failure
 *   DD_CK_LAUNCH(name) after a launch: configuration errors surface here, never later as a
 *                      sticky error
 *   DD_TRY(expr)       goto-cleanup form: `dd_status st` and a label `fail` in scope;
 *                      expr is a dd_status expression
 *   DD_TRY_CU(call)    goto-cleanup form of a CUDA call */
dd_status dd_cuda_fail(cudaError_t err, const char *what, const char *file, int line);
/* Records a non-CUDA failure text for dd_cuda_last_error() and returns st. */
dd_status dd_cuda_fail_text(dd_status st, const char *what, const char *file, int line);

static inline dd_status dd_cuda_check(cudaError_t err, const char *what, const char *file, int line) {
    return err == cudaSuccess ? DD_OK : dd_cuda_fail(err, what, file, line);
}

#define DD_CU(call) dd_cuda_check((call), #call, __FILE__, __LINE__)
#define DD_CK(call)                                                                     \
    do {                                                                                \
        const dd_status dd_st_ = DD_CU(call);                                           \
        if (dd_st_ != DD_OK) return dd_st_;                                             \
    } while (0)
#define DD_CK_LAUNCH(name) DD_CK(cudaGetLastError())
#define DD_TRY(expr)                                                                    \
    do {                                                                                \
        if ((st = (expr)) != DD_OK) goto fail;                                          \
    } while (0)
#define DD_TRY_CU(call) DD_TRY(DD_CU(call))

/* Multiprocessor count and dynamic shared-memory limit of the current device (cached). */
dd_status dd_cuda_device_limits(int *n_sm, int *max_smem_optin);

/* Selected rows one DEC block holds in shared memory; a larger layer total runs fork/join. */
#define DD_FUSED_SEL_CAP 4096
/* words of row-group ticket state after a workspace's meeting cells: [0] ticket counter,
 * [1] finished base blocks (both zero between calls; the last base block of a call zeroes them) */
#define DD_CELL_TAIL 32

/* DEC half of the one-launch layer kernel (dd_cuda_gemv.cu, v5). */
typedef struct {
    const uint8_t *rcodes;     /* device view of the pinned mapped residual */
    const uint16_t *rscales;
    float *cell;               /* >= d_out meeting cells, all-ones between calls (the kernel leaves
                                * them so) -- a workspace's */
    unsigned *ticket;          /* DD_CELL_TAIL words, zero between calls -- the same workspace's */
    uint16_t floors_half[DD_NUM_BUCKETS]; /* bucket floors rounded UP to fp16, non-increasing */
    int k_chunk, n_tb;
    int with_base;
} dd_fused_dec;

/* Layer selection with the v5 warp-per-chunk code of the fused kernel (dd_cuda_dec.cu); d_idx gets
 * dd_total_quota slots, -1 padded per chunk. */
dd_status dd_cuda_select_fused(int32_t d_in, const uint16_t *d_x, const uint16_t *floors_half,
                               int32_t k_chunk, int32_t *d_idx, void *stream);
/* The fork/join select kernel with the fp32 floors passed BY VALUE (a kernel parameter), so
 * changing the settings never touches device memory. */
dd_status dd_cuda_select_floors(int32_t d_in, const uint16_t *d_x, const float floors[DD_NUM_BUCKETS],
                                int32_t k_chunk, int32_t *d_idx, float *d_xsel, int max_blocks,
                                void *stream);
/* The one-launch layer kernel.  DD_ERR_UNSUPPORTED when the selection exceeds what a DEC block
 * holds (the caller falls back).  v: measurement variant (NULL = production). */
dd_status dd_cuda_fused_launch(const dd_shape *s, const uint8_t *d_qweight, const uint16_t *d_scales,
                               const uint16_t *d_zeros, const dd_fused_dec *dec,
                               const dd_cuda_variant *v, const uint16_t *d_x, uint16_t *d_y,
                               int accumulate, void *stream);
/* dd_cuda_gemv_base with a measurement variant (base_rows, base_grid; NULL = production). */
dd_status dd_cuda_gemv_base_v(const dd_shape *s, const uint8_t *d_qweight, const uint16_t *d_scales,
                              const uint16_t *d_zeros, const uint16_t *d_x, uint16_t *d_y,
                              int accumulate, int n_sm_free, const dd_cuda_variant *v, void *stream);
/* Base kernel 2's plan for a call (v->base_kernel = 2): *ksplit = 0 when kernel 0 would run
 * instead (group size, alignment, shared memory); else its k-split, grid, tiles, dynamic shared memory and
 * resident blocks per SM.  Tests and benchmarks print it. */
dd_status dd_cuda_gemv_k2_info(const dd_shape *s, const void *d_qweight, const void *d_scales,
                               const void *d_zeros, int n_sm_free, const dd_cuda_variant *v, int *ksplit,
                               long *blocks, long *tiles, size_t *smem, int *per_sm);

/* The layer object (dd_cuda_runtime.cu): immutable after dd_cuda_layer_create.  A shallow copy
 * with other weight pointers (the benchmark's rotated copies) is a valid layer for the duration
 * of a call; only the original is destroyed. */
struct dd_cuda_layer {
    dd_shape shape;
    int device;
    int n_sm;
    const uint8_t *d_qweight;
    const uint16_t *d_scales, *d_zeros, *d_rscales;
    const uint8_t *rcodes_dev; /* device view of the caller's pinned mapped buffer */
    const float *h_thresholds; /* host copy (the floors are derived from it) */
    /* owned allocations (freed by dd_cuda_layer_destroy) */
    void *own_dev[4];
    float *own_thresholds;
};

/* Per-stream scratch (dd_cuda_runtime.cu). */
struct dd_cuda_workspace {
    int device;
    int32_t max_d_in, max_d_out;
    float *d_cell;             /* max_d_out meeting cells (all-ones), then DD_CELL_TAIL ticket
                                * words (zero) */
    int32_t *d_idx;            /* fork/join: max_d_in selected indices */
    float *d_xsel;             /* fork/join: max_d_in selected values */
    cudaStream_t side;
    cudaEvent_t fork, join;
};

#endif
