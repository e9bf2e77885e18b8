/* Host memory for residual cheatsheets and device discovery.  Plain C over the CUDA runtime's C
 * API (linked statically), so a CUDA build still loads and runs its CPU backend on a machine with
 * no driver: every runtime call here fails soft into "no device". */
#include <stdlib.h>

#include "decdec.h"

#ifdef DD_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

int dd_built_with_cuda(void) {
#ifdef DD_WITH_CUDA
    return 1;
#else
    return 0;
#endif
}

int dd_cuda_device_count(void) {
#ifdef DD_WITH_CUDA
    static int cached = -1;
    if (cached < 0) {
        int n = 0;
        if (cudaGetDeviceCount(&n) != cudaSuccess) {
            (void)cudaGetLastError(); /* clear the sticky "no driver" status */
            n = 0;
        }
        cached = n;
    }
    return cached;
#else
    return 0;
#endif
}

dd_status dd_host_alloc(size_t bytes, int want_pinned, void **ptr, int *is_pinned) {
    if (!ptr || !is_pinned) return DD_ERR_INVALID_ARGUMENT;
    *ptr = NULL;
    *is_pinned = 0;
    if (bytes == 0) bytes = 64;
#ifdef DD_WITH_CUDA
    if (want_pinned && dd_cuda_device_count() > 0) {
        void *p = NULL;
        cudaError_t e = cudaHostAlloc(&p, bytes, cudaHostAllocMapped | cudaHostAllocPortable);
        if (e == cudaSuccess) {
            *ptr = p;
            *is_pinned = 1;
            return DD_OK;
        }
        (void)cudaGetLastError();
        return e == cudaErrorMemoryAllocation ? DD_ERR_OUT_OF_MEMORY : DD_ERR_CUDA;
    }
#else
    (void)want_pinned;
#endif
    size_t rounded = (bytes + 63) / 64 * 64;
    void *p = aligned_alloc(64, rounded);
    if (!p) return DD_ERR_OUT_OF_MEMORY;
    *ptr = p;
    return DD_OK;
}

void dd_host_free(void *ptr, int is_pinned) {
    if (!ptr) return;
#ifdef DD_WITH_CUDA
    if (is_pinned) {
        if (cudaFreeHost(ptr) != cudaSuccess) (void)cudaGetLastError();
        return;
    }
#else
    (void)is_pinned;
#endif
    free(ptr);
}
