/* decdec._C.Engine: the whole-model GPU decoder (csrc/cuda/dd_cuda_engine.h) over the immutable
 * weights of CUDA DecLinear objects.  decdec/engine.py builds it from a quantized model; this
 * file only converts arguments, holds references and turns dd_status into exceptions.
 *
 * Thread rule: one call at a time per Engine.  A call from a second thread while one runs (the
 * GIL is released during decode / prefill) raises RuntimeError; it never waits or corrupts. */
#include "dd_python.h" /* Python.h first */

#include <math.h>
#include <string.h>

#include "py_cuda_common.h"
#include "../cuda/dd_cuda_engine.h"

typedef struct {
    PyObject_HEAD
    dd_cuda_engine *engine;
    dd_engine_config config;
    PyObject *weights; /* tuple of the _LayerWeights the engine borrows dd_cuda_layers from */
    int device;
    int busy;          /* guarded by the GIL */
} EngineObject;

static int engine_enter(EngineObject *self) {
    if (!self->engine) {
        PyErr_SetString(PyExc_RuntimeError, "Engine is not initialised");
        return -1;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Engine is in use by another thread (one call at a time)");
        return -1;
    }
    dd_status st = dd_cuda_set_device(self->device);
    if (st != DD_OK) {
        dd_py_cuda_raise(st, "Engine: selecting its device");
        return -1;
    }
    self->busy = 1;
    return 0;
}

static void engine_leave(EngineObject *self) { self->busy = 0; }

static int config_int(PyObject *cfg, const char *key, int required, long lo, long hi, int32_t *out) {
    PyObject *v = PyMapping_GetItemString(cfg, key);
    if (!v) {
        if (!required && PyErr_ExceptionMatches(PyExc_KeyError)) {
            PyErr_Clear();
            return 0;
        }
        if (PyErr_ExceptionMatches(PyExc_KeyError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "Engine config: missing '%s'", key);
        }
        return -1;
    }
    char name[64];
    snprintf(name, sizeof name, "config['%s']", key);
    int r = dd_py_parse_int_in(v, name, lo, hi, out);
    Py_DECREF(v);
    return r;
}

/* A C-contiguous array of dtype typenum and exactly the given shape, or NULL + ValueError. */
static PyArrayObject *array_of(PyObject *obj, const char *name, int typenum, int ndim, const npy_intp *shape) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy array", name);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    if (PyArray_TYPE(a) != typenum) {
        PyErr_Format(PyExc_ValueError, "%s must be %s", name,
                     typenum == NPY_FLOAT16 ? "float16" : typenum == NPY_FLOAT32 ? "float32" : "int32");
        return NULL;
    }
    if (PyArray_NDIM(a) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must be %d-D, got %d-D", name, ndim, PyArray_NDIM(a));
        return NULL;
    }
    for (int d = 0; d < ndim; d++)
        if (shape[d] >= 0 && PyArray_DIM(a, d) != shape[d]) {
            PyErr_Format(PyExc_ValueError, "%s has dimension %d of size %zd, expected %zd", name, d,
                         (Py_ssize_t)PyArray_DIM(a, d), (Py_ssize_t)shape[d]);
            return NULL;
        }
    PyArrayObject *c = (PyArrayObject *)PyArray_FROMANY(obj, typenum, ndim, ndim,
                                                       NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED);
    return c;
}

