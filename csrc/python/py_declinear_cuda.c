/* The CUDA path of decdec.DecLinear (v2): the weights' dd_cuda_layer is immutable and shared; the
 * run settings are a dd_cuda_run value computed eagerly by the setters; every stream the layer
 * runs on gets its own dd_cuda_workspace, made on first use (or by L.prepare(stream)) while the
 * GIL is held, never inside a graph capture.  forward() takes device arrays (DeviceArray,
 * __cuda_array_interface__ objects such as torch CUDA tensors, DLPack producers, int pointers). */
#include "dd_python.h" /* Python.h first */

#include <string.h>

#include "py_cuda_common.h"
#include "pythread.h"

/* ---- weights ----------------------------------------------------------------------------- */

int dd_py_cuda_current_device_sms(int *device, int *n_sm) {
    dd_status st = dd_cuda_get_device(device);
    if (st == DD_OK) st = dd_cuda_device_sm_count(*device, n_sm);
    if (st != DD_OK) {
        dd_py_cuda_raise(st, "device='cuda': querying the current device");
        return -1;
    }
    if (*n_sm < 1) {
        PyErr_Format(PyExc_RuntimeError, "device='cuda': cuda:%d reports %d multiprocessors", *device, *n_sm);
        return -1;
    }
    return 0;
}

int dd_py_weights_cuda_create(LayerWeightsObject *w, const uint8_t *qweight, const uint16_t *scales,
                              const uint16_t *zeros) {
    dd_cuda_layer *layer = NULL;
    dd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dd_cuda_layer_create(&w->shape, qweight, scales, zeros, w->rcodes, w->rscales, w->thresholds,
                              &layer);
    Py_END_ALLOW_THREADS
    if (st != DD_OK) {
        if (layer) dd_cuda_layer_destroy(layer);
        dd_py_cuda_raise(st, "uploading the layer to the GPU");
        return -1;
    }
    w->cuda_layer = layer;
    w->device = dd_cuda_layer_device(layer);
    w->n_sm = dd_cuda_layer_n_sm(layer);
    return 0;
}

void dd_py_weights_cuda_free(LayerWeightsObject *w) {
    if (w->cuda_layer) dd_cuda_layer_destroy((dd_cuda_layer *)w->cuda_layer);
    w->cuda_layer = NULL;
}

int dd_py_cuda_settings_init(LayerWeightsObject *w, dd_py_settings *s) {
    dd_status st = dd_cuda_run_init((const dd_cuda_layer *)w->cuda_layer, s->k_chunk, s->n_tb,
                                    DD_PATH_FUSED, NULL, &s->run);
    if (st != DD_OK) {
        PyErr_Format(PyExc_ValueError, "k_chunk=%d, n_tb=%d: refused by the CUDA runtime (%s; this GPU has "
                     "%d multiprocessors)", (int)s->k_chunk, (int)s->n_tb, dd_strerror(st), w->n_sm);
        return -1;
    }
    return 0;
}

/* ---- the per-stream workspace table ---------------------------------------------------------
 * Keys (docs/DECLINEAR_V2.md): None / 0 / 1 (legacy default) -> (KEY_LEGACY, 0); 2 and
 * cudaStreamPerThread are per-thread -> (KEY_PER_THREAD, thread id); any other handle ->
 * (KEY_HANDLE, handle).  The table only grows (entries live as long as the DecLinear) and is
 * read and written with the GIL held; calls hold an entry's lock, not the GIL, while they enqueue
 * on its workspace, so two host threads on one stream enqueue whole calls one after the other. */
enum { KEY_LEGACY = 0, KEY_PER_THREAD = 1, KEY_HANDLE = 2 };

typedef struct {
    int kind;
    unsigned long long id;
    dd_cuda_workspace *ws;
    PyThread_type_lock lock;
} ws_entry;

typedef struct {
    Py_ssize_t n, cap;
    ws_entry *e;
} ws_table;

typedef struct {
    void *stream; /* what the runtime gets */
    int kind;
    unsigned long long id;
} stream_key;

static stream_key key_of_handle(uintptr_t h) {
    stream_key k;
    if (h == 0 || h == 1) { k.stream = NULL; k.kind = KEY_LEGACY; k.id = 0; }
    else if (h == 2) {
        k.stream = (void *)(uintptr_t)2;
        k.kind = KEY_PER_THREAD;
        k.id = (unsigned long long)PyThread_get_thread_ident();
    } else { k.stream = (void *)h; k.kind = KEY_HANDLE; k.id = (unsigned long long)h; }
    return k;
}

/* stream= argument: None (then the CAI stream of x when it gave one), an int handle, or an object
 * with .cuda_stream (torch) or .ptr (CuPy). */
