"""Recall of DecDEC's channel selection on the real activations of SmolLM2-135M-Instruct.

Every linear layer's input is recorded with LlamaModel's hook. Thresholds (the per-layer envelope
of sorted |x|, decdec.calibrate.ThresholdCalibrator) and the static channel ranking (largest mean
|x|) are calibrated on Emma; recall is measured on Persuasion tokens against each token's exact
per-chunk top-k (decdec.h's 'exact' rule):

    recall = |S(x) ∩ TopK(x)| / |TopK(x)|, averaged over tokens and the 30 layers of an input type.

SmolLM2 has four distinct linear inputs per layer (wq/wk/wv share one, w_gate/w_up share one):
attn-in (576), wo-in (576), mlp-in (576) and w_down-in (1536). The bucket selection is that of
DecLinear.select (layers built with decdec.layer.make_declinear from RTN weights: the selection
depends only on x and the thresholds); a vectorised NumPy twin, checked against DecLinear.select
on every measured token, does the bulk counting and the variants of the last table.

Usage: python bench/real_selection_recall.py [--calib-windows 8] [--eval-windows 2] [--context 512]
Prints Markdown (the tables of bench/results/real_selection_recall.md).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from decdec import data, formats
from decdec.calibrate import ThresholdCalibrator
from decdec.cheatsheet import build_cheatsheet
from decdec.fetch import fetch_smollm2
from decdec.layer import make_declinear
from decdec.loaders import load_gguf
from decdec.model import LlamaModel
from decdec.quantize import quantize_rtn

K_CHUNKS = (4, 8, 16, 32, 64)
# One representative linear per distinct input, the name the hook reports it under.
INPUTS = {"wq": "attn-in", "wo": "wo-in", "w_gate": "mlp-in", "w_down": "w_down-in"}
KEEP_SORTED = 128  # calibration keeps each token's 128 largest |x| (anchors need <= 96 of them)


def text_windows(tokens: np.ndarray, n_windows: int, context: int, bos_id: int) -> list:
    """Non-overlapping windows of BOS + (context - 1) text tokens from the start of the text."""
    step = context - 1
    if len(tokens) < n_windows * step:
        raise ValueError(f"text has {len(tokens)} tokens, {n_windows} windows need "
                         f"{n_windows * step}")
    return [np.concatenate([[bos_id], tokens[w * step:(w + 1) * step]]).astype(np.int64)
            for w in range(n_windows)]


def record_inputs(model: LlamaModel, windows: list, on_input) -> None:
    """Run every window, calling on_input(layer, input_name, X [T, d_in]) for the 4 inputs."""
    def hook(layer, name, x):
        if name in INPUTS:
            on_input(layer, name, x)
    for ids in windows:
        model.forward(ids, hook=hook)


class Calibration:
    """Per (layer, input): threshold envelope (max), mean |x| and the top-128 sorted |x| rows."""

    def __init__(self):
        self.cal, self.abs_sum, self.count, self.sorted_top = {}, {}, {}, {}

    def __call__(self, layer, name, X):
        key = (layer, name)
        if key not in self.cal:
            self.cal[key] = ThresholdCalibrator(X.shape[1])
            self.abs_sum[key] = np.zeros(X.shape[1], np.float64)
            self.count[key] = 0
            self.sorted_top[key] = []
        self.cal[key].update(X)
        A = np.abs(X.astype(np.float64))
        self.abs_sum[key] += A.sum(axis=0)
        self.count[key] += len(X)
        self.sorted_top[key].append(-np.sort(-A, axis=1)[:, :KEEP_SORTED].astype(np.float32))

    def thresholds(self, key):
        return self.cal[key].thresholds

    def mean_abs(self, key):
        return self.abs_sum[key] / self.count[key]

    def sorted_rows(self, key):
        return np.concatenate(self.sorted_top[key])


# ----------------------------------------------------------------------------- selection rules
def chunk_bounds(d_in: int, k_chunk: int):
    """[(lo, hi, quota)] per 1024-wide chunk (decdec.h)."""
    quotas = formats.chunk_quotas(d_in, k_chunk)
    return [(c * formats.CHUNK, min(d_in, (c + 1) * formats.CHUNK), q)
            for c, q in enumerate(quotas)]


def exact_mask(A: np.ndarray, k_chunk: int) -> np.ndarray:
    """Per-chunk top-k of |x| for every row of A [T, d_in] (ties to the lower index): bool mask."""
    T, d_in = A.shape
    mask = np.zeros((T, d_in), bool)
    rows = np.arange(T)[:, None]
    for lo, hi, q in chunk_bounds(d_in, k_chunk):
        if q:
            order = np.argsort(-A[:, lo:hi], axis=1, kind="stable")[:, :q]
            mask[rows, lo + order] = True
    return mask


def bucket_mask(A: np.ndarray, floors: np.ndarray, k_chunk: int) -> np.ndarray:
    """decdec.h's bucket rule with the given 32 floors, vectorised: per chunk, whole buckets from
    0 upwards, the cut bucket's lowest channel indices first. bool mask [T, d_in]."""
    T, d_in = A.shape
    bucket = np.full((T, d_in), formats.NUM_BUCKETS, np.int64)
    for i in range(formats.NUM_BUCKETS - 1, -1, -1):  # smallest qualifying i wins
        bucket[A >= floors[i]] = i
    mask = np.zeros((T, d_in), bool)
    rows = np.arange(T)[:, None]
    for lo, hi, q in chunk_bounds(d_in, k_chunk):
        if q:
            # sorting by (bucket, channel index) lists exactly the order in which the rule takes
            key = bucket[:, lo:hi] * (hi - lo) + np.arange(hi - lo)
            order = np.argsort(key, axis=1)[:, :q]
            mask[rows, lo + order] = True
    return mask