static void Engine_dealloc(EngineObject *self) {
    if (self->engine) {
        dd_cuda_set_device(self->device);
        dd_cuda_engine_destroy(self->engine);
    }
    Py_XDECREF(self->weights);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Engine_init(EngineObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"config", "embed", "head", "norms", "cos", "sin", "layers", NULL};
    PyObject *cfg, *embed_o, *head_o, *norms_o, *cos_o, *sin_o, *layers_o;
    if (self->engine || self->weights) {
        PyErr_SetString(PyExc_RuntimeError, "Engine is already initialised (build a new one)");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOO:Engine", kwlist, &cfg, &embed_o, &head_o,
                                     &norms_o, &cos_o, &sin_o, &layers_o))
        return -1;
    if (!PyMapping_Check(cfg)) {
        PyErr_SetString(PyExc_TypeError, "Engine config must be a mapping");
        return -1;
    }
    dd_engine_config c;
    memset(&c, 0, sizeof c);
    if (config_int(cfg, "dim", 1, 1, 65536, &c.dim) < 0 || config_int(cfg, "n_layers", 1, 1, 4096, &c.n_layers) < 0 ||
        config_int(cfg, "n_heads", 1, 1, 4096, &c.n_heads) < 0 ||
        config_int(cfg, "n_kv_heads", 1, 1, 4096, &c.n_kv_heads) < 0 ||
        config_int(cfg, "head_dim", 1, 2, 1024, &c.head_dim) < 0 ||
        config_int(cfg, "ffn_dim", 1, 1, 1 << 20, &c.ffn_dim) < 0 ||
        config_int(cfg, "vocab", 1, 1, 1 << 24, &c.vocab) < 0 ||
        config_int(cfg, "max_seq", 1, 1, 1 << 24, &c.max_seq) < 0 ||
        config_int(cfg, "max_prefill", 1, 1, 1 << 24, &c.max_prefill) < 0 ||
        config_int(cfg, "sliding_window", 0, 0, 1 << 30, &c.sliding_window) < 0 ||
        config_int(cfg, "fused", 0, 0, 1, &c.fused) < 0)
        return -1;
    PyObject *eps_o = PyMapping_GetItemString(cfg, "norm_eps");
    if (!eps_o) {
        if (PyErr_ExceptionMatches(PyExc_KeyError)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError, "Engine config: missing 'norm_eps'");
        }
        return -1;
    }
    double eps = PyFloat_AsDouble(eps_o);
    Py_DECREF(eps_o);
    if (eps == -1.0 && PyErr_Occurred()) return -1;
    if (!(eps > 0) || !isfinite(eps)) {
        /* PyErr_Format has no %g: format the number first */
        char num[48];
        snprintf(num, sizeof num, "%g", eps);
        PyErr_Format(PyExc_ValueError, "Engine config: norm_eps must be a positive number, got %s", num);
        return -1;
    }
    c.norm_eps = (float)eps;
    if (c.n_heads % c.n_kv_heads || c.head_dim % 2 || c.max_prefill > c.max_seq) {
        PyErr_SetString(PyExc_ValueError, "Engine config: n_heads must be a multiple of n_kv_heads, head_dim "
                        "even and max_prefill <= max_seq");
        return -1;
    }
    const npy_intp V = c.vocab, D = c.dim;
    npy_intp s_emb[2] = {V, D}, s_norm[2] = {2 * (npy_intp)c.n_layers + 1, D},
             s_rope[2] = {c.max_seq, c.head_dim / 2};
    PyArrayObject *embed = NULL, *head = NULL, *norms = NULL, *cosa = NULL, *sina = NULL;
    PyObject *seq = NULL, *weights = NULL;
    const dd_cuda_layer **layers = NULL;
    int rc = -1;
    if (!(embed = array_of(embed_o, "embed", NPY_FLOAT16, 2, s_emb))) goto done;
    if (head_o != Py_None && !(head = array_of(head_o, "head", NPY_FLOAT16, 2, s_emb))) goto done;
    if (!(norms = array_of(norms_o, "norms", NPY_FLOAT32, 2, s_norm))) goto done;
    if (!(cosa = array_of(cos_o, "cos", NPY_FLOAT32, 2, s_rope))) goto done;
    if (!(sina = array_of(sin_o, "sin", NPY_FLOAT32, 2, s_rope))) goto done;
    if (!(seq = PySequence_Fast(layers_o, "layers must be a sequence of CUDA DecLinear objects"))) goto done;
    const Py_ssize_t n_lin = (Py_ssize_t)c.n_layers * dd_engine_layers_per_block(&c);
    if (PySequence_Fast_GET_SIZE(seq) != n_lin) {
        PyErr_Format(PyExc_ValueError, "layers: %zd DecLinear objects given, the config needs n_layers x %d = %zd "
                     "(%s per block)", PySequence_Fast_GET_SIZE(seq), dd_engine_layers_per_block(&c), n_lin,
                     c.fused ? "q|k|v, o, gate|up, down" : "q, k, v, o, gate, up, down");
        goto done;
    }
    if (!(weights = PyTuple_New(n_lin))) goto done;
    layers = (const dd_cuda_layer **)PyMem_Calloc((size_t)n_lin, sizeof *layers);
    if (!layers) { PyErr_NoMemory(); goto done; }
    int device = -1;
    for (Py_ssize_t i = 0; i < n_lin; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyObject_TypeCheck(item, &DecLinear_Type)) {
            PyErr_Format(PyExc_TypeError, "layers[%zd] is %.80s, not a DecLinear", i, Py_TYPE(item)->tp_name);
            goto done;
        }
        DecLinearObject *L = (DecLinearObject *)item;
        if (dd_py_declinear_ready(L) < 0) goto done;
        LayerWeightsObject *w = L->weights;
        if (w->backend != DD_BACKEND_CUDA || !w->cuda_layer) {
            PyErr_Format(PyExc_ValueError, "layers[%zd] is a CPU DecLinear; the engine needs device='cuda'", i);
            goto done;
        }
        if (device >= 0 && w->device != device) {
            PyErr_Format(PyExc_ValueError, "layers[%zd] lives on cuda:%d, layers[0] on cuda:%d", i, w->device, device);
            goto done;
        }
        device = w->device;
        Py_INCREF(w);
        PyTuple_SET_ITEM(weights, i, (PyObject *)w);
        layers[i] = (const dd_cuda_layer *)w->cuda_layer;
    }
    dd_status st = dd_cuda_set_device(device);
    dd_cuda_engine *e = NULL;
    if (st == DD_OK) {
        const uint16_t *hp = head ? (const uint16_t *)PyArray_DATA(head) : NULL;
        Py_BEGIN_ALLOW_THREADS
        st = dd_cuda_engine_create(&c, (const uint16_t *)PyArray_DATA(embed), hp,
                                   (const float *)PyArray_DATA(norms), (const float *)PyArray_DATA(cosa),
                                   (const float *)PyArray_DATA(sina), layers, &e);
        Py_END_ALLOW_THREADS
    }
    if (st != DD_OK) {
        if (st == DD_ERR_INVALID_ARGUMENT)
            PyErr_Format(PyExc_ValueError, "Engine: the layers' shapes do not match the config (q %d x %d, "
                         "k/v %d x %d, o %d x %d, gate/up %d x %d, down %d x %d expected, out x in%s) or the "
                         "config is out of range (dim, ffn_dim and n_heads*head_dim multiples of 16)",
                         c.n_heads * c.head_dim, c.dim, c.n_kv_heads * c.head_dim, c.dim, c.dim,
                         c.n_heads * c.head_dim, c.ffn_dim, c.dim, c.dim, c.ffn_dim,
                         c.fused ? "; fused: q|k|v and gate|up stacked" : "");
        else if (st == DD_ERR_UNSUPPORTED)
            PyErr_Format(PyExc_ValueError, "Engine: head_dim %d is not supported (64 or 128)", c.head_dim);
        else
            dd_py_cuda_raise(st, "Engine: building on the GPU");
        goto done;
    }
    self->engine = e;
    self->config = c;
    self->device = device;
    self->weights = weights;
    weights = NULL;
    rc = 0;
