"""Issue 11, item 1, first experiment: does a non-uniform (SqueezeLLM-style) 3-bit base beat uniform
AWQ 3-bit on SmolLM2 before DecDEC?  Dense CPU evaluation of the dequantized base weights only (no
format, no kernel yet): per output channel, 2^bits centroids fitted by sensitivity-weighted 1-D
k-means, the weight of input channel j being diag(X^T X)_j from the calibration activations (the
second moment of the input it multiplies: the output error of a per-weight perturbation dw_j is
dw_j^2 * sum_t x_j^2 when channels are uncorrelated, the diagonal of AWQ's own error term).

    python bench/nonuniform_experiment.py [--bits 3] [--eval-text persuasion] [--awq-artifact DIR]

Reference = SmolLM2's dequantized GGUF Q4_1 weights. Perplexity protocol of the sweep (BOS + 511,
stride 511, first 1533 tokens). Prints one row per base and writes --json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decdec import data  # noqa: E402
from decdec.evaluate import EvalConfig, PerplexityProtocol, evaluate  # noqa: E402
from decdec.fileio import atomic_write_text  # noqa: E402
from decdec.model import LINEAR_NAMES, LlamaModel, LlamaWeights  # noqa: E402

INPUT_OF = {"wq": "attn_in", "wk": "attn_in", "wv": "attn_in", "wo": "o_in", "w_gate": "ffn_in",
            "w_up": "ffn_in", "w_down": "down_in"}


def weighted_kmeans_rows(W: np.ndarray, h: np.ndarray, k: int, iters: int = 20):
    """Per row of W [R, N]: k centroids minimising sum_j h_j (w_j - c_{q_j})^2 (h [N] >= 0).
    Lloyd's iterations vectorised over rows; init at weighted quantiles of each row.  Returns
    (centroids fp16 [R, k] sorted, codes uint8 [R, N]), codes = nearest fp16 centroid."""
    return weighted_kmeans_rows_h(W, np.broadcast_to(np.asarray(h, dtype=np.float64)[None, :], W.shape), k, iters)


def sparse_mask(W: np.ndarray, h: np.ndarray, frac: float) -> np.ndarray:
    """Dense-and-sparse split (SqueezeLLM): the `frac` share of a layer's weights with the largest
    sensitivity-weighted energy h_j w_ij^2 (ties: lower flat index) kept exact; bool mask [R, N]."""
    n = int(round(frac * W.size))
    mask = np.zeros(W.shape, bool)
    if n <= 0:
        return mask
    e = (h.astype(np.float64)[None, :] * W.astype(np.float64) ** 2).ravel()
    keep = np.argsort(-e, kind="stable")[:n]
    mask.ravel()[keep] = True
    return mask


def fit_nonuniform(W: np.ndarray, h: np.ndarray, k: int, group: int = 0, sparse_frac: float = 0.0):
    """Dequantized weights of the non-uniform base: per output channel (group 0) or per `group`
    consecutive inputs of a row, k centroids by weighted k-means over the dense part; the sparse
    part (sparse_mask) is kept exact in fp16 and has zero weight in the fit.  Returns (W_hat float32,
    objective over the dense part, bits per weight: codes + fp16 tables + sparse fp16 value and int32
    index per kept weight)."""
    R, N = W.shape
    g = N if group <= 0 else group
    if N % g:
        raise ValueError(f"group {g} does not divide {N}")
    mask = sparse_mask(W, h, sparse_frac)
    Wg = W.reshape(R * (N // g), g)
    hg = np.broadcast_to(h.reshape(1, N // g, g), (R, N // g, g)).reshape(R * (N // g), g)
    wt = np.where(mask.reshape(Wg.shape), 0.0, hg)
    C16, codes = weighted_kmeans_rows_h(Wg, wt, k)
    What = np.take_along_axis(C16.astype(np.float32), codes.astype(np.int64), 1).reshape(R, N)
    obj = float((np.where(mask, 0.0, h[None, :]) * (W - What) ** 2).sum())
    What = np.where(mask, W.astype(np.float16).astype(np.float32), What)
    bits = np.log2(k) + 16 * k / g + mask.mean() * (16 + 32)
    return What, obj, float(bits)


def weighted_kmeans_rows_h(W: np.ndarray, H: np.ndarray, k: int, iters: int = 20):
    """weighted_kmeans_rows with a weight per element (H [R, N] >= 0) instead of per column."""
    W = W.astype(np.float32)
    R, N = W.shape
    H = np.maximum(H.astype(np.float64), 1e-12)
    order = np.argsort(W, axis=1)
    Ws = np.take_along_axis(W, order, 1)
    cw = np.cumsum(np.take_along_axis(H, order, 1), axis=1)
    cw /= cw[:, -1:]
    qs = (np.arange(k) + 0.5) / k
    idx = np.stack([np.argmax(cw >= q, axis=1) for q in qs], axis=1)
    C = np.take_along_axis(Ws, idx, 1).astype(np.float64)
    base = (np.arange(R) * k)[:, None]
    wh = (W * H).ravel()
    hh = H.ravel()
    for _ in range(iters):
        C.sort(axis=1)
        mids = ((C[:, 1:] + C[:, :-1]) / 2).astype(np.float32)
        codes = (W[:, :, None] > mids[:, None, :]).sum(-1)
        flat = (base + codes).ravel()
        num = np.bincount(flat, weights=wh, minlength=R * k).reshape(R, k)
        den = np.bincount(flat, weights=hh, minlength=R * k).reshape(R, k)
        C = np.where(den > 0, num / np.maximum(den, 1e-300), C)
    C16 = np.sort(C, axis=1).astype(np.float16)
    Cf = C16.astype(np.float32)
    codes = np.abs(W[:, :, None] - Cf[:, None, :]).argmin(-1).astype(np.uint8)
    return C16, codes


def objective(W, h, C16, codes):
    return float((h[None, :] * (W - np.take_along_axis(C16.astype(np.float32), codes.astype(np.int64), 1)) ** 2).sum())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--eval-text", default="persuasion")
    p.add_argument("--eval-tokens", type=int, default=1533)
    p.add_argument("--calib-windows", type=int, default=8)
    p.add_argument("--awq-artifact", default=None, help="a saved 3-bit AWQ artifact to compare with")
    p.add_argument("--json", default="bench/results/nonuniform_experiment.json")
    p.add_argument("--variants", default="row",
                   help="comma list of non-uniform variants: row (one table per output channel), "
                        "sparseF (row tables + dense-and-sparse with F percent exact, e.g. sparse0.5), "
                        "gG (a table per G inputs, e.g. g192), gG+sparseF")
    p.add_argument("--no-uniform", action="store_true", help="skip the RTN / AWQ rows")
    args = p.parse_args(argv)
    from decdec import pipeline
    from decdec.fetch import fetch_smollm2
    from decdec.loaders import load_gguf
    from decdec.quantize import quantize_rtn
    weights, tok = load_gguf(fetch_smollm2(verbose=False))
    c = weights.config
    t0 = time.time()
    windows = pipeline.calibration_windows(tok.encode(data.text("emma")), args.calib_windows)
    stats = pipeline.collect_gram_stats(LlamaModel(weights), windows, progress=False)
    t_stats = time.time() - t0
    k = 1 << args.bits

    def with_layers(fn):
        layers = []
        for l, layer in enumerate(weights.layers):
            d = dict(layer)
            for name in LINEAR_NAMES:
                d[name] = fn(l, name, layer[name])
            layers.append(d)
        return LlamaWeights(c, weights.tok_embeddings, layers, weights.norm, weights.lm_head)

    configs, fits = [], {}
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        group, frac = 0, 0.0
        for part in variant.split("+"):
            if part.startswith("g"):
                group = int(part[1:])
            elif part.startswith("sparse"):
                frac = float(part[len("sparse"):]) / 100
            elif part != "row":
                raise SystemExit(f"unknown variant part {part!r} in {variant!r}")
        t1 = time.time()
        bits_w, n_w = [], []

        def nonuniform(l, name, W, group=group, frac=frac):
            h = np.diag(stats.layer(l)[INPUT_OF[name]][0])
            g = int(np.gcd(W.shape[1], group)) if group else 0   # group, or its largest divisor of d_in
            What, _, b = fit_nonuniform(W, h, k, g, frac)
            bits_w.append(b * W.size)
            n_w.append(W.size)
            return What
        nu = with_layers(nonuniform)
        fits[variant] = {"seconds": time.time() - t1, "bits_per_weight": sum(bits_w) / sum(n_w)}
        label = (f"non-uniform {args.bits}-bit, " + (f"a table per {group} inputs" if group else "a table per output channel")
                 + (f", {100 * frac:g}% sparse exact" if frac else "") + f" ({fits[variant]['bits_per_weight']:.2f} bits/weight)")
        configs.append(EvalConfig(label, LlamaModel(nu)))
    t_nu = sum(f["seconds"] for f in fits.values())
    if not args.no_uniform:
        rtn = with_layers(lambda l, n, W: quantize_rtn(W, args.bits, 128).dequantize())
        configs.append(EvalConfig(f"RTN {args.bits}-bit g128", LlamaModel(rtn)))
    if args.awq_artifact:
        from decdec import artifacts
        qm = artifacts.load(args.awq_artifact)
        configs.append(EvalConfig(f"AWQ {qm.label()} (artifact, dense)", LlamaModel(qm.float_weights())))
    protocol = PerplexityProtocol(512, 511, args.eval_tokens)
    res = evaluate(LlamaModel(weights), configs, tok.encode(data.text(args.eval_text)), protocol,
                   bos_id=c.bos_id, progress=False)
    print(f"# SmolLM2-135M-Instruct (reference = dequantized GGUF Q4_1), {args.eval_text}, {protocol.describe()}")
    print(f"# calibration stats {t_stats:.0f} s; non-uniform fit {t_nu:.0f} s on this machine")
    for r in res:
        print(f"{r['name']:<60} ppl {r['perplexity']:8.3f}  KL {r['kl']:.4f}  top-1 {r['top1']:.3f}")
    atomic_write_text(args.json, json.dumps({"eval_text": args.eval_text, "protocol": protocol.describe(),
                                             "bits": args.bits, "fit_seconds": t_nu, "fits": fits, "results": res},
                                            indent=1, default=str))


if __name__ == "__main__":
    main()
