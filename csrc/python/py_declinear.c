/* decdec.DecLinear: one linear layer with a 3/4-bit base weight, its 4-bit residual cheatsheet
 * and its selection thresholds.  This file holds construction, validation, properties and the
 * CPU forward; py_declinear_cuda.c adds the device path behind the same object. */
#include <math.h>
#include <string.h>

#include "dd_python.h"

#define DD_DEFAULT_N_TB 16
#define DD_MAX_N_TB 1024

/* ---- argument validation: every message names the argument and what was expected ------- */

static int check_array(PyObject *obj, const char *name, int typenum, int ndim,
                       const npy_intp *dims) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray, got %s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    if (PyArray_TYPE(a) != typenum) {
        PyArray_Descr *want = PyArray_DescrFromType(typenum);
        PyErr_Format(PyExc_TypeError, "%s must have dtype %S, got %S", name, (PyObject *)want,
                     (PyObject *)PyArray_DESCR(a));
        Py_XDECREF(want);
        return -1;
    }
    if (PyArray_NDIM(a) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must be %d-dimensional, got %d dimensions", name, ndim,
                     PyArray_NDIM(a));
        return -1;
    }
    for (int d = 0; d < ndim; d++) {
        if (PyArray_DIM(a, d) != dims[d]) {
            if (ndim == 1)
                PyErr_Format(PyExc_ValueError, "%s must have shape (%zd,), got (%zd,)", name,
                             (Py_ssize_t)dims[0], (Py_ssize_t)PyArray_DIM(a, 0));
            else
                PyErr_Format(PyExc_ValueError, "%s must have shape (%zd, %zd), got (%zd, %zd)",
                             name, (Py_ssize_t)dims[0], (Py_ssize_t)dims[1],
                             (Py_ssize_t)PyArray_DIM(a, 0), (Py_ssize_t)PyArray_DIM(a, 1));
            return -1;
        }
    }
    if (!PyArray_IS_C_CONTIGUOUS(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be C-contiguous (use numpy.ascontiguousarray)",
                     name);
        return -1;
    }
    return 0;
}

static void *copy_out(PyObject *obj) {
    size_t n = (size_t)PyArray_NBYTES((PyArrayObject *)obj);
    void *p = PyMem_RawMalloc(n ? n : 1);
    if (!p) {
        PyErr_NoMemory();
        return NULL;
    }
    memcpy(p, PyArray_DATA((PyArrayObject *)obj), n);
    return p;
}

static int parse_selection(PyObject *value, dd_selection *out) {
    if (!PyUnicode_Check(value)) {
        PyErr_Format(PyExc_TypeError, "selection must be 'bucket' or 'exact', got %s",
                     Py_TYPE(value)->tp_name);
        return -1;
    }
    if (PyUnicode_CompareWithASCIIString(value, "bucket") == 0) *out = DD_SELECT_BUCKET;
    else if (PyUnicode_CompareWithASCIIString(value, "exact") == 0) *out = DD_SELECT_EXACT;
    else {
        PyErr_Format(PyExc_ValueError, "selection must be 'bucket' or 'exact', got %R", value);
        return -1;
    }
    return 0;
}

/* An int attribute in [lo, hi]: TypeError for non-ints (bool included), ValueError out of range. */
static int parse_int_in(PyObject *value, const char *name, long lo, long hi, int32_t *out) {
    if (!PyLong_Check(value) || PyBool_Check(value)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, got %s", name, Py_TYPE(value)->tp_name);
        return -1;
    }
    long v = PyLong_AsLong(value);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (v < lo || v > hi) {
        PyErr_Format(PyExc_ValueError, "%s must be in [%ld, %ld], got %ld", name, lo, hi, v);
        return -1;
    }
    *out = (int32_t)v;
    return 0;
}

static int parse_k_chunk(PyObject *value, int32_t *out) {
    return parse_int_in(value, "k_chunk", 0, DD_CHUNK, out);
}

/* Settable attributes cannot be deleted: `del layer.k_chunk` raises instead of zeroing. */
static int reject_delete(PyObject *value, const char *name) {
    if (value) return 0;
    PyErr_Format(PyExc_AttributeError, "%s cannot be deleted", name);
    return -1;
}