done:
    PyMem_Free(layers);
    Py_XDECREF(weights);
    Py_XDECREF(seq);
    Py_XDECREF(embed);
    Py_XDECREF(head);
    Py_XDECREF(norms);
    Py_XDECREF(cosa);
    Py_XDECREF(sina);
    return rc;
}

static PyObject *engine_status(EngineObject *self, dd_status st, const char *what) {
    engine_leave(self);
    if (st == DD_OK) Py_RETURN_NONE;
    return dd_py_cuda_raise(st, what);
}

static PyObject *Engine_set_runs(EngineObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"k_chunk", "n_tb", NULL};
    PyObject *k_o, *n_tb_o;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:set_runs", kwlist, &k_o, &n_tb_o)) return NULL;
    if (!self->engine) { PyErr_SetString(PyExc_RuntimeError, "Engine is not initialised"); return NULL; }
    const Py_ssize_t n_lin = (Py_ssize_t)self->config.n_layers * dd_engine_layers_per_block(&self->config);
    PyObject *seq = PySequence_Fast(k_o, "k_chunk must be a sequence of ints (one per projection)");
    if (!seq) return NULL;
    if (PySequence_Fast_GET_SIZE(seq) != n_lin) {
        PyErr_Format(PyExc_ValueError, "k_chunk: %zd values given, the engine has %zd projections",
                     PySequence_Fast_GET_SIZE(seq), n_lin);
        Py_DECREF(seq);
        return NULL;
    }
    int32_t *k = (int32_t *)PyMem_Malloc(sizeof(int32_t) * (size_t)n_lin), n_tb;
    if (!k) { Py_DECREF(seq); return PyErr_NoMemory(); }
    int n_sm = 0;
    LayerWeightsObject *w0 = (LayerWeightsObject *)PyTuple_GET_ITEM(self->weights, 0);
    n_sm = w0->n_sm;
    int bad = dd_py_parse_int_in(n_tb_o, "n_tb", 1, dd_n_tb_max(n_sm), &n_tb) < 0;
    for (Py_ssize_t i = 0; !bad && i < n_lin; i++) {
        char name[48];
        snprintf(name, sizeof name, "k_chunk[%zd]", i);
        bad = dd_py_parse_int_in(PySequence_Fast_GET_ITEM(seq, i), name, 0, DD_CHUNK, &k[i]) < 0;
    }
    Py_DECREF(seq);
    if (bad) { PyMem_Free(k); return NULL; }
    if (engine_enter(self) < 0) { PyMem_Free(k); return NULL; }
    dd_status st = dd_cuda_engine_set_runs(self->engine, k, n_tb);
    PyMem_Free(k);
    return engine_status(self, st, "Engine.set_runs");
}

