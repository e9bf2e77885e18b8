/* decdec.DeviceArray: a small owning GPU array (allocate, upload from NumPy, download to NumPy)
 * exporting __cuda_array_interface__ v3 and DLPack, so decdec runs on the GPU without torch;
 * plus the parser that turns any CAI / DLPack / DeviceArray / int pointer into a device view,
 * and the module-level benchmark hooks used by decdec.bench. */
#include "dd_python.h" /* Python.h first */

#include <string.h>

#include "py_cuda_common.h"

/* ---- minimal DLPack ABI (dlpack.h v0.8, unversioned capsule "dltensor") ------------------- */
typedef struct { int32_t device_type; int32_t device_id; } DLDevice;
typedef struct { uint8_t code; uint8_t bits; uint16_t lanes; } DLDataType;
typedef struct {
    void *data; DLDevice device; int32_t ndim; DLDataType dtype;
    int64_t *shape; int64_t *strides; uint64_t byte_offset;
} DLTensor;
typedef struct DLManagedTensor {
    DLTensor dl_tensor; void *manager_ctx; void (*deleter)(struct DLManagedTensor *self);
} DLManagedTensor;
enum { kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3 };
enum { kDLInt = 0, kDLUInt = 1, kDLFloat = 2 };

typedef struct {
    PyObject_HEAD
    void *ptr;
    size_t nbytes;
    int ndim;
    Py_ssize_t shape[2];
    int typenum; /* NPY_FLOAT16, NPY_FLOAT32, NPY_UINT8, NPY_INT32 */
    int device;
} DeviceArrayObject;

static PyTypeObject DeviceArray_Type;

static const char *typestr_of(int typenum) {
    switch (typenum) {
    case NPY_FLOAT16: return "<f2";
    case NPY_FLOAT32: return "<f4";
    case NPY_UINT8: return "|u1";
    case NPY_INT32: return "<i4";
    }
    return NULL;
}

static int typenum_of(const char *ts) {
    if (!strcmp(ts, "<f2")) return NPY_FLOAT16;
    if (!strcmp(ts, "<f4")) return NPY_FLOAT32;
    if (!strcmp(ts, "|u1")) return NPY_UINT8;
    if (!strcmp(ts, "<i4")) return NPY_INT32;
    return -1;
}

PyObject *dd_py_cuda_raise(dd_status st, const char *context) {
    if (st == DD_ERR_CUDA_OUT_OF_MEMORY)
        return PyErr_Format(PyExc_MemoryError, "%s: out of GPU memory (%s)", context, dd_cuda_last_error());
    if (st == DD_ERR_CUDA || st == DD_ERR_NO_DEVICE)
        return PyErr_Format(DecdecCudaError, "%s: %s (%s)", context, dd_strerror(st), dd_cuda_last_error());
    return dd_py_raise(st, context);
}

/* Bytes of an ndim-D array of typenum: -1 + ValueError on a negative dimension or overflow. */
static int array_nbytes(int ndim, const Py_ssize_t *shape, int typenum, size_t *nbytes, const char *name) {
    if (!name) name = "DeviceArray";
    PyArray_Descr *descr = PyArray_DescrFromType(typenum);
    if (!descr) return -1;
    size_t n = (size_t)PyDataType_ELSIZE(descr);
    Py_DECREF(descr);
    for (int d = 0; d < ndim; d++) {
        if (shape[d] < 0) {
            PyErr_Format(PyExc_ValueError, "%s: negative dimension %zd", name, shape[d]);
            return -1;
        }
        if (shape[d] != 0 && n > (size_t)PY_SSIZE_T_MAX / (size_t)shape[d]) {
            PyErr_Format(PyExc_ValueError, "%s: array size overflows (shape too large)", name);
            return -1;
        }
        n *= (size_t)shape[d];
    }
    *nbytes = n;
    return 0;
}

static DeviceArrayObject *device_array_new(int ndim, const Py_ssize_t *shape, int typenum) {
    size_t nbytes = 0;
    if (ndim < 1 || ndim > 2) {
        PyErr_Format(PyExc_ValueError, "DeviceArray is 1-D or 2-D, got %d dimensions", ndim);
        return NULL;
    }
    if (array_nbytes(ndim, shape, typenum, &nbytes, NULL) < 0) return NULL;
    DeviceArrayObject *a = PyObject_New(DeviceArrayObject, &DeviceArray_Type);
    if (!a) return NULL;
    a->ptr = NULL;
    a->nbytes = nbytes;
    a->ndim = ndim;
    a->shape[0] = ndim > 0 ? shape[0] : 1;
    a->shape[1] = ndim > 1 ? shape[1] : 1;
    a->typenum = typenum;
    a->device = 0;
    dd_status st = dd_cuda_get_device(&a->device);
    void *p = NULL;
    if (st == DD_OK && nbytes > 0) st = dd_cuda_malloc(&p, nbytes);
    if (st != DD_OK) {
        Py_DECREF(a);
        dd_py_cuda_raise(st, "allocating a DeviceArray");
        return NULL;
    }
    a->ptr = p;
    return a;
}

PyObject *dd_py_device_array_empty(int ndim, const Py_ssize_t *shape, int typenum) {
    return (PyObject *)device_array_new(ndim, shape, typenum);
}

static void device_array_dealloc(DeviceArrayObject *a) {
    if (a->ptr) {
        int prev = -1;
        if (dd_cuda_get_device(&prev) == DD_OK && prev != a->device) dd_cuda_set_device(a->device);
        dd_cuda_free(a->ptr);
        if (prev >= 0 && prev != a->device) dd_cuda_set_device(prev);
    }
    PyObject_Free(a);
}

