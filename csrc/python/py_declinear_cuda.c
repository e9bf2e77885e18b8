/* The CUDA path of decdec.DecLinear: weights uploaded to device memory the object owns, the
 * residual read zero-copy from the object's one pinned mapped buffer, thresholds (as bucket
 * floors) on the device.  forward() takes device arrays (DeviceArray, __cuda_array_interface__
 * objects such as torch CUDA tensors, or int pointers) and a stream. */
#include <string.h>

#include "dd_python.h"
#include "py_cuda_common.h"

typedef struct {
    dd_cuda_layer *layer;
    int32_t k_chunk; /* what the device floors were computed for */
} dd_py_cuda_state;

int dd_py_declinear_cuda_init(DecLinearObject *self, PyObject *options) {
    (void)options;
    if (!self->rcodes_pinned) {
        PyErr_SetString(PyExc_RuntimeError, "device='cuda': the residual buffer could not be pinned "
                        "and mapped, so the GPU cannot read it");
        return -1;
    }
    if (self->selection != DD_SELECT_BUCKET) {
        PyErr_SetString(PyExc_NotImplementedError, "device='cuda' implements selection='bucket' only");
        return -1;
    }
    dd_py_cuda_state *state = (dd_py_cuda_state *)PyMem_RawCalloc(1, sizeof *state);
    if (!state) { PyErr_NoMemory(); return -1; }
    dd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dd_cuda_layer_create(&self->shape, self->qweight, self->scales, self->zeros, self->rcodes,
                              self->rscales, self->thresholds, &state->layer);
    if (st == DD_OK) st = dd_cuda_layer_set_k_chunk(state->layer, self->k_chunk);
    if (st == DD_OK) st = dd_cuda_layer_set_n_tb(state->layer, self->n_tb);
    Py_END_ALLOW_THREADS
    if (st != DD_OK) {
        if (state->layer) dd_cuda_layer_destroy(state->layer);
        PyMem_RawFree(state);
        dd_py_cuda_raise(st, "uploading the layer to the GPU");
        return -1;
    }
    state->k_chunk = self->k_chunk;
    self->cuda = state;
    return 0;
}

int dd_py_declinear_cuda_set_n_tb(DecLinearObject *self, int32_t n_tb) {
    dd_py_cuda_state *state = (dd_py_cuda_state *)self->cuda;
    if (!state) {
        PyErr_SetString(PyExc_RuntimeError, "DecLinear: CUDA state missing");
        return -1;
    }
    if (dd_cuda_layer_set_n_tb(state->layer, n_tb) != DD_OK) {
        PyErr_Format(PyExc_ValueError, "n_tb=%d: must be at least 1 and below this GPU's "
                     "multiprocessor count", (int)n_tb);
        return -1;
    }
    return 0;
}

void dd_py_declinear_cuda_free(DecLinearObject *self) {
    dd_py_cuda_state *state = (dd_py_cuda_state *)self->cuda;
    if (!state) return;
    if (state->layer) dd_cuda_layer_destroy(state->layer);
    PyMem_RawFree(state);
    self->cuda = NULL;
}

