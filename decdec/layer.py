"""Assembling DecLinear objects from the NumPy-side pieces."""
from __future__ import annotations

import numpy as np

from ._C import DecLinear
from .cheatsheet import Cheatsheet
from .quantize import QuantizedWeight


def make_declinear(qw: QuantizedWeight, cs: Cheatsheet, thresholds: np.ndarray, k_chunk: int = 0,
                   selection: str = "bucket", device: str = "cpu") -> DecLinear:
    if (cs.in_features, cs.out_features) != (qw.in_features, qw.out_features):
        raise ValueError(f"cheatsheet is {cs.out_features}x{cs.in_features} but the weight is "
                         f"{qw.out_features}x{qw.in_features}")
    return DecLinear(qw.qweight, qw.scales, qw.zeros, cs.codes, cs.scales,
                     np.ascontiguousarray(thresholds, dtype=np.float32),
                     in_features=qw.in_features, out_features=qw.out_features, bits=qw.bits,
                     group_size=qw.group_size, k_chunk=k_chunk, selection=selection, device=device)


def build_layer(W: np.ndarray, bits: int, group_size: int, thresholds: np.ndarray, k_chunk: int = 0,
                selection: str = "bucket", device: str = "cpu") -> DecLinear:
    """RTN-quantize W, build its cheatsheet and wrap both in a DecLinear (a convenience)."""
    from .cheatsheet import build_cheatsheet
    from .quantize import quantize_rtn

    qw = quantize_rtn(W, bits, group_size)
    cs = build_cheatsheet(W, qw.dequantize())
    return make_declinear(qw, cs, thresholds, k_chunk, selection, device)