/* DeviceArray(numpy_array) uploads; DeviceArray.empty(shape, dtype) allocates. */
static PyObject *device_array_from_numpy(PyObject *obj) {
    PyArrayObject *arr = (PyArrayObject *)PyArray_FROMANY(obj, NPY_NOTYPE, 0, 0, NPY_ARRAY_CARRAY_RO);
    if (!arr) return NULL;
    if (PyArray_NDIM(arr) < 1 || PyArray_NDIM(arr) > 2 || !typestr_of(PyArray_TYPE(arr))) {
        PyErr_Format(PyExc_TypeError, "DeviceArray holds 1-D or 2-D float16/float32/uint8/int32 data, got "
                     "%d-D %S", PyArray_NDIM(arr), (PyObject *)PyArray_DESCR(arr));
        Py_DECREF(arr);
        return NULL;
    }
    Py_ssize_t shape[2] = {PyArray_DIM(arr, 0), PyArray_NDIM(arr) > 1 ? PyArray_DIM(arr, 1) : 1};
    DeviceArrayObject *a = device_array_new(PyArray_NDIM(arr), shape, PyArray_TYPE(arr));
    if (a) {
        dd_status st;
        Py_BEGIN_ALLOW_THREADS
        st = a->nbytes ? dd_cuda_memcpy(a->ptr, PyArray_DATA(arr), a->nbytes, 0, NULL, 1) : DD_OK;
        Py_END_ALLOW_THREADS
        if (st != DD_OK) {
            Py_CLEAR(a);
            dd_py_cuda_raise(st, "uploading to a DeviceArray");
        }
    }
    Py_DECREF(arr);
    return (PyObject *)a;
}

static PyObject *device_array_tp_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    (void)type;
    static char *kwlist[] = {"array", NULL};
    PyObject *obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:DeviceArray", kwlist, &obj)) return NULL;
    if (dd_cuda_device_count() <= 0) {
        PyErr_SetString(PyExc_RuntimeError, "DeviceArray: no usable CUDA device or driver");
        return NULL;
    }
    return device_array_from_numpy(obj);
}

static PyObject *device_array_empty(PyObject *cls, PyObject *args) {
    (void)cls;
    PyObject *shape_obj, *dtype_obj = NULL;
    if (!PyArg_ParseTuple(args, "O|O:empty", &shape_obj, &dtype_obj)) return NULL;
    PyArray_Descr *descr = NULL;
    if (!PyArray_DescrConverter2(dtype_obj ? dtype_obj : Py_None, &descr)) return NULL;
    int typenum = descr ? descr->type_num : NPY_FLOAT16;
    Py_XDECREF(descr);
    if (!typestr_of(typenum)) {
        PyErr_SetString(PyExc_TypeError, "DeviceArray.empty: dtype must be float16, float32, uint8 or int32");
        return NULL;
    }
    Py_ssize_t shape[2] = {1, 1};
    int ndim = 1;
    if (PyLong_Check(shape_obj)) {
        shape[0] = PyLong_AsSsize_t(shape_obj);
    } else if (PyTuple_Check(shape_obj) && PyTuple_GET_SIZE(shape_obj) >= 1 && PyTuple_GET_SIZE(shape_obj) <= 2) {
        ndim = (int)PyTuple_GET_SIZE(shape_obj);
        for (int d = 0; d < ndim; d++) {
            PyObject *item = PyTuple_GET_ITEM(shape_obj, d);
            if (!PyLong_Check(item) || PyBool_Check(item)) {
                PyErr_Format(PyExc_TypeError, "DeviceArray.empty: shape entries must be ints, got %s",
                             Py_TYPE(item)->tp_name);
                return NULL;
            }
            shape[d] = PyLong_AsSsize_t(item);
            if (PyErr_Occurred()) return NULL;
        }
    } else {
        PyErr_SetString(PyExc_TypeError, "DeviceArray.empty: shape must be an int or a tuple of 1 or 2 ints");
        return NULL;
    }
    if (PyErr_Occurred()) return NULL;
    if (shape[0] < 0 || shape[1] < 0) {
        PyErr_SetString(PyExc_ValueError, "DeviceArray.empty: negative dimension");
        return NULL;
    }
    return (PyObject *)device_array_new(ndim, shape, typenum);
}

static PyObject *device_array_numpy(DeviceArrayObject *a, PyObject *noargs) {
    (void)noargs;
    npy_intp dims[2] = {a->shape[0], a->shape[1]};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(a->ndim, dims, a->typenum);
    if (!out) return NULL;
    dd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = a->nbytes ? dd_cuda_memcpy(PyArray_DATA(out), a->ptr, a->nbytes, 1, NULL, 1) : DD_OK;
    Py_END_ALLOW_THREADS
    if (st != DD_OK) {
        Py_DECREF(out);
        return dd_py_cuda_raise(st, "downloading a DeviceArray");
    }
    return (PyObject *)out;
}

static PyObject *shape_tuple(const DeviceArrayObject *a) {
    return a->ndim == 1 ? Py_BuildValue("(n)", a->shape[0]) : Py_BuildValue("(nn)", a->shape[0], a->shape[1]);
}

static PyObject *device_array_cai(DeviceArrayObject *a, void *c) {
    (void)c;
    /* stream None: the data is ready once the producing call returned (uploads synchronise;
     * DecLinear.forward results are ordered on the stream the caller gave) */
    PyObject *shape = shape_tuple(a);
    if (!shape) return NULL;
    PyObject *d = Py_BuildValue("{s:N,s:s,s:(K,O),s:O,s:i,s:O}", "shape", shape, "typestr",
                                typestr_of(a->typenum), "data", (unsigned long long)(uintptr_t)a->ptr,
                                Py_False, "strides", Py_None, "version", 3, "stream", Py_None);
    return d;
}

