/* Shared declarations of the binding layer: turns dd_status into Python exceptions and defines
 * the DecLinear object that the CPU (py_declinear.c) and CUDA (py_declinear_cuda.c) paths share. */
#ifndef DD_PYTHON_H
#define DD_PYTHON_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_22_API_VERSION
#define PY_ARRAY_UNIQUE_SYMBOL decdec_ARRAY_API
#ifndef DD_IMPORT_ARRAY_HERE
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>

#include "../decdec.h"

enum { DD_BACKEND_CPU = 0, DD_BACKEND_CUDA = 1 };

typedef struct {
    PyObject_HEAD
    dd_shape shape;
    int backend;
    int32_t k_chunk;
    int32_t n_tb;        /* thread blocks the GPU's DEC part may hold (the CPU ignores it) */
    dd_selection selection;
    /* host copies (the CPU backend computes from them; the CUDA path may release them) */
    uint8_t *qweight;
    uint16_t *scales;
    uint16_t *zeros;
    float *thresholds;
    uint16_t *rscales;
    /* the residual cheatsheet: held once, pinned + mapped when a GPU is usable */
    uint8_t *rcodes;
    int rcodes_pinned;
    /* opaque state of the CUDA path (device buffers, streams), owned by py_declinear_cuda.c */
    void *cuda;
    PyObject *weakreflist;
} DecLinearObject;

extern PyTypeObject DecLinear_Type;
extern PyObject *DecdecError;   /* base of every decdec exception */
extern PyObject *DecdecCudaError;

/* Set a Python exception for a failed status (context names the operation); returns NULL. */
PyObject *dd_py_raise(dd_status status, const char *context);

#ifdef DD_PY_CUDA
/* Implemented by py_declinear_cuda.c.  Each returns 0 / NULL with an exception set on failure. */
int dd_py_declinear_cuda_init(DecLinearObject *self, PyObject *kwds_device_options);
PyObject *dd_py_declinear_cuda_forward(DecLinearObject *self, PyObject *args, PyObject *kwds);
void dd_py_declinear_cuda_free(DecLinearObject *self);
int dd_py_declinear_cuda_set_n_tb(DecLinearObject *self, int32_t n_tb);
int dd_py_cuda_types_init(PyObject *module); /* DeviceArray & co */
#endif

#endif
