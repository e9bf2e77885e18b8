/*
 * The CUDA backend's host side: error capture, memory helpers, and the DecLinear v2 layer API:
 * the immutable layer (device weights), run settings (host-only values) and per-stream
 * workspaces (meeting cells, tickets, fork/join scratch, side stream).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>

#include "dd_cuda_internal.cuh"

/* ---- errors ---------------------------------------------------------------------------- */

static thread_local char g_last_error[512] = "no CUDA error recorded";

dd_status dd_cuda_fail(cudaError_t err, const char *what, const char *file, int line) {
    const char *base = strrchr(file, '/');
    snprintf(g_last_error, sizeof g_last_error, "%s: %s (%s) at %s:%d", what,
             cudaGetErrorString(err), cudaGetErrorName(err), base ? base + 1 : file, line);
    /* clear non-sticky errors so the next call starts clean */
    (void)cudaGetLastError();
    if (err == cudaErrorMemoryAllocation) return DD_ERR_CUDA_OUT_OF_MEMORY;
    if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) return DD_ERR_NO_DEVICE;
    return DD_ERR_CUDA;
}

dd_status dd_cuda_fail_text(dd_status st, const char *what, const char *file, int line) {
    const char *base = strrchr(file, '/');
    snprintf(g_last_error, sizeof g_last_error, "%s (%s) at %s:%d", what, dd_strerror(st),
             base ? base + 1 : file, line);
    return st;
}

extern "C" const char *dd_cuda_last_error(void) { return g_last_error; }

dd_status dd_cuda_device_limits(int *n_sm, int *max_smem_optin) {
    /* per-device cache, read and written by any host thread (relaxed atomics: every writer
     * stores the same values) */
    enum { kMaxDevices = 64 };
    static std::atomic<int> cached_sm[kMaxDevices], cached_smem[kMaxDevices];
    int dev = 0;
    DD_CK(cudaGetDevice(&dev));
    const bool cacheable = dev >= 0 && dev < kMaxDevices;
    if (cacheable) {
        const int sm = cached_sm[dev].load(std::memory_order_relaxed);
        const int smem = cached_smem[dev].load(std::memory_order_relaxed);
        if (sm > 0 && smem > 0) {
            *n_sm = sm;
            *max_smem_optin = smem;
            return DD_OK;
        }
    }
    int sm = 0, smem = 0;
    DD_CK(cudaDeviceGetAttribute(&sm, cudaDevAttrMultiProcessorCount, dev));
    DD_CK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    if (cacheable) {
        cached_smem[dev].store(smem, std::memory_order_relaxed);
        cached_sm[dev].store(sm, std::memory_order_relaxed);
    }
    *n_sm = sm;
    *max_smem_optin = smem;
    return DD_OK;
}

/* ---- devices and memory ---------------------------------------------------------------- */

extern "C" dd_status dd_cuda_get_device(int *device) {
    if (!device) return DD_ERR_INVALID_ARGUMENT;
    DD_CK(cudaGetDevice(device));
    return DD_OK;
}

extern "C" dd_status dd_cuda_set_device(int device) {
    DD_CK(cudaSetDevice(device));
    return DD_OK;
}

extern "C" dd_status dd_cuda_device_name(int device, char *buf, size_t len) {
    if (!buf || len == 0) return DD_ERR_INVALID_ARGUMENT;
    cudaDeviceProp prop;
    DD_CK(cudaGetDeviceProperties(&prop, device));
    snprintf(buf, len, "%s", prop.name);
    return DD_OK;
}

extern "C" dd_status dd_cuda_malloc(void **ptr, size_t bytes) {
    if (!ptr) return DD_ERR_INVALID_ARGUMENT;
    *ptr = NULL;
    DD_CK(cudaMalloc(ptr, bytes ? bytes : 16));
    return DD_OK;
}

extern "C" dd_status dd_cuda_free(void *ptr) {
    if (ptr) DD_CK(cudaFree(ptr));
    return DD_OK;
}