static PyObject *get_shape(DeviceArrayObject *a, void *c) { (void)c; return shape_tuple(a); }
static PyObject *get_dtype(DeviceArrayObject *a, void *c) {
    (void)c;
    return (PyObject *)PyArray_DescrFromType(a->typenum);
}
static PyObject *get_ptr(DeviceArrayObject *a, void *c) { (void)c; return PyLong_FromVoidPtr(a->ptr); }
static PyObject *get_nbytes(DeviceArrayObject *a, void *c) { (void)c; return PyLong_FromSize_t(a->nbytes); }
static PyObject *get_device(DeviceArrayObject *a, void *c) { (void)c; return PyLong_FromLong(a->device); }

/* DLPack export: the capsule keeps the DeviceArray alive until the consumer's deleter runs. */
typedef struct { DLManagedTensor m; int64_t shape[2]; PyObject *owner; } dd_dl_holder;

static void dl_deleter(DLManagedTensor *m) {
    dd_dl_holder *h = (dd_dl_holder *)m->manager_ctx;
    if (!h) return;
    if (Py_IsInitialized()) { /* during interpreter shutdown do nothing */
        PyGILState_STATE g = PyGILState_Ensure();
        Py_XDECREF(h->owner);
        PyMem_RawFree(h);
        PyGILState_Release(g);
    }
}

static void capsule_destructor(PyObject *cap) {
    if (PyCapsule_IsValid(cap, "used_dltensor")) return; /* consumed: the consumer owns it */
    DLManagedTensor *m = (DLManagedTensor *)PyCapsule_GetPointer(cap, "dltensor");
    if (m && m->deleter) m->deleter(m);
    else PyErr_Clear();
}

static PyObject *device_array_dlpack(DeviceArrayObject *a, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"stream", "max_version", "dl_device", "copy", NULL};
    PyObject *stream = Py_None, *max_version = Py_None, *dl_device = Py_None, *copy = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|$OOOO:__dlpack__", kwlist, &stream, &max_version,
                                     &dl_device, &copy))
        return NULL;
    if (copy == Py_True) {
        PyErr_SetString(PyExc_BufferError, "DeviceArray.__dlpack__: copy=True is not supported");
        return NULL;
    }
    dd_dl_holder *h = (dd_dl_holder *)PyMem_RawCalloc(1, sizeof *h);
    if (!h) return PyErr_NoMemory();
    h->shape[0] = a->shape[0];
    h->shape[1] = a->shape[1];
    h->owner = (PyObject *)a;
    Py_INCREF(a);
    DLTensor *t = &h->m.dl_tensor;
    t->data = a->ptr;
    t->device.device_type = kDLCUDA;
    t->device.device_id = a->device;
    t->ndim = a->ndim;
    t->shape = h->shape;
    t->strides = NULL;
    t->byte_offset = 0;
    switch (a->typenum) {
    case NPY_FLOAT16: t->dtype = (DLDataType){kDLFloat, 16, 1}; break;
    case NPY_FLOAT32: t->dtype = (DLDataType){kDLFloat, 32, 1}; break;
    case NPY_UINT8: t->dtype = (DLDataType){kDLUInt, 8, 1}; break;
    default: t->dtype = (DLDataType){kDLInt, 32, 1}; break;
    }
    h->m.manager_ctx = h;
    h->m.deleter = dl_deleter;
    PyObject *cap = PyCapsule_New(&h->m, "dltensor", capsule_destructor);
    if (!cap) {
        Py_DECREF(a);
        PyMem_RawFree(h);
    }
    return cap;
}

static PyObject *device_array_dlpack_device(DeviceArrayObject *a, PyObject *noargs) {
    (void)noargs;
    return Py_BuildValue("(ii)", kDLCUDA, a->device);
}

static PyObject *device_array_repr(DeviceArrayObject *a) {
    PyObject *shape = shape_tuple(a);
    if (!shape) return NULL;
    PyObject *r = PyUnicode_FromFormat("DeviceArray(shape=%S, dtype=%s, device=cuda:%d)", shape,
                                       typestr_of(a->typenum), a->device);
    Py_DECREF(shape);
    return r;
}

