"""The GPU engine: a whole Llama-family model decoding on one GPU with DecDEC (no torch).

`GpuEngine(qm)` uploads a QuantizedModel (decdec.pipeline / decdec.artifacts): every projection
becomes a CUDA DecLinear (its residual cheatsheet pinned in host memory, held once), the
embeddings and the head stay fp16 on the GPU (the head is NOT quantized: an fp16 GEMV), norms
and RoPE tables fp32.  The C engine (csrc/cuda/dd_cuda_engine.h) captures one decode step as a
CUDA graph and replays it per token: position, tokens and scores live in device memory, so no
Python runs per layer or per token inside `decode(n)`.

  prefill   the prompt's rows at once, without compensation (dequantised weights on tensor cores),
  decode    one token per step with compensation, each token compensated on its own,
  scoring   teacher-forced decode: the GPU perplexity of a text is the CPU protocol's
            (decdec.evaluate.eval_windows), every window decoded token by token from BOS.

Settings: `set_config(EngineConfig)` (decdec.engine_tune) or `set_k_chunk(k, n_tb)`; the graph is
captured again at the next decode.  One call at a time per engine (a second thread gets
RuntimeError).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from . import formats
from .model import LINEAR_NAMES, rope_inv_freq

# the engine's projection order per block (dd_cuda_engine.h DD_LIN_*), and the fused order
# (DD_FLIN_*): q|k|v and gate|up stacked into one layer each
ENGINE_ORDER = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
FUSED_ORDER = (("wq", "wk", "wv"), ("wo",), ("w_gate", "w_up"), ("w_down",))
MODULE_OF = {"wq": "qkv", "wk": "qkv", "wv": "qkv", "wo": "o", "w_gate": "gate_up",
             "w_up": "gate_up", "w_down": "down"}
assert set(ENGINE_ORDER) == set(LINEAR_NAMES)


def stack_linears(parts):
    """One QuantizedLinear whose output rows are the parts' rows in order (q|k|v, gate|up).

    Exact for DecDEC when the parts share their input: packed weight rows, group scales / zeros
    and residual scales are per output row; the cheatsheet's row for input channel i is the
    parts' rows for i side by side; the thresholds (calibrated on that shared input) must be
    equal, else ValueError (the caller then keeps the parts separate)."""
    from .cheatsheet import Cheatsheet
    from .pipeline import QuantizedLinear
    from .quantize import QuantizedWeight
    q0 = parts[0].qweight
    for p in parts[1:]:
        if (p.qweight.bits, p.qweight.group_size, p.qweight.in_features) != (q0.bits, q0.group_size, q0.in_features):
            raise ValueError("stacked projections must share bits, group size and input width")
        if not np.array_equal(p.thresholds, parts[0].thresholds):
            raise ValueError("stacked projections must share their thresholds (the same input)")
    qw = QuantizedWeight(np.concatenate([p.qweight.qweight for p in parts]),
                         np.concatenate([p.qweight.scales for p in parts]),
                         np.concatenate([p.qweight.zeros for p in parts]),
                         q0.bits, q0.group_size, q0.in_features, sum(p.qweight.out_features for p in parts))
    cs = Cheatsheet(np.concatenate([p.cheatsheet.codes for p in parts], axis=1),
                    np.concatenate([p.cheatsheet.scales for p in parts]))
    return QuantizedLinear(qw, cs, parts[0].thresholds)


class EngineUnavailable(RuntimeError):
    """No CUDA build or no usable GPU: the GPU engine cannot run here."""


def _need_engine():
    from . import _C
    if not hasattr(_C, "Engine"):
        raise EngineUnavailable("the GPU engine needs a CUDA build of decdec (nvcc at build time); this "
                           "build has the CPU backend only")
    if not _C.cuda_available():
        raise EngineUnavailable("the GPU engine needs a usable CUDA GPU and driver; none was found")
    return _C


def rope_tables(config, max_seq: int):
    """cos, sin float32 [max_seq, head_dim / 2]: decdec.model's tables (float64 angles)."""
    from .model import rope_tables as model_rope_tables
    return model_rope_tables(rope_inv_freq(config), max_seq)