extern "C" dd_status dd_cuda_memcpy(void *dst, const void *src, size_t bytes, int kind,
                                    void *stream, int sync) {
    if ((!dst || !src) && bytes) return DD_ERR_INVALID_ARGUMENT;
    static const cudaMemcpyKind kinds[3] = {cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost,
                                            cudaMemcpyDeviceToDevice};
    if (kind < 0 || kind > 2) return DD_ERR_INVALID_ARGUMENT;
    if (bytes == 0) return DD_OK;
    DD_CK(cudaMemcpyAsync(dst, src, bytes, kinds[kind], (cudaStream_t)stream));
    if (sync) DD_CK(cudaStreamSynchronize((cudaStream_t)stream));
    return DD_OK;
}

extern "C" dd_status dd_cuda_memset(void *ptr, int value, size_t bytes, void *stream) {
    if (!ptr && bytes) return DD_ERR_INVALID_ARGUMENT;
    if (bytes) DD_CK(cudaMemsetAsync(ptr, value, bytes, (cudaStream_t)stream));
    return DD_OK;
}

extern "C" dd_status dd_cuda_stream_is_capturing(void *stream, int *capturing) {
    if (!capturing) return DD_ERR_INVALID_ARGUMENT;
    *capturing = 0;
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    cudaError_t e = cudaStreamIsCapturing((cudaStream_t)stream, &status);
    if (e == cudaErrorStreamCaptureImplicit) { /* legacy stream while another stream captures globally */
        (void)cudaGetLastError();
        *capturing = 1;
        return DD_OK;
    }
    DD_CK(e);
    *capturing = status != cudaStreamCaptureStatusNone;
    return DD_OK;
}

extern "C" dd_status dd_cuda_device_sm_count(int device, int *n_sm) {
    if (!n_sm) return DD_ERR_INVALID_ARGUMENT;
    *n_sm = 0;
    DD_CK(cudaDeviceGetAttribute(n_sm, cudaDevAttrMultiProcessorCount, device));
    return DD_OK;
}

extern "C" dd_status dd_cuda_stream_synchronize(void *stream) {
    DD_CK(cudaStreamSynchronize((cudaStream_t)stream));
    return DD_OK;
}

extern "C" dd_status dd_cuda_device_synchronize(void) {
    DD_CK(cudaDeviceSynchronize());
    return DD_OK;
}

/* The one pinned allocator is dd_host_alloc (csrc/dd_host.c); this is its "pinned or fail" form. */
extern "C" dd_status dd_cuda_host_alloc_mapped(void **host_ptr, size_t bytes) {
    if (!host_ptr) return DD_ERR_INVALID_ARGUMENT;
    *host_ptr = NULL;
    void *p = NULL;
    int pinned = 0;
    const dd_status st = dd_host_alloc(bytes, 1, &p, &pinned);
    if (st != DD_OK) return dd_cuda_fail_text(st, "dd_host_alloc(pinned, mapped)", __FILE__, __LINE__);
    if (!pinned) {
        dd_host_free(p, 0);
        return dd_cuda_fail_text(DD_ERR_NO_DEVICE, "pinned memory needs a usable CUDA device", __FILE__, __LINE__);
    }
    *host_ptr = p;
    return DD_OK;
}

extern "C" dd_status dd_cuda_host_free(void *host_ptr) {
    dd_host_free(host_ptr, 1);
    return DD_OK;
}

extern "C" dd_status dd_cuda_host_device_pointer(const void *host_ptr, void **device_ptr) {
    if (!host_ptr || !device_ptr) return DD_ERR_INVALID_ARGUMENT;
    DD_CK(cudaHostGetDevicePointer(device_ptr, const_cast<void *>(host_ptr), 0));
    return DD_OK;
}

/* cuMemGetAddressRange through the runtime's driver entry point: no link against libcuda (the
 * extension must import on machines without a driver), resolved once. */
typedef int (*dd_mem_range_fn)(unsigned long long *base, size_t *size, unsigned long long ptr);

