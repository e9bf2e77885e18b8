/*
 * dd_cuda.h -- the CUDA backend of decdec: plain C entry points over the kernels in csrc/cuda.
 *
 * Formats and the selection rule are those of ../decdec.h.  Every function returns a dd_status;
 * none exits or aborts.  After DD_ERR_CUDA / DD_ERR_CUDA_OUT_OF_MEMORY, dd_cuda_last_error()
 * names the failed call, the CUDA error string and the source line (per host thread).
 * `stream` arguments are cudaStream_t passed as void* (NULL = the legacy default stream), so this
 * header needs no CUDA include and the Python binding stays plain C.
 *
 * Numerics (see docs/KERNELS.md): weights are dequantized exactly; activations are normalised
 * by a power of two per 64-input segment, products and sums inside one 32-weight (4-bit) or
 * 64-weight (3-bit) run use fp16 FMA on centred codes (|partial| <= 240, no overflow for any
 * finite fp16 x), every sum beyond that is fp32; the residual GEMV is fp32 throughout; the
 * output is rounded to fp16 once per contribution (base, then the DEC delta).
 */
#ifndef DD_CUDA_H
#define DD_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "../decdec.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- errors, devices, memory ---------------------------------------------------------- */
const char *dd_cuda_last_error(void);
dd_status dd_cuda_get_device(int *device);
dd_status dd_cuda_set_device(int device);
dd_status dd_cuda_device_name(int device, char *buf, size_t len);
dd_status dd_cuda_malloc(void **ptr, size_t bytes);
dd_status dd_cuda_free(void *ptr);
/* kind: 0 host->device, 1 device->host, 2 device->device; stream-ordered then synchronised
 * with the host when sync != 0. */
dd_status dd_cuda_memcpy(void *dst, const void *src, size_t bytes, int kind, void *stream,
                         int sync);
dd_status dd_cuda_memset(void *ptr, int value, size_t bytes, void *stream);
dd_status dd_cuda_stream_synchronize(void *stream);
dd_status dd_cuda_device_synchronize(void);
/* Pinned host memory mapped into the device address space (the residual cheatsheet's home). */
dd_status dd_cuda_host_alloc_mapped(void **host_ptr, size_t bytes);
dd_status dd_cuda_host_free(void *host_ptr);
dd_status dd_cuda_host_device_pointer(const void *host_ptr, void **device_ptr);
/* What a pointer is: DD_PTR_* below, and the device it lives on (-1 for plain host memory). */
enum { DD_PTR_HOST = 0, DD_PTR_PINNED_HOST = 1, DD_PTR_DEVICE = 2, DD_PTR_MANAGED = 3 };
dd_status dd_cuda_pointer_kind(const void *ptr, int *kind, int *device);

/* ---- kernels (one token, batch 1) ------------------------------------------------------ */
/* y[o] (=|+=) sum_j W_hat[o, j] x[j]; fp16 x, y.  accumulate: 0 stores, 1 atomically adds
 * (what the concurrent DEC path uses).  n_sm_free: streaming multiprocessors to size the grid
 * for (0 = all of them; the fused path passes SMs - n_tb so DEC's blocks find room). */
dd_status dd_cuda_gemv_base(const dd_shape *s, const uint8_t *d_qweight, const uint16_t *d_scales,
                            const uint16_t *d_zeros, const uint16_t *d_x, uint16_t *d_y,
                            int accumulate, int n_sm_free, void *stream);
/* Bucket selection of decdec.h on the device; d_floors = dd_bucket_floors(...) (32 floats on
 * the device).  Writes dd_total_quota(d_in, k_chunk) slots of d_idx / d_xsel chunk by chunk,
 * ascending; slots a chunk cannot fill (NaNs) get idx -1.  At most max_blocks blocks. */
dd_status dd_cuda_select(int32_t d_in, const uint16_t *d_x, const float *d_floors, int32_t k_chunk,
                         int32_t *d_idx, float *d_xsel, int max_blocks, void *stream);
/* y[o] += rscales[o] * sum_n xsel[n] * code(idx[n], o), codes read zero-copy from the mapped
 * pinned buffer (its device pointer), on n_tb thread blocks; y atomically (fp16). */
dd_status dd_cuda_dec_fetch(const dd_shape *s, const uint8_t *rcodes_mapped, const uint16_t *d_rscales,
                            const int32_t *d_idx, const float *d_xsel, int32_t n_sel, int n_tb,
                            uint16_t *d_y, void *stream);

/* ---- a whole layer -------------------------------------------------------------------- */
typedef struct dd_cuda_layer dd_cuda_layer;
/* Uploads qweight/scales/zeros/rscales/thresholds to the current device (copies: the host
 * arrays may be freed afterwards).  h_rcodes_pinned must stay valid for the layer's life: a
 * pinned, mapped buffer (dd_cuda_host_alloc_mapped or dd_host_alloc) that the caller owns. */
dd_status dd_cuda_layer_create(const dd_shape *s, const uint8_t *h_qweight, const uint16_t *h_scales,
                               const uint16_t *h_zeros, const uint8_t *h_rcodes_pinned,
                               const uint16_t *h_rscales, const float *h_thresholds,
                               dd_cuda_layer **out);
dd_status dd_cuda_layer_destroy(dd_cuda_layer *layer);
/* k_chunk 0..1024 (0 = compensation off).  Not while a stream capture is in progress
 * (it uploads the bucket floors synchronously). */
