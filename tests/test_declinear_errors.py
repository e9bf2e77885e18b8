"""Bad input to DecLinear raises a clear exception; malformed input never crashes; no leaks."""
import gc

import numpy as np
import pytest

import decdec
from decdec import formats
from layer_factory import random_layer

D_OUT, D_IN = 64, 1100


@pytest.fixture(scope="module")
def parts():
    rng = np.random.default_rng(20)
    _, qw, cs, t = random_layer(rng, D_OUT, D_IN, 3, 128)
    return dict(qweight=qw.qweight, scales=qw.scales, zeros=qw.zeros, residual_codes=cs.codes,
                residual_scales=cs.scales, thresholds=t, in_features=D_IN, out_features=D_OUT,
                bits=3, group_size=128)


def build(parts, **change):
    kw = dict(parts)
    kw.update(change)
    args = [kw.pop(k) for k in ("qweight", "scales", "zeros", "residual_codes", "residual_scales",
                                "thresholds")]
    return decdec.DecLinear(*args, **kw)


def test_valid_parts_build(parts):
    assert build(parts).in_features == D_IN


@pytest.mark.parametrize("change,exc,match", [
    (dict(qweight=None), TypeError, "qweight must be a numpy.ndarray"),
    (dict(scales="x"), TypeError, "scales must be a numpy.ndarray"),
    (dict(bits=2), ValueError, "bits must be 3 or 4"),
    (dict(group_size=32), ValueError, "group_size must be 64 or 128"),
    (dict(out_features=60), ValueError, "multiple of 32"),
    (dict(in_features=0), ValueError, "positive"),
    (dict(in_features=1000), ValueError, "shape"),
    (dict(k_chunk=-1), ValueError, r"k_chunk must be in \[0, 1024\]"),
    (dict(k_chunk=1025), ValueError, r"k_chunk must be in \[0, 1024\]"),
    (dict(k_chunk=2.5), TypeError, "k_chunk must be an int"),
    (dict(selection="topk"), ValueError, "selection must be 'bucket' or 'exact'"),
    (dict(device="tpu"), ValueError, "device must be 'cpu' or 'cuda'"),
])
def test_bad_arguments(parts, change, exc, match):
    with pytest.raises(exc, match=match):
        build(parts, **change)


def test_wrong_dtype_shape_contiguity(parts):
    with pytest.raises(TypeError, match="scales must have dtype float16"):
        build(parts, scales=parts["scales"].astype(np.float32))
    with pytest.raises(TypeError, match="qweight must have dtype uint8"):
        build(parts, qweight=parts["qweight"].astype(np.int16))
    with pytest.raises(ValueError, match="residual_codes must have shape"):
        build(parts, residual_codes=parts["residual_codes"][:-1])
    with pytest.raises(ValueError, match="thresholds must have shape"):
        build(parts, thresholds=parts["thresholds"][:-1].copy())
    with pytest.raises(ValueError, match="thresholds must be 1-dimensional"):
        build(parts, thresholds=parts["thresholds"][None])
    nc = np.asfortranarray(parts["zeros"])
    with pytest.raises(ValueError, match="zeros must be C-contiguous"):
        build(parts, zeros=nc)
    with pytest.raises(TypeError, match="requires keyword arguments"):
        decdec.DecLinear(*[parts[k] for k in ("qweight", "scales", "zeros", "residual_codes",
                                               "residual_scales", "thresholds")])


def test_bad_thresholds(parts):
    t = parts["thresholds"].copy()
    t[5] = np.nan
    with pytest.raises(ValueError, match="finite"):
        build(parts, thresholds=t)
    t = parts["thresholds"].copy()
    t[-1] = -1
    with pytest.raises(ValueError, match=">= 0"):
        build(parts, thresholds=t)
    t = parts["thresholds"][::-1].copy()
    with pytest.raises(ValueError, match="non-increasing"):
        build(parts, thresholds=t)
    s = parts["scales"].copy()
    s[0, 0] = np.inf
    with pytest.raises(ValueError, match="finite"):
        build(parts, scales=s)