static int parse_stream(PyObject *obj, long long cai_stream, stream_key *out) {
    if (obj == Py_None) {
        *out = key_of_handle(cai_stream > 0 ? (uintptr_t)cai_stream : 0);
        return 0;
    }
    PyObject *handle = NULL;
    if (PyLong_Check(obj) && !PyBool_Check(obj)) handle = (Py_INCREF(obj), obj);
    else if (PyObject_HasAttrString(obj, "cuda_stream")) handle = PyObject_GetAttrString(obj, "cuda_stream");
    else if (PyObject_HasAttrString(obj, "ptr")) handle = PyObject_GetAttrString(obj, "ptr");
    if (!handle || !PyLong_Check(handle)) {
        Py_XDECREF(handle);
        if (!PyErr_Occurred() || PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "stream must be an int handle or an object with .cuda_stream, got %s",
                         Py_TYPE(obj)->tp_name);
        }
        return -1;
    }
    void *p = PyLong_AsVoidPtr(handle);
    Py_DECREF(handle);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "stream: the handle does not fit a pointer");
        return -1;
    }
    *out = key_of_handle((uintptr_t)p);
    return 0;
}

/* The entry for key, made now when missing (GIL held).  A missing workspace on a capturing stream
 * is a RuntimeError: allocation is not allowed inside a capture. */
static ws_entry *workspace_for(DecLinearObject *self, const stream_key *key) {
    ws_table *t = (ws_table *)self->cuda;
    if (t) {
        for (Py_ssize_t i = 0; i < t->n; i++)
            if (t->e[i].kind == key->kind && t->e[i].id == key->id) return &t->e[i];
    }
    int capturing = 0;
    dd_status st = dd_cuda_stream_is_capturing(key->stream, &capturing);
    if (st != DD_OK) {
        dd_py_cuda_raise(st, "DecLinear: checking whether the stream is capturing");
        return NULL;
    }
    if (capturing) {
        PyErr_Format(PyExc_RuntimeError, "DecLinear: stream %p is capturing a CUDA graph and this layer has "
                     "no workspace for it yet (allocation is not allowed inside a capture): call "
                     "L.prepare(stream) before capturing", key->stream);
        return NULL;
    }
    if (!t) {
        t = (ws_table *)PyMem_RawCalloc(1, sizeof *t);
        if (!t) { PyErr_NoMemory(); return NULL; }
        self->cuda = t;
    }
    if (t->n == t->cap) {
        Py_ssize_t cap = t->cap ? 2 * t->cap : 4;
        ws_entry *e = (ws_entry *)PyMem_RawRealloc(t->e, (size_t)cap * sizeof *e);
        if (!e) { PyErr_NoMemory(); return NULL; }
        t->e = e;
        t->cap = cap;
    }
    const LayerWeightsObject *w = self->weights;
    PyThread_type_lock lock = PyThread_allocate_lock();
    if (!lock) { PyErr_NoMemory(); return NULL; }
    dd_cuda_workspace *ws = NULL;
    st = dd_cuda_workspace_create(w->device, w->shape.d_in, w->shape.d_out, &ws); /* GIL held */
    if (st != DD_OK) {
        PyThread_free_lock(lock);
        if (ws) dd_cuda_workspace_destroy(ws);
        dd_py_cuda_raise(st, "DecLinear: creating the stream's workspace");
        return NULL;
    }
    ws_entry *e = &t->e[t->n++];
    e->kind = key->kind;
    e->id = key->id;
    e->ws = ws;
    e->lock = lock;
    return e;
}

void dd_py_declinear_cuda_free(DecLinearObject *self) {
    ws_table *t = (ws_table *)self->cuda;
    if (!t) return;
    for (Py_ssize_t i = 0; i < t->n; i++) {
        dd_cuda_workspace_destroy(t->e[i].ws);
        PyThread_free_lock(t->e[i].lock);
    }
    PyMem_RawFree(t->e);
    PyMem_RawFree(t);
    self->cuda = NULL;
}

PyObject *dd_py_declinear_cuda_prepare(DecLinearObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"stream", NULL};
    PyObject *stream_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O:prepare", kwlist, &stream_obj)) return NULL;
    stream_key key;
    if (parse_stream(stream_obj, -1, &key) < 0) return NULL;
    if (!workspace_for(self, &key)) return NULL;
    Py_RETURN_NONE;
}

/* ---- calls ---------------------------------------------------------------------------------- */

static int check_x(const dd_device_view *xv, const LayerWeightsObject *w, const char *name) {
    if (xv->raw) return 0;
    if (xv->typenum != NPY_FLOAT16) {
        PyErr_Format(PyExc_TypeError, "%s must be float16 on the GPU", name);
        return -1;
    }
    if (xv->shape[xv->ndim - 1] != w->shape.d_in) {
        PyErr_Format(PyExc_ValueError, "%s has %zd features in its last dimension, the layer expects "
                     "in_features=%d", name, xv->shape[xv->ndim - 1], w->shape.d_in);
        return -1;
    }
    return 0;
}