static dd_mem_range_fn mem_range_fn(void) {
    static std::atomic<int> state{0}; /* 0 unresolved, 1 resolved, 2 unavailable */
    static dd_mem_range_fn fn = nullptr;
    int s = state.load(std::memory_order_acquire);
    if (s == 0) {
        void *p = nullptr;
        cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
        cudaError_t e = cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &p, 12000,
                                                         cudaEnableDefault, &q);
        if (e != cudaSuccess || q != cudaDriverEntryPointSuccess || !p) {
            (void)cudaGetLastError();
            p = nullptr;
        }
        fn = (dd_mem_range_fn)p;
        state.store(p ? 1 : 2, std::memory_order_release);
        s = p ? 1 : 2;
    }
    return s == 1 ? fn : nullptr;
}

extern "C" dd_status dd_cuda_pointer_range(const void *ptr, uintptr_t *base, size_t *size, int *known) {
    if (!base || !size || !known) return DD_ERR_INVALID_ARGUMENT;
    *base = 0;
    *size = 0;
    *known = 0;
    dd_mem_range_fn fn = mem_range_fn();
    if (!fn || !ptr) return DD_OK;
    unsigned long long b = 0;
    size_t n = 0;
    if (fn(&b, &n, (unsigned long long)(uintptr_t)ptr) != 0) return DD_OK; /* not a tracked allocation */
    *base = (uintptr_t)b;
    *size = n;
    *known = 1;
    return DD_OK;
}

extern "C" dd_status dd_cuda_pointer_kind(const void *ptr, int *kind, int *device) {
    if (!kind || !device) return DD_ERR_INVALID_ARGUMENT;
    cudaPointerAttributes attr;
    cudaError_t e = cudaPointerGetAttributes(&attr, ptr);
    if (e != cudaSuccess) { /* older runtimes: unregistered host memory is an error */
        (void)cudaGetLastError();
        *kind = DD_PTR_HOST;
        *device = -1;
        return DD_OK;
    }
    switch (attr.type) {
    case cudaMemoryTypeDevice: *kind = DD_PTR_DEVICE; *device = attr.device; break;
    case cudaMemoryTypeManaged: *kind = DD_PTR_MANAGED; *device = attr.device; break;
    case cudaMemoryTypeHost: *kind = DD_PTR_PINNED_HOST; *device = attr.device; break;
    default: *kind = DD_PTR_HOST; *device = -1; break;
    }
    return DD_OK;
}


/* ---- current-device scope -------------------------------------------------------------- */

static dd_status use_device(int device, int *prev) {
    *prev = -1;
    DD_CK(cudaGetDevice(prev));
    if (*prev != device) DD_CK(cudaSetDevice(device));
    return DD_OK;
}

static void restore_device(int device, int prev) {
    if (prev >= 0 && prev != device && cudaSetDevice(prev) != cudaSuccess) (void)cudaGetLastError();
}

/* ---- the layer: immutable weights ---------------------------------------------------------- */

static dd_status upload(void **dst, const void *src, size_t bytes) {
    DD_CK(cudaMalloc(dst, bytes ? bytes : 16));
    if (bytes) DD_CK(cudaMemcpy(*dst, src, bytes, cudaMemcpyHostToDevice));
    return DD_OK;
}

extern "C" dd_status dd_cuda_layer_destroy(dd_cuda_layer *L) {
    if (!L) return DD_OK;
    dd_status st = DD_OK;
    int prev = -1;
    const bool switched = use_device(L->device, &prev) == DD_OK;
    for (void *p : L->own_dev) {
        if (!p) continue;
        const dd_status e = DD_CU(cudaFree(p));
        if (st == DD_OK) st = e;
    }
    if (switched) restore_device(L->device, prev);
    free(L->own_thresholds);
    free(L);
    return st;
}