static PyObject *Engine_set_sampling(EngineObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"temperature", "top_p", "seed", NULL};
    double t = 0.0, p = 1.0;
    unsigned long long seed = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|ddK:set_sampling", kwlist, &t, &p, &seed)) return NULL;
    if (!(t >= 0) || !isfinite(t) || !(p > 0 && p <= 1)) {
        char num[96]; /* PyErr_Format has no %g */
        snprintf(num, sizeof num, "%g, %g", t, p);
        PyErr_Format(PyExc_ValueError, "set_sampling: temperature must be >= 0 and finite (0 = greedy), top_p in "
                     "(0, 1]; got %s", num);
        return NULL;
    }
    if (engine_enter(self) < 0) return NULL;
    dd_status st = dd_cuda_engine_set_sampling(self->engine, (float)t, (float)p, (uint64_t)seed);
    return engine_status(self, st, "Engine.set_sampling");
}

static PyObject *Engine_set_reference(EngineObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"logp", "start", NULL};
    PyObject *ref_o;
    int start = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|i:set_reference", kwlist, &ref_o, &start)) return NULL;
    if (!self->engine) { PyErr_SetString(PyExc_RuntimeError, "Engine is not initialised"); return NULL; }
    PyArrayObject *ref = NULL;
    int32_t rows = 0;
    if (ref_o != Py_None) {
        npy_intp shape[2] = {-1, self->config.vocab};
        if (!(ref = array_of(ref_o, "logp", NPY_FLOAT32, 2, shape))) return NULL;
        if (PyArray_DIM(ref, 0) < 1 || start < 0 || (long long)start + PyArray_DIM(ref, 0) > self->config.max_seq) {
            PyErr_Format(PyExc_ValueError, "set_reference: rows [%d, %lld) must lie in [0, max_seq = %d)", start,
                         (long long)start + (long long)PyArray_DIM(ref, 0), self->config.max_seq);
            Py_DECREF(ref);
            return NULL;
        }
        rows = (int32_t)PyArray_DIM(ref, 0);
    }
    if (engine_enter(self) < 0) { Py_XDECREF(ref); return NULL; }
    dd_status st;
    const float *p = ref ? (const float *)PyArray_DATA(ref) : NULL;
    Py_BEGIN_ALLOW_THREADS
    st = dd_cuda_engine_set_reference(self->engine, p, rows, ref ? start : 0);
    Py_END_ALLOW_THREADS
    Py_XDECREF(ref);
    return engine_status(self, st, "Engine.set_reference");
}