/* ---- lifetime ------------------------------------------------------------------------------ */

static void declinear_release(DecLinearObject *self) {
#ifdef DD_PY_CUDA
    if (self->cuda) dd_py_declinear_cuda_free(self);
#endif
    PyMem_RawFree(self->qweight);
    PyMem_RawFree(self->scales);
    PyMem_RawFree(self->zeros);
    PyMem_RawFree(self->thresholds);
    PyMem_RawFree(self->rscales);
    dd_host_free(self->rcodes, self->rcodes_pinned);
    self->qweight = NULL;
    self->scales = self->zeros = self->rscales = NULL;
    self->thresholds = NULL;
    self->rcodes = NULL;
}

static void declinear_dealloc(DecLinearObject *self) {
    if (self->weakreflist) PyObject_ClearWeakRefs((PyObject *)self);
    declinear_release(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int declinear_init(DecLinearObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"qweight", "scales", "zeros", "residual_codes", "residual_scales",
                             "thresholds", "in_features", "out_features", "bits", "group_size",
                             "k_chunk", "selection", "device", NULL};
    PyObject *qweight, *scales, *zeros, *rcodes, *rscales, *thresholds;
    int d_in = 0, d_out = 0, bits = 0, group_size = 0;
    PyObject *k_obj = NULL, *sel_obj = NULL;
    const char *device = "cpu";
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOO|$iiiiOOs:DecLinear", kwlist, &qweight,
                                     &scales, &zeros, &rcodes, &rscales, &thresholds, &d_in,
                                     &d_out, &bits, &group_size, &k_obj, &sel_obj, &device))
        return -1;
    if (d_in == 0 && d_out == 0 && bits == 0 && group_size == 0) {
        PyErr_SetString(PyExc_TypeError, "DecLinear() requires keyword arguments in_features, "
                        "out_features, bits and group_size");
        return -1;
    }
    if (self->qweight || self->rcodes) { /* __init__ called twice: start clean */
        declinear_release(self);
    }
    dd_shape s = {d_in, d_out, bits, group_size};
    if (d_in <= 0 || d_out <= 0) {
        PyErr_Format(PyExc_ValueError, "in_features and out_features must be positive, got %d, %d",
                     d_in, d_out);
        return -1;
    }
    if (bits != 3 && bits != 4) {
        PyErr_Format(PyExc_ValueError, "bits must be 3 or 4, got %d", bits);
        return -1;
    }
    if (group_size != 64 && group_size != 128) {
        PyErr_Format(PyExc_ValueError, "group_size must be 64 or 128, got %d", group_size);
        return -1;
    }
    if (d_out % DD_OUT_ALIGN != 0) {
        PyErr_Format(PyExc_ValueError, "out_features must be a multiple of %d, got %d",
                     DD_OUT_ALIGN, d_out);
        return -1;
    }
    if (dd_shape_check(&s) != DD_OK) {
        PyErr_Format(PyExc_ValueError, "unsupported layer shape %d x %d", d_out, d_in);
        return -1;
    }
    int backend;
    if (strcmp(device, "cpu") == 0) backend = DD_BACKEND_CPU;
    else if (strcmp(device, "cuda") == 0) backend = DD_BACKEND_CUDA;
    else {
        PyErr_Format(PyExc_ValueError, "device must be 'cpu' or 'cuda', got '%s'", device);
        return -1;
    }
    if (backend == DD_BACKEND_CUDA) {
#ifndef DD_PY_CUDA
        PyErr_SetString(PyExc_RuntimeError,
                        "device='cuda': this build of decdec has no CUDA backend (rebuild with nvcc)");
        return -1;
#else
        if (dd_cuda_device_count() <= 0) {
            PyErr_SetString(PyExc_RuntimeError, "device='cuda': no usable CUDA device or driver");
            return -1;
        }
#endif
    }

    const npy_intp n_groups = dd_num_groups(&s);
    const npy_intp qdims[2] = {d_out, (npy_intp)dd_qweight_row_bytes(&s)};
    const npy_intp gdims[2] = {d_out, n_groups};
    const npy_intp rdims[2] = {d_in, d_out / 2};
    const npy_intp odims[1] = {d_out};
    const npy_intp idims[1] = {d_in};
    if (check_array(qweight, "qweight", NPY_UINT8, 2, qdims) ||
        check_array(scales, "scales", NPY_FLOAT16, 2, gdims) ||
        check_array(zeros, "zeros", NPY_FLOAT16, 2, gdims) ||
        check_array(rcodes, "residual_codes", NPY_UINT8, 2, rdims) ||
        check_array(rscales, "residual_scales", NPY_FLOAT16, 1, odims) ||
        check_array(thresholds, "thresholds", NPY_FLOAT32, 1, idims))
        return -1;

    const float *t = (const float *)PyArray_DATA((PyArrayObject *)thresholds);
    for (int i = 0; i < d_in; i++) {
        if (!isfinite(t[i]) || t[i] < 0.f) {
            char value[32];
            PyOS_snprintf(value, sizeof value, "%g", (double)t[i]);
            PyErr_Format(PyExc_ValueError, "thresholds must be finite and >= 0; entry %d is %s",
                         i, value);
            return -1;
        }
        if (i > 0 && t[i] > t[i - 1]) {
            PyErr_Format(PyExc_ValueError,
                         "thresholds must be non-increasing (an envelope of sorted |x|); entry %d "
                         "exceeds entry %d",
                         i, i - 1);
            return -1;
        }
    }
    const uint16_t *sc = (const uint16_t *)PyArray_DATA((PyArrayObject *)scales);
    const uint16_t *zp = (const uint16_t *)PyArray_DATA((PyArrayObject *)zeros);
    const uint16_t *rs = (const uint16_t *)PyArray_DATA((PyArrayObject *)rscales);
    for (npy_intp i = 0; i < d_out * n_groups; i++) {
        if ((sc[i] & 0x7c00u) == 0x7c00u || (zp[i] & 0x7c00u) == 0x7c00u) {
            PyErr_Format(PyExc_ValueError, "scales and zeros must be finite (entry %zd is not)",
                         (Py_ssize_t)i);
            return -1;
        }
    }
    for (npy_intp i = 0; i < d_out; i++) {
        if ((rs[i] & 0x7c00u) == 0x7c00u) {
            PyErr_Format(PyExc_ValueError, "residual_scales must be finite (entry %zd is not)",
                         (Py_ssize_t)i);
            return -1;
        }
    }

    int32_t k_chunk = 0;
    dd_selection selection = DD_SELECT_BUCKET;
    if (k_obj && parse_k_chunk(k_obj, &k_chunk)) return -1;
    if (sel_obj && parse_selection(sel_obj, &selection)) return -1;

    self->shape = s;
    self->backend = backend;
    self->k_chunk = k_chunk;
    self->n_tb = DD_DEFAULT_N_TB;
    self->selection = selection;
    if (!(self->qweight = copy_out(qweight)) || !(self->scales = copy_out(scales)) ||
        !(self->zeros = copy_out(zeros)) || !(self->thresholds = copy_out(thresholds)) ||
        !(self->rscales = copy_out(rscales)))
        goto fail;
    {
        size_t nbytes = (size_t)PyArray_NBYTES((PyArrayObject *)rcodes);
        void *p = NULL;
        int pinned = 0;
        /* pinned + mapped whenever a GPU is usable: the CPU path reads the same buffer */
        dd_status st = dd_host_alloc(nbytes, 1, &p, &pinned);
        if (st != DD_OK) {
            dd_py_raise(st, "allocating the residual buffer");
            goto fail;
        }
        memcpy(p, PyArray_DATA((PyArrayObject *)rcodes), nbytes);
        self->rcodes = (uint8_t *)p;
        self->rcodes_pinned = pinned;
    }
