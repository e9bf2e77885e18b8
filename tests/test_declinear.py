"""DecLinear on the CPU backend against the float64 NumPy reference (decdec/reference.py)."""
import gc
import os
import threading

import numpy as np
import pytest

import decdec
from decdec.layer import make_declinear
from decdec.reference import reference_forward, reference_select
from layer_factory import heavy_tailed, random_layer

SHAPES = [(1536, 576), (576, 1536), (64, 1100), (96, 2500), (32, 4096)]


def rel_err(a, b):
    return np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [64, 128])
@pytest.mark.parametrize("d_out,d_in", SHAPES)
def test_forward_matches_float64_reference(bits, group_size, d_out, d_in):
    rng = np.random.default_rng(hash((bits, group_size, d_out, d_in)) % 2**32)
    _, qw, cs, t = random_layer(rng, d_out, d_in, bits, group_size)
    for k_chunk, selection in [(0, "bucket"), (8, "bucket"), (16, "exact"), (1024, "bucket")]:
        layer = make_declinear(qw, cs, t, k_chunk=k_chunk, selection=selection)
        x = heavy_tailed(rng, (3, d_in))  # fresh inputs per check
        ref = reference_forward(qw, cs, t, x, k_chunk, selection)
        assert rel_err(layer.forward(x), ref) < 2e-6, (k_chunk, selection)
        # one token at a time gives the same as the 2-D call (tokens are independent)
        y1 = layer.forward(x[1])
        assert rel_err(y1, ref[1]) < 2e-6
        # float16 in -> float16 out, at fp16 rounding level against a reference on the same input
        x16 = x.astype(np.float16)
        ref16 = reference_forward(qw, cs, t, x16, k_chunk, selection)
        y16 = layer.forward(x16)
        assert y16.dtype == np.float16
        assert rel_err(y16, ref16) < 1e-3


def test_k_chunk_zero_is_the_base_gemv():
    rng = np.random.default_rng(7)
    _, qw, cs, t = random_layer(rng, 128, 700, 3, 128)
    layer = make_declinear(qw, cs, t, k_chunk=0)
    x = rng.standard_normal((5, 700)).astype(np.float32)
    base = x.astype(np.float64) @ qw.dequantize().astype(np.float64).T
    assert rel_err(layer.forward(x), base) < 2e-6


def test_all_channels_exact_leaves_only_the_residual_error():
    rng = np.random.default_rng(8)
    W, qw, cs, t = random_layer(rng, 256, 1024, 3, 128)
    layer = make_declinear(qw, cs, t, k_chunk=1024, selection="exact")
    x = rng.standard_normal((4, 1024))
    y = layer.forward(x.astype(np.float32)).astype(np.float64)
    W64 = W.astype(np.float64)
    R_err = W64 - qw.dequantize() - cs.dequantize().T  # what the 4-bit residual itself misses
    expected_err = np.linalg.norm(x @ R_err.T)
    err = np.linalg.norm(y - x @ W64.T)
    assert abs(err - expected_err) < 1e-3 * expected_err + 1e-4
    assert err < 0.1 * np.linalg.norm(x @ (W64 - qw.dequantize()).T)


@pytest.mark.parametrize("selection", ["bucket", "exact"])
def test_error_falls_as_k_chunk_grows(selection):
    rng = np.random.default_rng(9)
    W, qw, cs, t = random_layer(rng, 512, 2048, 3, 128)
    X = heavy_tailed(rng, (64, 2048))
    exact = X.astype(np.float64) @ W.astype(np.float64).T
    layer = make_declinear(qw, cs, t, selection=selection)
    errors = []
    for k in [0, 2, 4, 8, 16, 32, 64, 256]:
        layer.k_chunk = k
        errors.append(np.mean(np.linalg.norm(layer.forward(X) - exact, axis=1)))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("k_chunk", [8, 16])
def test_bucket_recall_against_exact_top_k(k_chunk):
    """The paper reports ~80% recall of the bucketed top-k; we require >= 0.8 on heavy tails."""
    rng = np.random.default_rng(10 + k_chunk)
    d_in = 4096
    _, qw, cs, _ = random_layer(rng, 64, d_in, 3, 128)
    calib = heavy_tailed(rng, (512, d_in))
    from decdec.calibrate import calibrate_thresholds
    t = calibrate_thresholds(calib)
    bucket = make_declinear(qw, cs, t, k_chunk=k_chunk, selection="bucket")
    exact = make_declinear(qw, cs, t, k_chunk=k_chunk, selection="exact")
    recalls = []
    for x in heavy_tailed(rng, (200, d_in)):
        sb, se = bucket.select(x), exact.select(x)
        assert len(sb) == len(se) == 4 * k_chunk
        recalls.append(len(np.intersect1d(sb, se)) / len(se))
    assert np.mean(recalls) >= 0.8, np.mean(recalls)