static PyObject *Engine_reset(EngineObject *self, PyObject *arg) {
    if (!self->engine) { PyErr_SetString(PyExc_RuntimeError, "Engine is not initialised"); return NULL; }
    PyArrayObject *t = (PyArrayObject *)PyArray_FROMANY(arg, NPY_INT64, 1, 1, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_FORCECAST);
    if (!t) return NULL;
    const npy_intp n = PyArray_DIM(t, 0);
    if (n < 1 || n > (npy_intp)self->config.max_seq + 1) {
        PyErr_Format(PyExc_ValueError, "reset: %zd tokens given, 1..max_seq + 1 = %d allowed", (Py_ssize_t)n,
                     self->config.max_seq + 1);
        Py_DECREF(t);
        return NULL;
    }
    int32_t *buf = (int32_t *)PyMem_Malloc(sizeof(int32_t) * (size_t)n);
    if (!buf) { Py_DECREF(t); return PyErr_NoMemory(); }
    const int64_t *src = (const int64_t *)PyArray_DATA(t);
    for (npy_intp i = 0; i < n; i++) {
        if (src[i] < 0 || src[i] >= self->config.vocab) {
            PyErr_Format(PyExc_ValueError, "reset: token %zd is %lld, outside [0, vocab = %d)", (Py_ssize_t)i,
                         (long long)src[i], self->config.vocab);
            PyMem_Free(buf);
            Py_DECREF(t);
            return NULL;
        }
        buf[i] = (int32_t)src[i];
    }
    Py_DECREF(t);
    if (engine_enter(self) < 0) { PyMem_Free(buf); return NULL; }
    dd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dd_cuda_engine_reset(self->engine, buf, (int32_t)n);
    Py_END_ALLOW_THREADS
    PyMem_Free(buf);
    return engine_status(self, st, "Engine.reset");
}

static PyObject *Engine_prefill(EngineObject *self, PyObject *arg) {
    int32_t n;
    if (!self->engine) { PyErr_SetString(PyExc_RuntimeError, "Engine is not initialised"); return NULL; }
    if (dd_py_parse_int_in(arg, "n", 1, self->config.max_seq, &n) < 0) return NULL;
    if (engine_enter(self) < 0) return NULL;
    int32_t pos = dd_cuda_engine_pos(self->engine);
    dd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dd_cuda_engine_prefill(self->engine, n);
    Py_END_ALLOW_THREADS
    if (st == DD_ERR_INVALID_ARGUMENT) {
        engine_leave(self);
        return PyErr_Format(PyExc_ValueError, "prefill(%d) at position %d: the rows must be given tokens "
                            "(reset) and fit max_seq = %d", n, pos, self->config.max_seq);
    }
    return engine_status(self, st, "Engine.prefill");
}