def test_bad_forward_and_setters(parts):
    layer = build(parts)
    with pytest.raises(TypeError, match="float16 or float32"):
        layer.forward(np.zeros(D_IN, np.float64))
    with pytest.raises(ValueError, match="in_features=1100"):
        layer.forward(np.zeros(D_IN + 1, np.float32))
    with pytest.raises(ValueError, match="1-D"):
        layer.forward(np.zeros((1, 1, D_IN), np.float32))
    with pytest.raises(TypeError, match="numpy.ndarray"):
        layer.forward([0.0] * D_IN)
    with pytest.raises(ValueError, match="out must have shape"):
        layer.forward(np.zeros(D_IN, np.float32), out=np.zeros(D_OUT + 1, np.float32))
    with pytest.raises(TypeError, match="out must have dtype"):
        layer.forward(np.zeros(D_IN, np.float32), out=np.zeros(D_OUT, np.int32))
    with pytest.raises(ValueError, match="1-D"):
        layer.select(np.zeros((2, D_IN), np.float32))
    for bad in (-1, 1025):
        with pytest.raises(ValueError):
            layer.k_chunk = bad
    with pytest.raises(TypeError):
        layer.k_chunk = "8"
    with pytest.raises(ValueError):
        layer.selection = "random"
    with pytest.raises(AttributeError):
        del layer.k_chunk
    with pytest.raises(AttributeError):
        layer.bits = 4
    assert layer.k_chunk == 0 and layer.selection == "bucket"


ARRAY_NAMES = ["qweight", "scales", "zeros", "residual_codes", "residual_scales", "thresholds"]
SHAPE_NAMES = ["in_features", "out_features", "bits", "group_size"]


def _valid_change(parts, key, value):
    """Whether replacing parts[key] by value alone leaves a valid layer (written from the rules of
    decdec.h, not from the binding): the expectation the fuzz test checks every case against."""
    if key in ARRAY_NAMES:
        ref = parts[key]
        ok = (isinstance(value, np.ndarray) and value.dtype == ref.dtype and value.shape == ref.shape)
        if ok and key == "thresholds":
            ok = bool(np.all(np.isfinite(value)) and np.all(value >= 0) and np.all(np.diff(value) <= 0))
        return ok
    if key == "k_chunk":
        return 0 <= value <= 1024
    return value == parts[key]  # any other shape value mismatches the arrays or is invalid


def test_fuzz_malformed_constructions_never_crash(parts):
    """Random malformed constructions: each case is predicted valid or invalid from the format rules;
    a valid one must build and run, an invalid one must raise TypeError/ValueError whose message
    names one of the arguments that made it invalid (or an array whose shape that argument sets)."""
    rng = np.random.default_rng(21)
    junk = [None, 3, "x", np.zeros(0, np.uint8), np.zeros((2, 2), np.float16),
            np.zeros((D_OUT, 5), np.uint8), np.full(D_IN, np.nan, np.float32),
            np.zeros((D_IN, D_OUT), np.uint8), np.zeros(D_IN, np.float32)]
    built = raised = predicted_valid = 0
    for case in range(3000):
        kw = dict(parts)
        changed = {}
        for _ in range(int(rng.integers(1, 3))):
            key = str(rng.choice(ARRAY_NAMES + SHAPE_NAMES + ["k_chunk"]))
            if key in ARRAY_NAMES:
                kw[key] = changed[key] = junk[int(rng.integers(len(junk)))]
            else:
                kw[key] = changed[key] = int(rng.choice([-5, 0, 1, 3, 4, 31, 32, 64, 128, 1024,
                                                         2**31 - 1, 10**6]))
        bad = [k for k, v in changed.items() if not _valid_change(parts, k, v)]
        predicted_valid += not bad
        try:
            layer = build(kw)
        except (TypeError, ValueError) as e:
            raised += 1
            assert bad, f"case {case}: valid change {changed} raised {e!r}"
            names = set(bad)
            if names & set(SHAPE_NAMES):
                names |= set(ARRAY_NAMES)  # a shape argument shows up as a mismatching array
            assert any(n in str(e) for n in names), f"case {case}: {e!r} names none of {sorted(names)}"
            continue
        assert not bad, f"case {case}: invalid change {changed} built"
        built += 1
        y = layer.forward(np.ones(layer.in_features, np.float32))
        assert y.shape == (D_OUT,) and np.isfinite(y).all()
    assert built == predicted_valid and built + raised == 3000
    assert raised > 2000 and built > 50  # the generator exercises both sides


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs /proc")
def test_no_leak_over_10000_objects(parts):
    for _ in range(500):  # warm allocator pools
        build(parts, k_chunk=8).forward(np.ones(D_IN, np.float32))
    gc.collect()
    before = rss_bytes()
    for _ in range(10000):
        layer = build(parts, k_chunk=8)
        layer.forward(np.ones(D_IN, np.float32))
        del layer
    gc.collect()
    growth = rss_bytes() - before
    # one layer holds ~70 KB; a leak of even one buffer per object would add > 100 MB
    assert growth < 8 * 2**20, growth