extern "C" dd_status dd_cuda_layer_create(const dd_shape *s, const uint8_t *h_qweight,
                                          const uint16_t *h_scales, const uint16_t *h_zeros,
                                          const uint8_t *h_rcodes_pinned, const uint16_t *h_rscales,
                                          const float *h_thresholds, dd_cuda_layer **out) {
    if (!out) return DD_ERR_INVALID_ARGUMENT;
    *out = NULL;
    dd_status st = dd_shape_check(s);
    if (st != DD_OK) return st;
    if (!h_qweight || !h_scales || !h_zeros || !h_rcodes_pinned || !h_rscales || !h_thresholds)
        return DD_ERR_INVALID_ARGUMENT;
    if (((uintptr_t)h_rcodes_pinned & 15) != 0) return DD_ERR_INVALID_ARGUMENT;
    for (int i = 0; i < s->d_in; i++) {
        const float t = h_thresholds[i];
        if (!(t >= 0.f && t <= 3.4e38f)) return DD_ERR_NOT_FINITE;
    }
    dd_cuda_layer *L = (dd_cuda_layer *)calloc(1, sizeof *L);
    if (!L) return DD_ERR_OUT_OF_MEMORY;
    L->shape = *s;
    L->own_thresholds = (float *)malloc(sizeof(float) * (size_t)s->d_in);
    if (!L->own_thresholds) { free(L); return DD_ERR_OUT_OF_MEMORY; }
    memcpy(L->own_thresholds, h_thresholds, sizeof(float) * (size_t)s->d_in);
    L->h_thresholds = L->own_thresholds;
    {
        DD_TRY_CU(cudaGetDevice(&L->device));
        int smem_optin = 0;
        DD_TRY(dd_cuda_device_limits(&L->n_sm, &smem_optin));
        const size_t ng = (size_t)dd_num_groups(s);
        DD_TRY(upload(&L->own_dev[0], h_qweight, dd_qweight_row_bytes(s) * (size_t)s->d_out));
        DD_TRY(upload(&L->own_dev[1], h_scales, ng * (size_t)s->d_out * 2));
        DD_TRY(upload(&L->own_dev[2], h_zeros, ng * (size_t)s->d_out * 2));
        DD_TRY(upload(&L->own_dev[3], h_rscales, (size_t)s->d_out * 2));
        L->d_qweight = (const uint8_t *)L->own_dev[0];
        L->d_scales = (const uint16_t *)L->own_dev[1];
        L->d_zeros = (const uint16_t *)L->own_dev[2];
        L->d_rscales = (const uint16_t *)L->own_dev[3];
        void *dev = NULL;
        DD_TRY_CU(cudaHostGetDevicePointer(&dev, const_cast<uint8_t *>(h_rcodes_pinned), 0));
        L->rcodes_dev = (const uint8_t *)dev;
        /* pageable uploads may still be in flight to device memory when cudaMemcpy returns; calls
         * on other (non-blocking) streams must see the weights */
        DD_TRY_CU(cudaStreamSynchronize(0));
    }
    *out = L;
    return DD_OK;
fail:
    dd_cuda_layer_destroy(L);
    return st;
}

extern "C" int dd_cuda_layer_device(const dd_cuda_layer *L) { return L ? L->device : -1; }
extern "C" int dd_cuda_layer_n_sm(const dd_cuda_layer *L) { return L ? L->n_sm : 0; }
extern "C" const dd_shape *dd_cuda_layer_shape(const dd_cuda_layer *L) { return L ? &L->shape : NULL; }

/* ---- run settings: host only, no CUDA call ---------------------------------------------- */

/* The smallest fp16 value >= f (f >= 0 finite; +Inf above 65504): for an fp16 |x|,
 * |x| >= f  <=>  |x| >= ceil_half(f), so the device compares halves, exactly. */
static uint16_t ceil_half(float f) {
    if (!(f > 0.f)) return 0; /* every non-NaN |x| >= 0 >= f */
    uint16_t h = dd_float_to_half(f);
    if (dd_half_to_float(h) < f) h = (uint16_t)(h + 1); /* positive halves: next value up (0x7BFF -> Inf) */
    return h;
}

static bool rows_ok(int32_t r) { return r == 0 || r == 1 || r == 2 || r == 4; }

static bool variant_ok(const dd_cuda_variant *v, int n_sm) {
    return rows_ok(v->base_rows) && (v->base_grid == 0 || v->base_grid == 1) && rows_ok(v->layer_rows) &&
           v->layer_mode >= 0 && v->layer_mode <= 3 && v->layer_grid_cap >= 0 && v->base_sm >= 0 &&
           v->base_sm <= n_sm && (v->base_kernel == 0 || v->base_kernel == 2 || v->base_kernel == 3) &&
           (v->base_ksplit == 0 || v->base_ksplit == 1 || v->base_ksplit == 2 || v->base_ksplit == 4 ||
            v->base_ksplit == 8);
}