static int parse_stream(PyObject *obj, void **stream) {
    *stream = NULL;
    if (obj == Py_None) return 0;
    PyObject *handle = NULL;
    if (PyLong_Check(obj)) handle = (Py_INCREF(obj), obj);
    else if (PyObject_HasAttrString(obj, "cuda_stream")) handle = PyObject_GetAttrString(obj, "cuda_stream");
    else if (PyObject_HasAttrString(obj, "ptr")) handle = PyObject_GetAttrString(obj, "ptr");
    if (!handle || !PyLong_Check(handle)) {
        Py_XDECREF(handle);
        PyErr_Format(PyExc_TypeError, "stream must be an int handle or an object with .cuda_stream, got %s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    *stream = PyLong_AsVoidPtr(handle);
    Py_DECREF(handle);
    return PyErr_Occurred() ? -1 : 0;
}

PyObject *dd_py_declinear_cuda_forward(DecLinearObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"x", "out", "accumulate", "stream", "n_tokens", NULL};
    PyObject *x_obj, *out_obj = Py_None, *stream_obj = Py_None;
    int accumulate = 0;
    Py_ssize_t n_tok_arg = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O$pOn:forward", kwlist, &x_obj, &out_obj,
                                     &accumulate, &stream_obj, &n_tok_arg))
        return NULL;
    dd_py_cuda_state *state = (dd_py_cuda_state *)self->cuda;
    if (!state) {
        PyErr_SetString(PyExc_RuntimeError, "DecLinear: CUDA state missing");
        return NULL;
    }
    if (self->selection != DD_SELECT_BUCKET) {
        PyErr_SetString(PyExc_NotImplementedError, "device='cuda' implements selection='bucket' only");
        return NULL;
    }
    const int d_in = self->shape.d_in, d_out = self->shape.d_out;
    const int layer_dev = dd_cuda_layer_device(state->layer);
    dd_device_view xv, ov;
    if (dd_py_device_view(x_obj, "x", &xv) < 0) return NULL;
    Py_ssize_t n_tok;
    if (xv.raw) {
        n_tok = n_tok_arg < 0 ? 1 : n_tok_arg;
    } else {
        if (xv.typenum != NPY_FLOAT16) {
            PyErr_SetString(PyExc_TypeError, "x must be float16 on the GPU");
            return NULL;
        }
        if (xv.shape[xv.ndim - 1] != d_in) {
            PyErr_Format(PyExc_ValueError, "x has %zd features in its last dimension, the layer expects "
                         "in_features=%d", xv.shape[xv.ndim - 1], d_in);
            return NULL;
        }
        n_tok = xv.ndim == 1 ? 1 : xv.shape[0];
    }
    if (xv.device != layer_dev) {
        PyErr_Format(PyExc_ValueError, "x is on cuda:%d, the layer on cuda:%d", xv.device, layer_dev);
        return NULL;
    }
    void *stream = NULL;
    if (stream_obj != Py_None) {
        if (parse_stream(stream_obj, &stream) < 0) return NULL;
    } else if (xv.stream > 0) {
        /* CAI v3: the producer's stream; 1 = legacy default, 2 = per-thread default */
        stream = xv.stream == 1 ? NULL : xv.stream == 2 ? (void *)(uintptr_t)2 : (void *)(uintptr_t)xv.stream;
    }
    PyObject *result = NULL;
    if (out_obj == Py_None) {
        if (accumulate) {
            PyErr_SetString(PyExc_ValueError, "accumulate=True needs out=");
            return NULL;
        }
        Py_ssize_t shape[2] = {xv.ndim == 2 ? n_tok : d_out, d_out};
        result = dd_py_device_array_empty(xv.ndim == 2 ? 2 : 1, shape, NPY_FLOAT16);
        if (!result) return NULL;
        if (dd_py_device_view(result, "out", &ov) < 0) { Py_DECREF(result); return NULL; }
    } else {
        if (dd_py_device_view(out_obj, "out", &ov) < 0) return NULL;
        if (!ov.raw) {
            if (ov.typenum != NPY_FLOAT16) {
                PyErr_SetString(PyExc_TypeError, "out must be float16 on the GPU");
                return NULL;
            }
            Py_ssize_t o_tok = ov.ndim == 1 ? 1 : ov.shape[0];
            if (ov.shape[ov.ndim - 1] != d_out || o_tok != n_tok) {
                PyErr_Format(PyExc_ValueError, "out must hold %zd x %d (tokens x out_features)", n_tok, d_out);
                return NULL;
            }
        }
        if (ov.device != layer_dev) {
            PyErr_Format(PyExc_ValueError, "out is on cuda:%d, the layer on cuda:%d", ov.device, layer_dev);
            return NULL;
        }
        result = out_obj;
        Py_INCREF(result);
    }
    dd_status st = DD_OK;
    const int32_t k_chunk = self->k_chunk;
    Py_BEGIN_ALLOW_THREADS
    if (k_chunk != state->k_chunk) {
        st = dd_cuda_layer_set_k_chunk(state->layer, k_chunk);
        if (st == DD_OK) state->k_chunk = k_chunk;
    }
    if (st == DD_OK)
        st = dd_cuda_layer_forward(state->layer, (const uint16_t *)xv.ptr, (uint16_t *)ov.ptr,
                                   (int32_t)n_tok, accumulate, stream);
    /* results go to the caller's stream; a DeviceArray we allocated is handed back ready */
    if (st == DD_OK && out_obj == Py_None) st = dd_cuda_stream_synchronize(stream);
    Py_END_ALLOW_THREADS
    if (st != DD_OK) {
        Py_DECREF(result);
        return dd_py_cuda_raise(st, "DecLinear.forward on the GPU");
    }
    return result;
}
