/* Shared declarations of the binding layer: turns dd_status into Python exceptions and defines
 * the two objects that the CPU (py_declinear.c) and CUDA (py_declinear_cuda.c) paths share:
 *
 *   decdec._C._LayerWeights  (internal) the immutable, reference-counted weights of one layer:
 *                            host copies (CPU layers), the residual cheatsheet (pinned + mapped on
 *                            CUDA layers), thresholds, residual scales and, for CUDA layers, the
 *                            dd_cuda_layer holding the device copies.  Built once by
 *                            DecLinear.__init__, never modified, freed when the last DecLinear
 *                            or NumPy view referring to it goes.
 *   decdec.DecLinear         a reference to the weights + run settings (k_chunk, n_tb, selection
 *                            and, on CUDA, the dd_cuda_run derived from them eagerly in the
 *                            setters) + on CUDA a per-stream workspace table.
 *
 * Every call copies the settings while it holds the GIL and then releases the GIL for the long
 * work; the weights it reads cannot change or go away under it (the call holds a reference). */
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
#ifdef DD_PY_CUDA
#include "../cuda/dd_cuda.h"
#endif

enum { DD_BACKEND_CPU = 0, DD_BACKEND_CUDA = 1 };

#define DD_PY_CPU_DEFAULT_N_TB 16

/* The immutable weights of one layer.  Every pointer is set at construction and never changes. */
typedef struct {
    PyObject_HEAD
    dd_shape shape;
    int backend;
    /* host copies of the base weight: CPU layers only (NULL on CUDA layers, whose weights live
     * on the device alone) */
    uint8_t *qweight;
    uint16_t *scales;
    uint16_t *zeros;
    /* host copies on both backends (the CPU-side properties report them) */
    float *thresholds;
    uint16_t *rscales;
    /* the residual cheatsheet: pinned + mapped on CUDA layers (the GPU reads it zero-copy) */
    uint8_t *rcodes;
    int rcodes_pinned;
    /* CUDA layers: the dd_cuda_layer (device copies), its device and multiprocessor count */
    void *cuda_layer;
    int device;
    int n_sm;
} LayerWeightsObject;

/* Run settings: a plain value, replaced as a whole by the setters (GIL held) and copied as a
 * whole by every call when it starts (GIL held). */
typedef struct {
    int32_t k_chunk;
    int32_t n_tb;
    dd_selection selection;
#ifdef DD_PY_CUDA
    dd_cuda_run run; /* CUDA layers: dd_cuda_run_init(layer, k_chunk, n_tb, FUSED, NULL) */
#endif
} dd_py_settings;

enum { DD_PY_UNINIT = 0, DD_PY_INITIALISING = 1, DD_PY_READY = 2 };

typedef struct {
    PyObject_HEAD
    int state;                   /* DD_PY_UNINIT / INITIALISING / READY */
    LayerWeightsObject *weights; /* a strong reference once READY */
    dd_py_settings settings;
    void *cuda;                  /* CUDA layers: the per-stream workspace table (py_declinear_cuda.c) */
    PyObject *weakreflist;
} DecLinearObject;

extern PyTypeObject DecLinear_Type;
extern PyTypeObject LayerWeights_Type;
extern PyObject *DecdecError;   /* base of every decdec exception */
extern PyObject *DecdecCudaError;

/* Set a Python exception for a failed status (context names the operation); returns NULL. */
PyObject *dd_py_raise(dd_status status, const char *context);

/* 0 when self is a built DecLinear; -1 + RuntimeError("DecLinear is not initialised") otherwise. */
int dd_py_declinear_ready(DecLinearObject *self);

/* An int argument in [lo, hi]: TypeError for non-ints (bool included), ValueError out of range. */
int dd_py_parse_int_in(PyObject *value, const char *name, long lo, long hi, int32_t *out);

/* Shape arguments validated as DecLinear does (ValueError naming the argument). */
int dd_py_check_shape(int d_in, int d_out, int bits, int group_size, dd_shape *out);

#ifdef DD_PY_CUDA
/* Implemented by py_declinear_cuda.c.  Each returns -1 / NULL with an exception set on failure. */

/* The SM count of the current device (for n_tb validation before anything is allocated). */
int dd_py_cuda_current_device_sms(int *device, int *n_sm);
/* Upload: fills w->cuda_layer, w->device, w->n_sm from the host arrays (GIL released inside). */
int dd_py_weights_cuda_create(LayerWeightsObject *w, const uint8_t *qweight, const uint16_t *scales,
                              const uint16_t *zeros);
void dd_py_weights_cuda_free(LayerWeightsObject *w);
/* Fill settings->run from the other settings fields: ValueError when the runtime refuses them. */
int dd_py_cuda_settings_init(LayerWeightsObject *w, dd_py_settings *settings);
PyObject *dd_py_declinear_cuda_forward(DecLinearObject *self, PyObject *args, PyObject *kwds);
PyObject *dd_py_declinear_cuda_select(DecLinearObject *self, PyObject *args, PyObject *kwds);
PyObject *dd_py_declinear_cuda_prepare(DecLinearObject *self, PyObject *args, PyObject *kwds);
void dd_py_declinear_cuda_free(DecLinearObject *self); /* the workspace table */
int dd_py_cuda_types_init(PyObject *module);          /* DeviceArray & co */
int dd_py_engine_init(PyObject *module);              /* decdec._C.Engine (py_engine.c) */
#endif

#endif