def test_select_matches_reference_and_skips_nan():
    rng = np.random.default_rng(11)
    _, qw, cs, t = random_layer(rng, 32, 3000, 4, 128)
    layer = make_declinear(qw, cs, t, k_chunk=12)
    for _ in range(20):
        x = heavy_tailed(rng, (3000,))
        x[rng.choice(3000, 50, replace=False)] = np.nan
        x[rng.choice(3000, 3, replace=False)] = np.inf
        for selection in ("bucket", "exact"):
            layer.selection = selection
            got = layer.select(x)
            np.testing.assert_array_equal(got, reference_select(x, t, 12, selection))
            assert not np.isnan(x[got]).any()
    # an all-NaN input selects nothing and does not crash
    assert len(layer.select(np.full(3000, np.nan, np.float32))) == 0


def test_ties_fill_the_cut_bucket_from_the_lowest_index():
    rng = np.random.default_rng(12)
    _, qw, cs, _ = random_layer(rng, 32, 1024, 4, 128)
    t = np.ones(1024, np.float32)
    layer = make_declinear(qw, cs, t, k_chunk=4)
    x = np.full(1024, 0.5, np.float32)  # all in one bucket
    np.testing.assert_array_equal(layer.select(x), [0, 1, 2, 3])


def test_out_and_accumulate():
    rng = np.random.default_rng(13)
    _, qw, cs, t = random_layer(rng, 64, 256, 4, 64)
    layer = make_declinear(qw, cs, t, k_chunk=8)
    x = rng.standard_normal((2, 256)).astype(np.float32)
    y = layer.forward(x)
    out = np.full((2, 64), np.nan, np.float32)
    assert layer.forward(x, out=out) is out
    np.testing.assert_array_equal(out, y)
    acc = np.ones((2, 64), np.float32)
    layer.forward(x, out=acc, accumulate=True)
    np.testing.assert_allclose(acc, y + 1, rtol=1e-6)
    out16 = np.zeros((2, 64), np.float16)
    layer.forward(x, out=out16)
    np.testing.assert_allclose(out16, y.astype(np.float16))
    # non-contiguous x is accepted (copied); the result is the same
    xs = np.repeat(x, 2, axis=1)[:, ::2]
    np.testing.assert_array_equal(layer.forward(xs), y)


def test_properties_and_residual_view():
    rng = np.random.default_rng(14)
    _, qw, cs, t = random_layer(rng, 96, 1100, 3, 128)
    layer = make_declinear(qw, cs, t, k_chunk=8)
    assert (layer.in_features, layer.out_features, layer.bits, layer.group_size) == (1100, 96, 3, 128)
    assert layer.backend == "cpu" and layer.selection == "bucket" and layer.k_chunk == 8
    assert layer.residual_nbytes == cs.codes.nbytes  # v2: the codes only (dd_residual_nbytes)
    # weight_nbytes: packed weight + fp16 scales and zeros + fp16 residual scales + fp32 thresholds
    assert layer.weight_nbytes == (qw.qweight.nbytes + qw.scales.nbytes + qw.zeros.nbytes
                                   + cs.scales.nbytes + t.nbytes)
    assert layer.fetch_nbytes == (8 + 1) * 48  # chunks of 1024 and 76 -> quotas 8 and 1
    view = layer.residual_codes
    np.testing.assert_array_equal(view, cs.codes)
    assert not view.flags.writeable
    del layer
    gc.collect()
    np.testing.assert_array_equal(view, cs.codes)  # the view keeps its owner alive
    np.testing.assert_array_equal(make_declinear(qw, cs, t).thresholds, t)
    assert "DecLinear(in_features=1100" in repr(make_declinear(qw, cs, t))


def test_forward_releases_the_gil_and_is_thread_safe():
    rng = np.random.default_rng(15)
    _, qw, cs, t = random_layer(rng, 256, 2048, 3, 128)
    layer = make_declinear(qw, cs, t, k_chunk=8)
    x = heavy_tailed(rng, (16, 2048))
    expected = layer.forward(x)
    results = [None] * 4

    def work(i):
        results[i] = layer.forward(x)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for r in results:
        np.testing.assert_array_equal(r, expected)


def test_cuda_device_without_gpu_is_a_clear_error():
    if decdec.cuda_available():
        pytest.skip("a GPU is present")
    rng = np.random.default_rng(16)
    _, qw, cs, t = random_layer(rng, 32, 128, 4, 128)
    with pytest.raises(RuntimeError, match="cuda"):
        make_declinear(qw, cs, t, device="cuda")
