"""Quality of a quantized model: perplexity, KL divergence to the reference, top-1 agreement.

Perplexity protocol (PerplexityProtocol; defaults used for every number decdec reports):
  * The text is tokenized without special tokens; the first `n_tokens` text tokens are evaluated.
  * Windows of `context` positions: one BOS token (the model's bos_id) followed by up to
    context - 1 text tokens. Window j starts at text token j * stride. With stride = context - 1
    (the default) windows do not overlap and every text token is scored exactly once, the first of
    each window predicted from BOS alone. With a smaller stride each window scores only the tokens
    no earlier window scored (each then sees at least context - 1 - stride tokens of history).
  * Perplexity = exp(mean negative log-likelihood of the scored tokens), natural log.
  * KL = mean over the same positions of KL(P_reference || P_model) of the next-token distribution
    (nats); top-1 agreement = fraction of positions where both models' argmax agree.
DecDEC runs exactly as at decode: DecLinear.forward on a [T, d_in] block compensates every row
(token) on its own from that row's activations, so one windowed pass gives the logits of
token-by-token decoding (a KV-cache replay gives the same logits; tests/test_evaluate.py checks).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from .fileio import atomic_write_text


@dataclass(frozen=True)
class PerplexityProtocol:
    context: int = 512
    stride: int = 511
    n_tokens: int = 2044

    def __post_init__(self):
        if self.context < 2:
            raise ValueError(f"context must be >= 2, got {self.context}")
        if not 1 <= self.stride <= self.context - 1:
            raise ValueError(f"stride must lie in [1, context - 1 = {self.context - 1}], got {self.stride}")
        if self.n_tokens < 1:
            raise ValueError(f"n_tokens must be >= 1, got {self.n_tokens}")

    def describe(self) -> str:
        return (f"first {self.n_tokens} text tokens; windows of {self.context} positions (BOS + "
                f"{self.context - 1} text tokens), stride {self.stride}; every text token scored once")


def eval_windows(text_tokens, protocol: PerplexityProtocol, bos_id: int):
    """[(window ids with BOS first, index of the first scored target)] covering the first n_tokens.

    Targets of a window are its ids[1:]; target t is scored iff t >= first_scored.
    """
    toks = np.asarray(text_tokens, dtype=np.int64).reshape(-1)
    if bos_id is None:
        raise ValueError("the model has no BOS token id; the perplexity protocol needs one")
    n = min(protocol.n_tokens, len(toks))
    if n < 1:
        raise ValueError("no text tokens to evaluate")
    toks = toks[:n]
    L = protocol.context - 1
    out = []
    scored_until = 0
    start = 0
    while scored_until < n:
        chunk = toks[start:start + L]
        ids = np.concatenate([[bos_id], chunk]).astype(np.int64)
        first = scored_until - start
        out.append((ids, first))
        scored_until = start + len(chunk)
        start += protocol.stride
    return out


def log_softmax(logits) -> np.ndarray:
    a = np.asarray(logits, dtype=np.float64)
    a = a - a.max(axis=-1, keepdims=True)
    return a - np.log(np.exp(a).sum(axis=-1, keepdims=True))


@dataclass
class EvalConfig:
    """One row of an evaluation: a model plus the DecDEC setting applied before running it.

    model None means the reference model itself.  k_chunk None runs the model as it is; otherwise
    the row runs pipeline.with_compensation(model, k_chunk, selection), a copy sharing the weights,
    and the model itself is never changed."""
    name: str
    model: object = None
    k_chunk: int | None = None
    selection: str | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class _Acc:
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    n: int = 0
    seconds: float = 0.0


def evaluate(reference, configs, text_tokens, protocol: PerplexityProtocol | None = None,
             bos_id: int | None = None, progress: bool = True) -> list[dict]:
    """Perplexity, KL to the reference and top-1 agreement for each config, window by window.

    The reference runs once per window; every config runs on the same windows. Returns one dict per
    config: name, perplexity, kl, top1, n_tokens, seconds, plus the config's meta.
    """
    from .pipeline import with_compensation
    protocol = protocol or PerplexityProtocol()
    bos_id = reference.config.bos_id if bos_id is None else bos_id
    windows = eval_windows(text_tokens, protocol, bos_id)
    # each config's model at its own settings, sharing the layers' weights: the caller's models are
    # never changed, and configs sharing one model (3-bit at k_chunk 0, 8, 16) cannot disturb each other
    models = [cfg.model if cfg.model is None or cfg.k_chunk is None
              else with_compensation(cfg.model, cfg.k_chunk, cfg.selection or "bucket") for cfg in configs]
    accs = [_Acc() for _ in configs]
    ref_acc = _Acc()
    from tqdm.auto import tqdm
    bar = tqdm(total=len(windows) * (len(configs) + 1), desc="evaluate", disable=not progress)
    for ids, first in windows:
        targets = ids[1:][first:]
        rows = np.arange(first, len(ids) - 1)
        t0 = time.perf_counter()
        ref_lp = log_softmax(reference.forward(ids)[:-1][first:])
        ref_acc.seconds += time.perf_counter() - t0
        ref_p = np.exp(ref_lp)
        ref_top = ref_lp.argmax(axis=1)
        ref_acc.nll -= float(ref_lp[np.arange(len(rows)), targets].sum())
        ref_acc.n += len(rows)
        bar.update(1)
        for cfg, model, acc in zip(configs, models, accs):
            if model is None:
                lp = ref_lp
                dt = 0.0
            else:
                t0 = time.perf_counter()
                lp = log_softmax(model.forward(ids)[:-1][first:])
                dt = time.perf_counter() - t0
            acc.nll -= float(lp[np.arange(len(rows)), targets].sum())
            acc.kl += float((ref_p * (ref_lp - lp)).sum())
            acc.agree += int((lp.argmax(axis=1) == ref_top).sum())
            acc.n += len(rows)
            acc.seconds += dt
            bar.set_postfix_str(cfg.name[:40])
            bar.update(1)
    bar.close()
    results = []
    for cfg, acc in zip(configs, accs):
        results.append({"name": cfg.name, **cfg.meta, "perplexity": math.exp(acc.nll / acc.n),
                        "kl": acc.kl / acc.n, "top1": acc.agree / acc.n, "n_tokens": acc.n,
                        "seconds": round(acc.seconds, 2)})
    return results


def reference_perplexity(reference, text_tokens, protocol=None, bos_id=None, progress=False) -> float:
    r = evaluate(reference, [EvalConfig("reference")], text_tokens, protocol, bos_id, progress)
    return r[0]["perplexity"]


# ----------------------------------------------------------------------------------- reporting
def gap_closed(ppl_quant: float, ppl_dec: float, ppl_ref: float) -> float:
    """Fraction of the perplexity gap (quantized vs reference) that compensation closes."""
    gap = ppl_quant - ppl_ref
    if gap <= 0:
        return float("nan")
    return (ppl_quant - ppl_dec) / gap


def summarize_sweep(records: list[dict]) -> list[dict]:
    """Per quantizer and selection: gap closed at k_chunk 8 and 16, and the smallest k_chunk at
    which 3-bit + DecDEC beats plain 3.5-bit (None if none in the sweep)."""
    ref = next(r for r in records if r["quantizer"] == "reference")["perplexity"]
    out = []
    for q in sorted({r["quantizer"] for r in records} - {"reference"}):
        def get(bits, k, sel=None):
            for r in records:
                if r["quantizer"] == q and r["bits"] == bits and r["k_chunk"] == k and (
                        k == 0 or r["selection"] == sel):
                    return r
            return None
        base3, base35 = get(3, 0), get(3.5, 0)
        for sel in ("bucket", "exact"):
            if base3 is None:
                continue
            row = {"quantizer": q, "selection": sel, "ppl_ref": ref, "ppl_3bit": base3["perplexity"],
                   "ppl_3.5bit": base35["perplexity"] if base35 else None}
            for k in (8, 16):
                r = get(3, k, sel)
                row[f"ppl_3bit_k{k}"] = r["perplexity"] if r else None
                row[f"gap_closed_k{k}"] = gap_closed(base3["perplexity"], r["perplexity"], ref) if r else None
            cross = None
            if base35:
                for k in sorted({r["k_chunk"] for r in records if r["k_chunk"] > 0}):
                    r = get(3, k, sel)
                    if r and r["perplexity"] < base35["perplexity"]:
                        cross = k
                        break
            row["beats_3.5bit_from_k"] = cross
            out.append(row)
    return out


def _fmt(x, nd=3):
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def sweep_markdown(records: list[dict], meta: dict) -> str:
    lines = ["# Quality sweep: SmolLM2-135M-Instruct, DecDEC on the CPU", ""]
    for k, v in meta.items():
        lines.append(f"- {k}: {v}")
    lines += ["", "| quantizer | bits | selection | k_chunk | perplexity | KL (nats) | top-1 | "
              "residual bytes / token |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['quantizer']} | {r['bits']} | {r['selection']} | {r['k_chunk']} | "
                     f"{r['perplexity']:.3f} | {r['kl']:.4f} | {r['top1']:.4f} | "
                     f"{r.get('residual_bytes_per_token', 0):,} |")
    lines += ["", "## Gap closed by DecDEC (3-bit)", "",
              "| quantizer | selection | ref | 3-bit | 3.5-bit | 3-bit k8 | closed k8 | 3-bit k16 | "
              "closed k16 | 3-bit+DecDEC beats 3.5-bit from k_chunk |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summarize_sweep(records):
        lines.append(f"| {s['quantizer']} | {s['selection']} | {s['ppl_ref']:.3f} | {s['ppl_3bit']:.3f} | "
                     f"{_fmt(s['ppl_3.5bit'])} | {_fmt(s['ppl_3bit_k8'])} | {_fmt(s['gap_closed_k8'], 2)} | "
                     f"{_fmt(s['ppl_3bit_k16'])} | {_fmt(s['gap_closed_k16'], 2)} | "
                     f"{_fmt(s['beats_3.5bit_from_k'])} |")
    return "\n".join(lines) + "\n"


def sweep_plot(records: list[dict], path) -> None:
    """Perplexity and KL against k_chunk, one line per quantizer / bits / selection (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ref = next(r for r in records if r["quantizer"] == "reference")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = {(q, b): c for (q, b), c in zip(
        [(q, b) for q in ("rtn", "awq") for b in (3, 3.5, 4)],
        ["tab:red", "tab:orange", "tab:olive", "tab:blue", "tab:purple", "tab:green"])}
    for (q, b), color in colors.items():
        for sel, style in (("bucket", "-"), ("exact", "--")):
            pts = sorted((r["k_chunk"], r["perplexity"], r["kl"]) for r in records
                         if r["quantizer"] == q and r["bits"] == b and (r["k_chunk"] == 0 or r["selection"] == sel))
            if len(pts) < 2:
                continue
            ks = [max(p[0], 1) if False else p[0] for p in pts]
            xs = [k if k > 0 else 1 for k in ks]  # k 0 drawn at 1 on the log axis (marked)
            axes[0].plot(xs, [p[1] for p in pts], style, color=color, marker="o", ms=3,
                         label=f"{q.upper()} {b}-bit {sel}")
            axes[1].plot(xs, [p[2] for p in pts], style, color=color, marker="o", ms=3)
    axes[0].axhline(ref["perplexity"], color="k", lw=1, label="reference (dequantized Q4_1)")
    for ax, name in zip(axes, ("perplexity", "KL to reference (nats)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8, 16, 32, 64])
        ax.set_xticklabels(["0", "2", "4", "8", "16", "32", "64"])
        ax.set_xlabel("k_chunk (channels per 1024, per token)")
        ax.set_ylabel(name)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("DecDEC on SmolLM2-135M-Instruct (CPU), Pride and Prejudice")
    fig.tight_layout()
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_sweep(records: list[dict], meta: dict, out_dir) -> dict:
    """bench/results/quality.{md,json,png} (each written atomically). Returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"quality.{ext}") for ext in ("md", "json", "png")}
    atomic_write_text(paths["json"], json.dumps({"meta": meta, "records": records,
                                                  "summary": summarize_sweep(records)}, indent=1) + "\n")
    atomic_write_text(paths["md"], sweep_markdown(records, meta))
    sweep_plot(records, paths["png"])
    return paths
