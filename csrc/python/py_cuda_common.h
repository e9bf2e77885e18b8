/* Shared by py_device_array.c and py_declinear_cuda.c (CUDA builds only). */
#ifndef DD_PY_CUDA_COMMON_H
#define DD_PY_CUDA_COMMON_H
#include <stddef.h>

#include "../cuda/dd_cuda.h"

typedef struct {
    void *ptr;
    int ndim;             /* -1 for a raw int pointer */
    Py_ssize_t shape[2];
    int typenum;          /* -1 for a raw int pointer */
    int device;
    int raw;
    long long stream;     /* from __cuda_array_interface__; -1 when absent */
    int read_only;        /* __cuda_array_interface__ data[1] */
    PyObject *keep;       /* new reference to what keeps ptr alive (DLPack owner, CAI object), or NULL */
} dd_device_view;

/* Parse a DeviceArray / __cuda_array_interface__ object / int pointer; -1 + exception. */
int dd_py_device_view(PyObject *obj, const char *name, dd_device_view *v);
/* Drop what the view keeps alive (after the call that used ptr has been enqueued). Idempotent. */
void dd_py_device_view_release(dd_device_view *v);
/* The view's memory must hold `bytes` from ptr inside one device allocation (when the driver can
 * tell: lying shapes, n_tokens= beyond a raw pointer's allocation) and be aligned to `align` bytes.
 * -1 + ValueError naming `name`. */
int dd_py_device_view_check_extent(const dd_device_view *v, const char *name, size_t bytes, size_t align);
/* A new DeviceArray on the current device; ValueError when the size overflows. */
PyObject *dd_py_device_array_empty(int ndim, const Py_ssize_t *shape, int typenum);
PyObject *dd_py_cuda_raise(dd_status st, const char *context);

#endif
