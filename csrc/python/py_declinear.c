/* decdec.DecLinear: one linear layer with a 3/4-bit base weight, its 4-bit residual cheatsheet
 * and its selection thresholds (DecLinear v2, docs/DECLINEAR_V2.md).
 *
 * The weights live in an immutable, reference-counted decdec._C._LayerWeights (built once by
 * __init__, shared by with_settings() copies and by every NumPy view handed out); a DecLinear
 * holds a reference to it plus its run settings.  This file holds construction, validation,
 * properties and the CPU forward; py_declinear_cuda.c adds the device path behind the same
 * object. */
#include "dd_python.h" /* Python.h first */

#include <math.h>
#include <string.h>

/* ---- argument validation: every message names the argument and what was expected ------- */

/* The C core reads arrays as native, aligned C types: a byte-swapped or misaligned array would be
 * read as garbage (or trap), so it is refused with the fix named. */
static int check_native(PyArrayObject *a, const char *name) {
    if (!PyArray_ISNOTSWAPPED(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be in native byte order, got dtype %S "
                     "(use a.astype(a.dtype.newbyteorder('=')))", name, (PyObject *)PyArray_DESCR(a));
        return -1;
    }
    if (!PyArray_ISALIGNED(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be aligned to its dtype (use numpy.ascontiguousarray "
                     "or a.copy())", name);
        return -1;
    }
    return 0;
}

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
    return check_native(a, name);
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

/* An int in [lo, hi]: TypeError for non-ints (bool included), ValueError out of range; `why` (may
 * be "") is appended to the range in the message, saying where the bound comes from. */
static int parse_int_range(PyObject *value, const char *name, long lo, long hi, const char *why,
                           int32_t *out) {
    if (!PyLong_Check(value) || PyBool_Check(value)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, got %s", name, Py_TYPE(value)->tp_name);
        return -1;
    }
    int overflow = 0;
    long v = PyLong_AsLongAndOverflow(value, &overflow);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (overflow || v < lo || v > hi) {
        PyErr_Format(PyExc_ValueError, "%s must be in [%ld, %ld]%s, got %S", name, lo, hi, why, value);
        return -1;
    }
    *out = (int32_t)v;
    return 0;
}

int dd_py_parse_int_in(PyObject *value, const char *name, long lo, long hi, int32_t *out) {
    return parse_int_range(value, name, lo, hi, "", out);
}

static int parse_k_chunk(PyObject *value, int32_t *out) {
    return dd_py_parse_int_in(value, "k_chunk", 0, DD_CHUNK, out);
}

/* n_tb within the backend's limits: CUDA 1..dd_n_tb_max(SMs), CPU 1..DD_N_TB_LIMIT. */
static int parse_n_tb(PyObject *value, int backend, int n_sm, int32_t *out) {
    if (backend != DD_BACKEND_CUDA) return dd_py_parse_int_in(value, "n_tb", 1, DD_N_TB_LIMIT, out);
    char why[96];
    PyOS_snprintf(why, sizeof why, " on this GPU (%d multiprocessors: n_tb_max(n_sm) = max(1, n_sm - 1))",
                  n_sm);
    return parse_int_range(value, "n_tb", 1, dd_n_tb_max(n_sm), why, out);
}

/* Settable attributes cannot be deleted: `del layer.k_chunk` raises instead of zeroing. */
static int reject_delete(PyObject *value, const char *name) {
    if (value) return 0;
    PyErr_Format(PyExc_AttributeError, "%s cannot be deleted", name);
    return -1;
}

int dd_py_check_shape(int d_in, int d_out, int bits, int group_size, dd_shape *out) {
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
        PyErr_Format(PyExc_ValueError, "unsupported layer shape %d x %d (in_features and "
                     "out_features at most 1048576)", d_out, d_in);
        return -1;
    }
    *out = s;
    return 0;
}

int dd_py_declinear_ready(DecLinearObject *self) {
    if (self->state == DD_PY_READY && self->weights) return 0;
    PyErr_SetString(PyExc_RuntimeError, self->state == DD_PY_INITIALISING
                                            ? "DecLinear is not initialised (another thread is "
                                              "initialising it)"
                                            : "DecLinear is not initialised");
    return -1;
}

