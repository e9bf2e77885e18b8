/*
 * The CUDA backend's host side: error capture, memory helpers, and the layer object that owns
 * a layer's device buffers and runs base GEMV and DEC concurrently (fork/join on two streams).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

extern "C" const char *dd_cuda_last_error(void) { return g_last_error; }

dd_status dd_cuda_device_limits(int *n_sm, int *max_smem_optin) {
    enum { kMaxDevices = 64 };
    static int cached_sm[kMaxDevices], cached_smem[kMaxDevices];
    int dev = 0;
    DD_CK(cudaGetDevice(&dev));
    if (dev >= 0 && dev < kMaxDevices && cached_sm[dev] > 0) {
        *n_sm = cached_sm[dev];
        *max_smem_optin = cached_smem[dev];
        return DD_OK;
    }
    int sm = 0, smem = 0;
    DD_CK(cudaDeviceGetAttribute(&sm, cudaDevAttrMultiProcessorCount, dev));
    DD_CK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    if (dev >= 0 && dev < kMaxDevices) {
        cached_sm[dev] = sm;
        cached_smem[dev] = smem;
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

extern "C" dd_status dd_cuda_stream_synchronize(void *stream) {
    DD_CK(cudaStreamSynchronize((cudaStream_t)stream));
    return DD_OK;
}

extern "C" dd_status dd_cuda_device_synchronize(void) {
    DD_CK(cudaDeviceSynchronize());
    return DD_OK;
}

extern "C" dd_status dd_cuda_host_alloc_mapped(void **host_ptr, size_t bytes) {
    if (!host_ptr) return DD_ERR_INVALID_ARGUMENT;
    *host_ptr = NULL;
    DD_CK(cudaHostAlloc(host_ptr, bytes ? bytes : 16, cudaHostAllocMapped | cudaHostAllocPortable));
    return DD_OK;
}

extern "C" dd_status dd_cuda_host_free(void *host_ptr) {
    if (host_ptr) DD_CK(cudaFreeHost(host_ptr));
    return DD_OK;
}

extern "C" dd_status dd_cuda_host_device_pointer(const void *host_ptr, void **device_ptr) {
    if (!host_ptr || !device_ptr) return DD_ERR_INVALID_ARGUMENT;
    DD_CK(cudaHostGetDevicePointer(device_ptr, const_cast<void *>(host_ptr), 0));
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

/* ---- the layer object ------------------------------------------------------------------ */



static dd_status upload(void **dst, const void *src, size_t bytes) {
    DD_CK(cudaMalloc(dst, bytes ? bytes : 16));
    if (bytes) DD_CK(cudaMemcpy(*dst, src, bytes, cudaMemcpyHostToDevice));
    return DD_OK;
}

extern "C" dd_status dd_cuda_layer_destroy(dd_cuda_layer *L) {
    if (!L) return DD_OK;
    int prev = -1;
    dd_status st = DD_OK;
    if (cudaGetDevice(&prev) == cudaSuccess && prev != L->device) cudaSetDevice(L->device);
    void *bufs[] = {L->d_qweight, L->d_scales, L->d_zeros, L->d_rscales,
                    L->d_floors, L->d_xsel, L->d_idx, L->d_cell};
    for (void *p : bufs)
        if (p && cudaFree(p) != cudaSuccess) st = dd_cuda_fail(cudaGetLastError(), "cudaFree", __FILE__, __LINE__);
    if (L->side) cudaStreamDestroy(L->side);
    if (L->fork) cudaEventDestroy(L->fork);
    if (L->join) cudaEventDestroy(L->join);
    if (prev >= 0 && prev != L->device) cudaSetDevice(prev);
    (void)cudaGetLastError();
    free(L->h_thresholds);
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
    L->n_tb = 16;
    L->h_thresholds = (float *)malloc(sizeof(float) * (size_t)s->d_in);
    if (!L->h_thresholds) { free(L); return DD_ERR_OUT_OF_MEMORY; }
    memcpy(L->h_thresholds, h_thresholds, sizeof(float) * (size_t)s->d_in);
#define TRY(x) do { if ((st = (x)) != DD_OK) goto fail; } while (0)
#define TRYCU(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { st = dd_cuda_fail(e_, #x, __FILE__, __LINE__); goto fail; } } while (0)
    {
        TRYCU(cudaGetDevice(&L->device));
        int smem_optin = 0;
        TRY(dd_cuda_device_limits(&L->n_sm, &smem_optin));
        const size_t ng = (size_t)dd_num_groups(s);
        TRY(upload((void **)&L->d_qweight, h_qweight, dd_qweight_row_bytes(s) * (size_t)s->d_out));
        TRY(upload((void **)&L->d_scales, h_scales, ng * (size_t)s->d_out * 2));
        TRY(upload((void **)&L->d_zeros, h_zeros, ng * (size_t)s->d_out * 2));
        TRY(upload((void **)&L->d_rscales, h_rscales, (size_t)s->d_out * 2));
        TRYCU(cudaMalloc((void **)&L->d_floors, DD_NUM_BUCKETS * sizeof(float)));
        TRYCU(cudaMalloc((void **)&L->d_idx, (size_t)s->d_in * sizeof(int32_t)));
        TRYCU(cudaMalloc((void **)&L->d_xsel, (size_t)s->d_in * sizeof(float)));
        /* meeting cells: all-ones ("empty") between calls; every fused call leaves them so */
        /* + DD_CELL_TAIL words: the base half's row-group ticket counter and finished-block count
         * (zero between calls; the last base block of every call zeroes them again) */
        TRYCU(cudaMalloc((void **)&L->d_cell, ((size_t)s->d_out + DD_CELL_TAIL) * sizeof(float)));
        TRYCU(cudaMemset(L->d_cell, 0xFF, (size_t)s->d_out * sizeof(float)));
        TRYCU(cudaMemset(L->d_cell + s->d_out, 0, DD_CELL_TAIL * sizeof(float)));
        TRYCU(cudaDeviceSynchronize());
        void *dev = NULL;
        TRYCU(cudaHostGetDevicePointer(&dev, const_cast<uint8_t *>(h_rcodes_pinned), 0));
        L->rcodes_dev = (const uint8_t *)dev;
        TRYCU(cudaStreamCreateWithFlags(&L->side, cudaStreamNonBlocking));
        TRYCU(cudaEventCreateWithFlags(&L->fork, cudaEventDisableTiming));
        TRYCU(cudaEventCreateWithFlags(&L->join, cudaEventDisableTiming));
    }
    *out = L;
    return DD_OK;
fail:
    dd_cuda_layer_destroy(L);
    return st;
#undef TRY
#undef TRYCU
}