static int check_device(const dd_device_view *v, const LayerWeightsObject *w, const char *name) {
    if (v->device == w->device) return 0;
    PyErr_Format(PyExc_ValueError, "%s is on cuda:%d, the layer on cuda:%d", name, v->device, w->device);
    return -1;
}

PyObject *dd_py_declinear_cuda_forward(DecLinearObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"x", "out", "accumulate", "stream", "n_tokens", NULL};
    PyObject *x_obj, *out_obj = Py_None, *stream_obj = Py_None, *n_tok_obj = Py_None;
    int accumulate = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O$pOO:forward", kwlist, &x_obj, &out_obj,
                                     &accumulate, &stream_obj, &n_tok_obj))
        return NULL;
    LayerWeightsObject *w = self->weights;
    const int d_in = w->shape.d_in, d_out = w->shape.d_out;
    const long max_tok = INT32_MAX / (d_in > d_out ? d_in : d_out);
    if (accumulate && out_obj == Py_None) {
        PyErr_SetString(PyExc_ValueError, "accumulate=True needs out= (the array to add into)");
        return NULL;
    }
    int32_t n_tok_arg = -1;
    if (n_tok_obj != Py_None && dd_py_parse_int_in(n_tok_obj, "n_tokens", 1, max_tok, &n_tok_arg) < 0)
        return NULL;

    dd_device_view xv, ov;
    memset(&ov, 0, sizeof ov);
    PyObject *result = NULL;
    int allocated = 0;
    if (dd_py_device_view(x_obj, "x", &xv) < 0) return NULL;
    if (check_x(&xv, w, "x") < 0 || check_device(&xv, w, "x") < 0) goto fail;
    Py_ssize_t n_tok;
    int out_ndim;
    if (xv.raw) {
        n_tok = n_tok_arg < 0 ? 1 : n_tok_arg;
        out_ndim = n_tok_arg < 0 ? 1 : 2; /* n_tokens= given: (n_tokens, out_features) */
    } else {
        n_tok = xv.ndim == 1 ? 1 : xv.shape[0];
        out_ndim = xv.ndim;
        if (n_tok_arg >= 0 && n_tok_arg != n_tok) {
            PyErr_Format(PyExc_ValueError, "n_tokens=%d but x holds %zd tokens (n_tokens= is for int "
                         "pointers)", (int)n_tok_arg, n_tok);
            goto fail;
        }
    }
    if (n_tok > max_tok) { /* checked before any int32 cast */
        PyErr_Format(PyExc_ValueError, "x has %zd tokens; at most %ld fit one call of this layer "
                     "(INT32_MAX / max(in_features, out_features))", n_tok, max_tok);
        goto fail;
    }
    if (dd_py_device_view_check_extent(&xv, "x", (size_t)n_tok * (size_t)w->shape.d_in * 2, 2) < 0) goto fail;
    stream_key key;
    if (parse_stream(stream_obj, xv.stream, &key) < 0) goto fail;

    if (out_obj == Py_None) {
        int capturing = 0;
        dd_status cst = dd_cuda_stream_is_capturing(key.stream, &capturing);
        if (cst != DD_OK) { dd_py_cuda_raise(cst, "DecLinear.forward: checking the stream"); goto fail; }
        if (capturing) {
            PyErr_SetString(PyExc_RuntimeError, "DecLinear.forward: out= is required while the stream is "
                            "capturing a CUDA graph (an output allocated here could not outlive the capture)");
            goto fail;
        }
        Py_ssize_t shape[2] = {out_ndim == 2 ? n_tok : d_out, d_out};
        result = dd_py_device_array_empty(out_ndim, shape, NPY_FLOAT16);
        if (!result) goto fail;
        allocated = 1;
        if (dd_py_device_view(result, "out", &ov) < 0) goto fail;
    } else {
        if (dd_py_device_view(out_obj, "out", &ov) < 0) goto fail;
        if (!ov.raw) {
            if (ov.typenum != NPY_FLOAT16) {
                PyErr_SetString(PyExc_TypeError, "out must be float16 on the GPU");
                goto fail;
            }
            Py_ssize_t o_tok = ov.ndim == 1 ? 1 : ov.shape[0];
            if (ov.shape[ov.ndim - 1] != d_out || o_tok != n_tok) {
                PyErr_Format(PyExc_ValueError, "out must hold %zd x %d (tokens x out_features)", n_tok, d_out);
                goto fail;
            }
        }
        if (ov.read_only) {
            PyErr_SetString(PyExc_ValueError, "out is read-only (its __cuda_array_interface__ says so)");
            goto fail;
        }
        if (check_device(&ov, w, "out") < 0) goto fail;
        if (dd_py_device_view_check_extent(&ov, "out", (size_t)n_tok * (size_t)d_out * 2, 2) < 0) goto fail;
        result = out_obj;
        Py_INCREF(result);
    }
    ws_entry *e = workspace_for(self, &key);
    if (!e) goto fail;

    dd_status st = DD_OK;
    const dd_cuda_run run = self->settings.run; /* this call's settings */
    dd_cuda_workspace *ws = e->ws;
    PyThread_type_lock lock = e->lock;
    const dd_cuda_layer *layer = (const dd_cuda_layer *)w->cuda_layer;
    Py_INCREF(self); /* weights and workspace stay alive while the GIL is released */
    if (n_tok > 0) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(lock, WAIT_LOCK);
        st = dd_cuda_layer_forward(layer, &run, ws, (const uint16_t *)xv.ptr, (uint16_t *)ov.ptr,
                                   (int32_t)n_tok, accumulate, key.stream);
        /* an output allocated here is handed back ready */
        if (st == DD_OK && allocated) st = dd_cuda_stream_synchronize(key.stream);
        PyThread_release_lock(lock);
        Py_END_ALLOW_THREADS
    }
    Py_DECREF(self);
    dd_py_device_view_release(&xv);
    dd_py_device_view_release(&ov);
    if (st != DD_OK) {
        Py_DECREF(result);
        return dd_py_cuda_raise(st, "DecLinear.forward on the GPU");
    }
    return result;