static PyMethodDef device_array_methods[] = {
    {"numpy", (PyCFunction)device_array_numpy, METH_NOARGS, "Download to a new NumPy array."},
    {"empty", (PyCFunction)device_array_empty, METH_VARARGS | METH_CLASS,
     "DeviceArray.empty(shape, dtype=float16): uninitialised device memory."},
    {"__dlpack__", (PyCFunction)(void (*)(void))device_array_dlpack, METH_VARARGS | METH_KEYWORDS,
     "DLPack export (kDLCUDA)."},
    {"__dlpack_device__", (PyCFunction)device_array_dlpack_device, METH_NOARGS, "(kDLCUDA, device id)"},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef device_array_getset[] = {
    {"__cuda_array_interface__", (getter)device_array_cai, NULL, "CUDA array interface v3", NULL},
    {"shape", (getter)get_shape, NULL, "shape", NULL},
    {"dtype", (getter)get_dtype, NULL, "NumPy dtype", NULL},
    {"ptr", (getter)get_ptr, NULL, "device pointer (int)", NULL},
    {"nbytes", (getter)get_nbytes, NULL, "bytes", NULL},
    {"device", (getter)get_device, NULL, "CUDA device ordinal", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyTypeObject DeviceArray_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "decdec.DeviceArray",
    .tp_basicsize = sizeof(DeviceArrayObject),
    .tp_dealloc = (destructor)device_array_dealloc,
    .tp_repr = (reprfunc)device_array_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "DeviceArray(numpy_array): a GPU copy of a 1-D/2-D float16, float32, uint8 or int32 "
              "array; .numpy() downloads; exports __cuda_array_interface__ and DLPack.",
    .tp_methods = device_array_methods,
    .tp_getset = device_array_getset,
    .tp_new = device_array_tp_new,
};

/* ---- importing device views ------------------------------------------------------------ */

/* An imported DLPack tensor, consumed: the capsule was renamed "used_dltensor" (so the producer's
 * capsule destructor leaves it alone) and this holder capsule calls the managed tensor's deleter
 * exactly once, when the view that keeps it is released. */
static void dl_import_destructor(PyObject *cap) {
    DLManagedTensor *m = (DLManagedTensor *)PyCapsule_GetPointer(cap, "decdec.dlpack_import");
    if (!m) { PyErr_Clear(); return; }
    if (m->deleter) m->deleter(m);
}

/* A DLPack producer (JAX, CuPy, torch, another DeviceArray...): take its capsule, consume it, read
 * the tensor; the view keeps the managed tensor alive (v->keep) until dd_py_device_view_release,
 * which runs its deleter.  The capsule is asked for on the legacy default stream (1), where
 * decdec launches unless stream= says otherwise. */
/* A producer's own hook (__cuda_array_interface__, __dlpack__, __dlpack_device__) raised: report it
 * as a TypeError naming the argument and the hook, the producer's exception chained as the cause.
 * BaseExceptions that are not Exceptions (KeyboardInterrupt, SystemExit) pass through. */
static int producer_failed(const char *name, const char *hook) {
    if (!PyErr_ExceptionMatches(PyExc_Exception)) return -1;
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    if (tb && v) PyException_SetTraceback(v, tb);
    PyErr_Format(PyExc_TypeError, "%s: its %s raised %s", name, hook,
                 t ? ((PyTypeObject *)t)->tp_name : "an exception");
    PyObject *t2, *v2, *tb2;
    PyErr_Fetch(&t2, &v2, &tb2);
    PyErr_NormalizeException(&t2, &v2, &tb2);
    if (v2 && v) PyException_SetCause(v2, v); /* steals v */
    else Py_XDECREF(v);
    Py_XDECREF(t);
    Py_XDECREF(tb);
    PyErr_Restore(t2, v2, tb2);
    return -1;
}

static int dlpack_view(PyObject *obj, const char *name, dd_device_view *v) {
    PyObject *dev = PyObject_CallMethod(obj, "__dlpack_device__", NULL);
    if (!dev) return producer_failed(name, "__dlpack_device__");
    int dev_type = -1, dev_id = -1;
    if (!PyTuple_Check(dev) || !PyArg_ParseTuple(dev, "ii", &dev_type, &dev_id)) {
        Py_DECREF(dev);
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: __dlpack_device__ must return (device_type, device_id)", name);
        return -1;
    }
    Py_DECREF(dev);
    if (dev_type != kDLCUDA) {
        PyErr_Format(PyExc_ValueError, "%s is a DLPack tensor on device type %d, not CUDA (2): the CUDA "
                     "DecLinear needs device memory", name, dev_type);
        return -1;
    }
    v->device = dev_id; /* what the producer claims; dd_py_device_view checks it against the memory */
    PyObject *kw = Py_BuildValue("{s:i}", "stream", 1);
    PyObject *meth = kw ? PyObject_GetAttrString(obj, "__dlpack__") : NULL;
    PyObject *empty = meth ? PyTuple_New(0) : NULL;
    PyObject *cap = empty ? PyObject_Call(meth, empty, kw) : NULL;
    Py_XDECREF(empty);
    Py_XDECREF(meth);
    Py_XDECREF(kw);
    if (!cap) return producer_failed(name, "__dlpack__");
    if (!PyCapsule_CheckExact(cap) || !PyCapsule_IsValid(cap, "dltensor")) {
        Py_DECREF(cap);
        PyErr_Format(PyExc_TypeError, "%s: __dlpack__ did not return an unconsumed 'dltensor' capsule", name);
        return -1;
    }
    DLManagedTensor *m = (DLManagedTensor *)PyCapsule_GetPointer(cap, "dltensor");
    if (!m) { Py_DECREF(cap); return -1; }
    /* consume it: from here on the deleter is ours to call (once) */
    if (PyCapsule_SetName(cap, "used_dltensor") < 0) { Py_DECREF(cap); return -1; }
    Py_DECREF(cap);
    PyObject *holder = PyCapsule_New(m, "decdec.dlpack_import", dl_import_destructor);
    if (!holder) {
        if (m->deleter) m->deleter(m);
        return -1;
    }
    v->keep = holder; /* released (and the deleter run) by dd_py_device_view_release */
    const DLTensor *t = &m->dl_tensor;
    if (t->device.device_type != kDLCUDA) {
        PyErr_Format(PyExc_ValueError, "%s: the DLPack tensor is on device type %d, not CUDA (2)", name,
                     (int)t->device.device_type);
        return -1;
    }
    if (t->device.device_id != v->device) {
        PyErr_Format(PyExc_ValueError, "%s: the DLPack tensor says cuda:%d, its __dlpack_device__ cuda:%d",
                     name, (int)t->device.device_id, v->device);
        return -1;
    }
    if (t->ndim < 1 || t->ndim > 2 || !t->shape) {
        PyErr_Format(PyExc_ValueError, "%s must be 1-D or 2-D, got %d dimensions", name, (int)t->ndim);
        return -1;
    }
    if (t->dtype.lanes != 1) {
        PyErr_Format(PyExc_TypeError, "%s: vector DLPack dtypes are not supported", name);
        return -1;
    }
    if (t->dtype.code == kDLFloat && t->dtype.bits == 16) v->typenum = NPY_FLOAT16;
    else if (t->dtype.code == kDLFloat && t->dtype.bits == 32) v->typenum = NPY_FLOAT32;
    else if (t->dtype.code == kDLUInt && t->dtype.bits == 8) v->typenum = NPY_UINT8;
    else if (t->dtype.code == kDLInt && t->dtype.bits == 32) v->typenum = NPY_INT32;
    else {
        PyErr_Format(PyExc_TypeError, "%s: unsupported DLPack dtype (code %d, %d bits)", name,
                     (int)t->dtype.code, (int)t->dtype.bits);
        return -1;
    }
    v->ndim = (int)t->ndim;
    for (int d = 0; d < v->ndim; d++) {
        if (t->shape[d] < 0 || t->shape[d] > PY_SSIZE_T_MAX) {
            PyErr_Format(PyExc_ValueError, "%s: DLPack dimension %d is %lld", name, d, (long long)t->shape[d]);
            return -1;
        }
        v->shape[d] = (Py_ssize_t)t->shape[d];
    }
    size_t nbytes;
    if (array_nbytes(v->ndim, v->shape, v->typenum, &nbytes, name) < 0) return -1;
    if (t->strides) { /* strides are in elements; only C-contiguous layouts are accepted */
        int64_t want = 1;
        for (int d = v->ndim - 1; d >= 0; d--) {
            if (t->shape[d] > 1 && t->strides[d] != want) {
                PyErr_Format(PyExc_ValueError, "%s must be C-contiguous", name);
                return -1;
            }
            want *= t->shape[d];
        }
    }
    if (t->byte_offset > (uint64_t)UINTPTR_MAX - (uintptr_t)t->data) {
        PyErr_Format(PyExc_ValueError, "%s: DLPack byte_offset overflows the pointer", name);
        return -1;
    }
    v->ptr = (char *)t->data + t->byte_offset;
    return 0;
}

/* 1 when obj (an int) is negative, else 0. */
static int int_is_negative(PyObject *obj) {
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (v == -1 && PyErr_Occurred()) { PyErr_Clear(); return 0; }
    return overflow < 0 || (overflow == 0 && v < 0);
}

/* An integer-like item of a CAI tuple (int or __index__, not bool): 0 / -1 + exception. */
static int cai_int(PyObject *item, const char *name, const char *what, long long *out) {
    if (PyBool_Check(item) || !PyIndex_Check(item)) {
        PyErr_Format(PyExc_TypeError, "%s: malformed __cuda_array_interface__: %s must be ints, got %s",
                     name, what, Py_TYPE(item)->tp_name);
        return -1;
    }
    PyObject *i = PyNumber_Index(item);
    if (!i) return -1;
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(i, &overflow);
    Py_DECREF(i);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (overflow) {
        PyErr_Format(PyExc_ValueError, "%s: malformed __cuda_array_interface__: %s out of range", name, what);
        return -1;
    }
    *out = v;
    return 0;
}

/* __cuda_array_interface__ (v2/v3) of obj into v; every item's type and size checked. */
static int cai_view(PyObject *obj, PyObject *cai, const char *name, dd_device_view *v) {
    if (!PyDict_Check(cai)) {
        PyErr_Format(PyExc_TypeError, "%s: malformed __cuda_array_interface__: a dict expected, got %s", name,
                     Py_TYPE(cai)->tp_name);
        return -1;
    }
    PyObject *shape = PyDict_GetItemString(cai, "shape"); /* borrowed */
    PyObject *ts = PyDict_GetItemString(cai, "typestr");
    PyObject *data = PyDict_GetItemString(cai, "data");
    PyObject *strides = PyDict_GetItemString(cai, "strides");
    PyObject *stream = PyDict_GetItemString(cai, "stream");
    PyObject *mask = PyDict_GetItemString(cai, "mask");
    PyObject *version = PyDict_GetItemString(cai, "version");
    /* the protocol requires 'version'; any int >= 0 is taken (v3 keys are read, others ignored) */
    if (!version || !PyLong_Check(version) || PyBool_Check(version) || int_is_negative(version)) {
        PyErr_Format(PyExc_TypeError, "%s: malformed __cuda_array_interface__: 'version' must be an int "
                     ">= 0 (the protocol requires it)", name);
        return -1;
    }
    if (!shape || !PyTuple_Check(shape)) {
        PyErr_Format(PyExc_TypeError, "%s: malformed __cuda_array_interface__: 'shape' must be a tuple", name);
        return -1;
    }
    if (!ts || !PyUnicode_Check(ts)) {
        PyErr_Format(PyExc_TypeError, "%s: malformed __cuda_array_interface__: 'typestr' must be a str", name);
        return -1;
    }
    if (!data || !PyTuple_Check(data) || PyTuple_GET_SIZE(data) != 2) {
        PyErr_Format(PyExc_TypeError, "%s: malformed __cuda_array_interface__: 'data' must be a tuple "
                     "(pointer: int, read_only: bool)", name);
        return -1;
    }
    if (mask && mask != Py_None) {
        PyErr_Format(PyExc_ValueError, "%s: masked __cuda_array_interface__ arrays are not supported", name);
        return -1;
    }
    Py_ssize_t nd = PyTuple_GET_SIZE(shape);
    if (nd < 1 || nd > 2) {
        PyErr_Format(PyExc_ValueError, "%s must be 1-D or 2-D, got %zd dimensions", name, nd);
        return -1;
    }
    v->ndim = (int)nd;
    for (int d = 0; d < v->ndim; d++) {
        long long e;
        if (cai_int(PyTuple_GET_ITEM(shape, d), name, "shape entries", &e) < 0) return -1;
        if (e < 0 || e > PY_SSIZE_T_MAX) {
            PyErr_Format(PyExc_ValueError, "%s: malformed __cuda_array_interface__: shape entry %d is %lld",
                         name, d, e);
            return -1;
        }
        v->shape[d] = (Py_ssize_t)e;
    }
    Py_ssize_t tslen = 0;
    const char *tss = PyUnicode_AsUTF8AndSize(ts, &tslen);
    if (!tss) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: malformed __cuda_array_interface__: 'typestr' is not valid UTF-8", name);
        return -1;
    }
    /* the length check refuses an embedded NUL ("<f2\0x"), which strcmp alone would accept */
    v->typenum = (size_t)tslen == strlen(tss) ? typenum_of(tss) : -1;
    if (v->typenum < 0) {
        PyErr_Format(PyExc_TypeError, "%s: unsupported typestr %R (float16 '<f2', float32 '<f4', uint8 "
                     "'|u1' or int32 '<i4')", name, ts);
        return -1;
    }
    size_t nbytes;
    if (array_nbytes(v->ndim, v->shape, v->typenum, &nbytes, name) < 0) return -1;
    PyObject *p = PyTuple_GET_ITEM(data, 0), *ro = PyTuple_GET_ITEM(data, 1);
    if (!PyLong_Check(p) || PyBool_Check(p) || !PyBool_Check(ro)) {
        PyErr_Format(PyExc_TypeError, "%s: malformed __cuda_array_interface__: 'data' must be a tuple "
                     "(pointer: int, read_only: bool)", name);
        return -1;
    }
    if (int_is_negative(p)) {
        PyErr_Format(PyExc_ValueError, "%s: malformed __cuda_array_interface__: negative pointer", name);
        return -1;
    }
    v->ptr = PyLong_AsVoidPtr(p);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s: malformed __cuda_array_interface__: the pointer does not fit", name);
        return -1;
    }
    v->read_only = ro == Py_True;
    if (strides && strides != Py_None) { /* only C-contiguous strides are accepted */
        if (!PyTuple_Check(strides) || PyTuple_GET_SIZE(strides) != nd) {
            PyErr_Format(PyExc_TypeError, "%s: malformed __cuda_array_interface__: 'strides' must be None or a "
                         "tuple of %zd ints", name, nd);
            return -1;
        }
        long long want = v->typenum == NPY_FLOAT32 || v->typenum == NPY_INT32 ? 4 : v->typenum == NPY_UINT8 ? 1 : 2;
        for (int d = v->ndim - 1; d >= 0; d--) {
            long long sd;
            if (cai_int(PyTuple_GET_ITEM(strides, d), name, "strides", &sd) < 0) return -1;
            if (v->shape[d] > 1 && sd != want) {
                PyErr_Format(PyExc_ValueError, "%s must be C-contiguous", name);
                return -1;
            }
            want *= v->shape[d]; /* bounded by nbytes, checked above */
        }
    }
    if (stream && stream != Py_None) {
        long long sv;
        if (cai_int(stream, name, "'stream'", &sv) < 0) return -1;
        if (sv <= 0) {
            PyErr_Format(PyExc_ValueError, "%s: malformed __cuda_array_interface__: 'stream' %lld (0 is "
                         "disallowed by CAI v3; None, 1, 2 or a stream handle)", name, sv);
            return -1;
        }
        v->stream = sv;
    }
    Py_INCREF(obj);
    v->keep = obj;
    return 0;
}

