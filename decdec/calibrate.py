"""Selection thresholds: per layer, an upper envelope of the sorted |x| over calibration tokens.

thresholds[r] = max over tokens of the r-th largest |x| of that token's input vector (decdec.h), so
the anchors a = t[0] and b = t[k-1] are available for any k_chunk without recalibrating.

The max is set by the most extreme calibration tokens (on SmolLM2 the envelope of w_down's input
sits ~10x above a median token's top value), which pushes the anchors above a typical token's top-k
and costs recall.  `quantile=0.9` stores the per-rank 90th percentile instead (same format, same
run-time cost; bench/results/real_selection_recall.md measured +0.06 recall on the worst inputs).
"""
from __future__ import annotations

import numpy as np


class ThresholdCalibrator:
    """Accumulates the envelope over batches of activation vectors [T, d_in].

    quantile=None keeps the per-rank maximum (the published rule).  With a quantile q in (0, 1],
    the top `max_rank` ranks of every token are kept (default: all) and the per-rank q-quantile is
    stored; ranks past max_rank fall back to the maximum, clipped so the vector stays
    non-increasing."""

    def __init__(self, d_in: int, quantile: float | None = None, max_rank: int | None = None):
        if d_in <= 0:
            raise ValueError(f"d_in must be positive, got {d_in}")
        if quantile is not None and not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        self.d_in = d_in
        self.quantile = quantile
        self.max_rank = d_in if max_rank is None else max(1, min(int(max_rank), d_in))
        self.count = 0
        self._envelope = np.zeros(d_in, np.float32)
        self._tops: list[np.ndarray] = []

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
        if self.quantile is not None:
            self._tops.append(A[:, : self.max_rank].copy())
        self.count += len(A)

    @property
    def thresholds(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("no calibration tokens were seen")
        if self.quantile is None:
            # the max over tokens of descending rows is itself non-increasing
            return self._envelope.copy()
        tops = np.concatenate(self._tops, axis=0)
        q = np.quantile(tops, self.quantile, axis=0).astype(np.float32)
        t = self._envelope.copy()
        t[: len(q)] = q
        return np.minimum.accumulate(t).astype(np.float32)


def calibrate_thresholds(X: np.ndarray, quantile: float | None = None) -> np.ndarray:
    """Thresholds (float32 [d_in]) from a stack of activation vectors X [T, d_in]."""
    X = np.asarray(X)
    cal = ThresholdCalibrator(X.shape[-1], quantile=quantile)
    cal.update(X)
    return cal.thresholds