extern "C" int dd_cuda_layer_device(const dd_cuda_layer *L) { return L ? L->device : -1; }

/* The smallest fp16 value >= f (f >= 0 finite; +Inf above 65504): for an fp16 |x|,
 * |x| >= f  <=>  |x| >= ceil_half(f), so the device compares halves, exactly. */
static uint16_t ceil_half(float f) {
    if (!(f > 0.f)) return 0; /* every non-NaN |x| >= 0 >= f */
    uint16_t h = dd_float_to_half(f);
    if (dd_half_to_float(h) < f) h = (uint16_t)(h + 1); /* positive halves: next value up (0x7BFF -> Inf) */
    return h;
}

static dd_status use_device(const dd_cuda_layer *L, int *prev) {
    DD_CK(cudaGetDevice(prev));
    if (*prev != L->device) DD_CK(cudaSetDevice(L->device));
    return DD_OK;
}

static void restore_device(const dd_cuda_layer *L, int prev) {
    if (prev >= 0 && prev != L->device) cudaSetDevice(prev);
}

extern "C" dd_status dd_cuda_layer_set_k_chunk(dd_cuda_layer *L, int32_t k_chunk) {
    if (!L || k_chunk < 0 || k_chunk > DD_CHUNK) return DD_ERR_INVALID_ARGUMENT;
    const int32_t k_total = dd_total_quota(L->shape.d_in, k_chunk);
    if (k_total > 0) {
        float floors[DD_NUM_BUCKETS];
        dd_bucket_floors(L->h_thresholds, k_total, floors);
        int prev = -1;
        dd_status st = use_device(L, &prev);
        if (st != DD_OK) return st;
        cudaError_t e = cudaMemcpy(L->d_floors, floors, sizeof floors, cudaMemcpyHostToDevice);
        restore_device(L, prev);
        if (e != cudaSuccess) return dd_cuda_fail(e, "cudaMemcpy(floors)", __FILE__, __LINE__);
        /* the fused kernel's warp selection needs non-increasing floors (always so for valid,
         * non-increasing thresholds) and the whole selection in one block's shared memory */
        int monotone = 1;
        for (int i = 0; i + 1 < DD_NUM_BUCKETS; i++) monotone &= floors[i] >= floors[i + 1];
        for (int i = 0; i < DD_NUM_BUCKETS; i++) L->floors_half[i] = ceil_half(floors[i]);
        L->fused_ok = monotone && k_total <= DD_FUSED_SEL_CAP;
    }
    L->k_chunk = k_chunk;
    L->k_total = k_total;
    return DD_OK;
}

extern "C" dd_status dd_cuda_layer_set_n_tb(dd_cuda_layer *L, int32_t n_tb) {
    if (!L || n_tb < 1 || n_tb >= L->n_sm) return DD_ERR_INVALID_ARGUMENT;
    L->n_tb = n_tb;
    return DD_OK;
}

extern "C" dd_status dd_cuda_layer_set_serial(dd_cuda_layer *L, int serial) {
    if (!L || serial < DD_PATH_FUSED || serial > DD_PATH_FORKJOIN) return DD_ERR_INVALID_ARGUMENT;
    L->serial = serial;
    return DD_OK;
}

/* Legacy path, kept for measurements: memset, fork, select + fetch kernels on the side stream
 * beside the base GEMV (fp16 atomics), join. */