/* The settings a run may carry on layer L (one rule for dd_cuda_run_init and the call's check). */
static bool settings_ok(const dd_cuda_layer *L, int32_t k_chunk, int32_t n_tb, int32_t path,
                        const dd_cuda_variant *v) {
    return k_chunk >= 0 && k_chunk <= DD_CHUNK && n_tb >= 1 && n_tb <= dd_n_tb_max(L->n_sm) &&
           path >= DD_PATH_FUSED && path <= DD_PATH_FORKJOIN && variant_ok(v, L->n_sm);
}

extern "C" dd_status dd_cuda_run_init(const dd_cuda_layer *L, int32_t k_chunk, int32_t n_tb, int32_t path,
                                      const dd_cuda_variant *variant, dd_cuda_run *run) {
    if (!L || !run) return DD_ERR_INVALID_ARGUMENT;
    dd_cuda_variant v;
    memset(&v, 0, sizeof v);
    if (variant) v = *variant;
    if (!settings_ok(L, k_chunk, n_tb, path, &v)) return DD_ERR_INVALID_ARGUMENT;
    dd_cuda_run r;
    memset(&r, 0, sizeof r);
    r.k_chunk = k_chunk;
    r.n_tb = n_tb;
    r.path = path;
    r.variant = v;
    r.k_total = dd_total_quota(L->shape.d_in, k_chunk);
    if (r.k_total > 0) {
        dd_bucket_floors(L->h_thresholds, r.k_total, r.floors);
        for (int i = 0; i < DD_NUM_BUCKETS; i++) r.floors_half[i] = ceil_half(r.floors[i]);
        /* the fused kernel's warp selection needs non-increasing floors (always so for valid,
         * non-increasing thresholds) and the whole selection in one block's shared memory */
        r.fused_ok = dd_rule_floors_monotone(r.floors) && r.k_total <= DD_FUSED_SEL_CAP;
    }
    *run = r;
    return DD_OK;
}

/* What a call checks of a run it did not make (cheap: no loop over the input). */
static bool run_ok(const dd_cuda_layer *L, const dd_cuda_run *R) {
    return settings_ok(L, R->k_chunk, R->n_tb, R->path, &R->variant) &&
           R->k_total == dd_total_quota(L->shape.d_in, R->k_chunk) &&
           (!R->fused_ok || R->k_total <= DD_FUSED_SEL_CAP);
}

/* ---- workspace: per-stream scratch ------------------------------------------------------ */

extern "C" dd_status dd_cuda_workspace_destroy(dd_cuda_workspace *W) {
    if (!W) return DD_OK;
    dd_status st = DD_OK;
    int prev = -1;
    const bool switched = use_device(W->device, &prev) == DD_OK;
    void *bufs[] = {W->d_cell, W->d_idx, W->d_xsel};
    for (void *p : bufs) {
        if (!p) continue;
        const dd_status e = DD_CU(cudaFree(p));
        if (st == DD_OK) st = e;
    }
    if (W->side && cudaStreamDestroy(W->side) != cudaSuccess) (void)cudaGetLastError();
    if (W->fork && cudaEventDestroy(W->fork) != cudaSuccess) (void)cudaGetLastError();
    if (W->join && cudaEventDestroy(W->join) != cudaSuccess) (void)cudaGetLastError();
    if (switched) restore_device(W->device, prev);
    free(W);
    return st;
}