/* ---- the immutable weights ------------------------------------------------------------ */

static void weights_dealloc(LayerWeightsObject *w) {
#ifdef DD_PY_CUDA
    if (w->cuda_layer) dd_py_weights_cuda_free(w); /* before the residual it reads */
#endif
    PyMem_RawFree(w->qweight);
    PyMem_RawFree(w->scales);
    PyMem_RawFree(w->zeros);
    PyMem_RawFree(w->thresholds);
    PyMem_RawFree(w->rscales);
    dd_host_free(w->rcodes, w->rcodes_pinned);
    Py_TYPE(w)->tp_free((PyObject *)w);
}

static PyObject *weights_repr(LayerWeightsObject *w) {
    return PyUnicode_FromFormat("<decdec._C._LayerWeights %d x %d, %d-bit, group %d, %s>",
                                w->shape.d_out, w->shape.d_in, w->shape.bits, w->shape.group_size,
                                w->backend == DD_BACKEND_CUDA ? "cuda" : "cpu");
}

PyTypeObject LayerWeights_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "decdec._C._LayerWeights",
    .tp_basicsize = sizeof(LayerWeightsObject),
    .tp_dealloc = (destructor)weights_dealloc,
    .tp_repr = (reprfunc)weights_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Internal: the immutable weights of one DecLinear (host copies, pinned residual, "
              "device copies).  Made only by DecLinear(); shared by with_settings() copies and kept "
              "alive by the NumPy views a DecLinear hands out.  Not constructible from Python.",
    /* tp_new NULL: `_LayerWeights()` raises TypeError */
};

/* Build the weights from validated arrays; NULL + exception on failure (nothing left behind).
 * May release the GIL (the CUDA upload); the caller holds references to the arrays. */
static LayerWeightsObject *weights_build(const dd_shape *s, int backend, PyObject *qweight,
                                         PyObject *scales, PyObject *zeros, PyObject *rcodes,
                                         PyObject *rscales, PyObject *thresholds) {
    LayerWeightsObject *w = (LayerWeightsObject *)PyType_GenericAlloc(&LayerWeights_Type, 0);
    if (!w) return NULL;
    w->shape = *s;
    w->backend = backend;
    w->device = -1;
    if (!(w->thresholds = copy_out(thresholds)) || !(w->rscales = copy_out(rscales))) goto fail;
    if (backend == DD_BACKEND_CPU &&
        (!(w->qweight = copy_out(qweight)) || !(w->scales = copy_out(scales)) ||
         !(w->zeros = copy_out(zeros))))
        goto fail;
    {
        size_t nbytes = (size_t)PyArray_NBYTES((PyArrayObject *)rcodes);
        void *p = NULL;
        int pinned = 0;
        /* pinned + mapped for a CUDA layer (the GPU reads it zero-copy); pageable for a CPU one */
        dd_status st = dd_host_alloc(nbytes, backend == DD_BACKEND_CUDA, &p, &pinned);
        if (st != DD_OK) {
            dd_py_raise(st, "allocating the residual buffer");
            goto fail;
        }
        memcpy(p, PyArray_DATA((PyArrayObject *)rcodes), nbytes);
        w->rcodes = (uint8_t *)p;
        w->rcodes_pinned = pinned;
    }
#ifdef DD_PY_CUDA
    if (backend == DD_BACKEND_CUDA) {
        if (!w->rcodes_pinned) {
            PyErr_SetString(PyExc_RuntimeError, "device='cuda': the residual buffer could not be "
                            "pinned and mapped, so the GPU cannot read it");
            goto fail;
        }
        if (dd_py_weights_cuda_create(w, (const uint8_t *)PyArray_DATA((PyArrayObject *)qweight),
                                      (const uint16_t *)PyArray_DATA((PyArrayObject *)scales),
                                      (const uint16_t *)PyArray_DATA((PyArrayObject *)zeros)) < 0)
            goto fail;
    }
#endif
    return w;
fail:
    Py_DECREF(w); /* weights_dealloc frees whatever was allocated */
    return NULL;
}