#ifdef DD_PY_CUDA
    if (backend == DD_BACKEND_CUDA && dd_py_declinear_cuda_init(self, NULL) < 0) goto fail;
#endif
    return 0;
fail:
    declinear_release(self);
    return -1;
}

/* ---- forward on the CPU ------------------------------------------------------------------ */

/* x as a C-contiguous float32 array (converting float16 or strided input); NULL + exception
 * when x is not a float16/float32 array of the right width. */
static PyArrayObject *input_as_float32(DecLinearObject *self, PyObject *x_obj, npy_intp *n_tok,
                                       int *x_typenum) {
    if (!PyArray_Check(x_obj)) {
        PyErr_Format(PyExc_TypeError, "x must be a numpy.ndarray of float16 or float32, got %s "
                     "(device arrays go to a DecLinear built with device='cuda')",
                     Py_TYPE(x_obj)->tp_name);
        return NULL;
    }
    PyArrayObject *x = (PyArrayObject *)x_obj;
    int tn = PyArray_TYPE(x);
    if (tn != NPY_FLOAT32 && tn != NPY_FLOAT16) {
        PyErr_Format(PyExc_TypeError, "x must have dtype float16 or float32, got %S",
                     (PyObject *)PyArray_DESCR(x));
        return NULL;
    }
    int nd = PyArray_NDIM(x);
    if (nd != 1 && nd != 2) {
        PyErr_Format(PyExc_ValueError, "x must be 1-D (in_features,) or 2-D (tokens, in_features), "
                     "got %d dimensions", nd);
        return NULL;
    }
    if (PyArray_DIM(x, nd - 1) != self->shape.d_in) {
        PyErr_Format(PyExc_ValueError, "x has %zd features in its last dimension, the layer "
                     "expects in_features=%d", (Py_ssize_t)PyArray_DIM(x, nd - 1), self->shape.d_in);
        return NULL;
    }
    *n_tok = nd == 1 ? 1 : PyArray_DIM(x, 0);
    if (*n_tok > INT32_MAX / 2) {
        PyErr_SetString(PyExc_ValueError, "x has too many tokens");
        return NULL;
    }
    *x_typenum = tn;
    return (PyArrayObject *)PyArray_FROMANY(x_obj, NPY_FLOAT32, 1, 2, NPY_ARRAY_CARRAY_RO);
}

