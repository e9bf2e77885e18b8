/* decdec._C: module init, exceptions, and the status -> exception mapping. */
#define DD_IMPORT_ARRAY_HERE
#include "dd_python.h"
#ifdef DD_PY_CUDA
#include "py_cuda_common.h"
#endif


PyObject *DecdecError = NULL;
PyObject *DecdecCudaError = NULL;

PyObject *dd_py_raise(dd_status status, const char *context) {
    PyObject *type;
    switch (status) {
    case DD_ERR_INVALID_ARGUMENT:
    case DD_ERR_NOT_FINITE:
        type = PyExc_ValueError;
        break;
    case DD_ERR_UNSUPPORTED:
        type = PyExc_NotImplementedError;
        break;
    case DD_ERR_OUT_OF_MEMORY:
        return PyErr_Format(PyExc_MemoryError, "%s: %s", context, dd_strerror(status));
    case DD_ERR_CUDA:
    case DD_ERR_CUDA_OUT_OF_MEMORY:
    case DD_ERR_NO_DEVICE:
        type = DecdecCudaError;
        break;
    default:
        type = DecdecError;
    }
    PyErr_Format(type, "%s: %s", context, dd_strerror(status));
    return NULL;
}

static PyObject *py_cuda_available(PyObject *m, PyObject *noargs) {
    (void)m; (void)noargs;
#ifdef DD_PY_CUDA
    return PyBool_FromLong(dd_cuda_device_count() > 0);
#else
    Py_RETURN_FALSE;
#endif
}

static PyObject *py_built_with_cuda(PyObject *m, PyObject *noargs) {
    (void)m; (void)noargs;
#ifdef DD_PY_CUDA
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

static PyObject *py_bucket_floors(PyObject *m, PyObject *args) {
    /* exposes dd_bucket_floors so tests can check the NumPy mirror bit for bit */
    (void)m;
    PyObject *t_obj;
    int k_total;
    if (!PyArg_ParseTuple(args, "Oi:bucket_floors", &t_obj, &k_total)) return NULL;
    PyArrayObject *t = (PyArrayObject *)PyArray_FROMANY(t_obj, NPY_FLOAT32, 1, 1, NPY_ARRAY_CARRAY_RO);
    if (!t) return NULL;
    if (k_total < 1 || k_total > PyArray_DIM(t, 0)) {
        Py_DECREF(t);
        return PyErr_Format(PyExc_ValueError, "k_total must be in [1, len(thresholds)], got %d", k_total);
    }
    npy_intp n = DD_NUM_BUCKETS;
    PyObject *f = PyArray_SimpleNew(1, &n, NPY_FLOAT32);
    if (f) dd_bucket_floors((const float *)PyArray_DATA(t), k_total, (float *)PyArray_DATA((PyArrayObject *)f));
    Py_DECREF(t);
    return f;
}

/* ---- the shared rules of decdec.h, exposed so decdec.formats / decdec.pipeline mirror them --- */

static PyObject *py_n_tb_max(PyObject *m, PyObject *arg) {
    (void)m;
    int32_t n_sm;
    if (dd_py_parse_int_in(arg, "n_sm", 1, 1 << 20, &n_sm) < 0) return NULL;
    return PyLong_FromLong(dd_n_tb_max(n_sm));
}

static PyObject *py_n_tb_default(PyObject *m, PyObject *arg) {
    (void)m;
    int32_t n_sm;
    if (dd_py_parse_int_in(arg, "n_sm", 1, 1 << 20, &n_sm) < 0) return NULL;
    return PyLong_FromLong(dd_n_tb_default(n_sm));
}

static PyObject *py_layer_nbytes(PyObject *m, PyObject *args, PyObject *kwds) {
    (void)m;
    static char *kwlist[] = {"in_features", "out_features", "bits", "group_size", "k_chunk", NULL};
    int d_in, d_out, bits, group_size;
    PyObject *k_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiiiO:layer_nbytes", kwlist, &d_in, &d_out, &bits,
                                     &group_size, &k_obj))
        return NULL;
    dd_shape s;
    int32_t k_chunk;
    if (dd_py_check_shape(d_in, d_out, bits, group_size, &s) < 0 ||
        dd_py_parse_int_in(k_obj, "k_chunk", 0, DD_CHUNK, &k_chunk) < 0)
        return NULL;
    return Py_BuildValue("{s:n,s:n,s:n}", "weight", (Py_ssize_t)dd_weight_nbytes(&s), "residual",
                         (Py_ssize_t)dd_residual_nbytes(&s), "fetch",
                         (Py_ssize_t)dd_fetch_nbytes(&s, k_chunk));
}

