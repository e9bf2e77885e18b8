"""RTN group quantization and the residual cheatsheet against float64 arithmetic."""
import numpy as np
import pytest

from decdec.cheatsheet import build_cheatsheet
from decdec.quantize import quantize_rtn, quantize_with_params


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [64, 128])
def test_rtn_error_within_half_step(bits, group_size):
    rng = np.random.default_rng(bits * group_size)
    W = rng.standard_normal((64, 576)).astype(np.float32)
    qw = quantize_rtn(W, bits, group_size)
    W_hat = qw.dequantize()
    g = np.arange(576) // group_size
    step = qw.scales.astype(np.float64)[:, g]
    # round-to-nearest inside the range: |W - W_hat| <= step / 2 (+ fp16 rounding of scale/zero)
    assert (np.abs(W - W_hat) <= 0.5 * step * 1.01 + 1e-6).all()
    assert qw.codes().max() < (1 << bits)


def test_quantize_with_params_reproduces_rtn():
    rng = np.random.default_rng(3)
    W = rng.standard_normal((32, 256))
    qw = quantize_rtn(W, 4, 128)
    again = quantize_with_params(W, qw.scales, qw.zeros, 4, 128)
    np.testing.assert_array_equal(again.qweight, qw.qweight)


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="bits"):
        quantize_rtn(np.zeros((32, 128)), 2, 128)
    with pytest.raises(ValueError, match="group_size"):
        quantize_rtn(np.zeros((32, 128)), 4, 32)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_rtn(np.zeros((30, 128)), 4, 128)
    with pytest.raises(ValueError, match="NaN"):
        quantize_rtn(np.full((32, 128), np.nan), 4, 128)


def test_cheatsheet_scale_is_mse_best_of_candidates():
    rng = np.random.default_rng(4)
    W = rng.standard_normal((64, 300))
    qw = quantize_rtn(W, 3, 128)
    R = (W - qw.dequantize()).T
    cs = build_cheatsheet(W, qw.dequantize())
    R_hat = cs.dequantize().astype(np.float64)
    err = ((R_hat - R) ** 2).sum(axis=0)
    m = np.abs(R).max(axis=0) / 7
    for o in range(0, 64, 7):  # brute force over the 32 candidates for a few channels
        best = min(((np.clip(np.round(R[:, o] / float(np.float16(m[o] * (t + 1) / 32))), -7, 7)
                     * float(np.float16(m[o] * (t + 1) / 32)) - R[:, o]) ** 2).sum()
                   for t in range(32))
        assert err[o] <= best * (1 + 1e-9) + 1e-15
    # a 4-bit residual removes most of the 3-bit error
    assert ((R_hat - R) ** 2).sum() < 0.05 * (R ** 2).sum()
