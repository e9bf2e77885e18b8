"""Float64 NumPy reference of the whole DecLinear layer and of its channel selection.

Slow and plain on purpose: it is the oracle that the C CPU backend and the CUDA backend are tested
against, written from the text of csrc/decdec.h and not from the C code."""
from __future__ import annotations

import numpy as np

from . import formats
from .cheatsheet import Cheatsheet
from .quantize import QuantizedWeight


def reference_select(x: np.ndarray, thresholds: np.ndarray | None, k_chunk: int,
                     selection: str = "bucket") -> np.ndarray:
    """Selected input channels of one token (int64, chunk by chunk, ascending within a chunk)."""
    x = np.asarray(x, np.float32)
    quotas = formats.chunk_quotas(len(x), k_chunk)
    k_total = sum(quotas)
    if k_total == 0:
        return np.zeros(0, np.int64)
    ax = np.abs(x)
    chosen = []
    if selection == "bucket":
        f = formats.bucket_floors(thresholds, k_total)
        bucket = np.full(len(x), formats.NUM_BUCKETS)
        for i in range(formats.NUM_BUCKETS - 1, -1, -1):  # the smallest qualifying bucket wins
            bucket = np.where(ax >= f[i], i, bucket)
    elif selection != "exact":
        raise ValueError(f"selection must be 'bucket' or 'exact', got {selection!r}")
    for c, quota in enumerate(quotas):
        lo, hi = c * formats.CHUNK, min(len(x), (c + 1) * formats.CHUNK)
        if quota == 0:
            continue
        if selection == "exact":
            valid = [j for j in range(lo, hi) if not np.isnan(ax[j])]
            valid.sort(key=lambda j: (-ax[j], j))
            chosen.extend(sorted(valid[:quota]))
            continue
        taken = []
        for b in range(formats.NUM_BUCKETS):
            members = [j for j in range(lo, hi) if bucket[j] == b]
            room = quota - len(taken)
            taken.extend(members[:room])  # lowest channel indices first in the cut bucket
            if len(taken) == quota:
                break
        chosen.extend(sorted(taken))
    return np.asarray(chosen, np.int64)


def reference_forward(qw: QuantizedWeight, cs: Cheatsheet, thresholds: np.ndarray | None,
                      x: np.ndarray, k_chunk: int = 0, selection: str = "bucket") -> np.ndarray:
    """y = W_hat x + sum_{i in S(x)} x_i R_hat[i, :] in float64, for x [d_in] or [T, d_in]."""
    x = np.asarray(x)
    X = np.atleast_2d(x).astype(np.float64)
    W_hat = qw.dequantize().astype(np.float64)
    R_hat = cs.dequantize().astype(np.float64)
    Y = X @ W_hat.T
    if k_chunk:
        for t in range(len(X)):
            S = reference_select(X[t].astype(np.float32), thresholds, k_chunk, selection)
            Y[t] += X[t, S] @ R_hat[S]
    return Y[0] if x.ndim == 1 else Y
