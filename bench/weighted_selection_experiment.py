"""Experiment: select channels by |x_i| * ||R_hat_i|| (the residual row's norm) instead of |x_i|.

The residual error a channel leaves is x_i * R_hat[i, :]; |x| alone assumes equal row norms.  AWQ
breaks that assumption (it rescales input channels before rounding), which may be why DecDEC closes
less of AWQ's gap.  Exact per-chunk top-k on both scores, same channel count, SmolLM2 (dequantized
GGUF = reference), Persuasion (development text).  Prints a Markdown table.

Usage: python bench/weighted_selection_experiment.py [--tokens 511] [--calib-windows 4]
"""
import argparse

import numpy as np

from decdec import data, formats, pipeline
from decdec.evaluate import EvalConfig, PerplexityProtocol, evaluate
from decdec.fetch import fetch_smollm2
from decdec.loaders import load_gguf
from decdec.model import LlamaModel


class WeightedExact:
    """Base GEMV through DecLinear (k_chunk 0) plus a NumPy residual over the per-chunk top-k of
    |x| * weight (weight = ones: the plain |x| rule)."""

    def __init__(self, declinear, R_hat, weight):
        self.base, self.R, self.w, self.k_chunk = declinear, R_hat, weight, 0
        self.in_features, self.out_features = declinear.in_features, declinear.out_features

    def forward(self, X):
        Y = self.base.forward(X)
        if self.k_chunk == 0:
            return Y
        S = np.abs(X) * self.w
        for c, q in enumerate(formats.chunk_quotas(X.shape[1], self.k_chunk)):
            lo, hi = c * formats.CHUNK, min(X.shape[1], (c + 1) * formats.CHUNK)
            idx = lo + np.argpartition(-S[:, lo:hi], q - 1, axis=1)[:, :q]  # [T, q]
            xs = np.take_along_axis(X, idx, axis=1)                         # [T, q]
            Y += np.einsum("tq,tqo->to", xs, self.R[idx])
        return Y


def wrap(qm, weighted):
    model = pipeline.build_model(qm, k_chunk=0)
    for (l, name), lin in list(model.linears.items()):
        cs = qm.blocks[l].linears[name].cheatsheet
        R = cs.dequantize()
        w = np.linalg.norm(R, axis=1).astype(np.float32) if weighted else np.ones(R.shape[0], np.float32)
        model.linears[(l, name)] = WeightedExact(lin, R, w)
    return model


def set_k(model, k):
    for lin in model.linears.values():
        lin.k_chunk = k


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=511)
    ap.add_argument("--calib-windows", type=int, default=4)
    args = ap.parse_args()
    weights, tok = load_gguf(fetch_smollm2())
    calib = tok.encode(data.text("emma"))
    text = tok.encode(data.text("persuasion"))
    protocol = PerplexityProtocol(context=512, stride=511, n_tokens=args.tokens)
    print(f"SmolLM2-135M-Instruct (reference = dequantized GGUF), 3-bit, exact per-chunk top-k, "
          f"Persuasion first {args.tokens} tokens, calibration {args.calib_windows} Emma windows\n")
    print("| quantizer | k_chunk | score |x| | score |x|*||R_i|| |")
    print("|---|---|---|---|")
    for method in ("rtn", "awq"):
        qm = pipeline.quantize_model(weights, calib, bits=3, method=method, n_windows=args.calib_windows)
        plain, weighted = wrap(qm, False), wrap(qm, True)
        for k in (0, 8, 16):
            set_k(plain, k)
            set_k(weighted, k)
            res = evaluate(LlamaModel(weights), [EvalConfig("x", plain), EvalConfig("xw", weighted)], text,
                           protocol, progress=False)
            p = {r["name"]: r["perplexity"] for r in res}
            print(f"| {method} | {k} | {p['x']:.3f} | {p['xw']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