void dd_py_device_view_release(dd_device_view *v) {
    Py_CLEAR(v->keep);
}

int dd_py_device_view(PyObject *obj, const char *name, dd_device_view *v) {
    int claimed = -1; /* the device a DLPack producer names (checked against the memory's own) */
    memset(v, 0, sizeof *v);
    v->stream = -1; /* none given */
    if (PyLong_Check(obj) && !PyBool_Check(obj)) { /* a raw pointer: the caller vouches for dtype and shape */
        if (int_is_negative(obj)) {
            PyErr_Format(PyExc_ValueError, "%s: a negative int is not a device pointer", name);
            return -1;
        }
        v->ptr = PyLong_AsVoidPtr(obj);
        if (PyErr_Occurred()) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "%s: the int does not fit a device pointer", name);
            return -1;
        }
        v->raw = 1;
        v->ndim = -1;
        v->typenum = -1;
    } else if (PyObject_TypeCheck(obj, &DeviceArray_Type)) {
        DeviceArrayObject *a = (DeviceArrayObject *)obj;
        v->ptr = a->ptr;
        v->ndim = a->ndim;
        v->shape[0] = a->shape[0];
        v->shape[1] = a->shape[1];
        v->typenum = a->typenum;
        Py_INCREF(obj);
        v->keep = obj;
    } else if (!PyObject_HasAttrString(obj, "__cuda_array_interface__") &&
               PyObject_HasAttrString(obj, "__dlpack__") && !PyArray_Check(obj)) {
        if (dlpack_view(obj, name, v) < 0) goto fail;
        claimed = v->device;
    } else {
        PyObject *cai = PyObject_GetAttrString(obj, "__cuda_array_interface__");
        if (!cai) {
            if (!PyErr_ExceptionMatches(PyExc_AttributeError)) /* a property that raised */
                return producer_failed(name, "__cuda_array_interface__");
            PyErr_Clear();
            if (PyArray_Check(obj)) {
                PyErr_Format(PyExc_TypeError, "%s is a NumPy (host) array; the CUDA DecLinear needs device "
                             "memory (decdec.DeviceArray(x), a torch CUDA tensor, or an int pointer)", name);
                return -1;
            }
            PyErr_Format(PyExc_TypeError, "%s must expose __cuda_array_interface__ or __dlpack__ (or be a "
                         "DeviceArray or an int device pointer), got %s", name, Py_TYPE(obj)->tp_name);
            return -1;
        }
        int rc = cai_view(obj, cai, name, v);
        Py_DECREF(cai);
        if (rc < 0) goto fail;
    }
    int empty = v->ndim > 0 && (v->shape[0] == 0 || (v->ndim == 2 && v->shape[1] == 0));
    if (!v->ptr) {
        if (empty) { /* nothing to read or write: take the current device */
            dd_status st = dd_cuda_get_device(&v->device);
            if (st != DD_OK) { dd_py_cuda_raise(st, name); goto fail; }
            return 0;
        }
        PyErr_Format(PyExc_ValueError, "%s is a null pointer", name);
        goto fail;
    }
    int kind = 0, dev = -1;
    dd_status st = dd_cuda_pointer_kind(v->ptr, &kind, &dev);
    if (st != DD_OK) { dd_py_cuda_raise(st, name); goto fail; }
    if (kind != DD_PTR_DEVICE && kind != DD_PTR_MANAGED) {
        PyErr_Format(PyExc_ValueError, "%s points to host memory; the CUDA DecLinear needs device memory", name);
        goto fail;
    }
    if (claimed >= 0 && claimed != dev) {
        PyErr_Format(PyExc_ValueError, "%s: __dlpack_device__ says cuda:%d but the memory is on cuda:%d",
                     name, claimed, dev);
        goto fail;
    }
    v->device = dev;
    return 0;
