"""The thread rule of DecLinear (class docstring): any number of threads may call one DecLinear at
once and get correct results; each call uses the settings it started with.  v1 (5222c17) let a
re-init run beside a GIL-released forward (heap-use-after-free in dd_cpu_dequant_row) and had
CUDA calls share mutable state.  CPU here; the CUDA counterparts are in test_declinear_v2_gpu.py."""
import threading

import numpy as np
import pytest

import decdec
from decdec.layer import make_declinear
from layer_factory import heavy_tailed, random_layer

D_OUT, D_IN = 256, 2048
N_THREADS = 4
ROUNDS = 12


@pytest.fixture(scope="module")
def layer_and_refs():
    rng = np.random.default_rng(80)
    _, qw, cs, t = random_layer(rng, D_OUT, D_IN, 3, 128)
    layer = make_declinear(qw, cs, t, k_chunk=8)
    x = heavy_tailed(rng, (16, D_IN))
    # one-thread references of the same object for every setting the test flips between
    refs = {}
    for k in (8, 64):
        layer.k_chunk = k
        refs[k] = layer.forward(x)
    layer.k_chunk = 8
    assert not np.array_equal(refs[8], refs[64])
    return qw, cs, t, layer, x, refs


def _run_threads(work, n):
    errors = []

    def wrap(i):
        try:
            work(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]


def test_own_settings_copies_give_exact_results(layer_and_refs):
    """Each thread uses its own with_settings() copy (shared weights): results are bit-exact."""
    _, _, _, layer, x, refs = layer_and_refs
    results = {}

    def work(i):
        k = 8 if i % 2 == 0 else 64
        mine = layer.with_settings(k_chunk=k)
        results[i] = [mine.forward(x) for _ in range(ROUNDS)]

    _run_threads(work, N_THREADS)
    for i, ys in results.items():
        for y in ys:
            np.testing.assert_array_equal(y, refs[8 if i % 2 == 0 else 64])


def test_setter_beside_calls_never_mixes_settings(layer_and_refs):
    """Threads call forward on ONE layer while another flips k_chunk between 8 and 64: every result
    equals, bit for bit, the one-thread result of one of the two settings (never a mixture, never
    garbage)."""
    _, _, _, layer, x, refs = layer_and_refs
    stop = threading.Event()
    seen = {8: 0, 64: 0}
    lock = threading.Lock()

    def flipper():
        k = 8
        while not stop.is_set():
            k = 64 if k == 8 else 8
            layer.k_chunk = k

    def work(i):
        for _ in range(ROUNDS):
            y = layer.forward(x)
            match = [k for k, r in refs.items() if np.array_equal(y, r)]
            assert match, "a result matched neither setting"
            with lock:
                seen[match[0]] += 1

    flip = threading.Thread(target=flipper)
    flip.start()
    try:
        _run_threads(work, N_THREADS)
    finally:
        stop.set()
        flip.join()
        layer.k_chunk = 8
    assert sum(seen.values()) == N_THREADS * ROUNDS


def test_reinit_beside_forward_is_refused(layer_and_refs):
    """v1: __init__ from another thread freed the buffers a GIL-released forward was reading.  Now
    every such __init__ raises RuntimeError and every forward result is exact."""
    qw, cs, t, layer, x, refs = layer_and_refs
    stop = threading.Event()
    refused = []

    def reinit():
        while not stop.is_set():
            try:
                layer.__init__(qw.qweight, qw.scales, qw.zeros, cs.codes, cs.scales, t,
                               in_features=D_IN, out_features=D_OUT, bits=3, group_size=128)
            except RuntimeError as e:
                assert "immutable" in str(e)
                refused.append(1)
            else:
                raise AssertionError("__init__ on a built layer succeeded")

    def work(i):
        for _ in range(ROUNDS):
            np.testing.assert_array_equal(layer.forward(x), refs[8])

    th = threading.Thread(target=reinit)
    th.start()
    try:
        _run_threads(work, N_THREADS)
    finally:
        stop.set()
        th.join()
    assert refused


def test_forward_releases_the_gil(layer_and_refs):
    """A pure-Python counter thread makes progress while forward runs (the GIL is released)."""
    _, _, _, layer, _, _ = layer_and_refs
    big = heavy_tailed(np.random.default_rng(81), (256, D_IN))
    ticks = [0]
    stop = threading.Event()

    def count():
        while not stop.is_set():
            ticks[0] += 1

    th = threading.Thread(target=count)
    th.start()
    try:
        before = ticks[0]
        layer.forward(big)
        during = ticks[0] - before
    finally:
        stop.set()
        th.join()
    assert during > 0


def test_dropping_the_layer_while_threads_use_copies(layer_and_refs):
    """The weights are reference-counted: copies keep them alive after the original goes."""
    qw, cs, t, _, x, refs = layer_and_refs
    original = make_declinear(qw, cs, t, k_chunk=8)
    copies = [original.with_settings() for _ in range(N_THREADS)]
    del original

    def work(i):
        for _ in range(4):
            np.testing.assert_array_equal(copies[i].forward(x), refs[8])

    _run_threads(work, N_THREADS)
    assert decdec.DecLinear is type(copies[0])