static PyObject *declinear_forward(DecLinearObject *self, PyObject *args, PyObject *kwds) {
#ifdef DD_PY_CUDA
    if (self->backend == DD_BACKEND_CUDA) return dd_py_declinear_cuda_forward(self, args, kwds);
#endif
    static char *kwlist[] = {"x", "out", "accumulate", NULL};
    PyObject *x_obj, *out_obj = Py_None;
    int accumulate = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O$p:forward", kwlist, &x_obj, &out_obj,
                                     &accumulate))
        return NULL;
    npy_intp n_tok = 0;
    int x_type = 0;
    PyArrayObject *x32 = input_as_float32(self, x_obj, &n_tok, &x_type);
    if (!x32) return NULL;
    const int nd = PyArray_NDIM(x32);
    npy_intp odims[2] = {n_tok, self->shape.d_out};
    if (nd == 1) odims[0] = self->shape.d_out;

    PyArrayObject *out = NULL, *y32 = NULL;
    if (out_obj != Py_None) {
        if (!PyArray_Check(out_obj)) {
            PyErr_Format(PyExc_TypeError, "out must be a numpy.ndarray, got %s",
                         Py_TYPE(out_obj)->tp_name);
            goto fail;
        }
        out = (PyArrayObject *)out_obj;
        Py_INCREF(out);
        int ot = PyArray_TYPE(out);
        if (ot != NPY_FLOAT32 && ot != NPY_FLOAT16) {
            PyErr_Format(PyExc_TypeError, "out must have dtype float16 or float32, got %S",
                         (PyObject *)PyArray_DESCR(out));
            goto fail;
        }
        if (PyArray_NDIM(out) != nd || PyArray_DIM(out, 0) != odims[0] ||
            (nd == 2 && PyArray_DIM(out, 1) != odims[1])) {
            PyErr_SetString(PyExc_ValueError, "out must have shape x.shape[:-1] + (out_features,)");
            goto fail;
        }
        if (!PyArray_IS_C_CONTIGUOUS(out) || !PyArray_ISWRITEABLE(out)) {
            PyErr_SetString(PyExc_ValueError, "out must be C-contiguous and writeable");
            goto fail;
        }
        if (ot == NPY_FLOAT32 && !accumulate) {
            y32 = out;
            Py_INCREF(y32);
        }
    } else {
        out = (PyArrayObject *)PyArray_SimpleNew(nd, odims, x_type);
        if (!out) goto fail;
        if (x_type == NPY_FLOAT32) {
            y32 = out;
            Py_INCREF(y32);
        }
    }
    if (!y32) {
        y32 = (PyArrayObject *)PyArray_SimpleNew(nd, odims, NPY_FLOAT32);
        if (!y32) goto fail;
    }

    dd_status st;
    const dd_shape s = self->shape;
    const int32_t k = self->k_chunk;
    const dd_selection mode = self->selection;
    Py_BEGIN_ALLOW_THREADS
    st = dd_cpu_forward(&s, self->qweight, self->scales, self->zeros, self->rcodes, self->rscales,
                        self->thresholds, k, mode, (const float *)PyArray_DATA(x32),
                        (int32_t)n_tok, (float *)PyArray_DATA(y32));
    Py_END_ALLOW_THREADS
    if (st != DD_OK) {
        dd_py_raise(st, "DecLinear.forward (cpu)");
        goto fail;
    }
    if (y32 != out) {
        if (accumulate) {
            PyObject *sum = PyNumber_InPlaceAdd((PyObject *)out, (PyObject *)y32);
            if (!sum) goto fail;
            Py_DECREF(sum);
        } else if (PyArray_CopyInto(out, y32) < 0) {
            goto fail;
        }
    }
    Py_DECREF(x32);
    Py_DECREF(y32);
    return (PyObject *)out;