static PyObject *Engine_decode(EngineObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"n", "graph", NULL};
    PyObject *n_o;
    int graph = 1;
    int32_t n;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|p:decode", kwlist, &n_o, &graph)) return NULL;
    if (!self->engine) { PyErr_SetString(PyExc_RuntimeError, "Engine is not initialised"); return NULL; }
    if (dd_py_parse_int_in(n_o, "n", 0, self->config.max_seq, &n) < 0) return NULL;
    int32_t pos = dd_cuda_engine_pos(self->engine);
    if ((long long)pos + n > self->config.max_seq)
        return PyErr_Format(PyExc_ValueError, "decode(%d) at position %d passes max_seq = %d", n, pos,
                            self->config.max_seq);
    if (engine_enter(self) < 0) return NULL;
    dd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dd_cuda_engine_decode(self->engine, n, graph);
    Py_END_ALLOW_THREADS
    return engine_status(self, st, "Engine.decode");
}

static PyObject *Engine_time_steps(EngineObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"pos", "n", NULL};
    int pos, n;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "ii:time_steps", kwlist, &pos, &n)) return NULL;
    if (!self->engine) { PyErr_SetString(PyExc_RuntimeError, "Engine is not initialised"); return NULL; }
    if (pos < 0 || n < 1 || (long long)pos + n > self->config.max_seq)
        return PyErr_Format(PyExc_ValueError, "time_steps: positions [%d, %lld) must lie in [0, max_seq = %d)",
                            pos, (long long)pos + n, self->config.max_seq);
    if (engine_enter(self) < 0) return NULL;
    double us = 0;
    dd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dd_cuda_engine_time_steps(self->engine, pos, n, &us);
    Py_END_ALLOW_THREADS
    engine_leave(self);
    if (st != DD_OK) return dd_py_cuda_raise(st, "Engine.time_steps");
    return PyFloat_FromDouble(us);
}

static PyObject *Engine_read(EngineObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"what", "start", "n", NULL};
    const char *what;
    int start = 0, n = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "s|ii:read", kwlist, &what, &start, &n)) return NULL;
    if (!self->engine) { PyErr_SetString(PyExc_RuntimeError, "Engine is not initialised"); return NULL; }
    int kind, typenum = NPY_FLOAT32;
    long long len;
    if (!strcmp(what, "tokens")) { kind = DD_ENGINE_TOKENS; typenum = NPY_INT32; len = self->config.max_seq + 1; }
    else if (!strcmp(what, "nll")) { kind = DD_ENGINE_NLL; len = self->config.max_seq; }
    else if (!strcmp(what, "kl")) { kind = DD_ENGINE_KL; len = self->config.max_seq; }
    else if (!strcmp(what, "logits")) { kind = DD_ENGINE_LOGITS; len = self->config.vocab; start = 0; n = (int)len; }
    else return PyErr_Format(PyExc_ValueError, "read: what must be 'tokens', 'nll', 'kl' or 'logits', got '%s'", what);
    if (n < 0) n = (int)(len - start);
    if (start < 0 || n < 0 || (long long)start + n > len)
        return PyErr_Format(PyExc_ValueError, "read('%s'): [%d, %lld) outside [0, %lld)", what, start,
                            (long long)start + n, len);
    npy_intp dims[1] = {n};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(1, dims, typenum);
    if (!out) return NULL;
    if (engine_enter(self) < 0) { Py_DECREF(out); return NULL; }
    dd_status st = DD_OK;
    void *dst = PyArray_DATA(out);
    if (n > 0) {
        Py_BEGIN_ALLOW_THREADS
        st = dd_cuda_engine_read(self->engine, kind, start, n, dst);
        Py_END_ALLOW_THREADS
    }
    engine_leave(self);
    if (st != DD_OK) { Py_DECREF(out); return dd_py_cuda_raise(st, "Engine.read"); }
    return (PyObject *)out;
}