static dd_status forward_token_forkjoin(dd_cuda_layer *L, const uint16_t *x, uint16_t *y,
                                        int accumulate, cudaStream_t stream) {
    const dd_shape *s = &L->shape;
    dd_status st;
    if (!accumulate) DD_CK(cudaMemsetAsync(y, 0, (size_t)s->d_out * 2, stream));
    DD_CK(cudaEventRecord(L->fork, stream));
    DD_CK(cudaStreamWaitEvent(L->side, L->fork, 0));
    if ((st = dd_cuda_select(s->d_in, x, L->d_floors, L->k_chunk, L->d_idx, L->d_xsel, L->n_tb,
                             L->side)) != DD_OK)
        return st;
    if ((st = dd_cuda_dec_fetch(s, L->rcodes_dev, L->d_rscales, L->d_idx, L->d_xsel, L->k_total,
                                L->n_tb, y, L->side)) != DD_OK)
        return st;
    DD_CK(cudaEventRecord(L->join, L->side));
    const int free_sm = L->n_sm - L->n_tb > 0 ? L->n_sm - L->n_tb : 1;
    if ((st = dd_cuda_gemv_base(s, L->d_qweight, L->d_scales, L->d_zeros, x, y, 1, free_sm,
                                stream)) != DD_OK)
        return st;
    DD_CK(cudaStreamWaitEvent(stream, L->join, 0));
    return DD_OK;
}

static dd_status forward_token(dd_cuda_layer *L, const uint16_t *x, uint16_t *y, int accumulate,
                               cudaStream_t stream) {
    const dd_shape *s = &L->shape;
    if (L->k_total == 0)
        return dd_cuda_gemv_base(s, L->d_qweight, L->d_scales, L->d_zeros, x, y, accumulate, 0,
                                 stream);
    if (L->serial == DD_PATH_FORKJOIN || !L->fused_ok) return forward_token_forkjoin(L, x, y, accumulate, stream);
    dd_fused_dec dec;
    dec.rcodes = L->rcodes_dev;
    dec.rscales = L->d_rscales;
    memcpy(dec.floors_half, L->floors_half, sizeof dec.floors_half);
    dec.cell = L->d_cell;
    dec.k_chunk = L->k_chunk;
    dec.n_tb = L->n_tb;
    dec.base_sm = L->base_sm;
    if (L->serial == DD_PATH_SERIAL) { /* DEC alone writes y (=|+= delta), then base adds */
        dec.with_base = 0;
        dd_status st = dd_cuda_fused_launch(s, L->d_qweight, L->d_scales, L->d_zeros, &dec, x, y,
                                            accumulate, stream);
        if (st != DD_OK) return st;
        return dd_cuda_gemv_base(s, L->d_qweight, L->d_scales, L->d_zeros, x, y, 1, 0, stream);
    }
    dec.with_base = 1;
    return dd_cuda_fused_launch(s, L->d_qweight, L->d_scales, L->d_zeros, &dec, x, y, accumulate,
                                stream);
}

extern "C" dd_status dd_cuda_layer_forward(dd_cuda_layer *L, const uint16_t *d_x, uint16_t *d_y,
                                           int32_t n_tok, int accumulate, void *stream) {
    if (!L || !d_x || !d_y || n_tok < 0) return DD_ERR_INVALID_ARGUMENT;
    int prev = -1;
    dd_status st = use_device(L, &prev);
    if (st != DD_OK) return st;
    for (int32_t t = 0; t < n_tok && st == DD_OK; t++)
        st = forward_token(L, d_x + (size_t)t * L->shape.d_in, d_y + (size_t)t * L->shape.d_out,
                           accumulate, (cudaStream_t)stream);
    restore_device(L, prev);
    return st;
}

extern "C" dd_status dd_cuda_layer_select(dd_cuda_layer *L, const uint16_t *d_x, int32_t *h_idx,
                                          int32_t *n_selected, void *stream) {
    if (!L || !d_x || !h_idx || !n_selected) return DD_ERR_INVALID_ARGUMENT;
    *n_selected = 0;
    if (L->k_total == 0) return DD_OK;
    int prev = -1;
    dd_status st = use_device(L, &prev);
    if (st != DD_OK) return st;
    /* the code the layer call runs: the fused kernel's warp selection when it applies */
    st = L->fused_ok ? dd_cuda_select_fused(L->shape.d_in, d_x, L->floors_half, L->k_chunk, L->d_idx, stream)
                     : dd_cuda_select(L->shape.d_in, d_x, L->d_floors, L->k_chunk, L->d_idx, L->d_xsel, 0,
                                      stream);
    if (st == DD_OK) {
        cudaError_t e = cudaMemcpyAsync(h_idx, L->d_idx, sizeof(int32_t) * (size_t)L->k_total,
                                        cudaMemcpyDeviceToHost, (cudaStream_t)stream);
        if (e == cudaSuccess) e = cudaStreamSynchronize((cudaStream_t)stream);
        if (e != cudaSuccess) st = dd_cuda_fail(e, "copying the selection back", __FILE__, __LINE__);
    }
    restore_device(L, prev);
    if (st != DD_OK) return st;
    int32_t n = 0;
    for (int32_t i = 0; i < L->k_total; i++) n += h_idx[i] >= 0;
    *n_selected = n;
    return DD_OK;
}