fail:
    dd_py_device_view_release(&xv);
    dd_py_device_view_release(&ov);
    Py_XDECREF(result);
    return NULL;
}

PyObject *dd_py_declinear_cuda_select(DecLinearObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"x", "stream", NULL};
    PyObject *x_obj, *stream_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|$O:select", kwlist, &x_obj, &stream_obj)) return NULL;
    LayerWeightsObject *w = self->weights;
    dd_device_view xv;
    if (dd_py_device_view(x_obj, "x", &xv) < 0) return NULL;
    PyObject *idx = NULL, *res = NULL;
    if (check_x(&xv, w, "x") < 0 || check_device(&xv, w, "x") < 0) goto done;
    if (!xv.raw && xv.ndim != 1 && xv.shape[0] != 1) {
        PyErr_SetString(PyExc_ValueError, "select takes one token: x must be 1-D");
        goto done;
    }
    if (dd_py_device_view_check_extent(&xv, "x", (size_t)w->shape.d_in * 2, 2) < 0) goto done;
    stream_key key;
    if (parse_stream(stream_obj, xv.stream, &key) < 0) goto done;
    const dd_cuda_run run = self->settings.run;
    npy_intp cap = run.k_total;
    idx = PyArray_SimpleNew(1, &cap, NPY_INT32);
    if (!idx) goto done;
    int32_t n_sel = 0;
    if (cap > 0) {
        ws_entry *e = workspace_for(self, &key);
        if (!e) goto done;
        dd_status st;
        dd_cuda_workspace *ws = e->ws;
        PyThread_type_lock lock = e->lock;
        int32_t *h = (int32_t *)PyArray_DATA((PyArrayObject *)idx);
        Py_INCREF(self);
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(lock, WAIT_LOCK);
        st = dd_cuda_layer_select((const dd_cuda_layer *)w->cuda_layer, &run, ws, (const uint16_t *)xv.ptr,
                                  h, &n_sel, key.stream);
        PyThread_release_lock(lock);
        Py_END_ALLOW_THREADS
        Py_DECREF(self);
        if (st != DD_OK) {
            dd_py_cuda_raise(st, "DecLinear.select on the GPU");
            goto done;
        }
        /* compact the -1 padding of chunks that could not fill their quota (NaNs), keeping order */
        npy_intp m = 0;
        for (npy_intp i = 0; i < cap; i++)
            if (h[i] >= 0) h[m++] = h[i];
        if (m != n_sel) {
            PyErr_Format(DecdecError, "DecLinear.select on the GPU: %zd valid indices but the kernel "
                         "reported %d", (Py_ssize_t)m, (int)n_sel);
            goto done;
        }
    }
    if (n_sel == cap) {
        res = idx;
        idx = NULL;
    } else {
        PyObject *head = PySequence_GetSlice(idx, 0, n_sel);
        if (head) {
            res = PyArray_NewCopy((PyArrayObject *)head, NPY_CORDER);
            Py_DECREF(head);
        }
    }
done:
    Py_XDECREF(idx);
    dd_py_device_view_release(&xv);
    return res;
}
