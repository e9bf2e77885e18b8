/* Shared by the csrc/cuda translation units: error capture and small device helpers. */
#ifndef DD_CUDA_INTERNAL_CUH
#define DD_CUDA_INTERNAL_CUH

#include <cuda_runtime.h>
#include <cuda_fp16.h>

#include "dd_cuda.h"

/* Record the failing call for dd_cuda_last_error() and map the CUDA error to a dd_status. */
dd_status dd_cuda_fail(cudaError_t err, const char *what, const char *file, int line);

#define DD_CK(call)                                                                     \
    do {                                                                                \
        cudaError_t dd_err_ = (call);                                                   \
        if (dd_err_ != cudaSuccess) return dd_cuda_fail(dd_err_, #call, __FILE__, __LINE__); \
    } while (0)

/* After a launch: launch-configuration errors surface here, never later as a sticky error. */
#define DD_CK_LAUNCH(name) DD_CK(cudaGetLastError())

/* Multiprocessor count and dynamic shared-memory limit of the current device (cached). */
dd_status dd_cuda_device_limits(int *n_sm, int *max_smem_optin);

/* Selected rows one DEC block holds in shared memory; a larger layer total runs fork/join. */
#define DD_FUSED_SEL_CAP 4096
/* words after the d_out meeting cells: [0] row-group ticket counter, [1] finished base blocks */
#define DD_CELL_TAIL 32

/* DEC half of the one-launch layer kernel (dd_cuda_gemv.cu, v5). */
typedef struct {
    const uint8_t *rcodes;     /* device view of the pinned mapped residual */
    const uint16_t *rscales;
    float *cell;               /* d_out meeting cells, all-ones between calls (the kernel leaves them so),
                                * then DD_CELL_TAIL words: row-group tickets (zero between calls) */
    uint16_t floors_half[DD_NUM_BUCKETS]; /* bucket floors rounded UP to fp16, non-increasing */
    int k_chunk, n_tb;
    int base_sm;               /* SMs the base grid is sized for; 0 = SMs - n_tb */
    int with_base;
} dd_fused_dec;
/* DD_ERR_UNSUPPORTED when the selection exceeds what a DEC block holds (the caller falls back). */
/* Layer selection with the v5 warp-per-chunk code of the fused kernel (dd_cuda_dec.cu); d_idx gets
 * dd_total_quota slots, -1 padded per chunk. */
dd_status dd_cuda_select_fused(int32_t d_in, const uint16_t *d_x, const uint16_t *floors_half,
                               int32_t k_chunk, int32_t *d_idx, void *stream);
dd_status dd_cuda_fused_launch(const dd_shape *s, const uint8_t *d_qweight, const uint16_t *d_scales,
                               const uint16_t *d_zeros, const dd_fused_dec *dec, const uint16_t *d_x,
                               uint16_t *d_y, int accumulate, void *stream);

/* The layer object (dd_cuda_runtime.cu); the benchmark swaps its weight pointers. */
struct dd_cuda_layer {
    dd_shape shape;
    int device;
    int n_sm;
    int32_t k_chunk, k_total, n_tb;
    int serial;                /* DD_PATH_* below */
    int base_sm;               /* fused path: SMs the base grid is sized for (0 = SMs - n_tb) */
    float *d_cell;             /* fused path: d_out meeting cells (all-ones between calls) */
    uint16_t floors_half[DD_NUM_BUCKETS]; /* current floors rounded up to fp16 */
    int fused_ok;              /* floors non-increasing and k_total within a DEC block's capacity */
    uint8_t *d_qweight;
    uint16_t *d_scales, *d_zeros, *d_rscales;
    float *d_floors, *d_xsel;
    int32_t *d_idx;
    const uint8_t *rcodes_dev; /* device view of the caller's pinned mapped buffer */
    float *h_thresholds;
    cudaStream_t side;
    cudaEvent_t fork, join;
};

/* How a layer call runs DEC (dd_cuda_layer_set_serial's argument). */
enum { DD_PATH_FUSED = 0, DD_PATH_SERIAL = 1, DD_PATH_FORKJOIN = 2 };

#endif
