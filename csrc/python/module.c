/* decdec._C: module init, exceptions, and the status -> exception mapping. */
#define DD_IMPORT_ARRAY_HERE
#include "dd_python.h"

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

static PyMethodDef module_methods[] = {
    {"cuda_available", py_cuda_available, METH_NOARGS, "Whether a usable CUDA GPU is present."},
    {"built_with_cuda", py_built_with_cuda, METH_NOARGS, "Whether this build has the CUDA backend."},
    {"bucket_floors", py_bucket_floors, METH_VARARGS, "bucket_floors(thresholds, k_total) -> float32[32]"},
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
#ifdef DD_PY_CUDA
    if (dd_py_cuda_types_init(m) < 0) goto fail;
#endif
    if (PyModule_AddIntConstant(m, "FORMAT_VERSION", DD_FORMAT_VERSION) < 0 ||
        PyModule_AddIntConstant(m, "CHUNK", DD_CHUNK) < 0 ||
        PyModule_AddIntConstant(m, "NUM_BUCKETS", DD_NUM_BUCKETS) < 0 ||
        PyModule_AddIntConstant(m, "BLOCK", DD_BLOCK) < 0 ||
        PyModule_AddIntConstant(m, "OUT_ALIGN", DD_OUT_ALIGN) < 0 ||
        PyModule_AddIntConstant(m, "RESIDUAL_SCALE_CANDIDATES", DD_RESIDUAL_SCALE_CANDIDATES) < 0)
        goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