fail:
    dd_py_device_view_release(v);
    return -1;
}

int dd_py_device_view_check_extent(const dd_device_view *v, const char *name, size_t bytes, size_t align) {
    if (bytes == 0) return 0;
    const uintptr_t p = (uintptr_t)v->ptr;
    if (align > 1 && (p % align) != 0) {
        PyErr_Format(PyExc_ValueError, "%s must be aligned to %zu bytes (its elements), got address %p",
                     name, align, v->ptr);
        return -1;
    }
    uintptr_t base = 0;
    size_t size = 0;
    int known = 0;
    dd_status st = dd_cuda_pointer_range(v->ptr, &base, &size, &known);
    if (st != DD_OK) { dd_py_cuda_raise(st, name); return -1; }
    if (known && (p < base || p - base > size || size - (p - base) < bytes)) {
        PyErr_Format(PyExc_ValueError, "%s: %zu bytes from %p run past the end of its device allocation "
                     "(%zu bytes at %p): the shape, n_tokens= or pointer is wrong", name, bytes, v->ptr,
                     size, (void *)base);
        return -1;
    }
    return 0;
}

/* ---- benchmark hooks for decdec.bench --------------------------------------------------- */

static void bench_capsule_free(PyObject *cap) {
    dd_cuda_bench *b = (dd_cuda_bench *)PyCapsule_GetPointer(cap, "decdec.cuda_bench");
    if (b) dd_cuda_bench_destroy(b);
    else PyErr_Clear();
}