def _fp16(a, name):
    a = np.asarray(a, dtype=np.float32)
    big = np.abs(a).max() if a.size else 0.0
    if not np.isfinite(big) or big > 65504:
        raise ValueError(f"{name} does not fit fp16 (max |value| {big})")
    return np.ascontiguousarray(a.astype(np.float16))


@dataclass
class DecodeResult:
    tokens: np.ndarray        # the new tokens (int64), cut at EOS when asked
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int

    @property
    def tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else float("nan")


class GpuEngine:
    """A QuantizedModel on the GPU.  max_seq: KV-cache positions; max_prefill: prompt rows per
    prefill launch sequence (activations are sized for it)."""

    def __init__(self, qm, max_seq: int = 2048, max_prefill: int = 512, k_chunk: int = 0,
                 n_tb: int | None = None, layers=None, fused: bool | None = None):
        _C = _need_engine()
        from .layer import make_declinear
        c = qm.config
        if getattr(c, "attn_bias", False):
            raise ValueError("the GPU engine does not support attention biases (Qwen2-style q/k/v "
                             "biases) yet; run this model on the CPU")
        if max_seq < 2:
            raise ValueError(f"max_seq must be >= 2, got {max_seq}")
        max_prefill = int(min(max_prefill, max_seq))
        self.qm = qm
        self.config = c
        self.max_seq = int(max_seq)
        if layers is None:
            # fused (q|k|v and gate|up stacked: 4 DecLinear calls per block instead of 7) whenever
            # the parts share thresholds, as calibration on one input gives; fused=False forces 7
            stacked = None
            if fused is not False:
                try:
                    stacked = [[stack_linears([b.linears[n] for n in grp]) for grp in FUSED_ORDER]
                               for b in qm.blocks]
                except ValueError:
                    if fused:
                        raise
            self.fused = stacked is not None
            lins = ([ql for blk in stacked for ql in blk] if stacked is not None else
                    [b.linears[n] for b in qm.blocks for n in ENGINE_ORDER])
            layers = [make_declinear(ql.qweight, ql.cheatsheet, ql.thresholds, device="cuda") for ql in lins]
        else:
            self.fused = bool(fused) if fused is not None else len(layers) == 4 * c.n_layers
        self.layers = list(layers)
        self.slot_modules = (("qkv", "o", "gate_up", "down") if self.fused
                             else tuple(MODULE_OF[n] for n in ENGINE_ORDER))
        tied = qm.lm_head is qm.tok_embeddings
        embed = _fp16(qm.tok_embeddings, "tok_embeddings")
        head = None if tied else _fp16(qm.lm_head, "lm_head")
        norms = np.stack([np.asarray(v, dtype=np.float32) for b in qm.blocks
                          for v in (b.attn_norm, b.ffn_norm)] + [np.asarray(qm.norm, np.float32)])
        cos, sin = rope_tables(c, self.max_seq)
        cfg = {"dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
               "head_dim": c.head_dim, "ffn_dim": c.ffn_dim, "vocab": c.vocab_size,
               "norm_eps": float(c.norm_eps), "max_seq": self.max_seq, "max_prefill": max_prefill,
               "sliding_window": int(c.sliding_window or 0), "fused": int(self.fused)}
        self._e = _C.Engine(cfg, embed, head, np.ascontiguousarray(norms), cos, sin, self.layers)
        from . import gpu
        self.n_sm = gpu.sm_count(0)
        self.n_tb = int(n_tb) if n_tb is not None else formats.n_tb_default(self.n_sm)
        self.k_chunks = [0] * len(self.layers)
        self.set_k_chunk(k_chunk, self.n_tb)

    # ------------------------------------------------------------------ settings
    def set_k_chunk(self, k_chunk: int, n_tb: int | None = None) -> None:
        """One k_chunk for every projection."""
        self.set_k_chunks([int(k_chunk)] * len(self.layers), n_tb)

    def set_k_chunks(self, k_chunks, n_tb: int | None = None) -> None:
        n_tb = self.n_tb if n_tb is None else int(n_tb)
        k_chunks = [int(k) for k in k_chunks]
        self._e.set_runs(k_chunks, n_tb)
        self.k_chunks, self.n_tb = k_chunks, n_tb

    def set_config(self, config) -> None:
        """An EngineConfig (decdec.engine_tune): n_tb and k_chunk per module type."""
        ks = [int(config.k_chunk[m]) for _ in range(self.config.n_layers) for m in self.slot_modules]
        self.set_k_chunks(ks, config.n_tb)

    def set_reference(self, logp, start: int = 0) -> None:
        """Reference log-probabilities [rows, vocab] for positions [start, start + rows) (KL)."""
        self._e.set_reference(None if logp is None else np.ascontiguousarray(logp, dtype=np.float32), start)

    # ------------------------------------------------------------------ running
    def generate(self, prompt_ids, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, eos_id: int | None = None,
                 prefill: bool = True) -> DecodeResult:
        """Prefill the prompt (without compensation), then decode max_new_tokens with compensation
        (graph replays).  Sampling runs on the GPU: greedy at temperature 0, else top-p."""
        ids = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
        if ids.size < 1:
            raise ValueError("the prompt must hold at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if ids.size - 1 + max_new_tokens > self.max_seq:
            raise ValueError(f"{ids.size} prompt tokens + {max_new_tokens} new tokens do not fit "
                             f"max_seq = {self.max_seq} (GpuEngine(max_seq=...))")
        self._e.set_sampling(float(temperature), float(top_p), int(seed) & (2**64 - 1))
        self._e.reset(ids)
        t0 = time.perf_counter()
        if prefill and ids.size > 1:
            self._e.prefill(ids.size - 1)
        else:
            self._e.decode(ids.size - 1)
        self._e.read("tokens", 0, 1)      # synchronises: the prefill is done
        t1 = time.perf_counter()
        self._e.decode(max_new_tokens)
        new = self._e.read("tokens", ids.size, max_new_tokens).astype(np.int64)
        t2 = time.perf_counter()
        if eos_id is not None:
            hit = np.nonzero(new == eos_id)[0]
            if hit.size:
                new = new[:hit[0] + 1]
        return DecodeResult(new, int(ids.size), t1 - t0, t2 - t1, int(max_new_tokens))

    def score(self, ids, graph: bool = True) -> np.ndarray:
        """Teacher-forced decode of one window: nll[i] = -log p(ids[i + 1] | ids[:i + 1]), each
        position one compensated decode step (float64 [len(ids) - 1])."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not 2 <= ids.size <= self.max_seq + 1:
            raise ValueError(f"a scored window holds 2..max_seq + 1 = {self.max_seq + 1} tokens, got {ids.size}")
        self._e.reset(ids)
        self._e.decode(ids.size - 1, graph=graph)
        return self._e.read("nll", 0, ids.size - 1).astype(np.float64)

    def kl(self, n: int) -> np.ndarray:
        """KL(reference || model) per position of the last scored window (set_reference first)."""
        return self._e.read("kl", 0, n).astype(np.float64)

    def perplexity(self, text_tokens, protocol=None, bos_id: int | None = None) -> dict:
        """The CPU protocol (decdec.evaluate) by teacher-forced decode on the GPU."""
        from .evaluate import PerplexityProtocol, eval_windows
        protocol = protocol or PerplexityProtocol()
        bos_id = self.config.bos_id if bos_id is None else bos_id
        if protocol.context > self.max_seq + 1:
            raise ValueError(f"protocol context {protocol.context} exceeds max_seq + 1 = {self.max_seq + 1}")
        nll, per_window = [], []
        t0 = time.perf_counter()
        for ids, first in eval_windows(text_tokens, protocol, bos_id):
            w = self.score(ids)[first:]
            nll.append(w)
            per_window.append(float(np.exp(w.mean())))
        allnll = np.concatenate(nll)
        if not np.isfinite(allnll).all():
            raise RuntimeError("the GPU engine produced non-finite log-likelihoods")
        return {"perplexity": float(np.exp(allnll.mean())), "n_tokens": int(allnll.size),
                "per_window": per_window, "nll": allnll, "seconds": time.perf_counter() - t0}

    def logits(self) -> np.ndarray:
        return self._e.read("logits")

    def step_us(self, pos: int = 256, n: int = 64, reps: int = 7) -> float:
        """Median over reps of the mean time of one graph-replayed decode step at context pos."""
        if pos + n > self.max_seq:
            raise ValueError(f"pos + n = {pos + n} exceeds max_seq = {self.max_seq}")
        self._e.reset(np.zeros(1, np.int64))
        self._e.time_steps(pos, n)          # warm-up (and capture)
        t = [self._e.time_steps(pos, n) / n for _ in range(reps)]
        return float(np.median(t))

    # ------------------------------------------------------------------ accounting
    def bytes_per_step(self, pos: int) -> dict:
        """Bytes one decode step must read at context pos: quantized weights (decdec.h's rule),
        the fp16 head, one embedding row, norms, and the KV cache up to pos."""
        c = self.config
        lin = sum(int(ly.weight_nbytes) for ly in self.layers)
        head = 2 * c.vocab_size * c.dim
        kv = 2 * 2 * c.n_layers * c.n_kv_heads * c.head_dim * (pos + 1)
        other = 2 * c.dim + 4 * c.dim * (2 * c.n_layers + 1)
        return {"linears": int(lin), "head": int(head), "kv": int(kv), "other": int(other),
                "total": int(lin + head + kv + other)}

    @property
    def nbytes(self) -> int:
        return int(self._e.nbytes)

    @property
    def pos(self) -> int:
        return int(self._e.pos)


# ----------------------------------------------------------------------------- synthetic models
SHAPES = {
    "llama3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=14336,
                      vocab_size=128256, tie=False, rope_theta=500000.0),
    "llama3-70b-layers": dict(dim=8192, n_layers=8, n_heads=64, n_kv_heads=8, head_dim=128, ffn_dim=28672,
                              vocab_size=128256, tie=False, rope_theta=500000.0),
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, ffn_dim=1536,
                         vocab_size=49152, tie=True, rope_theta=100000.0),
}


def synthetic_model(shape: str | dict, bits: int = 3, group_size: int = 128, seed: int = 0,
                    n_layers: int | None = None, max_seq: int = 4096):
    """A QuantizedModel of real shapes with random packed weights (for speed measurements only:
    its text is noise).  Codes, residual codes and group parameters are drawn directly in the
    packed formats of decdec.h, so an 8B-shaped model builds in seconds, not hours."""
    from .cheatsheet import Cheatsheet
    from .model import LlamaConfig
    from .pipeline import QuantizedBlock, QuantizedLinear, QuantizedModel
    from .quantize import QuantizedWeight
    from .awq import LayerScales
    s = dict(SHAPES[shape]) if isinstance(shape, str) else dict(shape)
    if n_layers is not None:
        s["n_layers"] = int(n_layers)
    cfg = LlamaConfig(dim=s["dim"], n_layers=s["n_layers"], n_heads=s["n_heads"], n_kv_heads=s["n_kv_heads"],
                      head_dim=s["head_dim"], ffn_dim=s["ffn_dim"], vocab_size=s["vocab_size"], norm_eps=1e-5,
                      rope_theta=s["rope_theta"], tie_embeddings=s["tie"], max_seq_len=max_seq, bos_id=1, eos_id=2)
    rng = np.random.default_rng(seed)
    zero = float(2 ** (bits - 1))

    def linear(d_out, d_in):
        row = formats.qweight_row_bytes(d_in, bits)
        qweight = np.frombuffer(rng.bytes(d_out * row), dtype=np.uint8).reshape(d_out, row)
        n_groups = -(-d_in // group_size)
        # scale so that W_hat's entries have std ~ 1/sqrt(d_in) (activations stay O(1))
        sc = np.full((d_out, n_groups), 1.0 / (math.sqrt(d_in) * 2 ** (bits - 1) / math.sqrt(3)),
                     dtype=np.float16)
        zs = np.full((d_out, n_groups), zero, dtype=np.float16)
        qw = QuantizedWeight(qweight, sc, zs, bits, group_size, d_in, d_out)
        codes = np.frombuffer(rng.bytes(d_in * d_out // 2), dtype=np.uint8).reshape(d_in, d_out // 2).copy()
        # nibble 0 would be code -8, outside -7..7: lift it to 1
        lo, hi = codes & 0x0F, codes & 0xF0
        codes = (np.where(lo == 0, 1, lo) | np.where(hi == 0, 0x10, hi)).astype(np.uint8)
        cs = Cheatsheet(codes, np.full(d_out, sc[0, 0] * 0.25, dtype=np.float16))
        thr = np.sort(np.abs(rng.standard_normal(d_in)).astype(np.float32))[::-1].copy()
        return QuantizedLinear(qw, cs, thr)

    D, F = cfg.dim, cfg.ffn_dim
    Q, KV = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {"wq": (Q, D), "wk": (KV, D), "wv": (KV, D), "wo": (D, Q), "w_gate": (F, D), "w_up": (F, D),
              "w_down": (D, F)}
    blocks = []
    for _ in range(cfg.n_layers):
        lins = {name: linear(*shapes[name]) for name in ENGINE_ORDER}
        blocks.append(QuantizedBlock(bits, np.ones(D, np.float32), np.ones(D, np.float32),
                                     LayerScales.identity(cfg), lins))
    emb = (rng.standard_normal((cfg.vocab_size, D), dtype=np.float32) * 0.5)
    head = emb if cfg.tie_embeddings else rng.standard_normal((cfg.vocab_size, D), dtype=np.float32) * (1 / math.sqrt(D))
    return QuantizedModel(cfg, emb, np.ones(D, np.float32), head, blocks, "synthetic", group_size)


# ----------------------------------------------------------------------------- end-to-end tuning
def engine_measure(eng: GpuEngine, pos: int = 256, n: int = 32, reps: int = 3):
    """measure(config) -> us of one decode step of `eng` at `config`, timed on the real decode
    graph (captured again for every configuration; CUDA events; median of reps)."""
    def measure(config) -> float:
        eng.set_config(config)
        return eng.step_us(pos=pos, n=n, reps=reps)
    return measure


def coarse_kl(ref_top_idx, ref_top_logp, logp) -> np.ndarray:
    """KL(P || Q) per position of the distributions coarsened to the reference's top tokens plus one
    bucket for the rest: ref_top_idx / ref_top_logp [n, k] of P, logp [n, vocab] of Q.  Exact for
    the coarsened partition, a lower bound of the full KL (data processing); with k = 1024 of
    49152 tokens the lumped tail holds well under 1% of P's mass on SmolLM2."""
    p_top = np.exp(ref_top_logp.astype(np.float64))
    q_top = np.exp(np.take_along_axis(logp, ref_top_idx, -1))
    kl = (p_top * (ref_top_logp - np.log(np.maximum(q_top, 1e-300)))).sum(-1)
    p_rest = np.clip(1 - p_top.sum(-1), 0, 1)
    q_rest = np.clip(1 - q_top.sum(-1), 1e-300, 1)
    return kl + np.where(p_rest > 0, p_rest * (np.log(np.maximum(p_rest, 1e-300)) - np.log(q_rest)), 0.0)


def engine_kl(eng: GpuEngine, ids, ref_top_idx, ref_top_logp):
    """kl(config) -> mean coarse_kl(reference || engine) over the teacher-forced window `ids`
    (calibration text), every position one compensated decode step, logits read per step."""
    from .evaluate import log_softmax
    ids = np.asarray(ids, dtype=np.int64)
    n = ids.size - 1
    if ref_top_idx.shape[0] != n or ref_top_logp.shape != ref_top_idx.shape:
        raise ValueError(f"the reference rows must cover the {n} scored positions of ids")

    def kl(config) -> float:
        eng.set_config(config)
        eng._e.reset(ids)
        rows = []
        for _ in range(n):
            eng._e.decode(1)
            rows.append(eng.logits())
        return float(coarse_kl(ref_top_idx, ref_top_logp, log_softmax(np.stack(rows))).mean())
    return kl


def tune(eng: GpuEngine, target: float, mode: str = "latency", kl_ids=None, ref_top=None,
         pos: int = 256, n: int = 32, reps: int = 3, max_seconds: float = 120, base_us=None):
    """The end-to-end tuner (decdec.engine_tune) on this engine's decode graph; mode 'latency'
    (the paper's) or 'quality' (KL per microsecond, needs kl_ids and ref_top)."""
    from . import engine_tune as T
    from . import gpu
    measure = engine_measure(eng, pos, n, reps)
    shapes = T.layer_shapes_of(eng.config)
    choices = gpu.n_tb_choices(eng.n_sm)
    if mode == "latency":
        r = T.tune_latency(measure, choices, target, base_us=base_us, max_seconds=max_seconds,
                           layer_shapes=shapes)
    elif mode == "quality":
        if kl_ids is None or ref_top is None:
            raise ValueError("mode='quality' needs kl_ids and ref_top = (top indices, top "
                             "log-probabilities) of the reference on them")
        r = T.tune_quality(measure, engine_kl(eng, kl_ids, *ref_top), choices, target,
                           base_us=base_us, max_seconds=max_seconds, layer_shapes=shapes)
    else:
        raise ValueError(f"mode must be 'latency' or 'quality', got {mode!r}")
    eng.set_config(r.config)
    return r


def reference_top(reference_weights, ids, top: int = 1024):
    """(top indices, top log-probabilities) [len(ids) - 1, top] of a float model (decdec.model
    LlamaModel on the CPU) on ids: the quality-aware tuner's reference (coarse_kl)."""
    from .evaluate import log_softmax
    from .model import LlamaModel
    lp = log_softmax(LlamaModel(reference_weights).forward(np.asarray(ids)))[:-1]
    idx = np.argsort(-lp, axis=-1)[:, :top]
    return idx.astype(np.int32), np.take_along_axis(lp, idx, -1).astype(np.float32)


def tune_main(argv=None) -> int:
    """`python -m decdec tune --engine --artifact DIR`: the end-to-end tuner on the GPU engine's
    decode graph; writes <artifact>/tuned-<target>pct.json for `eval / generate --device cuda
    --tuned <target>`."""
    import argparse
    from . import artifacts, data
    from . import engine_tune as T
    p = argparse.ArgumentParser(prog="python -m decdec tune --engine", description=tune_main.__doc__.splitlines()[0])
    p.add_argument("--artifact", required=True)
    p.add_argument("--targets", type=float, nargs="+", default=[0.025, 0.05, 0.10],
                   help="slowdown bounds (default 0.025 0.05 0.10)")
    p.add_argument("--mode", choices=("latency", "quality"), default="latency",
                   help="latency: the paper's (default); quality: KL per microsecond (needs --reference)")
    p.add_argument("--reference", default=None, help="float model for --mode quality: 'smollm2', GGUF or HF dir")
    p.add_argument("--calib-text", default="emma", help="text of the quality mode's KL (default emma)")
    p.add_argument("--kl-tokens", type=int, default=128, help="positions of the quality mode's KL (default 128)")
    p.add_argument("--pos", type=int, default=256, help="context position of the timed steps (default 256)")
    p.add_argument("--max-seconds", type=float, default=120, help="search time per target (default 120)")
    args = p.parse_args(argv)
    _need_engine()
    if args.mode == "quality" and not args.reference:
        p.error("--mode quality needs --reference (the float model the KL is measured against)")
    qm = artifacts.load(args.artifact)
    eng = GpuEngine(qm, max_seq=max(args.pos + 64, args.kl_tokens + 2))
    kl_ids = ref_top = None
    if args.mode == "quality":
        from .cli import _load_source, _read_text
        ref_w, tok = _load_source(args.reference)
        kl_ids = np.concatenate([[qm.config.bos_id], tok.encode(_read_text(args.calib_text))[:args.kl_tokens]])
        ref_top = reference_top(ref_w, kl_ids)
    from . import _C
    meta0 = {"artifact_sha256": T.artifact_checksum(args.artifact), "gpu": _C._cuda_device_name(0)}
    base = None
    for target in args.targets:
        r = tune(eng, target, args.mode, kl_ids=kl_ids, ref_top=ref_top, pos=args.pos,
                 max_seconds=args.max_seconds, base_us=base)
        base = r.base_us
        path = T.save_config(T.tuned_config_path(args.artifact, target), r.config,
                             {**meta0, "target": target, "mode": args.mode, "base_us": r.base_us,
                              "tuned_us": r.tuned_us, "slowdown": r.slowdown})
        print(f"{r.summary()}\n  -> {path}")
    return 0