fail:
    Py_XDECREF(x32);
    Py_XDECREF(y32);
    Py_XDECREF(out);
    return NULL;
}

static PyObject *declinear_select(DecLinearObject *self, PyObject *x_obj) {
    npy_intp n_tok = 0;
    int x_type = 0;
    PyArrayObject *x32 = input_as_float32(self, x_obj, &n_tok, &x_type);
    if (!x32) return NULL;
    if (PyArray_NDIM(x32) != 1) {
        Py_DECREF(x32);
        PyErr_SetString(PyExc_ValueError, "select takes one token: x must be 1-D");
        return NULL;
    }
    npy_intp cap = dd_total_quota(self->shape.d_in, self->k_chunk);
    PyArrayObject *idx = (PyArrayObject *)PyArray_SimpleNew(1, &cap, NPY_INT32);
    if (!idx) {
        Py_DECREF(x32);
        return NULL;
    }
    int32_t n = 0;
    dd_status st;
    const int32_t k = self->k_chunk;
    const dd_selection mode = self->selection;
    Py_BEGIN_ALLOW_THREADS
    st = dd_cpu_select((const float *)PyArray_DATA(x32), self->shape.d_in, self->thresholds, k,
                       mode, (int32_t *)PyArray_DATA(idx), &n);
    Py_END_ALLOW_THREADS
    Py_DECREF(x32);
    if (st != DD_OK) {
        Py_DECREF(idx);
        return dd_py_raise(st, "DecLinear.select");
    }
    if (n == cap) return (PyObject *)idx;
    PyObject *head = PySequence_GetSlice((PyObject *)idx, 0, n);
    Py_DECREF(idx);
    if (!head) return NULL;
    PyObject *copy = PyArray_NewCopy((PyArrayObject *)head, NPY_CORDER);
    Py_DECREF(head);
    return copy;
}

/* ---- properties ---------------------------------------------------------------------------- */

