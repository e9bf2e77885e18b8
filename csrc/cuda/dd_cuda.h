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
/* *capturing = 1 while `stream` (NULL = legacy default, (void *)2 = per-thread default) is
 * capturing a CUDA graph, else 0 (the binding refuses to allocate a workspace inside a capture). */
dd_status dd_cuda_stream_is_capturing(void *stream, int *capturing);
/* *n_sm = the multiprocessor count of `device` (n_tb's limits derive from it). */
dd_status dd_cuda_device_sm_count(int device, int *n_sm);
dd_status dd_cuda_device_synchronize(void);
/* Pinned host memory mapped into the device address space (the residual cheatsheet's home):
 * dd_host_alloc(bytes, want_pinned=1) that fails (DD_ERR_NO_DEVICE) instead of falling back to
 * pageable memory; dd_cuda_host_free = dd_host_free(ptr, 1).  One pinned allocator. */
dd_status dd_cuda_host_alloc_mapped(void **host_ptr, size_t bytes);
dd_status dd_cuda_host_free(void *host_ptr);
dd_status dd_cuda_host_device_pointer(const void *host_ptr, void **device_ptr);
/* What a pointer is: DD_PTR_* below, and the device it lives on (-1 for plain host memory). */
enum { DD_PTR_HOST = 0, DD_PTR_PINNED_HOST = 1, DD_PTR_DEVICE = 2, DD_PTR_MANAGED = 3 };
dd_status dd_cuda_pointer_kind(const void *ptr, int *kind, int *device);
/* The device allocation holding ptr: [*base, *base + *size).  *known = 0 (and DD_OK) when the driver
 * cannot say (no driver entry point, or memory it does not track): callers then skip the check. */
dd_status dd_cuda_pointer_range(const void *ptr, uintptr_t *base, size_t *size, int *known);

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

/* ---- a whole layer: immutable weights, run settings, per-stream workspace --------------
 *
 * Three separate things (DecLinear v2, issue 7):
 *   dd_cuda_layer      the weights on the device: created once, NEVER modified afterwards (every
 *                      function below takes it const).  Safe to share between threads and streams.
 *   dd_cuda_run        the run settings of a call (k_chunk, n_tb, path, measurement variant) and
 *                      what is derived from them (k_total, bucket floors): a plain value, built on
 *                      the host by dd_cuda_run_init with NO CUDA call (so it may be built while a
 *                      stream capture is in progress), copied into every launch by value.
 *   dd_cuda_workspace  per-call scratch: the fused kernel's meeting cells and row-group tickets,
 *                      the fork/join path's index/value buffers, its side stream and events.
 *                      Calls that may overlap on the GPU (different streams, or a graph replayed
 *                      beside eager calls) need different workspaces; calls ordered on one stream
 *                      may share one, also across layers (sized for the largest d_in / d_out).
 * Thread rule: any number of host threads may call dd_cuda_layer_forward on one layer at once,
 * each with its own run value; a workspace serves one stream at a time. */
typedef struct dd_cuda_layer dd_cuda_layer;
typedef struct dd_cuda_workspace dd_cuda_workspace;

/* How a layer call runs DEC. */
enum {
    DD_PATH_FUSED = 0,    /* one launch: DEC blocks beside the base GEMV blocks (falls back to
                           * FORKJOIN when the floors are not non-increasing or more than
                           * DD_FUSED_SEL_CAP rows are selected) */
    DD_PATH_SERIAL = 1,   /* DEC alone, then the base GEMV, on one stream (measurement) */
    DD_PATH_FORKJOIN = 2  /* select + fetch kernels on the workspace's side stream beside the base */
};

/* Measurement-only kernel variants (0 = the production rule everywhere).  Carried inside
 * dd_cuda_run, never process-global: production calls cannot see a benchmark's choice. */
typedef struct {
    int32_t base_rows;      /* plain base GEMV rows per lane group: 0 rule, 1, 2, 4 */
    int32_t base_grid;      /* plain base GEMV grid: 0 rule (one block per resident slot), 1 whole waves */
    int32_t layer_rows;     /* layer kernel rows per lane group: 0 rule, 1, 2, 4 */
    int32_t layer_mode;     /* layer kernel row-group hand-out: 0 rule (v7), 1 static, 2 tickets on
                             * SMs - n_tb, 3 tickets on every free slot  (see dd_cuda_gemv.cu) */
    int32_t layer_grid_cap; /* at most this many base blocks in the layer kernel (0 = no cap) */
    int32_t base_sm;        /* SMs the layer kernel's base grid is sized for (0 = SMs - n_tb) */
    /* added with the issue-9 base kernels (zero = unchanged behaviour, so older initialisers stay valid): */
    int32_t base_kernel;    /* plain base GEMV (dd_cuda_gemv_base_v, DD_BENCH_BASE*, and the base
                             * GEMV calls of the serial / fork-join / k_chunk 0 layer paths):
                             * 0 = kernel 0 (production), 2 = kernel 2 (tensor-core mma.sync dot
                             * products, docs/KERNELS.md "Base kernel 2"), 3 = kernel 2 reading a
                             * 3-bit qweight in the FIELDS layout (decdec.h, dd_repack_fields3; the
                             * caller uploads that layout; 4-bit: as 2); falls back to 0 for
                             * group size 64, a qweight not 16-byte aligned or shared
                             * memory beyond the device's.  (1 was the cp.async-ring kernel: measured
                             * no faster than kernel 0 on the H200 and removed.)  The one-launch
                             * layer kernel (DD_PATH_FUSED) is not affected. */
    int32_t base_ksplit;    /* kernel 2's input-dimension split over a block's 8 warps: 0 rule
                             * (fewest steps on the busiest block), 1, 2, 4, 8.  Kernel 2 also reads
                             * base_rows: 2 = one row pair per lane step (4 blocks/SM), else two */
} dd_cuda_variant;