/* ---- DecLinear lifetime ----------------------------------------------------------------- */

static void declinear_dealloc(DecLinearObject *self) {
    if (self->weakreflist) PyObject_ClearWeakRefs((PyObject *)self);
#ifdef DD_PY_CUDA
    if (self->cuda) dd_py_declinear_cuda_free(self); /* workspaces, before the weights */
#endif
    Py_CLEAR(self->weights);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int declinear_init(DecLinearObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"qweight", "scales", "zeros", "residual_codes", "residual_scales",
                             "thresholds", "in_features", "out_features", "bits", "group_size",
                             "k_chunk", "selection", "device", "n_tb", NULL};
    PyObject *qweight, *scales, *zeros, *rcodes, *rscales, *thresholds;
    PyObject *d_in_obj = NULL, *d_out_obj = NULL, *bits_obj = NULL, *group_obj = NULL;
    PyObject *k_obj = NULL, *sel_obj = NULL, *n_tb_obj = Py_None;
    const char *device = "cpu";
    if (self->state != DD_PY_UNINIT) {
        PyErr_SetString(PyExc_RuntimeError,
                        self->state == DD_PY_READY
                            ? "DecLinear is immutable: __init__ was already called on this object; "
                              "build a new DecLinear (or use L.with_settings(...) for other settings)"
                            : "DecLinear is immutable: another thread is initialising this object");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOO|$OOOOOOsO:DecLinear", kwlist, &qweight,
                                     &scales, &zeros, &rcodes, &rscales, &thresholds, &d_in_obj,
                                     &d_out_obj, &bits_obj, &group_obj, &k_obj, &sel_obj, &device,
                                     &n_tb_obj))
        return -1;
    if (!d_in_obj || !d_out_obj || !bits_obj || !group_obj) {
        PyErr_SetString(PyExc_TypeError, "DecLinear() requires keyword arguments in_features, "
                        "out_features, bits and group_size");
        return -1;
    }
    /* each int keyword by name (a bare "cannot be interpreted as an integer" names nothing);
     * the shape rules themselves are dd_py_check_shape's */
    int32_t d_in = 0, d_out = 0, bits = 0, group_size = 0;
    if (dd_py_parse_int_in(d_in_obj, "in_features", INT32_MIN, INT32_MAX, &d_in) < 0 ||
        dd_py_parse_int_in(d_out_obj, "out_features", INT32_MIN, INT32_MAX, &d_out) < 0 ||
        dd_py_parse_int_in(bits_obj, "bits", INT32_MIN, INT32_MAX, &bits) < 0 ||
        dd_py_parse_int_in(group_obj, "group_size", INT32_MIN, INT32_MAX, &group_size) < 0)
        return -1;
    /* 1. validate everything; nothing is allocated before the last check */
    dd_shape s;
    if (dd_py_check_shape(d_in, d_out, bits, group_size, &s) < 0) return -1;
    int backend;
    if (strcmp(device, "cpu") == 0) backend = DD_BACKEND_CPU;
    else if (strcmp(device, "cuda") == 0) backend = DD_BACKEND_CUDA;
    else {
        PyErr_Format(PyExc_ValueError, "device must be 'cpu' or 'cuda', got '%s'", device);
        return -1;
    }
    int n_sm = 0;
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

    dd_py_settings settings;
    memset(&settings, 0, sizeof settings);
    settings.selection = DD_SELECT_BUCKET;
    if (k_obj && parse_k_chunk(k_obj, &settings.k_chunk)) return -1;
    if (sel_obj && parse_selection(sel_obj, &settings.selection)) return -1;
    if (backend == DD_BACKEND_CUDA && settings.selection != DD_SELECT_BUCKET) {
        PyErr_SetString(PyExc_NotImplementedError, "device='cuda' implements selection='bucket' only");
        return -1;
    }
#ifdef DD_PY_CUDA
    int sm_device = -1;
    if (backend == DD_BACKEND_CUDA && dd_py_cuda_current_device_sms(&sm_device, &n_sm) < 0) return -1;