static PyObject *get_in_features(DecLinearObject *self, void *c) { (void)c; return PyLong_FromLong(self->shape.d_in); }
static PyObject *get_out_features(DecLinearObject *self, void *c) { (void)c; return PyLong_FromLong(self->shape.d_out); }
static PyObject *get_bits(DecLinearObject *self, void *c) { (void)c; return PyLong_FromLong(self->shape.bits); }
static PyObject *get_group_size(DecLinearObject *self, void *c) { (void)c; return PyLong_FromLong(self->shape.group_size); }
static PyObject *get_k_chunk(DecLinearObject *self, void *c) { (void)c; return PyLong_FromLong(self->k_chunk); }
static PyObject *get_backend(DecLinearObject *self, void *c) {
    (void)c;
    return PyUnicode_FromString(self->backend == DD_BACKEND_CUDA ? "cuda" : "cpu");
}
static PyObject *get_selection(DecLinearObject *self, void *c) {
    (void)c;
    return PyUnicode_FromString(self->selection == DD_SELECT_EXACT ? "exact" : "bucket");
}
static PyObject *get_residual_pinned(DecLinearObject *self, void *c) { (void)c; return PyBool_FromLong(self->rcodes_pinned); }

static PyObject *get_residual_nbytes(DecLinearObject *self, void *c) {
    (void)c; /* codes in host memory + the per-output-channel scales */
    size_t n = (size_t)self->shape.d_in * dd_residual_row_bytes(&self->shape) + 2u * (size_t)self->shape.d_out;
    return PyLong_FromSize_t(n);
}
static PyObject *get_weight_nbytes(DecLinearObject *self, void *c) {
    (void)c; /* what lives in GPU memory for this layer: packed weight, scales, zeros, thresholds */
    const dd_shape *s = &self->shape;
    size_t n = (size_t)s->d_out * dd_qweight_row_bytes(s) + 4u * (size_t)s->d_out * dd_num_groups(s) +
               4u * (size_t)s->d_in + 2u * (size_t)s->d_out;
    return PyLong_FromSize_t(n);
}
static PyObject *get_fetch_nbytes(DecLinearObject *self, void *c) {
    (void)c; /* residual bytes fetched over PCIe per token at the current k_chunk */
    size_t k = (size_t)dd_total_quota(self->shape.d_in, self->k_chunk);
    return PyLong_FromSize_t(k * dd_residual_row_bytes(&self->shape));
}

static PyObject *get_thresholds(DecLinearObject *self, void *c) {
    (void)c;
    npy_intp n = self->shape.d_in;
    PyObject *a = PyArray_SimpleNew(1, &n, NPY_FLOAT32);
    if (a) memcpy(PyArray_DATA((PyArrayObject *)a), self->thresholds, sizeof(float) * (size_t)n);
    return a;
}

/* A read-only NumPy view of the residual buffer (pinned when a GPU is usable), kept alive by
 * this object: the buffer is never copied to hand it out. */
static PyObject *get_residual_codes(DecLinearObject *self, void *c) {
    (void)c;
    npy_intp dims[2] = {self->shape.d_in, self->shape.d_out / 2};
    PyObject *a = PyArray_New(&PyArray_Type, 2, dims, NPY_UINT8, NULL, self->rcodes, 0,
                              NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED, NULL);
    if (!a) return NULL;
    Py_INCREF(self);
    if (PyArray_SetBaseObject((PyArrayObject *)a, (PyObject *)self) < 0) {
        Py_DECREF(a);
        return NULL;
    }
    return a;
}

static int set_k_chunk(DecLinearObject *self, PyObject *value, void *c) {
    (void)c;
    if (reject_delete(value, "k_chunk")) return -1;
    return parse_k_chunk(value, &self->k_chunk);
}

static PyObject *get_n_tb(DecLinearObject *self, void *c) { (void)c; return PyLong_FromLong(self->n_tb); }

static int set_n_tb(DecLinearObject *self, PyObject *value, void *c) {
    (void)c;
    int32_t n;
    if (reject_delete(value, "n_tb") || parse_int_in(value, "n_tb", 1, DD_MAX_N_TB, &n)) return -1;
#ifdef DD_PY_CUDA
    if (self->backend == DD_BACKEND_CUDA && dd_py_declinear_cuda_set_n_tb(self, n) < 0) return -1;
#endif
    self->n_tb = n;
    return 0;
}

