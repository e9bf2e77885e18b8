"""Base-weight quantization: asymmetric uniform group quantization (3/4 bit, group 64/128).

quantize_rtn is round-to-nearest with an optional clipping ratio; quantize_with_params quantizes
onto a given grid (used by the activation-aware quantizer after it chose scales and clipping).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from . import formats


@dataclass
class QuantizedWeight:
    """A packed base weight and its group parameters (formats in csrc/decdec.h)."""

    qweight: np.ndarray   # uint8 [d_out, row_bytes]
    scales: np.ndarray    # float16 [d_out, n_groups]
    zeros: np.ndarray     # float16 [d_out, n_groups]
    bits: int
    group_size: int
    in_features: int
    out_features: int

    def codes(self) -> np.ndarray:
        return formats.unpack_weight(self.qweight, self.bits, self.in_features)

    def dequantize(self) -> np.ndarray:
        """W_hat as float32 [d_out, d_in], computed exactly as the kernels do (fp32 s * (q - z))."""
        q = self.codes().astype(np.float32)
        d_out, d_in = q.shape
        g = np.arange(d_in) // self.group_size
        s = self.scales.astype(np.float32)[:, g]
        z = self.zeros.astype(np.float32)[:, g]
        return s * (q - z)

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + self.scales.nbytes + self.zeros.nbytes


def _grouped(W: np.ndarray, group_size: int) -> np.ndarray:
    """[d_out, d_in] -> [d_out, n_groups, group_size], padding columns with NaN (ignored)."""
    d_out, d_in = W.shape
    d_pad = formats.padded_in_features(d_in)
    Wp = np.full((d_out, d_pad), np.nan, np.float64)
    Wp[:, :d_in] = W
    return Wp.reshape(d_out, d_pad // group_size, group_size)


def group_params(W: np.ndarray, bits: int, group_size: int, clip_ratio=1.0):
    """Scales and zero points (float16 [d_out, n_groups]) of asymmetric min/max quantization,
    the range shrunk by clip_ratio (a scalar or an array broadcastable to [d_out, n_groups])."""
    G = _grouped(np.asarray(W, np.float64), group_size)
    with warnings.catch_warnings():  # groups made only of padding are all-NaN: they get 0
        warnings.simplefilter("ignore", RuntimeWarning)
        wmax = np.nanmax(G, axis=2)
        wmin = np.nanmin(G, axis=2)
    wmax = np.nan_to_num(wmax, nan=0.0)
    wmin = np.nan_to_num(wmin, nan=0.0)
    # the grid must contain 0 (so zero weights stay zero) and have a positive step
    wmax = np.maximum(wmax, 0.0) * clip_ratio
    wmin = np.minimum(wmin, 0.0) * clip_ratio
    qmax = (1 << bits) - 1
    scale = (wmax - wmin) / qmax
    scale = np.where(scale > 1e-8, scale, 1e-8)
    scale16 = scale.astype(np.float16)
    scale16 = np.where(scale16 == 0, np.float16(6e-8), scale16)  # never a zero scale after fp16
    zero = np.clip(np.round(-wmin / scale16.astype(np.float64)), 0, qmax).astype(np.float16)
    return scale16, zero


def quantize_with_params(W: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int,
                         group_size: int) -> QuantizedWeight:
    """Quantize W [d_out, d_in] onto the grid given by fp16 scales and zeros [d_out, n_groups]."""
    W = np.asarray(W, np.float64)
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D [d_out, d_in], got shape {W.shape}")
    if not np.isfinite(W).all():
        raise ValueError("W contains NaN or Inf")
    d_out, d_in = W.shape
    formats.check_layer_shape(d_out, d_in, bits, group_size)
    n_groups = formats.num_groups(d_in, group_size)
    scales = np.asarray(scales, np.float16)
    zeros = np.asarray(zeros, np.float16)
    if scales.shape != (d_out, n_groups) or zeros.shape != (d_out, n_groups):
        raise ValueError(f"scales and zeros must have shape ({d_out}, {n_groups})")
    g = np.arange(d_in) // group_size
    s = scales.astype(np.float64)[:, g]
    z = zeros.astype(np.float64)[:, g]
    codes = np.clip(np.round(W / s + z), 0, (1 << bits) - 1).astype(np.uint8)
    return QuantizedWeight(formats.pack_weight(codes, bits), np.ascontiguousarray(scales),
                           np.ascontiguousarray(zeros), bits, group_size, d_in, d_out)


def quantize_rtn(W: np.ndarray, bits: int, group_size: int = 128, clip_ratio=1.0) -> QuantizedWeight:
    """Round-to-nearest asymmetric group quantization of W [d_out, d_in]."""
    W = np.asarray(W)
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D [d_out, d_in], got shape {W.shape}")
    formats.check_layer_shape(W.shape[0], W.shape[1], bits, group_size)
    if not np.isfinite(W).all():
        raise ValueError("W contains NaN or Inf")
    scales, zeros = group_params(W, bits, group_size, clip_ratio)
    return quantize_with_params(W, scales, zeros, bits, group_size)
