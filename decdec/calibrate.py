"""Selection thresholds: per layer, the upper envelope of the sorted |x| over calibration tokens.

thresholds[r] = max over tokens of the r-th largest |x| of that token's input vector, so the
anchors a = t[0] and b = t[k-1] are available for any k_chunk without recalibrating."""
from __future__ import annotations

import numpy as np


class ThresholdCalibrator:
    """Accumulates the envelope over batches of activation vectors [T, d_in]."""

    def __init__(self, d_in: int):
        if d_in <= 0:
            raise ValueError(f"d_in must be positive, got {d_in}")
        self.d_in = d_in
        self.count = 0
        self._envelope = np.zeros(d_in, np.float32)

    def update(self, X: np.ndarray) -> None:
        X = np.asarray(X)
        if X.ndim == 1:
            X = X[None]
        if X.ndim != 2 or X.shape[1] != self.d_in:
            raise ValueError(f"activations must be [tokens, {self.d_in}], got shape {X.shape}")
        A = np.abs(X.astype(np.float32))
        A = A[np.isfinite(A).all(axis=1)]  # a token with NaN/Inf would poison the envelope
        if not len(A):
            return
        A = -np.sort(-A, axis=1)  # each row descending
        np.maximum(self._envelope, A.max(axis=0), out=self._envelope)
        self.count += len(A)

    @property
    def thresholds(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("no calibration tokens were seen")
        # the max over tokens of descending rows is itself non-increasing
        return self._envelope.copy()


def calibrate_thresholds(X: np.ndarray) -> np.ndarray:
    """Thresholds (float32 [d_in]) from a stack of activation vectors X [T, d_in]."""
    X = np.asarray(X)
    cal = ThresholdCalibrator(X.shape[-1])
    cal.update(X)
    return cal.thresholds