static PyObject *py_bench_create(PyObject *m, PyObject *args) {
    (void)m;
    dd_shape s;
    unsigned long long rotate = 0, seed = 7;
    if (!PyArg_ParseTuple(args, "iiii|KK", &s.d_in, &s.d_out, &s.bits, &s.group_size, &rotate, &seed)) return NULL;
    dd_cuda_bench *b = NULL;
    dd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dd_cuda_bench_create(&s, (size_t)rotate, seed, &b);
    Py_END_ALLOW_THREADS
    if (st != DD_OK) return dd_py_cuda_raise(st, "creating a benchmark layer");
    PyObject *cap = PyCapsule_New(b, "decdec.cuda_bench", bench_capsule_free);
    if (!cap) dd_cuda_bench_destroy(b);
    return cap;
}

/* variant: None, or a dict of dd_cuda_variant fields (ints); unknown keys are a ValueError. */
static int parse_variant(PyObject *obj, dd_cuda_variant *v, int *given) {
    memset(v, 0, sizeof *v);
    *given = 0;
    if (obj == Py_None) return 0;
    if (!PyDict_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "variant must be None or a dict of dd_cuda_variant fields, got %s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    static const struct { const char *name; size_t off; } fields[] = {
        {"base_rows", offsetof(dd_cuda_variant, base_rows)},
        {"base_grid", offsetof(dd_cuda_variant, base_grid)},
        {"layer_rows", offsetof(dd_cuda_variant, layer_rows)},
        {"layer_mode", offsetof(dd_cuda_variant, layer_mode)},
        {"layer_grid_cap", offsetof(dd_cuda_variant, layer_grid_cap)},
        {"base_sm", offsetof(dd_cuda_variant, base_sm)},
        {"base_kernel", offsetof(dd_cuda_variant, base_kernel)},
        {"base_ksplit", offsetof(dd_cuda_variant, base_ksplit)},
    };
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(obj, &pos, &key, &value)) {
        size_t f = 0, nf = sizeof fields / sizeof fields[0];
        if (PyUnicode_Check(key))
            for (; f < nf; f++)
                if (PyUnicode_CompareWithASCIIString(key, fields[f].name) == 0) break;
        if (!PyUnicode_Check(key) || f == nf) {
            PyErr_Format(PyExc_ValueError, "variant: unknown field %R (known: base_rows, base_grid, "
                         "layer_rows, layer_mode, layer_grid_cap, base_sm, base_kernel, base_ksplit)", key);
            return -1;
        }
        int32_t iv;
        char what[64];
        PyOS_snprintf(what, sizeof what, "variant['%s']", fields[f].name);
        if (dd_py_parse_int_in(value, what, 0, INT32_MAX, &iv) < 0) return -1;
        memcpy((char *)v + fields[f].off, &iv, sizeof iv);
    }
    *given = 1;
    return 0;
}