static PyObject *py_repack_fields3(PyObject *m, PyObject *args) {
    /* exposes dd_repack_fields3 (3-bit planar -> the FIELDS device layout) so tests can check the
     * NumPy mirror bit for bit and benchmarks can upload the layout */
    (void)m;
    PyObject *q_obj;
    int d_in;
    if (!PyArg_ParseTuple(args, "Oi:repack_fields3", &q_obj, &d_in)) return NULL;
    PyArrayObject *q = (PyArrayObject *)PyArray_FROMANY(q_obj, NPY_UINT8, 2, 2, NPY_ARRAY_CARRAY_RO);
    if (!q) return NULL;
    const npy_intp d_out = PyArray_DIM(q, 0);
    if (d_out > INT32_MAX) {
        Py_DECREF(q);
        return PyErr_Format(PyExc_ValueError, "repack_fields3: %zd rows is too many", (Py_ssize_t)d_out);
    }
    dd_shape s = {d_in, (int32_t)d_out, 3, 128};
    if (dd_shape_check(&s) != DD_OK) {
        Py_DECREF(q);
        return PyErr_Format(PyExc_ValueError, "repack_fields3: not a valid 3-bit layer of %zd rows x %d inputs",
                            (Py_ssize_t)d_out, d_in);
    }
    if ((size_t)PyArray_DIM(q, 1) != dd_qweight_row_bytes(&s)) {
        PyErr_Format(PyExc_ValueError, "repack_fields3: rows must be %zu bytes for %d inputs, got %zd",
                     dd_qweight_row_bytes(&s), d_in, (Py_ssize_t)PyArray_DIM(q, 1));
        Py_DECREF(q);
        return NULL;
    }
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(2, PyArray_DIMS(q), NPY_UINT8);
    if (!out) {
        Py_DECREF(q);
        return NULL;
    }
    dd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dd_repack_fields3(&s, (const uint8_t *)PyArray_DATA(q), (uint8_t *)PyArray_DATA(out));
    Py_END_ALLOW_THREADS
    Py_DECREF(q);
    if (st != DD_OK) {
        Py_DECREF(out);
        return dd_py_raise(st, "repack_fields3");
    }
    return (PyObject *)out;
}

static PyObject *py_cuda_sm_count(PyObject *m, PyObject *args, PyObject *kwds) {
    (void)m;
    static char *kwlist[] = {"device", NULL};
    int device = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|i:cuda_sm_count", kwlist, &device)) return NULL;
#ifdef DD_PY_CUDA
    if (dd_cuda_device_count() <= 0) {
        PyErr_SetString(DecdecCudaError, "cuda_sm_count: no usable CUDA device or driver");
        return NULL;
    }
    if (device < 0 || device >= dd_cuda_device_count())
        return PyErr_Format(PyExc_ValueError, "device must be in [0, %d), got %d", dd_cuda_device_count(),
                            device);
    int n_sm = 0;
    dd_status st = dd_cuda_device_sm_count(device, &n_sm);
    if (st != DD_OK) return dd_py_cuda_raise(st, "cuda_sm_count");
    return PyLong_FromLong(n_sm);
#else
    (void)device;
    PyErr_SetString(PyExc_RuntimeError, "cuda_sm_count: this build of decdec has no CUDA backend");
    return NULL;
#endif
}