def static_mask(mean_abs: np.ndarray, T: int, k_chunk: int) -> np.ndarray:
    """The same channels for every token: per chunk, the quota with the largest calibration
    mean |x|."""
    d_in = len(mean_abs)
    sel = np.zeros(d_in, bool)
    for lo, hi, q in chunk_bounds(d_in, k_chunk):
        if q:
            sel[lo + np.argsort(-mean_abs[lo:hi], kind="stable")[:q]] = True
    return np.broadcast_to(sel, (T, d_in))


def recall(mask: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-token |S ∩ TopK| / |TopK|."""
    return (mask & truth).sum(axis=1) / truth.sum(axis=1)


def mass(mask: np.ndarray, truth: np.ndarray, A: np.ndarray) -> np.ndarray:
    """Per-token sum of |x| over S divided by the same sum over the exact top-k."""
    return (A * mask).sum(axis=1) / (A * truth).sum(axis=1)


# ----------------------------------------------------------------------------- variants
VARIANT_RULES = ("envelope (max)", "q99", "q90", "median")


def variant_thresholds(cal: Calibration, key, rule: str) -> np.ndarray:
    """Another statistic over calibration tokens of the r-th largest |x| (r < 128; the anchors
    a = t[0], b = t[k-1] never need more). A drop-in thresholds array: the kernel is unchanged.
    Quantiles of rank-wise values of descending rows are themselves non-increasing."""
    if rule == "envelope (max)":
        return cal.thresholds(key)[:KEEP_SORTED]
    S = cal.sorted_rows(key)
    q = 0.5 if rule == "median" else float(rule[1:]) / 100
    return np.quantile(S, q, axis=0).astype(np.float32)


def measure(weights, calib: Calibration, evals: dict):
    """Main table rows and the DecLinear.select cross-check counts."""
    n_layers = weights.config.n_layers
    rows, checked, mismatches = {}, 0, 0
    for name, label in INPUTS.items():
        d_in = evals[(0, name)].shape[1]
        stats = {k: {"rb": [], "mb": [], "rs": [], "ms": []} for k in K_CHUNKS}
        for layer in range(n_layers):
            key = (layer, name)
            X = evals[key]
            A = np.abs(X)
            t = calib.thresholds(key)
            # The layer the model would run (3-bit RTN, group 64); the selection reads only x and
            # the thresholds, so a cheap one-candidate cheatsheet does.
            W = weights.layers[layer][name]
            qw = quantize_rtn(W, 3, 64)
            dl = make_declinear(qw, build_cheatsheet(W, qw.dequantize(), candidates=1), t)
            for k in K_CHUNKS:
                dl.k_chunk = k
                truth = exact_mask(A, k)
                mb = bucket_mask(A, formats.bucket_floors(t, sum(formats.chunk_quotas(d_in, k))), k)
                for tk in range(len(X)):
                    checked += 1
                    sel = np.sort(dl.select(X[tk]))
                    mismatches += not np.array_equal(sel, np.flatnonzero(mb[tk]))
                ms = static_mask(calib.mean_abs(key), len(X), k)
                s = stats[k]
                s["rb"].append(recall(mb, truth).mean()); s["mb"].append(mass(mb, truth, A).mean())
                s["rs"].append(recall(ms, truth).mean()); s["ms"].append(mass(ms, truth, A).mean())
        for k in K_CHUNKS:
            s = stats[k]
            rows[(name, k)] = (label, d_in, k, sum(formats.chunk_quotas(d_in, k)),
                               np.mean(s["rb"]), int(np.argmin(s["rb"])), min(s["rb"]),
                               np.mean(s["mb"]), np.mean(s["rs"]), np.mean(s["ms"]))
    return rows, checked, mismatches


def measure_variants(n_layers, calib: Calibration, evals: dict):
    table = {}
    for name in INPUTS:
        ths = {(layer, r): variant_thresholds(calib, (layer, name), r)
               for layer in range(n_layers) for r in VARIANT_RULES}
        for k in K_CHUNKS:
            for r in VARIANT_RULES:
                vals = []
                for layer in range(n_layers):
                    A = np.abs(evals[(layer, name)])
                    kt = sum(formats.chunk_quotas(A.shape[1], k))
                    mb = bucket_mask(A, formats.bucket_floors(ths[(layer, r)], kt), k)
                    vals.append(recall(mb, exact_mask(A, k)).mean())
                table[(name, k, r)] = np.mean(vals)
    return table


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--eval-windows", type=int, default=2)
    ap.add_argument("--context", type=int, default=512)
    args = ap.parse_args()

    t0 = time.time()
    weights, tok = load_gguf(fetch_smollm2())
    model = LlamaModel(weights)
    bos = weights.config.bos_id
    emma = tok.encode(data.text("emma"))
    pers = tok.encode(data.text("persuasion"))
    calib = Calibration()
    record_inputs(model, text_windows(emma, args.calib_windows, args.context, bos), calib)
    recorded = {}
    record_inputs(model, text_windows(pers, args.eval_windows, args.context, bos),
                  lambda layer, name, X: recorded.setdefault((layer, name), []).append(X.copy()))
    evals = {k: np.concatenate(v) for k, v in recorded.items()}
    t_record = time.time() - t0

    rows, checked, mismatches = measure(weights, calib, evals)
    n_eval = len(evals[(0, "wq")])
    print(f"SmolLM2-135M-Instruct (dequantized Q4_1 GGUF = the reference model). Calibration: "
          f"{args.calib_windows} Emma windows x {args.context} positions (BOS + {args.context - 1} "
          f"text tokens; {args.calib_windows * args.context} tokens). Evaluation: "
          f"{args.eval_windows} Persuasion windows of the same form ({n_eval} tokens), 30 layers "
          f"per input type. Recall = |S ∩ TopK| / |TopK| against the exact per-chunk top-k, mean "
          f"over tokens and layers; |x|-mass = sum of |x| over S / the same over TopK. Static = "
          f"the per-chunk quota of channels with the largest calibration mean |x|, the same for "
          f"every token. DecLinear.select agreed with the NumPy twin on {checked - mismatches}"
          f"/{checked} (token, layer, k_chunk) selections.\n")
    print("| input | d_in | k_chunk | channels/token | bucket recall | worst layer (its recall) | "
          "bucket |x|-mass | static recall | static |x|-mass |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in INPUTS:
        for k in K_CHUNKS:
            label, d_in, k, n, rb, wl, worst, mb, rs, ms = rows[(name, k)]
            print(f"| {label} | {d_in} | {k} | {n} | {rb:.3f} | {wl} ({worst:.3f}) | {mb:.3f} | "
                  f"{rs:.3f} | {ms:.3f} |")
    if mismatches:
        raise SystemExit(f"DecLinear.select disagreed with the NumPy twin on {mismatches} "
                         "selections")

    table = measure_variants(weights.config.n_layers, calib, evals)
    print("\nBucket-rule recall when the thresholds array holds another statistic over calibration "
          "tokens of the r-th largest |x| (same kernel, same floors formula; 'envelope (max)' is "
          "ThresholdCalibrator's):\n")
    print("| input | k_chunk | " + " | ".join(VARIANT_RULES) + " |")
    print("|---|---|" + "---|" * len(VARIANT_RULES))
    for name, label in INPUTS.items():
        for k in K_CHUNKS:
            cells = " | ".join(f"{table[(name, k, r)]:.3f}" for r in VARIANT_RULES)
            print(f"| {label} | {k} | {cells} |")
    print(f"\n(recording {t_record:.0f} s, total {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