static PyObject *Engine_get_pos(EngineObject *self, void *c) {
    (void)c;
    return PyLong_FromLong(self->engine ? dd_cuda_engine_pos(self->engine) : -1);
}
static PyObject *Engine_get_nbytes(EngineObject *self, void *c) {
    (void)c;
    return PyLong_FromSize_t(self->engine ? dd_cuda_engine_nbytes(self->engine) : 0);
}
static PyObject *Engine_get_config(EngineObject *self, void *c) {
    (void)c;
    const dd_engine_config *g = &self->config;
    return Py_BuildValue("{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:d,s:i,s:i,s:i,s:i}", "dim", g->dim, "n_layers", g->n_layers,
                         "n_heads", g->n_heads, "n_kv_heads", g->n_kv_heads, "head_dim", g->head_dim, "ffn_dim",
                         g->ffn_dim, "vocab", g->vocab, "norm_eps", (double)g->norm_eps, "max_seq", g->max_seq,
                         "max_prefill", g->max_prefill, "sliding_window", g->sliding_window, "fused", g->fused);
}

static PyMethodDef Engine_methods[] = {
    {"set_runs", (PyCFunction)(void (*)(void))Engine_set_runs, METH_VARARGS | METH_KEYWORDS,
     "set_runs(k_chunk, n_tb): k_chunk per projection (n_layers x 7: q k v o gate up down, or fused x 4: "
     "qkv o gate_up down), one n_tb; "
     "the decode graph is captured again at the next decode"},
    {"set_sampling", (PyCFunction)(void (*)(void))Engine_set_sampling, METH_VARARGS | METH_KEYWORDS,
     "set_sampling(temperature=0, top_p=1, seed=0): 0 = greedy"},
    {"set_reference", (PyCFunction)(void (*)(void))Engine_set_reference, METH_VARARGS | METH_KEYWORDS,
     "set_reference(logp float32 [rows, vocab] or None, start=0): reference log-probabilities for KL"},
    {"reset", (PyCFunction)Engine_reset, METH_O, "reset(tokens): a new sequence of given tokens, position 0"},
    {"prefill", (PyCFunction)Engine_prefill, METH_O, "prefill(n): n given rows at once, without compensation"},
    {"decode", (PyCFunction)(void (*)(void))Engine_decode, METH_VARARGS | METH_KEYWORDS,
     "decode(n, graph=True): n decode steps with compensation (graph replays, or eager launches)"},
    {"time_steps", (PyCFunction)(void (*)(void))Engine_time_steps, METH_VARARGS | METH_KEYWORDS,
     "time_steps(pos, n) -> microseconds of n graph-replayed steps from position pos (CUDA events)"},
    {"read", (PyCFunction)(void (*)(void))Engine_read, METH_VARARGS | METH_KEYWORDS,
     "read(what, start=0, n=None): 'tokens' (int32), 'nll', 'kl' (float32, NaN = not scored), 'logits'"},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef Engine_getset[] = {
    {"pos", (getter)Engine_get_pos, NULL, "position of the token the next step processes", NULL},
    {"nbytes", (getter)Engine_get_nbytes, NULL, "device bytes the engine allocated (not the layers)", NULL},
    {"config", (getter)Engine_get_config, NULL, "the engine's configuration", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

PyTypeObject Engine_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "decdec._C.Engine",
    .tp_basicsize = sizeof(EngineObject),
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Engine(config, embed, head, norms, cos, sin, layers): a whole Llama-family decoder on the GPU "
              "over CUDA DecLinear layers (use decdec.engine.GpuEngine).  One call at a time.",
    .tp_methods = Engine_methods,
    .tp_getset = Engine_getset,
    .tp_init = (initproc)Engine_init,
    .tp_new = PyType_GenericNew,
};

int dd_py_engine_init(PyObject *module) {
    if (PyType_Ready(&Engine_Type) < 0) return -1;
    return PyModule_AddObjectRef(module, "Engine", (PyObject *)&Engine_Type);
}