dd_status dd_cuda_layer_set_k_chunk(dd_cuda_layer *layer, int32_t k_chunk);
/* n_tb: thread blocks for DEC (1..SMs/2 are sensible; default 16). */
dd_status dd_cuda_layer_set_n_tb(dd_cuda_layer *layer, int32_t n_tb);
/* 0 (default): one kernel launch per token: DEC thread blocks (selection + zero-copy fetch, each
 *    owning a slice of the output columns) and the base GEMV's blocks in the same grid, meeting per
 *    output in an fp32 exchange cell (graph-capturable); falls back to 2 when the floors are not
 *    non-increasing or more than 4096 rows are selected;
 * 1: DEC alone, then the base GEMV, serialised on `stream` (for measurement);
 * 2: the earlier fork/join path (memset, select and fetch kernels on a second stream beside the
 *    base GEMV; for measurement).
 * A layer object runs one call at a time: calls on different streams must not overlap. */
dd_status dd_cuda_layer_set_serial(dd_cuda_layer *layer, int serial);
int dd_cuda_layer_device(const dd_cuda_layer *layer);
/* One layer call for n_tok tokens (each compensated on its own): y (=|+=) layer(x).
 * x: [n_tok, d_in] fp16, y: [n_tok, d_out] fp16, both device memory of the layer's device.
 * Stream-ordered on `stream`; capturable into a CUDA graph. */
dd_status dd_cuda_layer_forward(dd_cuda_layer *layer, const uint16_t *d_x, uint16_t *d_y,
                                int32_t n_tok, int accumulate, void *stream);
/* Indices the layer's current k_chunk selects for one token (host array of
 * dd_total_quota(d_in, k_chunk) entries, -1 padded); synchronises `stream`. */
dd_status dd_cuda_layer_select(dd_cuda_layer *layer, const uint16_t *d_x, int32_t *h_idx,
                               int32_t *n_selected, void *stream);

/* ---- benchmark support (decdec.bench and csrc/cuda/tests) -------------------------------- */
/* A bench session holds enough copies of one random layer (qweight|scales|zeros contiguous per
 * copy) to rotate far past the L2, a pinned random residual, random inputs, and a layer object
 * whose weight pointers it swaps per call.  Times are medians over `reps` replays of a CUDA
 * graph of `iters` calls, timed with CUDA events, reported in microseconds per call. */
typedef struct dd_cuda_bench dd_cuda_bench;
enum {
    DD_BENCH_BASE = 0,          /* base GEMV alone on every SM */
    DD_BENCH_BASE_RESERVED = 1, /* base GEMV alone, grid sized for SMs - n_tb (DEC's share idle) */
    DD_BENCH_FUSED = 2,         /* the layer: base beside DEC (fork/join), k_chunk, n_tb */
    DD_BENCH_SERIAL = 3,        /* the layer with DEC and base one after the other */
    DD_BENCH_READ = 4,          /* a plain streaming read of the same bytes (the ceiling) */
    DD_BENCH_DEC_ONLY = 5,      /* DEC alone (the fused kernel without base blocks), n_tb blocks */
    DD_BENCH_FORKJOIN = 6,      /* the earlier layer path: memset + fork/join, select, fetch, base */
    DD_BENCH_DEC_LEGACY = 7,    /* the earlier select kernel + fetch kernel alone */
    DD_BENCH_FUSED_FULL = 8,    /* as FUSED, base grid sized for every SM (DEC blocks share SMs) */
    DD_BENCH_EMPTY = 9          /* an empty kernel per call: launch floor inside a graph */
};
dd_status dd_cuda_bench_create(const dd_shape *s, size_t rotate_bytes, uint64_t seed,
                               dd_cuda_bench **out);
dd_status dd_cuda_bench_run(dd_cuda_bench *b, int mode, int32_t k_chunk, int32_t n_tb, int iters,
                            int reps, double *us_per_call);
/* bytes one call must move (qweight + scales + zeros), copies held, multiprocessors */
dd_status dd_cuda_bench_info(const dd_cuda_bench *b, size_t *layer_bytes, int *n_copies, int *n_sm);
dd_status dd_cuda_bench_destroy(dd_cuda_bench *b);
/* Base GEMV variant for measurement (process-wide; 0/-1 restore the defaults): rows per lane
 * group (1, 2, 4; 0 = automatic), grid rule (0 = one block per resident slot, 1 = whole waves of
 * row groups, -1 = default). */
void dd_cuda_bench_set_base_variant(int rows, int grid);
/* Benchmark-only: the layer kernel's rows per lane group (0 = rule) and row-group hand-out (0 static,
 * 1 dynamic tickets on SMs - n_tb, 2 dynamic filling every free block slot; -1 = default). */
void dd_cuda_bench_set_layer_variant(int rows, int mode);
/* Test-only: cap the layer kernel's base blocks (0 = none), so small layers hand out many row groups. */
void dd_cuda_bench_set_layer_grid_cap(int max_base_blocks);
/* Bandwidth probes: HBM streaming read of `bytes` (GB/s), zero-copy read of pinned mapped host
 * memory by 2*zero_copy_blocks x 256 threads (GB/s), cudaMemcpy host->device from pinned memory (GB/s). */
dd_status dd_cuda_bench_bandwidth(size_t bytes, int zero_copy_blocks, double *hbm_gbs,
                                  double *zero_copy_gbs, double *h2d_gbs);

#ifdef __cplusplus
}
#endif
#endif /* DD_CUDA_H */