#endif
    if (n_tb_obj != Py_None) {
        if (parse_n_tb(n_tb_obj, backend, n_sm, &settings.n_tb)) return -1;
    } else {
        settings.n_tb = backend == DD_BACKEND_CUDA ? dd_n_tb_default(n_sm) : DD_PY_CPU_DEFAULT_N_TB;
    }

    /* 2. build; a failure leaves the object uninitialised and nothing allocated */
    self->state = DD_PY_INITIALISING; /* the CUDA upload releases the GIL: no second __init__ */
    LayerWeightsObject *w = weights_build(&s, backend, qweight, scales, zeros, rcodes, rscales,
                                          thresholds);
    if (!w) {
        self->state = DD_PY_UNINIT;
        return -1;
    }
#ifdef DD_PY_CUDA
    if (backend == DD_BACKEND_CUDA && dd_py_cuda_settings_init(w, &settings) < 0) {
        Py_DECREF(w);
        self->state = DD_PY_UNINIT;
        return -1;
    }
#endif
    self->weights = w;
    self->settings = settings;
    self->state = DD_PY_READY;
    return 0;
}

/* ---- forward on the CPU ------------------------------------------------------------------ */

/* x as a C-contiguous float32 array (converting float16 or strided input); NULL + exception
 * when x is not a float16/float32 array of the right width. */
static PyArrayObject *input_as_float32(const dd_shape *s, PyObject *x_obj, npy_intp *n_tok,
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
    if (PyArray_DIM(x, nd - 1) != s->d_in) {
        PyErr_Format(PyExc_ValueError, "x has %zd features in its last dimension, the layer "
                     "expects in_features=%d", (Py_ssize_t)PyArray_DIM(x, nd - 1), s->d_in);
        return NULL;
    }
    *n_tok = nd == 1 ? 1 : PyArray_DIM(x, 0);
    const npy_intp widest = s->d_in > s->d_out ? s->d_in : s->d_out;
    if (*n_tok > INT32_MAX / widest) {
        PyErr_Format(PyExc_ValueError, "x has %zd tokens; at most %zd fit one call of this layer "
                     "(INT32_MAX / max(in_features, out_features))", (Py_ssize_t)*n_tok,
                     (Py_ssize_t)(INT32_MAX / widest));
        return NULL;
    }
    *x_typenum = tn;
    return (PyArrayObject *)PyArray_FROMANY(x_obj, NPY_FLOAT32, 1, 2, NPY_ARRAY_CARRAY_RO);
}