typedef struct {
    int32_t k_chunk;       /* 0..DD_CHUNK (0 = compensation off: the base GEMV alone) */
    int32_t n_tb;          /* 1..dd_n_tb_max(SMs) */
    int32_t path;          /* DD_PATH_* */
    dd_cuda_variant variant;
    /* derived by dd_cuda_run_init; callers do not write these */
    int32_t k_total;       /* dd_total_quota(d_in, k_chunk) */
    int32_t fused_ok;      /* the fused kernel applies (floors non-increasing, k_total <= cap) */
    float floors[DD_NUM_BUCKETS];          /* dd_bucket_floors(thresholds, k_total) */
    uint16_t floors_half[DD_NUM_BUCKETS];  /* the same rounded UP to fp16 (exact compare on fp16 |x|) */
} dd_cuda_run;

/* Uploads qweight/scales/zeros/rscales to the current device and keeps a host copy of the
 * thresholds (the floors are derived from them); the host arrays may be freed afterwards.
 * h_rcodes_pinned must stay valid for the layer's life: a pinned, mapped buffer (dd_host_alloc
 * with want_pinned) that the caller owns.  Synchronous; not while a capture is in progress. */
dd_status dd_cuda_layer_create(const dd_shape *s, const uint8_t *h_qweight, const uint16_t *h_scales,
                               const uint16_t *h_zeros, const uint8_t *h_rcodes_pinned,
                               const uint16_t *h_rscales, const float *h_thresholds,
                               dd_cuda_layer **out);
dd_status dd_cuda_layer_destroy(dd_cuda_layer *layer);
int dd_cuda_layer_device(const dd_cuda_layer *layer);
int dd_cuda_layer_n_sm(const dd_cuda_layer *layer);
const dd_shape *dd_cuda_layer_shape(const dd_cuda_layer *layer);

/* Settings for calls on `layer`: validates k_chunk (0..DD_CHUNK), n_tb (1..dd_n_tb_max(SMs)),
 * path and variant, derives k_total and floors.  Host only, no CUDA call, no allocation. */
dd_status dd_cuda_run_init(const dd_cuda_layer *layer, int32_t k_chunk, int32_t n_tb, int32_t path,
                           const dd_cuda_variant *variant /* NULL = production */, dd_cuda_run *run);

/* Scratch for calls of layers up to max_d_in x max_d_out on `device`: allocated and initialised
 * synchronously (meeting cells all-ones, tickets zero; every call leaves them so).  Not while a
 * capture is in progress. */
dd_status dd_cuda_workspace_create(int device, int32_t max_d_in, int32_t max_d_out,
                                   dd_cuda_workspace **out);
dd_status dd_cuda_workspace_destroy(dd_cuda_workspace *ws);

/* One layer call for n_tok tokens (each compensated on its own): y (=|+=) layer(x).
 * x: [n_tok, d_in] fp16, y: [n_tok, d_out] fp16, device memory of the layer's device.
 * Stream-ordered on `stream`; no allocation, no host synchronisation, no host->device copy:
 * capturable into a CUDA graph.  DD_ERR_INVALID_ARGUMENT when ws is too small or on another
 * device, or run was not made for this layer's SM count. */
dd_status dd_cuda_layer_forward(const dd_cuda_layer *layer, const dd_cuda_run *run,
                                dd_cuda_workspace *ws, const uint16_t *d_x, uint16_t *d_y,
                                int32_t n_tok, int accumulate, void *stream);
/* The indices run's k_chunk selects for one token, computed by the code the layer call runs
 * (the fused kernel's warp selection when run->fused_ok and run->path is not DD_PATH_FORKJOIN,
 * else the fork/join select kernel; both select the same set):
 * h_idx gets run->k_total entries (-1 padded per chunk), *n_selected the valid ones;
 * synchronises `stream`. */
dd_status dd_cuda_layer_select(const dd_cuda_layer *layer, const dd_cuda_run *run,
                               dd_cuda_workspace *ws, const uint16_t *d_x, int32_t *h_idx,
                               int32_t *n_selected, void *stream);

/* ---- benchmark support (decdec.bench and csrc/cuda/tests) -------------------------------- */
/* A bench session holds enough copies of one random layer (qweight|scales|zeros contiguous per
 * copy) to rotate far past the L2, a pinned random residual, random inputs, one immutable layer
 * (run per call on a shallow view holding copy i's weight pointers) and one workspace.  Times are medians over `reps` replays of a CUDA
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
/* variant: NULL = production kernels; otherwise the measurement variant (dd_cuda_variant above),
 * passed to exactly this run: nothing process-global changes. */
dd_status dd_cuda_bench_run(dd_cuda_bench *b, int mode, int32_t k_chunk, int32_t n_tb,
                            const dd_cuda_variant *variant, int iters, int reps, double *us_per_call);
/* bytes one call must move (qweight + scales + zeros), copies held, multiprocessors */
dd_status dd_cuda_bench_info(const dd_cuda_bench *b, size_t *layer_bytes, int *n_copies, int *n_sm);
dd_status dd_cuda_bench_destroy(dd_cuda_bench *b);
/* Bandwidth probes: HBM streaming read of `bytes` (GB/s), zero-copy read of pinned mapped host
 * memory by 2*zero_copy_blocks x 256 threads (GB/s), cudaMemcpy host->device from pinned memory (GB/s). */
dd_status dd_cuda_bench_bandwidth(size_t bytes, int zero_copy_blocks, double *hbm_gbs,
                                  double *zero_copy_gbs, double *h2d_gbs);

#ifdef __cplusplus
}
#endif
#endif /* DD_CUDA_H */