extern "C" dd_status dd_cuda_workspace_create(int device, int32_t max_d_in, int32_t max_d_out,
                                              dd_cuda_workspace **out) {
    if (!out) return DD_ERR_INVALID_ARGUMENT;
    *out = NULL;
    if (device < 0 || max_d_in <= 0 || max_d_out <= 0 || max_d_in > (1 << 20) || max_d_out > (1 << 20))
        return DD_ERR_INVALID_ARGUMENT;
    dd_cuda_workspace *W = (dd_cuda_workspace *)calloc(1, sizeof *W);
    if (!W) return DD_ERR_OUT_OF_MEMORY;
    W->device = device;
    W->max_d_in = max_d_in;
    W->max_d_out = max_d_out;
    int prev = -1;
    dd_status st = use_device(device, &prev);
    if (st != DD_OK) { free(W); return st; }
    {
        /* meeting cells: all-ones ("empty") between calls; every fused call leaves them so; then
         * DD_CELL_TAIL words of row-group tickets, zero between calls (the last base block of
         * every call zeroes them again) */
        DD_TRY_CU(cudaMalloc((void **)&W->d_cell, ((size_t)max_d_out + DD_CELL_TAIL) * sizeof(float)));
        DD_TRY_CU(cudaMalloc((void **)&W->d_idx, (size_t)max_d_in * sizeof(int32_t)));
        DD_TRY_CU(cudaMalloc((void **)&W->d_xsel, (size_t)max_d_in * sizeof(float)));
        DD_TRY_CU(cudaMemsetAsync(W->d_cell, 0xFF, (size_t)max_d_out * sizeof(float), 0));
        DD_TRY_CU(cudaMemsetAsync(W->d_cell + max_d_out, 0, DD_CELL_TAIL * sizeof(float), 0));
        DD_TRY_CU(cudaStreamSynchronize(0)); /* initialised before any stream may use it */
        DD_TRY_CU(cudaStreamCreateWithFlags(&W->side, cudaStreamNonBlocking));
        DD_TRY_CU(cudaEventCreateWithFlags(&W->fork, cudaEventDisableTiming));
        DD_TRY_CU(cudaEventCreateWithFlags(&W->join, cudaEventDisableTiming));
    }
    restore_device(device, prev);
    *out = W;
    return DD_OK;
fail:
    restore_device(device, prev);
    dd_cuda_workspace_destroy(W);
    return st;
}

/* ---- one layer call ----------------------------------------------------------------------- */

/* Fork/join path (also the fallback when the fused kernel does not apply): memset, fork, select
 * (floors by value) + fetch kernels on the workspace's side stream beside the base GEMV (fp16
 * atomics), join. */
static dd_status forward_token_forkjoin(const dd_cuda_layer *L, const dd_cuda_run *R, dd_cuda_workspace *W,
                                        const uint16_t *x, uint16_t *y, int accumulate, cudaStream_t stream) {
    const dd_shape *s = &L->shape;
    dd_status st;
    if (!accumulate) DD_CK(cudaMemsetAsync(y, 0, (size_t)s->d_out * 2, stream));
    DD_CK(cudaEventRecord(W->fork, stream));
    DD_CK(cudaStreamWaitEvent(W->side, W->fork, 0));
    if ((st = dd_cuda_select_floors(s->d_in, x, R->floors, R->k_chunk, W->d_idx, W->d_xsel, R->n_tb,
                                    W->side)) != DD_OK)
        return st;
    if ((st = dd_cuda_dec_fetch(s, L->rcodes_dev, L->d_rscales, W->d_idx, W->d_xsel, R->k_total,
                                R->n_tb, y, W->side)) != DD_OK)
        return st;
    DD_CK(cudaEventRecord(W->join, W->side));
    const int free_sm = L->n_sm - R->n_tb > 0 ? L->n_sm - R->n_tb : 1;
    if ((st = dd_cuda_gemv_base_v(s, L->d_qweight, L->d_scales, L->d_zeros, x, y, 1, free_sm,
                                  &R->variant, stream)) != DD_OK)
        return st;
    DD_CK(cudaStreamWaitEvent(stream, W->join, 0));
    return DD_OK;
}