static PyObject *py_bench_run(PyObject *m, PyObject *args, PyObject *kwds) {
    (void)m;
    static char *kwlist[] = {"bench", "mode", "k_chunk", "n_tb", "iters", "reps", "variant", NULL};
    PyObject *cap, *variant_obj = Py_None;
    int mode, k_chunk, n_tb, iters, reps;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Oiiiii|O:_cuda_bench_run", kwlist, &cap, &mode, &k_chunk,
                                     &n_tb, &iters, &reps, &variant_obj))
        return NULL;
    dd_cuda_bench *b = (dd_cuda_bench *)PyCapsule_GetPointer(cap, "decdec.cuda_bench");
    if (!b) return NULL;
    if (mode < DD_BENCH_BASE || mode > DD_BENCH_EMPTY)
        return PyErr_Format(PyExc_ValueError, "mode must be one of BENCH_BASE..BENCH_EMPTY (%d..%d), got %d",
                            DD_BENCH_BASE, DD_BENCH_EMPTY, mode);
    if (iters < 1 || reps < 1)
        return PyErr_Format(PyExc_ValueError, "iters and reps must be >= 1, got %d, %d", iters, reps);
    dd_cuda_variant variant;
    int given = 0;
    if (parse_variant(variant_obj, &variant, &given) < 0) return NULL;
    double us = 0;
    dd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dd_cuda_bench_run(b, mode, k_chunk, n_tb, given ? &variant : NULL, iters, reps, &us);
    Py_END_ALLOW_THREADS
    if (st != DD_OK) return dd_py_cuda_raise(st, "benchmark run");
    return PyFloat_FromDouble(us);
}

static PyObject *py_bench_info(PyObject *m, PyObject *cap) {
    (void)m;
    dd_cuda_bench *b = (dd_cuda_bench *)PyCapsule_GetPointer(cap, "decdec.cuda_bench");
    if (!b) return NULL;
    size_t bytes = 0;
    int copies = 0, n_sm = 0;
    dd_cuda_bench_info(b, &bytes, &copies, &n_sm);
    return Py_BuildValue("(nii)", (Py_ssize_t)bytes, copies, n_sm);
}

static PyObject *py_bandwidth(PyObject *m, PyObject *args) {
    (void)m;
    unsigned long long bytes = 1ull << 31;
    int blocks = 16;
    if (!PyArg_ParseTuple(args, "|Ki", &bytes, &blocks)) return NULL;
    double hbm = 0, zc = 0, h2d = 0;
    dd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dd_cuda_bench_bandwidth((size_t)bytes, blocks, &hbm, &zc, &h2d);
    Py_END_ALLOW_THREADS
    if (st != DD_OK) return dd_py_cuda_raise(st, "bandwidth probe");
    return Py_BuildValue("(ddd)", hbm, zc, h2d);
}

static PyObject *py_device_name(PyObject *m, PyObject *args) {
    (void)m;
    int dev = 0;
    if (!PyArg_ParseTuple(args, "|i", &dev)) return NULL;
    char buf[256];
    dd_status st = dd_cuda_device_name(dev, buf, sizeof buf);
    if (st != DD_OK) return dd_py_cuda_raise(st, "device name");
    return PyUnicode_FromString(buf);
}

static PyMethodDef cuda_functions[] = {
    {"_cuda_bench_create", py_bench_create, METH_VARARGS, "(d_in, d_out, bits, group_size[, rotate_bytes, seed])"},
    {"_cuda_bench_run", (PyCFunction)(void (*)(void))py_bench_run, METH_VARARGS | METH_KEYWORDS,
     "(bench, mode, k_chunk, n_tb, iters, reps, variant=None) -> us per call; variant: a dict of "
     "dd_cuda_variant fields (base_rows, base_grid, layer_rows, layer_mode, layer_grid_cap, base_sm, "
     "base_kernel, base_ksplit)"},
    {"_cuda_bench_info", py_bench_info, METH_O, "(bench) -> (layer bytes, copies, SMs)"},
    {"_cuda_bandwidth", py_bandwidth, METH_VARARGS, "([bytes, zero_copy_blocks]) -> (hbm, zero-copy, h2d) GB/s"},
    {"_cuda_device_name", py_device_name, METH_VARARGS, "([device]) -> name"},
    {NULL, NULL, 0, NULL}};

int dd_py_cuda_types_init(PyObject *module) {
    if (PyType_Ready(&DeviceArray_Type) < 0) return -1;
    Py_INCREF(&DeviceArray_Type);
    if (PyModule_AddObject(module, "DeviceArray", (PyObject *)&DeviceArray_Type) < 0) {
        Py_DECREF(&DeviceArray_Type);
        return -1;
    }
    if (PyModule_AddFunctions(module, cuda_functions) < 0) return -1;
    static const struct { const char *name; int value; } constants[] = {
        {"BENCH_BASE", DD_BENCH_BASE}, {"BENCH_BASE_RESERVED", DD_BENCH_BASE_RESERVED},
        {"BENCH_FUSED", DD_BENCH_FUSED}, {"BENCH_SERIAL", DD_BENCH_SERIAL}, {"BENCH_READ", DD_BENCH_READ},
        {"BENCH_DEC_ONLY", DD_BENCH_DEC_ONLY}, {"BENCH_FORKJOIN", DD_BENCH_FORKJOIN},
        {"BENCH_DEC_LEGACY", DD_BENCH_DEC_LEGACY}, {"BENCH_FUSED_FULL", DD_BENCH_FUSED_FULL},
        {"BENCH_EMPTY", DD_BENCH_EMPTY}, {"PATH_FUSED", DD_PATH_FUSED}, {"PATH_SERIAL", DD_PATH_SERIAL},
        {"PATH_FORKJOIN", DD_PATH_FORKJOIN},
    };
    for (size_t i = 0; i < sizeof constants / sizeof constants[0]; i++)
        if (PyModule_AddIntConstant(module, constants[i].name, constants[i].value) < 0) return -1;
    return 0;
}
