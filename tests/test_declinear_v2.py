"""DecLinear v2 (issue 7, docs/DECLINEAR_V2.md): immutable weights, run settings, the binding's
contract.  Every test here names the v1 defect it guards against; each failed (or crashed) on
commit 5222c17.  CPU tests run everywhere; the CUDA ones are in test_declinear_v2_gpu.py."""
import gc
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import decdec
from decdec import formats
from decdec.layer import make_declinear
from decdec.reference import reference_forward
from layer_factory import heavy_tailed, random_layer

_C = decdec._C
D_OUT, D_IN = 96, 1100


@pytest.fixture(scope="module")
def parts():
    rng = np.random.default_rng(70)
    _, qw, cs, t = random_layer(rng, D_OUT, D_IN, 3, 128)
    return qw, cs, t


def _args(qw, cs, t):
    return (qw.qweight, qw.scales, qw.zeros, cs.codes, cs.scales, t)


def _kw(qw, **extra):
    kw = dict(in_features=qw.in_features, out_features=qw.out_features, bits=qw.bits,
              group_size=qw.group_size)
    kw.update(extra)
    return kw


def _run_isolated(code):
    """Run code in a fresh interpreter: a segfault shows as a negative return code, not a dead suite."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__),
                                                       os.path.dirname(os.path.dirname(__file__))]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=120)


# ---- immutability ------------------------------------------------------------------------------

def test_reinit_raises_and_the_layer_is_untouched(parts):
    """v1: __init__ on a live layer freed its buffers first and rebuilt (or, on bad input, left NULLs)."""
    qw, cs, t = parts
    layer = make_declinear(qw, cs, t, k_chunk=8)
    x = heavy_tailed(np.random.default_rng(1), (2, D_IN))
    before = layer.forward(x)
    with pytest.raises(RuntimeError, match="DecLinear is immutable"):
        layer.__init__(*_args(qw, cs, t), **_kw(qw))
    with pytest.raises(RuntimeError, match="build a new DecLinear"):
        layer.__init__(*_args(qw, cs, t), **_kw(qw, bits=2))  # even with bad arguments
    np.testing.assert_array_equal(layer.forward(x), before)
    np.testing.assert_array_equal(layer.thresholds, t)
    assert layer.k_chunk == 8


def test_failed_reinit_then_thresholds_does_not_crash(parts):
    """v1: a failed re-init left NULL buffers and `L.thresholds` then segfaulted (py_declinear.c:148,
    :487).  Run in a subprocess so that the old behaviour reads as a failure, not a dead suite."""
    r = _run_isolated("""
        import numpy as np, decdec
        from layer_factory import random_layer
        from decdec.layer import make_declinear
        _, qw, cs, t = random_layer(np.random.default_rng(3), 64, 1100, 3, 128)
        L = make_declinear(qw, cs, t)
        try:
            L.__init__(qw.qweight, qw.scales, qw.zeros, cs.codes, cs.scales, t, in_features=1100,
                       out_features=64, bits=2, group_size=128)
        except (RuntimeError, ValueError) as e:
            print(type(e).__name__)
        assert np.array_equal(L.thresholds, t)
        L.forward(np.ones(1100, np.float32))
        print("ok")
    """)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.split() == ["RuntimeError", "ok"]


def test_residual_view_never_changes(parts):
    """v1: a residual_codes view taken before a re-init silently changed (py_declinear.c:493-505)."""
    qw, cs, t = parts
    layer = make_declinear(qw, cs, t)
    view = layer.residual_codes
    assert view.base is layer._weights  # the immutable weights keep it alive, not the DecLinear
    other = np.ascontiguousarray(cs.codes[::-1])
    with pytest.raises(RuntimeError):
        layer.__init__(qw.qweight, qw.scales, qw.zeros, other, cs.scales, t, **_kw(qw))
    np.testing.assert_array_equal(view, cs.codes)
    with pytest.raises(ValueError):
        view[0, 0] = 1  # read-only
    del layer
    gc.collect()
    np.testing.assert_array_equal(view, cs.codes)


def test_uninitialised_object_raises_everywhere(parts):
    """v1: DecLinear.__new__(DecLinear).forward(x) ran on NULL buffers."""
    L = _C.DecLinear.__new__(_C.DecLinear)
    x = np.ones(D_IN, np.float32)
    getters = ["in_features", "out_features", "bits", "group_size", "backend", "k_chunk", "n_tb",
               "selection", "residual_nbytes", "residual_pinned", "weight_nbytes", "fetch_nbytes",
               "thresholds", "residual_scales", "residual_codes", "_weights"]
    for name in getters:
        with pytest.raises(RuntimeError, match="DecLinear is not initialised"):
            getattr(L, name)
    for name, value in [("k_chunk", 4), ("n_tb", 4), ("selection", "exact")]:
        with pytest.raises(RuntimeError, match="not initialised"):
            setattr(L, name, value)
    calls = [lambda: L.forward(x), lambda: L(x), lambda: L.select(x), lambda: L.prepare(),
             lambda: L.with_settings(k_chunk=1)]
    for call in calls:
        with pytest.raises(RuntimeError, match="not initialised"):
            call()
    assert "not initialised" in repr(L)
    # a failed first __init__ leaves it uninitialised (and a later valid one may still build it)
    qw, cs, t = parts
    with pytest.raises(ValueError):
        L.__init__(*_args(qw, cs, t), **_kw(qw, k_chunk=5000))
    with pytest.raises(RuntimeError, match="not initialised"):
        L.thresholds
    L.__init__(*_args(qw, cs, t), **_kw(qw))
    np.testing.assert_array_equal(L.thresholds, t)


def test_layer_weights_is_internal(parts):
    qw, cs, t = parts
    layer = make_declinear(qw, cs, t)
    w = layer._weights
    assert type(w) is _C._LayerWeights and "_LayerWeights" in repr(w)
    with pytest.raises(TypeError):
        _C._LayerWeights()
    with pytest.raises(TypeError):
        type(w)()


# ---- settings ------------------------------------------------------------------------------------

def test_with_settings_shares_the_weights(parts):
    qw, cs, t = parts
    a = make_declinear(qw, cs, t, k_chunk=4)
    b = a.with_settings(k_chunk=32, selection="exact", n_tb=3)
    assert b._weights is a._weights
    assert np.shares_memory(a.residual_codes, b.residual_codes)
    assert (a.k_chunk, a.selection, a.n_tb) == (4, "bucket", 16)
    assert (b.k_chunk, b.selection, b.n_tb) == (32, "exact", 3)
    c = b.with_settings()  # nothing changed: same settings, same weights
    assert (c.k_chunk, c.selection, c.n_tb) == (32, "exact", 3) and c._weights is a._weights
    x = heavy_tailed(np.random.default_rng(2), (3, D_IN))
    np.testing.assert_allclose(b.forward(x), reference_forward(qw, cs, t, x, 32, "exact"), rtol=2e-5,
                               atol=1e-5)
    b.k_chunk = 0
    assert a.k_chunk == 4  # settings are per object
    del a, c
    gc.collect()
    assert b.forward(x).shape == (3, D_OUT)  # b keeps the shared weights alive
    for bad, exc in [(dict(k_chunk=-1), ValueError), (dict(n_tb=0), ValueError),
                     (dict(selection="top"), ValueError), (dict(k_chunk="3"), TypeError)]:
        with pytest.raises(exc):
            b.with_settings(**bad)
    with pytest.raises(TypeError):
        b.with_settings(8)  # keyword-only


def test_failed_setter_keeps_the_old_settings(parts):
    qw, cs, t = parts
    layer = make_declinear(qw, cs, t, k_chunk=8, selection="exact")
    for name, bad in [("k_chunk", 1025), ("n_tb", 0), ("selection", "x"), ("k_chunk", None)]:
        with pytest.raises((ValueError, TypeError)):
            setattr(layer, name, bad)
    assert (layer.k_chunk, layer.n_tb, layer.selection) == (8, 16, "exact")


def test_prepare_on_cpu_is_a_no_op(parts):
    qw, cs, t = parts
    layer = make_declinear(qw, cs, t)
    assert layer.prepare() is None
    with pytest.raises(ValueError, match="no streams"):
        layer.prepare(stream=5)


# ---- byte rules and constants ----------------------------------------------------------------------

@pytest.mark.parametrize("d_out,d_in,bits,gs", [(96, 1100, 3, 128), (64, 4096, 4, 64), (32, 130, 4, 128)])
@pytest.mark.parametrize("k_chunk", [0, 1, 8, 1024])
def test_byte_properties_follow_the_rules(d_out, d_in, bits, gs, k_chunk):
    d_pad = -(-d_in // 128) * 128
    n_groups = d_pad // gs
    weight = d_out * d_pad * bits // 8 + 2 * 2 * d_out * n_groups + 2 * d_out + 4 * d_in
    residual = d_in * d_out // 2
    fetch = sum(formats.chunk_quotas(d_in, k_chunk)) * d_out // 2
    got = _C.layer_nbytes(d_in, d_out, bits, gs, k_chunk)
    assert got == {"weight": weight, "residual": residual, "fetch": fetch}
    got_kw = _C.layer_nbytes(in_features=d_in, out_features=d_out, bits=bits, group_size=gs,
                             k_chunk=k_chunk)
    assert got_kw == got
    rng = np.random.default_rng(d_in + k_chunk)
    _, qw, cs, t = random_layer(rng, d_out, d_in, bits, gs, calib_tokens=8)
    layer = make_declinear(qw, cs, t, k_chunk=k_chunk)
    assert (layer.weight_nbytes, layer.residual_nbytes, layer.fetch_nbytes) == (weight, residual, fetch)
    assert layer.residual_nbytes == cs.codes.nbytes == layer.residual_codes.nbytes


def test_layer_nbytes_validates_like_declinear():
    with pytest.raises(ValueError, match="bits"):
        _C.layer_nbytes(1024, 64, 5, 128, 8)
    with pytest.raises(ValueError, match="multiple of 32"):
        _C.layer_nbytes(1024, 60, 4, 128, 8)
    with pytest.raises(ValueError, match="k_chunk"):
        _C.layer_nbytes(1024, 64, 4, 128, 1025)
    with pytest.raises(ValueError, match="positive"):
        _C.layer_nbytes(0, 64, 4, 128, 0)


def test_constants_match_the_python_mirror():
    """The C constants of decdec.h against decdec.formats (the NumPy side of the same rules)."""
    for name in ("CHUNK", "NUM_BUCKETS", "BLOCK", "OUT_ALIGN", "RESIDUAL_MAX_CODE", "RESIDUAL_NIBBLE_BIAS"):
        assert getattr(_C, name) == getattr(formats, name), name
    assert _C.N_TB_LIMIT == 1024 and _C.RESIDUAL_SCALE_CANDIDATES == 32 and _C.FORMAT_VERSION == 1
    for name in ("N_TB_LIMIT", "RESIDUAL_SCALE_CANDIDATES", "FORMAT_VERSION"):
        if hasattr(formats, name):
            assert getattr(formats, name) == getattr(_C, name), name
    for fn in ("n_tb_max", "n_tb_default"):
        if hasattr(formats, fn):
            for n_sm in (1, 2, 16, 17, 132):
                assert getattr(formats, fn)(n_sm) == getattr(_C, fn)(n_sm), (fn, n_sm)
    if _C.built_with_cuda():
        assert [_C.PATH_FUSED, _C.PATH_SERIAL, _C.PATH_FORKJOIN] == [0, 1, 2]
        assert [_C.BENCH_BASE, _C.BENCH_EMPTY] == [0, 9]
    else:
        assert not hasattr(_C, "BENCH_BASE")
        with pytest.raises(RuntimeError, match="no CUDA backend"):
            _C.cuda_sm_count()


def test_cuda_layer_on_a_cpu_build_is_refused_before_allocating(parts):
    if _C.cuda_available():
        pytest.skip("a GPU is present")
    qw, cs, t = parts
    with pytest.raises(RuntimeError, match="cuda"):
        make_declinear(qw, cs, t, device="cuda")


# ---- no leaks ----------------------------------------------------------------------------------------

def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_10000_create_drop_cycles_leak_nothing(parts):
    """Weights, views, with_settings copies and failed constructions: Python-tracked memory
    (tracemalloc sees PyMem_Raw*, i.e. the host copies) and RSS (the residual buffer) stay flat."""
    import tracemalloc

    qw, cs, t = parts
    x = np.ones(D_IN, np.float32)

    def cycle():
        layer = make_declinear(qw, cs, t, k_chunk=8)
        copy = layer.with_settings(k_chunk=4)
        view = layer.residual_codes
        copy.forward(x)
        layer.select(x)
        try:
            layer.__init__(*_args(qw, cs, t), **_kw(qw))
        except RuntimeError:
            pass
        try:
            make_declinear(qw, cs, t, k_chunk=2000)
        except ValueError:
            pass
        del layer, copy, view

    for _ in range(300):
        cycle()
    gc.collect()
    tracemalloc.start()
    rss0 = _rss()
    snap0 = tracemalloc.take_snapshot()
    for _ in range(10000):
        cycle()
    gc.collect()
    snap1 = tracemalloc.take_snapshot()
    rss1 = _rss()
    tracemalloc.stop()
    traced = sum(s.size_diff for s in snap1.compare_to(snap0, "filename"))
    # one layer's host copies are ~60 KB: one leaked buffer per cycle would be > 100 MB
    assert traced < 256 * 1024, traced
    assert rss1 - rss0 < 8 * 2**20, rss1 - rss0