def test_n_tb_property(parts):
    layer = build(parts)
    assert layer.n_tb == 16 == decdec._C.CPU_DEFAULT_N_TB
    layer.n_tb = 8
    assert layer.n_tb == 8
    layer.n_tb = decdec._C.N_TB_LIMIT
    for bad in (0, -1, decdec._C.N_TB_LIMIT + 1, 2**70):
        with pytest.raises(ValueError, match="n_tb"):
            layer.n_tb = bad
    with pytest.raises(TypeError, match="n_tb must be an int"):
        layer.n_tb = 4.0
    with pytest.raises(TypeError, match="n_tb must be an int"):
        layer.n_tb = True
    assert layer.n_tb == decdec._C.N_TB_LIMIT
    assert build(parts, n_tb=3).n_tb == 3
    with pytest.raises(ValueError, match="n_tb"):
        build(parts, n_tb=0)


def test_n_tb_rule_functions():
    C = decdec._C
    for n_sm in (1, 2, 3, 8, 15, 16, 17, 108, 132, 1000):
        hi = C.n_tb_max(n_sm)
        assert hi == max(1, n_sm - 1)
        assert C.n_tb_default(n_sm) == min(max(n_sm // 8, 1), hi)
    assert C.n_tb_default(132) == 16 and C.n_tb_default(16) == 2
    for bad in (0, -3):
        with pytest.raises(ValueError, match="n_sm"):
            C.n_tb_max(bad)
    with pytest.raises(TypeError):
        C.n_tb_default("16")


def test_accumulate_without_out_is_an_error(parts):
    """v1 ignored accumulate=True without out= on the CPU (and raised on CUDA)."""
    layer = build(parts)
    with pytest.raises(ValueError, match="accumulate=True needs out="):
        layer.forward(np.ones(D_IN, np.float32), accumulate=True)


def test_too_many_tokens_is_a_value_error(parts):
    layer = build(parts)
    n = 2**31 // D_IN + 1  # a zero-stride view: no memory behind it
    x = np.lib.stride_tricks.as_strided(np.zeros(D_IN, np.float32), (n, D_IN), (0, 4))
    with pytest.raises(ValueError, match="tokens"):
        layer.forward(x)


# ---- found by bench/reliability.py (declinear target) on the first v2 binding ----------------

@pytest.mark.parametrize("key", ["in_features", "out_features", "bits", "group_size"])
@pytest.mark.parametrize("value", ["128", 3.0, None, b"cpu", 2**32, -2**40])
def test_int_keywords_are_named_in_the_error(parts, key, value):
    # was "'str' object cannot be interpreted as an integer" / "Python int too large to convert"
    with pytest.raises((TypeError, ValueError), match=key):
        build(parts, **{key: value})


def _swapped(a):
    return a.astype(a.dtype.newbyteorder("S"))


def _misaligned(a):
    raw = np.zeros(a.nbytes + a.itemsize, np.uint8)
    view = raw[1:1 + a.nbytes].view(a.dtype).reshape(a.shape)
    view[...] = a
    assert not view.flags.aligned
    return view


@pytest.mark.parametrize("key", ["scales", "zeros", "residual_scales", "thresholds"])
def test_byte_swapped_weights_are_refused(parts, key):
    # was accepted and read as native: a silently different layer
    with pytest.raises(ValueError, match=f"{key} must be in native byte order"):
        build(parts, **{key: _swapped(parts[key])})


@pytest.mark.parametrize("key", ["scales", "zeros", "residual_scales", "thresholds"])
def test_misaligned_weights_are_refused(parts, key):
    # UBSan: misaligned loads at py_declinear.c (thresholds as float, scales as uint16)
    with pytest.raises(ValueError, match=f"{key} must be aligned"):
        build(parts, **{key: _misaligned(parts[key])})


def test_byte_swapped_out_is_refused(parts):
    L = build(parts, k_chunk=8)
    x = np.random.default_rng(1).standard_normal(D_IN).astype(np.float32)
    out = _swapped(np.zeros(D_OUT, np.float32))
    with pytest.raises(ValueError, match="out must be in native byte order"):
        L.forward(x, out=out)


def test_out_overlapping_x_gives_the_right_answer(parts):
    # out sharing x's memory used to read outputs as inputs
    L = build(parts, k_chunk=8)
    rng = np.random.default_rng(2)
    n = max(D_IN, D_OUT)
    buf = rng.standard_normal(n).astype(np.float32)
    x = buf[:D_IN]
    want = L.forward(x.copy())
    out = buf[:D_OUT]  # aliases the head of x
    got = L.forward(x, out=out)
    assert got is out
    np.testing.assert_array_equal(out, want)