static PyMethodDef module_methods[] = {
    {"cuda_available", py_cuda_available, METH_NOARGS, "Whether a usable CUDA GPU is present."},
    {"built_with_cuda", py_built_with_cuda, METH_NOARGS, "Whether this build has the CUDA backend."},
    {"bucket_floors", py_bucket_floors, METH_VARARGS, "bucket_floors(thresholds, k_total) -> float32[32]"},
    {"n_tb_max", py_n_tb_max, METH_O, "n_tb_max(n_sm): the largest n_tb a GPU of n_sm multiprocessors takes"},
    {"n_tb_default", py_n_tb_default, METH_O, "n_tb_default(n_sm): the default n_tb on a GPU of n_sm multiprocessors"},
    {"cuda_sm_count", (PyCFunction)(void (*)(void))py_cuda_sm_count, METH_VARARGS | METH_KEYWORDS,
     "cuda_sm_count(device=0): multiprocessors of a CUDA device"},
    {"repack_fields3", py_repack_fields3, METH_VARARGS,
     "repack_fields3(packed, in_features) -> uint8 array: 3-bit planar rows in the FIELDS device layout "
     "of decdec.h (the tensor-core base kernel's)"},
    {"layer_nbytes", (PyCFunction)(void (*)(void))py_layer_nbytes, METH_VARARGS | METH_KEYWORDS,
     "layer_nbytes(in_features, out_features, bits, group_size, k_chunk) -> {'weight', 'residual', "
     "'fetch'}: the byte rules of decdec.h (GPU-resident weights, residual codes, residual bytes "
     "fetched per token)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "decdec._C",
                                        "decdec C core: DecLinear and its CPU/CUDA kernels.", -1,
                                        module_methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__C(void) {
    import_array();
    PyObject *m = PyModule_Create(&module_def);
    if (!m) return NULL;
    DecdecError = PyErr_NewExceptionWithDoc("decdec.DecdecError", "Base class of decdec errors.",
                                            PyExc_RuntimeError, NULL);
    if (!DecdecError || PyModule_AddObjectRef(m, "DecdecError", DecdecError) < 0) goto fail;
    DecdecCudaError = PyErr_NewExceptionWithDoc("decdec.CudaError", "A CUDA runtime call failed.",
                                                DecdecError, NULL);
    if (!DecdecCudaError || PyModule_AddObjectRef(m, "CudaError", DecdecCudaError) < 0) goto fail;
    if (PyType_Ready(&DecLinear_Type) < 0) goto fail;
    if (PyModule_AddObjectRef(m, "DecLinear", (PyObject *)&DecLinear_Type) < 0) goto fail;
    if (PyType_Ready(&LayerWeights_Type) < 0) goto fail;
    if (PyModule_AddObjectRef(m, "_LayerWeights", (PyObject *)&LayerWeights_Type) < 0) goto fail;
#ifdef DD_PY_CUDA
    if (dd_py_cuda_types_init(m) < 0) goto fail;
    if (dd_py_engine_init(m) < 0) goto fail;
#endif
    if (PyModule_AddIntConstant(m, "FORMAT_VERSION", DD_FORMAT_VERSION) < 0 ||
        PyModule_AddIntConstant(m, "CHUNK", DD_CHUNK) < 0 ||
        PyModule_AddIntConstant(m, "NUM_BUCKETS", DD_NUM_BUCKETS) < 0 ||
        PyModule_AddIntConstant(m, "BLOCK", DD_BLOCK) < 0 ||
        PyModule_AddIntConstant(m, "OUT_ALIGN", DD_OUT_ALIGN) < 0 ||
        PyModule_AddIntConstant(m, "RESIDUAL_SCALE_CANDIDATES", DD_RESIDUAL_SCALE_CANDIDATES) < 0 ||
        PyModule_AddIntConstant(m, "RESIDUAL_MAX_CODE", DD_RESIDUAL_MAX_CODE) < 0 ||
        PyModule_AddIntConstant(m, "RESIDUAL_NIBBLE_BIAS", DD_RESIDUAL_NIBBLE_BIAS) < 0 ||
        PyModule_AddIntConstant(m, "N_TB_LIMIT", DD_N_TB_LIMIT) < 0 ||
        PyModule_AddIntConstant(m, "CPU_DEFAULT_N_TB", DD_PY_CPU_DEFAULT_N_TB) < 0)
        goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
