"""Random layers for the DecLinear tests (shared by the CPU and CUDA test files)."""
import numpy as np

from decdec.calibrate import calibrate_thresholds
from decdec.cheatsheet import build_cheatsheet
from decdec.quantize import quantize_rtn


def heavy_tailed(rng, shape, df=3.0, n_outliers=4, outlier_scale=30.0):
    """Student-t activations with a few huge channels (the shape of real LLM inputs)."""
    x = rng.standard_t(df, size=shape).astype(np.float32)
    d_in = shape[-1]
    cols = rng.choice(d_in, size=min(n_outliers, d_in), replace=False)
    x[..., cols] *= outlier_scale
    return x


def random_layer(rng, d_out, d_in, bits, group_size, calib_tokens=128):
    W = (rng.standard_normal((d_out, d_in)) * 0.05).astype(np.float32)
    qw = quantize_rtn(W, bits, group_size)
    cs = build_cheatsheet(W, qw.dequantize())
    t = calibrate_thresholds(heavy_tailed(rng, (calib_tokens, d_in)))
    return W, qw, cs, t