static PyObject *declinear_forward(DecLinearObject *self, PyObject *args, PyObject *kwds) {
    if (dd_py_declinear_ready(self) < 0) return NULL;
#ifdef DD_PY_CUDA
    if (self->weights->backend == DD_BACKEND_CUDA) return dd_py_declinear_cuda_forward(self, args, kwds);
#endif
    static char *kwlist[] = {"x", "out", "accumulate", NULL};
    PyObject *x_obj, *out_obj = Py_None;
    int accumulate = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O$p:forward", kwlist, &x_obj, &out_obj,
                                     &accumulate))
        return NULL;
    if (accumulate && out_obj == Py_None) {
        PyErr_SetString(PyExc_ValueError, "accumulate=True needs out= (the array to add into)");
        return NULL;
    }
    LayerWeightsObject *w = self->weights;
    npy_intp n_tok = 0;
    int x_type = 0;
    PyArrayObject *x32 = input_as_float32(&w->shape, x_obj, &n_tok, &x_type);
    if (!x32) return NULL;
    const int nd = PyArray_NDIM(x32);
    npy_intp odims[2] = {n_tok, w->shape.d_out};
    if (nd == 1) odims[0] = w->shape.d_out;

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
        if (check_native(out, "out") < 0) goto fail;
        /* out overlapping x (both contiguous: byte ranges are exact): the kernel would read
         * outputs as inputs, so compute into a temporary and copy, as NumPy's ufuncs do */
        const char *xb = (const char *)PyArray_DATA(x32), *ob = (const char *)PyArray_DATA(out);
        const int overlaps = xb < ob + PyArray_NBYTES(out) && ob < xb + PyArray_NBYTES(x32);
        if (ot == NPY_FLOAT32 && !accumulate && !overlaps) {
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
    /* this call's settings, whatever setters do next; w needs no reference of its own: the call
     * holds self, and self holds its weights for life (they are never replaced once ready) */
    const dd_py_settings set = self->settings;
    Py_BEGIN_ALLOW_THREADS
    st = dd_cpu_forward(&w->shape, w->qweight, w->scales, w->zeros, w->rcodes, w->rscales,
                        w->thresholds, set.k_chunk, set.selection, (const float *)PyArray_DATA(x32),
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

static PyObject *declinear_select(DecLinearObject *self, PyObject *args, PyObject *kwds) {
    if (dd_py_declinear_ready(self) < 0) return NULL;
#ifdef DD_PY_CUDA
    if (self->weights->backend == DD_BACKEND_CUDA) return dd_py_declinear_cuda_select(self, args, kwds);
#endif
    static char *kwlist[] = {"x", NULL};
    PyObject *x_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:select", kwlist, &x_obj)) return NULL;
    LayerWeightsObject *w = self->weights;
    npy_intp n_tok = 0;
    int x_type = 0;
    PyArrayObject *x32 = input_as_float32(&w->shape, x_obj, &n_tok, &x_type);
    if (!x32) return NULL;
    if (PyArray_NDIM(x32) != 1) {
        Py_DECREF(x32);
        PyErr_SetString(PyExc_ValueError, "select takes one token: x must be 1-D");
        return NULL;
    }
    const dd_py_settings set = self->settings;
    npy_intp cap = dd_total_quota(w->shape.d_in, set.k_chunk);
    PyArrayObject *idx = (PyArrayObject *)PyArray_SimpleNew(1, &cap, NPY_INT32);
    if (!idx) {
        Py_DECREF(x32);
        return NULL;
    }
    int32_t n = 0;
    dd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dd_cpu_select((const float *)PyArray_DATA(x32), w->shape.d_in, w->thresholds, set.k_chunk,
                       set.selection, (int32_t *)PyArray_DATA(idx), &n);
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

static PyObject *declinear_prepare(DecLinearObject *self, PyObject *args, PyObject *kwds) {
    if (dd_py_declinear_ready(self) < 0) return NULL;
#ifdef DD_PY_CUDA
    if (self->weights->backend == DD_BACKEND_CUDA) return dd_py_declinear_cuda_prepare(self, args, kwds);
#endif
    static char *kwlist[] = {"stream", NULL};
    PyObject *stream = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O:prepare", kwlist, &stream)) return NULL;
    if (stream != Py_None) {
        PyErr_SetString(PyExc_ValueError, "prepare(stream=...): a CPU DecLinear has no streams");
        return NULL;
    }
    Py_RETURN_NONE; /* a CPU layer needs no workspace */
}

/* Settings with some fields replaced (NULL = keep): validated as the setters do. */
static int settings_replace(DecLinearObject *self, PyObject *k_obj, PyObject *n_tb_obj,
                            PyObject *sel_obj, dd_py_settings *out) {
    LayerWeightsObject *w = self->weights;
    dd_py_settings s = self->settings;
    if (k_obj && parse_k_chunk(k_obj, &s.k_chunk)) return -1;
    if (n_tb_obj && parse_n_tb(n_tb_obj, w->backend, w->n_sm, &s.n_tb)) return -1;
    if (sel_obj) {
        if (parse_selection(sel_obj, &s.selection)) return -1;
        if (w->backend == DD_BACKEND_CUDA && s.selection != DD_SELECT_BUCKET) {
            PyErr_SetString(PyExc_NotImplementedError, "device='cuda' implements selection='bucket' only");
            return -1;
        }
    }
#ifdef DD_PY_CUDA
    if (w->backend == DD_BACKEND_CUDA && dd_py_cuda_settings_init(w, &s) < 0) return -1;
#endif
    *out = s;
    return 0;
}

static PyObject *declinear_with_settings(DecLinearObject *self, PyObject *args, PyObject *kwds) {
    if (dd_py_declinear_ready(self) < 0) return NULL;
    static char *kwlist[] = {"k_chunk", "n_tb", "selection", NULL};
    PyObject *k_obj = Py_None, *n_tb_obj = Py_None, *sel_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|$OOO:with_settings", kwlist, &k_obj, &n_tb_obj,
                                     &sel_obj))
        return NULL;
    dd_py_settings s;
    if (settings_replace(self, k_obj == Py_None ? NULL : k_obj, n_tb_obj == Py_None ? NULL : n_tb_obj,
                         sel_obj == Py_None ? NULL : sel_obj, &s) < 0)
        return NULL;
    DecLinearObject *copy = (DecLinearObject *)DecLinear_Type.tp_alloc(&DecLinear_Type, 0);
    if (!copy) return NULL;
    Py_INCREF(self->weights);
    copy->weights = self->weights;
    copy->settings = s;
    copy->cuda = NULL; /* its own workspaces, made on first use of a stream */
    copy->state = DD_PY_READY;
    return (PyObject *)copy;
}

/* ---- properties ---------------------------------------------------------------------------- */

#define READY_OR_NULL(self) do { if (dd_py_declinear_ready(self) < 0) return NULL; } while (0)
#define READY_OR_FAIL(self) do { if (dd_py_declinear_ready(self) < 0) return -1; } while (0)

static PyObject *get_in_features(DecLinearObject *self, void *c) { (void)c; READY_OR_NULL(self); return PyLong_FromLong(self->weights->shape.d_in); }
static PyObject *get_out_features(DecLinearObject *self, void *c) { (void)c; READY_OR_NULL(self); return PyLong_FromLong(self->weights->shape.d_out); }
static PyObject *get_bits(DecLinearObject *self, void *c) { (void)c; READY_OR_NULL(self); return PyLong_FromLong(self->weights->shape.bits); }
static PyObject *get_group_size(DecLinearObject *self, void *c) { (void)c; READY_OR_NULL(self); return PyLong_FromLong(self->weights->shape.group_size); }
static PyObject *get_k_chunk(DecLinearObject *self, void *c) { (void)c; READY_OR_NULL(self); return PyLong_FromLong(self->settings.k_chunk); }
static PyObject *get_n_tb(DecLinearObject *self, void *c) { (void)c; READY_OR_NULL(self); return PyLong_FromLong(self->settings.n_tb); }
static PyObject *get_backend(DecLinearObject *self, void *c) {
    (void)c;
    READY_OR_NULL(self);
    return PyUnicode_FromString(self->weights->backend == DD_BACKEND_CUDA ? "cuda" : "cpu");
}
static PyObject *get_selection(DecLinearObject *self, void *c) {
    (void)c;
    READY_OR_NULL(self);
    return PyUnicode_FromString(self->settings.selection == DD_SELECT_EXACT ? "exact" : "bucket");
}
static PyObject *get_residual_pinned(DecLinearObject *self, void *c) {
    (void)c;
    READY_OR_NULL(self);
    return PyBool_FromLong(self->weights->rcodes_pinned);
}
static PyObject *get_residual_nbytes(DecLinearObject *self, void *c) {
    (void)c;
    READY_OR_NULL(self);
    return PyLong_FromSize_t(dd_residual_nbytes(&self->weights->shape));
}
static PyObject *get_weight_nbytes(DecLinearObject *self, void *c) {
    (void)c;
    READY_OR_NULL(self);
    return PyLong_FromSize_t(dd_weight_nbytes(&self->weights->shape));
}
static PyObject *get_fetch_nbytes(DecLinearObject *self, void *c) {
    (void)c;
    READY_OR_NULL(self);
    return PyLong_FromSize_t(dd_fetch_nbytes(&self->weights->shape, self->settings.k_chunk));
}
static PyObject *get_weights(DecLinearObject *self, void *c) {
    (void)c;
    READY_OR_NULL(self);
    Py_INCREF(self->weights);
    return (PyObject *)self->weights;
}

static PyObject *copy_array(const void *src, npy_intp n, int typenum, size_t elsize) {
    PyObject *a = PyArray_SimpleNew(1, &n, typenum);
    if (a) memcpy(PyArray_DATA((PyArrayObject *)a), src, elsize * (size_t)n);
    return a;
}

static PyObject *get_thresholds(DecLinearObject *self, void *c) {
    (void)c;
    READY_OR_NULL(self);
    return copy_array(self->weights->thresholds, self->weights->shape.d_in, NPY_FLOAT32, 4);
}
static PyObject *get_residual_scales(DecLinearObject *self, void *c) {
    (void)c;
    READY_OR_NULL(self);
    return copy_array(self->weights->rscales, self->weights->shape.d_out, NPY_FLOAT16, 2);
}

/* A read-only NumPy view of the residual buffer (pinned on CUDA layers) whose base is the
 * immutable weights object: it never changes and never dangles, whatever happens to the
 * DecLinear it came from. */
static PyObject *get_residual_codes(DecLinearObject *self, void *c) {
    (void)c;
    READY_OR_NULL(self);
    LayerWeightsObject *w = self->weights;
    npy_intp dims[2] = {w->shape.d_in, w->shape.d_out / 2};
    PyObject *a = PyArray_New(&PyArray_Type, 2, dims, NPY_UINT8, NULL, w->rcodes, 0,
                              NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED, NULL);
    if (!a) return NULL;
    Py_INCREF(w);
    if (PyArray_SetBaseObject((PyArrayObject *)a, (PyObject *)w) < 0) { /* steals w even on failure */
        Py_DECREF(a);
        return NULL;
    }
    return a;
}

/* k_chunk, n_tb and selection: the getset closure names the attribute; the new settings are
 * validated (and on CUDA derived) as a whole before they replace the old ones. */
static int set_setting(DecLinearObject *self, PyObject *value, void *closure) {
    const char *name = (const char *)closure;
    READY_OR_FAIL(self);
    if (reject_delete(value, name)) return -1;
    const int is_k = strcmp(name, "k_chunk") == 0, is_n_tb = strcmp(name, "n_tb") == 0;
    dd_py_settings s;
    if (settings_replace(self, is_k ? value : NULL, is_n_tb ? value : NULL,
                         is_k || is_n_tb ? NULL : value, &s))
        return -1;
    self->settings = s;
    return 0;
}

static PyObject *declinear_repr(DecLinearObject *self) {
    if (self->state != DD_PY_READY) return PyUnicode_FromString("<DecLinear (not initialised)>");
    const LayerWeightsObject *w = self->weights;
    return PyUnicode_FromFormat("DecLinear(in_features=%d, out_features=%d, bits=%d, group_size=%d, "
                                "k_chunk=%d, n_tb=%d, selection='%s', backend='%s')",
                                w->shape.d_in, w->shape.d_out, w->shape.bits, w->shape.group_size,
                                self->settings.k_chunk, self->settings.n_tb,
                                self->settings.selection == DD_SELECT_EXACT ? "exact" : "bucket",
                                w->backend == DD_BACKEND_CUDA ? "cuda" : "cpu");
}

static PyGetSetDef declinear_getset[] = {
    {"in_features", (getter)get_in_features, NULL, "input width d_in", NULL},
    {"out_features", (getter)get_out_features, NULL, "output width d_out", NULL},
    {"bits", (getter)get_bits, NULL, "bits of the base weight (3 or 4)", NULL},
    {"group_size", (getter)get_group_size, NULL, "quantization group size (64 or 128)", NULL},
    {"backend", (getter)get_backend, NULL, "'cpu' or 'cuda'", NULL},
    {"k_chunk", (getter)get_k_chunk, (setter)set_setting,
     "channels compensated per 1024-wide chunk of x (0 turns compensation off)", (void *)"k_chunk"},
    {"n_tb", (getter)get_n_tb, (setter)set_setting,
     "thread blocks the GPU's DEC part may hold beside the base GEMV: CUDA layers 1..n_tb_max(SMs), "
     "default n_tb_default(SMs); CPU layers 1..N_TB_LIMIT, default 16 (the CPU ignores it)", (void *)"n_tb"},
    {"selection", (getter)get_selection, (setter)set_setting, "'bucket' (approximate top-k) or 'exact'", (void *)"selection"},
    {"residual_nbytes", (getter)get_residual_nbytes, NULL, "bytes of the residual cheatsheet's codes (host memory)", NULL},
    {"residual_pinned", (getter)get_residual_pinned, NULL, "whether the residual lives in pinned, mapped memory", NULL},
    {"weight_nbytes", (getter)get_weight_nbytes, NULL,
     "bytes this layer keeps in GPU memory (qweight, scales, zeros, residual scales, thresholds)", NULL},
    {"fetch_nbytes", (getter)get_fetch_nbytes, NULL, "residual bytes fetched per token at the current k_chunk", NULL},
    {"thresholds", (getter)get_thresholds, NULL, "a copy of the calibrated thresholds", NULL},
    {"residual_scales", (getter)get_residual_scales, NULL, "a copy of the residual scales (float16)", NULL},
    {"residual_codes", (getter)get_residual_codes, NULL,
     "read-only view of the residual buffer (based on the immutable weights)", NULL},
    {"_weights", (getter)get_weights, NULL, "internal: the shared, immutable _LayerWeights", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyMethodDef declinear_methods[] = {
    {"forward", (PyCFunction)(void (*)(void))declinear_forward, METH_VARARGS | METH_KEYWORDS,
     "forward(x, out=None, *, accumulate=False[, stream=None, n_tokens=None]): y = W_hat x + "
     "R_hat[S]^T x[S], each row of a 2-D x compensated on its own.  Returns x's dtype (or writes "
     "into out; accumulate=True adds into out and needs it).  CUDA layers take device float16 x/out "
     "(DeviceArray, __cuda_array_interface__, DLPack, int pointers with n_tokens=) and stream=."},
    {"select", (PyCFunction)(void (*)(void))declinear_select, METH_VARARGS | METH_KEYWORDS,
     "select(x[, stream=None]): the input channels chosen for one token (int32, chunk by chunk, "
     "ascending).  CPU layers take a NumPy x; CUDA layers a device float16 x and report what the "
     "GPU kernel selects."},
    {"prepare", (PyCFunction)(void (*)(void))declinear_prepare, METH_VARARGS | METH_KEYWORDS,
     "prepare(stream=None): make this layer's workspace for `stream` now (CUDA layers), so that a "
     "later call on it may be captured into a CUDA graph.  A no-op on CPU layers."},
    {"with_settings", (PyCFunction)(void (*)(void))declinear_with_settings, METH_VARARGS | METH_KEYWORDS,
     "with_settings(*, k_chunk=None, n_tb=None, selection=None): a new DecLinear sharing these "
     "weights (no copy, no upload) with other run settings."},
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
    .tp_doc =
        "DecLinear(qweight, scales, zeros, residual_codes, residual_scales, thresholds, *, "
        "in_features, out_features, bits, group_size, k_chunk=0, selection='bucket', device='cpu', "
        "n_tb=None)\n\n"
        "A 3/4-bit linear layer with dynamic error compensation (DecDEC).\n\n"
        "The weights are validated once and are immutable afterwards (a second __init__ raises "
        "RuntimeError; build a new DecLinear, or use with_settings() for other run settings: it "
        "shares the weights).  k_chunk, n_tb and selection are run settings, applied when set.\n\n"
        "Thread safety: any number of threads may call one DecLinear at once and get correct "
        "results; each call uses the settings it started with (a setter running beside a call "
        "never changes that call).  CUDA calls on different streams use different workspaces; "
        "calls on one stream are ordered by it.  A CUDA graph captured from a call keeps using that "
        "stream's workspace: do not replay it concurrently with eager calls on the same stream's "
        "workspace from another stream, and keep the DecLinear alive while the graph may replay.  "
        "Call L.prepare(stream) before capturing on a stream the layer has not run on yet.",
    .tp_weaklistoffset = offsetof(DecLinearObject, weakreflist),
    .tp_methods = declinear_methods,
    .tp_getset = declinear_getset,
    .tp_init = (initproc)declinear_init,
    .tp_new = PyType_GenericNew,
};