static int set_selection(DecLinearObject *self, PyObject *value, void *c) {
    (void)c;
    if (reject_delete(value, "selection")) return -1;
    return parse_selection(value, &self->selection);
}

static PyObject *declinear_repr(DecLinearObject *self) {
    return PyUnicode_FromFormat("DecLinear(in_features=%d, out_features=%d, bits=%d, group_size=%d, "
                                "k_chunk=%d, selection='%s', backend='%s')",
                                self->shape.d_in, self->shape.d_out, self->shape.bits,
                                self->shape.group_size, self->k_chunk,
                                self->selection == DD_SELECT_EXACT ? "exact" : "bucket",
                                self->backend == DD_BACKEND_CUDA ? "cuda" : "cpu");
}

static PyGetSetDef declinear_getset[] = {
    {"in_features", (getter)get_in_features, NULL, "input width d_in", NULL},
    {"out_features", (getter)get_out_features, NULL, "output width d_out", NULL},
    {"bits", (getter)get_bits, NULL, "bits of the base weight (3 or 4)", NULL},
    {"group_size", (getter)get_group_size, NULL, "quantization group size (64 or 128)", NULL},
    {"backend", (getter)get_backend, NULL, "'cpu' or 'cuda'", NULL},
    {"k_chunk", (getter)get_k_chunk, (setter)set_k_chunk,
     "channels compensated per 1024-wide chunk of x (0 turns compensation off)", NULL},
    {"n_tb", (getter)get_n_tb, (setter)set_n_tb,
     "thread blocks the GPU's DEC part may hold beside the base GEMV (default 16; the CPU ignores it)", NULL},
    {"selection", (getter)get_selection, (setter)set_selection, "'bucket' (approximate top-k) or 'exact'", NULL},
    {"residual_nbytes", (getter)get_residual_nbytes, NULL, "bytes of the residual cheatsheet (host memory)", NULL},
    {"residual_pinned", (getter)get_residual_pinned, NULL, "whether the residual lives in pinned, mapped memory", NULL},
    {"weight_nbytes", (getter)get_weight_nbytes, NULL, "bytes this layer keeps in GPU memory", NULL},
    {"fetch_nbytes", (getter)get_fetch_nbytes, NULL, "residual bytes fetched per token at the current k_chunk", NULL},
    {"thresholds", (getter)get_thresholds, NULL, "a copy of the calibrated thresholds", NULL},
    {"residual_codes", (getter)get_residual_codes, NULL, "read-only view of the residual buffer", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyMethodDef declinear_methods[] = {
    {"forward", (PyCFunction)(void (*)(void))declinear_forward, METH_VARARGS | METH_KEYWORDS,
     "forward(x, out=None, *, accumulate=False): y = W_hat x + R_hat[S]^T x[S], each row of a 2-D x "
     "compensated on its own.  Returns x's dtype (or writes into out)."},
    {"select", (PyCFunction)declinear_select, METH_O,
     "select(x): the input channels chosen for a 1-D x (int32, chunk by chunk, ascending)."},
    {NULL, NULL, 0, NULL}};

static PyObject *declinear_call(PyObject *self, PyObject *args, PyObject *kwds) {
    return declinear_forward((DecLinearObject *)self, args, kwds);
}

PyTypeObject DecLinear_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "decdec.DecLinear",
    .tp_basicsize = sizeof(DecLinearObject),
    .tp_dealloc = (destructor)declinear_dealloc,
    .tp_repr = (reprfunc)declinear_repr,
    .tp_call = declinear_call,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "DecLinear(qweight, scales, zeros, residual_codes, residual_scales, thresholds, *, "
              "in_features, out_features, bits, group_size, k_chunk=0, selection='bucket', "
              "device='cpu')\n\nA 3/4-bit linear layer with dynamic error compensation (DecDEC).",
    .tp_weaklistoffset = offsetof(DecLinearObject, weakreflist),
    .tp_methods = declinear_methods,
    .tp_getset = declinear_getset,
    .tp_init = (initproc)declinear_init,
    .tp_new = PyType_GenericNew,
};
