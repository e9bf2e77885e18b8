"""The residual "cheatsheet": R = W - W_hat quantized to 4-bit codes in -7..7 with one fp16 scale
per output channel, stored input-channel-major (one contiguous row per input channel)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import formats

SCALE_CANDIDATES = formats.RESIDUAL_SCALE_CANDIDATES


@dataclass
class Cheatsheet:
    codes: np.ndarray    # uint8 [d_in, d_out // 2]  (packed nibbles, formats.pack_residual)
    scales: np.ndarray   # float16 [d_out]

    @property
    def in_features(self) -> int:
        return self.codes.shape[0]

    @property
    def out_features(self) -> int:
        return self.codes.shape[1] * 2

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes

    def dequantize(self) -> np.ndarray:
        """R_hat as float32 [d_in, d_out] (input-channel-major, like the storage)."""
        return formats.unpack_residual(self.codes).astype(np.float32) * self.scales.astype(np.float32)


def residual_scales(R: np.ndarray, candidates: int = SCALE_CANDIDATES,
                    max_code: int = formats.RESIDUAL_MAX_CODE) -> np.ndarray:
    """Per output channel, the MSE-best of `candidates` scales m*(t+1)/N, m = max|R[:, o]| /
    max_code (7: the 4-bit format; other widths for experiments, bench/residual_precision.py).
    R is [d_in, d_out]; returns float16 [d_out] (the fp16 value is the one scored)."""
    R = np.asarray(R, np.float64)
    m = np.abs(R).max(axis=0) / max_code
    best_err = np.full(R.shape[1], np.inf)
    best = np.zeros(R.shape[1], np.float16)
    for t in range(candidates):
        s16 = (m * (t + 1) / candidates).astype(np.float16)
        s = s16.astype(np.float64)
        safe = np.where(s > 0, s, 1.0)
        q = np.clip(np.round(R / safe), -max_code, max_code)
        err = ((q * s - R) ** 2).sum(axis=0)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, s16, best)
    return best


def build_cheatsheet(W: np.ndarray, W_hat: np.ndarray,
                     candidates: int = SCALE_CANDIDATES) -> Cheatsheet:
    """Quantize the residual R = W - W_hat (both [d_out, d_in]) into a Cheatsheet."""
    W = np.asarray(W, np.float64)
    W_hat = np.asarray(W_hat, np.float64)
    if W.shape != W_hat.shape or W.ndim != 2:
        raise ValueError(f"W and W_hat must be 2-D of one shape, got {W.shape} and {W_hat.shape}")
    if W.shape[0] % 2:
        raise ValueError("out_features must be even")
    if not (np.isfinite(W).all() and np.isfinite(W_hat).all()):
        raise ValueError("W or W_hat contains NaN or Inf")
    R = (W - W_hat).T  # [d_in, d_out]: one row per input channel
    scales = residual_scales(R, candidates)
    s = scales.astype(np.float64)
    q = np.clip(np.round(R / np.where(s > 0, s, 1.0)), -formats.RESIDUAL_MAX_CODE,
                formats.RESIDUAL_MAX_CODE).astype(np.int8)
    return Cheatsheet(formats.pack_residual(q), np.ascontiguousarray(scales))