static dd_status forward_token(const dd_cuda_layer *L, const dd_cuda_run *R, dd_cuda_workspace *W,
                               const uint16_t *x, uint16_t *y, int accumulate, cudaStream_t stream) {
    const dd_shape *s = &L->shape;
    if (R->k_total == 0)
        return dd_cuda_gemv_base_v(s, L->d_qweight, L->d_scales, L->d_zeros, x, y, accumulate, 0,
                                   &R->variant, stream);
    if (R->path == DD_PATH_FORKJOIN || !R->fused_ok)
        return forward_token_forkjoin(L, R, W, x, y, accumulate, stream);
    dd_fused_dec dec;
    dec.rcodes = L->rcodes_dev;
    dec.rscales = L->d_rscales;
    dec.cell = W->d_cell;
    dec.ticket = reinterpret_cast<unsigned *>(W->d_cell + W->max_d_out);
    memcpy(dec.floors_half, R->floors_half, sizeof dec.floors_half);
    dec.k_chunk = R->k_chunk;
    dec.n_tb = R->n_tb;
    if (R->path == DD_PATH_SERIAL) { /* DEC alone writes y (=|+= delta), then base adds */
        dec.with_base = 0;
        dd_status st = dd_cuda_fused_launch(s, L->d_qweight, L->d_scales, L->d_zeros, &dec, &R->variant,
                                            x, y, accumulate, stream);
        if (st != DD_OK) return st;
        return dd_cuda_gemv_base_v(s, L->d_qweight, L->d_scales, L->d_zeros, x, y, 1, 0, &R->variant,
                                   stream);
    }
    dec.with_base = 1;
    return dd_cuda_fused_launch(s, L->d_qweight, L->d_scales, L->d_zeros, &dec, &R->variant, x, y,
                                accumulate, stream);
}

static bool workspace_fits(const dd_cuda_layer *L, const dd_cuda_workspace *W) {
    return W->device == L->device && W->max_d_in >= L->shape.d_in && W->max_d_out >= L->shape.d_out;
}

extern "C" dd_status dd_cuda_layer_forward(const dd_cuda_layer *L, const dd_cuda_run *run,
                                           dd_cuda_workspace *ws, const uint16_t *d_x, uint16_t *d_y,
                                           int32_t n_tok, int accumulate, void *stream) {
    if (!L || !run || !ws || !d_x || !d_y || n_tok < 0) return DD_ERR_INVALID_ARGUMENT;
    const dd_cuda_run R = *run; /* this call's settings, whatever the caller does meanwhile */
    if (!run_ok(L, &R) || !workspace_fits(L, ws)) return DD_ERR_INVALID_ARGUMENT;
    int prev = -1;
    dd_status st = use_device(L->device, &prev);
    if (st != DD_OK) return st;
    for (int32_t t = 0; t < n_tok && st == DD_OK; t++)
        st = forward_token(L, &R, ws, d_x + (size_t)t * L->shape.d_in, d_y + (size_t)t * L->shape.d_out,
                           accumulate, (cudaStream_t)stream);
    restore_device(L->device, prev);
    return st;
}

extern "C" dd_status dd_cuda_layer_select(const dd_cuda_layer *L, const dd_cuda_run *run,
                                          dd_cuda_workspace *ws, const uint16_t *d_x, int32_t *h_idx,
                                          int32_t *n_selected, void *stream) {
    if (!L || !run || !ws || !d_x || !h_idx || !n_selected) return DD_ERR_INVALID_ARGUMENT;
    *n_selected = 0;
    const dd_cuda_run R = *run;
    if (!run_ok(L, &R) || !workspace_fits(L, ws)) return DD_ERR_INVALID_ARGUMENT;
    if (R.k_total == 0) return DD_OK;
    int prev = -1;
    dd_status st = use_device(L->device, &prev);
    if (st != DD_OK) return st;
    /* the code the layer call runs: the fused kernel's warp selection when it applies */
    const cudaStream_t cs = (cudaStream_t)stream;
    st = R.fused_ok && R.path != DD_PATH_FORKJOIN
             ? dd_cuda_select_fused(L->shape.d_in, d_x, R.floors_half, R.k_chunk, ws->d_idx, stream)
             : dd_cuda_select_floors(L->shape.d_in, d_x, R.floors, R.k_chunk, ws->d_idx, ws->d_xsel, 0, stream);
    if (st == DD_OK)
        st = DD_CU(cudaMemcpyAsync(h_idx, ws->d_idx, sizeof(int32_t) * (size_t)R.k_total,
                                   cudaMemcpyDeviceToHost, cs));
    if (st == DD_OK) st = DD_CU(cudaStreamSynchronize(cs));
    restore_device(L->device, prev);
    if (st != DD_OK) return st;
    int32_t n = 0;
    for (int32_t i = 0; i < R.k_total; i++) n += h_idx[i] >= 0;
    *n_selected = n;
    return DD_OK;
}
