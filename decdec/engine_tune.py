"""End-to-end tuner of a whole-model decode engine: one n_tb and a k_chunk per module type, chosen
under a bound on the slowdown of a whole decode step (not of the linear layers alone, as
decdec.tune budgets).

It is written against an abstract measurement interface, so it runs on anything that can time a
configuration:

    measure(config: EngineConfig) -> float   microseconds of one decode step (the GPU engine
                                             replays a CUDA graph of the step; noisy)
    kl(config: EngineConfig) -> float        mean KL of the engine's next-token distribution to
                                             the reference on calibration text (quality mode)

`SimulatedEngine` is a cost model with both methods (tests, docs, CI without a GPU).

The search (docs: ../shared/docs/DECDEC-NOTES.md, "Tuner"):
  base:     all k_chunk 0 (DEC off), measured `base_reps` times, the median is the reference;
  phase 1:  for each n_tb, climb one uniform k_chunk up the ladder K_STEPS while the step stays
            within (1 + target) x base; keep the n_tb reaching the highest rung (the paper's
            phase 1); ties to the one with the lowest time at the first rung past the bound, or
            to the smaller n_tb when those times are within tie_tol of each other;
  phase 2:  greedy: each round, try raising every module type by one ladder rung (tune_quality:
            by up to `lookahead` rungs), measure each candidate, take the fitting one that adds
            least time per fetched residual byte (tune_latency) or removes most KL per
            microsecond added (tune_quality); stop when no candidate fits;
  verify:   the measurements above are single and noisy, and a greedy search that keeps the
            candidates that happened to measure low is biased low.  So the final choice and the
            base are measured again, interleaved, `confirm_reps` times each; the choice is kept
            only if median(choice) / median(base) - 1 <= target, else the search backs off one
            step along the path it took (last greedy step first, then down the phase-1 rungs)
            and verifies again.  All k_chunk 0 is the base itself and always passes.
Every measurement and KL evaluation is recorded in TuneResult.trace.

The knee model (predict_knee, predict_model_knees) predicts from bandwidths alone the largest
k_chunk whose DEC fetch still hides under the base GEMV, for a side-by-side with the tuned values
(format_knees).  save_config / load_config keep a tuned configuration beside its artifact.

Pure Python (no NumPy needed, no torch, no decdec._C): it uses decdec.formats (the byte rules),
decdec.model (LINEAR_NAMES) and decdec.fileio (atomic writes).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

from . import formats
from .fileio import atomic_write_text
from .model import LINEAR_NAMES

# ---- module types and configurations ---------------------------------------------------------

MODULE_TYPES = ("qkv", "o", "gate_up", "down")

# A model's linear layers by module type: one k_chunk serves every linear of a type.
LINEAR_TO_TYPE = {"wq": "qkv", "wk": "qkv", "wv": "qkv", "wo": "o",
                  "w_gate": "gate_up", "w_up": "gate_up", "w_down": "down"}
assert set(LINEAR_TO_TYPE) == set(LINEAR_NAMES) and set(LINEAR_TO_TYPE.values()) == set(MODULE_TYPES)

# The k_chunk ladder the search climbs.  Why these rungs:
# - roughly geometric above 8 (steps of 1.33-1.5x): a step's cost grows with k, so equal
#   relative steps give each measurement a similar, resolvable time difference, and 11 rungs
#   cover 0..64 (a +1 ladder would need 64 rungs per type and per n_tb, ~6x the measurements);
# - dense where the knees are: predicted knees are ~9 (3-bit) and ~12 (4-bit) on an H200
#   (R_bw = HBM / zero-copy ~ 90), ~12.5-17 on an H100, so 8, 12, 16 bracket them; below 8 the
#   rungs 1, 2, 4 keep the small budgets of 2.5% targets on datacenter GPUs usable;
# - 64 on top: 6.25% of the channels, past any datacenter knee by 4x; laptop GPUs (RTX 4050M,
#   knee ~60 measured in the paper) reach it, and a caller can pass a longer ladder (values up
#   to formats.CHUNK);
# - past the knee one +1 step of one type adds about 1/k of that type's exposed DEC time, which
#   for k >= 16 is often below a CUDA graph replay's run-to-run noise on a whole decode step
#   (~0.3-1%): finer rungs there would mostly be decided by noise.
K_STEPS = (0, 1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class EngineConfig:
    """The settings of a whole-model engine: n_tb (thread blocks DEC may hold beside each base
    GEMV) and one k_chunk per module type (MODULE_TYPES; 0 = compensation off for that type).

    Validated at construction with a CPU layer's n_tb limits (formats.check_n_tb: 1..N_TB_LIMIT);
    `validate(n_sm)` checks a GPU's.  Every problem raises ValueError naming the field.  The
    k_chunk dict is copied (in MODULE_TYPES order); treat it as read-only (the config is hashed
    by value)."""
    n_tb: int
    k_chunk: dict[str, int]

    def __post_init__(self):
        def as_int(v):  # NumPy integers and the like become int; anything else is validated
            return int(v) if not isinstance(v, bool) and hasattr(v, "__index__") else v
        object.__setattr__(self, "n_tb", as_int(self.n_tb))
        if isinstance(self.k_chunk, Mapping):  # a copy, in MODULE_TYPES order (unknown keys last)
            rest = {m: as_int(v) for m, v in self.k_chunk.items()}
            ordered = {m: rest.pop(m) for m in MODULE_TYPES if m in rest}
            object.__setattr__(self, "k_chunk", {**ordered, **rest})
        self.validate()

    def validate(self, n_sm: int | None = None) -> "EngineConfig":
        """Check n_tb (1..formats.n_tb_max(n_sm) for a GPU of n_sm SMs, 1..N_TB_LIMIT when n_sm is
        None) and k_chunk (exactly one int in 0..formats.CHUNK per module type); returns self."""
        if not _is_int(self.n_tb):
            raise ValueError(f"n_tb must be an int, got {self.n_tb!r:.40}")
        try:
            formats.check_n_tb(self.n_tb, n_sm)
        except (TypeError, ValueError) as e:
            raise ValueError(str(e)) from None
        if not isinstance(self.k_chunk, Mapping):
            raise ValueError(f"k_chunk must map module types {MODULE_TYPES} to ints, got "
                             f"{type(self.k_chunk).__name__}")
        missing = [m for m in MODULE_TYPES if m not in self.k_chunk]
        unknown = [m for m in self.k_chunk if m not in MODULE_TYPES]
        if missing or unknown:
            raise ValueError(f"k_chunk must have exactly the module types {MODULE_TYPES}: "
                             + ", ".join(filter(None, [f"missing {missing}" if missing else "",
                                                       f"unknown {unknown}" if unknown else ""])))
        for m in MODULE_TYPES:
            k = self.k_chunk[m]
            if not _is_int(k):
                raise ValueError(f"k_chunk[{m!r}] must be an int, got {k!r:.40}")
            if not 0 <= k <= formats.CHUNK:
                raise ValueError(f"k_chunk[{m!r}] = {k} is outside [0, {formats.CHUNK}]")
        return self

    def __hash__(self):
        return hash((self.n_tb, tuple(self.k_chunk[m] for m in MODULE_TYPES)))

    @classmethod
    def uniform(cls, n_tb: int, k: int) -> "EngineConfig":
        return cls(n_tb, {m: k for m in MODULE_TYPES})

    def replace(self, n_tb: int | None = None, **k_chunk: int) -> "EngineConfig":
        """A copy with n_tb and/or some module types' k_chunk changed."""
        return EngineConfig(self.n_tb if n_tb is None else n_tb, dict(self.k_chunk, **k_chunk))

    def k_chunk_of(self, linear_name: str) -> int:
        """k_chunk of a model linear (decdec.model.LINEAR_NAMES: wq/wk/wv -> qkv, wo -> o,
        w_gate/w_up -> gate_up, w_down -> down); KeyError for any other name."""
        try:
            return self.k_chunk[LINEAR_TO_TYPE[linear_name]]
        except KeyError:
            raise KeyError(f"{linear_name!r} is not a linear layer of a decoder block "
                           f"(one of {LINEAR_NAMES})") from None

    @property
    def is_base(self) -> bool:
        """All k_chunk 0: DEC off everywhere (n_tb then does not matter)."""
        return not any(self.k_chunk.values())

    def as_dict(self) -> dict:
        return {"n_tb": self.n_tb, "k_chunk": {m: self.k_chunk[m] for m in MODULE_TYPES}}

    def to_json(self) -> str:
        """'{"n_tb": 8, "k_chunk": {"qkv": 12, "o": 12, "gate_up": 16, "down": 8}}'"""
        return json.dumps(self.as_dict())

    @classmethod
    def from_json(cls, data: str | Mapping) -> "EngineConfig":
        """From to_json()'s text or the dict it encodes; ValueError if it is not exactly
        {"n_tb": int, "k_chunk": {type: int}}."""
        if isinstance(data, (str, bytes)):
            try:
                data = json.loads(data)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"engine config is not valid JSON ({e})") from None
        if not isinstance(data, Mapping):
            raise ValueError(f"engine config must be a JSON object, got {type(data).__name__}")
        keys = set(data)
        if keys != {"n_tb", "k_chunk"}:
            raise ValueError(f"engine config must have exactly the keys n_tb and k_chunk, got "
                             f"{sorted(map(str, keys))}")
        if not isinstance(data["k_chunk"], Mapping):
            raise ValueError(f"k_chunk must be an object, got {type(data['k_chunk']).__name__}")
        return cls(data["n_tb"], dict(data["k_chunk"]))

    def __str__(self) -> str:
        return f"n_tb {self.n_tb}, k_chunk " + ", ".join(f"{m} {self.k_chunk[m]}" for m in MODULE_TYPES)


# ---- byte rules (decdec.h, through decdec.formats) --------------------------------------------

def _check_shape(d_in, d_out) -> None:
    if not (_is_int(d_in) and _is_int(d_out)) or d_in <= 0 or d_out <= 0:
        raise ValueError(f"layer shape must be positive ints, got d_in {d_in!r}, d_out {d_out!r}")
    if d_out % formats.OUT_ALIGN:
        raise ValueError(f"d_out must be a multiple of {formats.OUT_ALIGN}, got {d_out}")


def fetch_nbytes(d_in: int, d_out: int, k_chunk: int) -> int:
    """Residual bytes one token fetches from host memory for a d_in -> d_out layer: decdec.h's
    dd_fetch_nbytes = dd_total_quota(d_in, k_chunk) rows x d_out / 2 bytes (4-bit codes; the
    fp16 residual scales are GPU-resident, part of dd_weight_nbytes, and not fetched).  The quota
    is formats.total_quota, the one Python copy of the selection rule."""
    _check_shape(d_in, d_out)
    return formats.total_quota(d_in, k_chunk) * (d_out // 2)


def base_read_nbytes(d_in: int, d_out: int, bits: int, group_size: int = 128) -> int:
    """Bytes the base GEMV reads from HBM: the packed weight (formats.qweight_row_bytes per
    output row) plus its fp16 scales and zeros (formats.num_groups per row each)."""
    _check_shape(d_in, d_out)
    formats.check_layer_shape(d_out, d_in, bits, group_size)
    return d_out * (formats.qweight_row_bytes(d_in, bits) + 4 * formats.num_groups(d_in, group_size))


def llama_layer_shapes(dim: int, n_heads: int, n_kv_heads: int, head_dim: int,
                       ffn_dim: int) -> dict[str, list[tuple[int, int]]]:
    """(d_in, d_out) of the linears of one Llama decoder block by module type (q, k, v, gate and
    up are separate GEMVs, each with its own DEC)."""
    q, kv = n_heads * head_dim, n_kv_heads * head_dim
    return {"qkv": [(dim, q), (dim, kv), (dim, kv)], "o": [(q, dim)],
            "gate_up": [(dim, ffn_dim), (dim, ffn_dim)], "down": [(ffn_dim, dim)]}


def layer_shapes_of(config) -> dict[str, list[tuple[int, int]]]:
    """llama_layer_shapes of a decdec.model.LlamaConfig (or anything with its attributes)."""
    return llama_layer_shapes(config.dim, config.n_heads, config.n_kv_heads, config.head_dim,
                              config.ffn_dim)


def _check_layer_shapes(layer_shapes) -> dict[str, list[tuple[int, int]]]:
    if not isinstance(layer_shapes, Mapping) or set(layer_shapes) != set(MODULE_TYPES):
        raise ValueError(f"layer_shapes must map exactly the module types {MODULE_TYPES} to lists "
                         f"of (d_in, d_out)")
    out = {}
    for m in MODULE_TYPES:
        shapes = [tuple(s) for s in layer_shapes[m]]
        if not shapes or any(len(s) != 2 for s in shapes):
            raise ValueError(f"layer_shapes[{m!r}] must be a non-empty list of (d_in, d_out)")
        for d_in, d_out in shapes:
            _check_shape(d_in, d_out)
        out[m] = shapes
    return out


def type_fetch_nbytes(layer_shapes, module: str, k_chunk: int) -> int:
    """fetch_nbytes summed over the layers of one module type."""
    return sum(fetch_nbytes(d_in, d_out, k_chunk) for d_in, d_out in layer_shapes[module])


# ---- the search ---------------------------------------------------------------------------------

@dataclass
class TuneResult:
    """What a tuner returns.  base_us / tuned_us / slowdown are the verification's medians
    (re-measured, interleaved), not the search's single measurements; when everything backed off
    to the base, config is all k_chunk 0 and tuned_us = base_us = the search's base.

    trace: one dict per event, in order, each with "phase" (base, phase1, phase2, verify, result):
      a measurement:  "m" (1, 2, ...: n_measurements in all), "n_tb", "k_chunk", "us", and
                      "slowdown" over the search's base, "module" (phase 2: the type raised),
                      "role" (verify: "base" or "candidate");
      a KL value:     "n_tb", "k_chunk", "kl" (tune_quality; once per configuration);
      a decision:     phase 1 per n_tb "uniform_k", "edge_us" (time at the first rung past the
                      bound); phase 2 "chosen" (type), "k_chunk", "us", "score"; verify
                      "base_us", "us", "slowdown" (medians), "accepted"."""
    config: EngineConfig
    base_us: float
    tuned_us: float
    slowdown: float
    target: float
    mode: str                      # "latency" or "quality"
    trace: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    n_measurements: int = 0
    backoffs: int = 0              # verification failures undone (steps backed off)
    stopped: str = "converged"     # "converged" (no candidate fits) or "time" (max_seconds hit)
    kl: float | None = None        # quality mode: kl(config) of the result; base_kl of all-zero
    base_kl: float | None = None

    def to_json(self) -> dict:
        """A JSON-ready dict (config as its as_dict())."""
        d = {k: getattr(self, k) for k in ("base_us", "tuned_us", "slowdown", "target", "mode",
                                           "seconds", "n_measurements", "backoffs", "stopped",
                                           "kl", "base_kl")}
        return {"config": self.config.as_dict(), **d, "trace": self.trace}

    def summary(self) -> str:
        s = (f"{self.mode} {100 * self.target:.1f}%: {self.config}; {self.base_us:.2f} -> "
             f"{self.tuned_us:.2f} us ({100 * self.slowdown:+.2f}%), {self.n_measurements} "
             f"measurements in {self.seconds:.1f} s")
        if self.kl is not None:
            s += f", KL {self.base_kl:.5f} -> {self.kl:.5f}"
        return s + (f", {self.backoffs} back-off(s)" if self.backoffs else "")


class _Session:
    """Measurements of one tuner run: single measurements cached per config during the search,
    every call recorded in the trace, the time budget watched."""

    def __init__(self, measure, kl, max_seconds, clock):
        self.measure_fn, self.kl_fn = measure, kl
        self.max_seconds, self.clock = max_seconds, clock
        self.t0 = clock()
        self.trace: list[dict] = []
        self.n = 0
        self.cache: dict[tuple, float] = {}
        self.kl_cache: dict[tuple, float] = {}
        self.base_us: float | None = None

    @staticmethod
    def key(c: EngineConfig) -> tuple:
        # DEC off everywhere: the base engine, whatever n_tb says
        return (0,) * 5 if c.is_base else (c.n_tb, *(c.k_chunk[m] for m in MODULE_TYPES))

    def out_of_time(self) -> bool:
        return self.clock() - self.t0 > self.max_seconds

    def raw(self, c: EngineConfig, phase: str, **note) -> float:
        t = float(self.measure_fn(c))
        if not math.isfinite(t) or t <= 0:
            raise ValueError(f"measure({c}) returned {t!r}; it must return a positive time in us")
        self.n += 1
        entry = {"m": self.n, "phase": phase, "n_tb": c.n_tb, "k_chunk": dict(c.k_chunk), "us": t}
        if self.base_us is not None:
            entry["slowdown"] = t / self.base_us - 1.0
        entry.update(note)
        self.trace.append(entry)
        return t

    def time(self, c: EngineConfig, phase: str, **note) -> float:
        k = self.key(c)
        if k not in self.cache:
            self.cache[k] = self.raw(c, phase, **note)
        return self.cache[k]

    def kl(self, c: EngineConfig, phase: str, **note) -> float:
        k = self.key(c)
        if k not in self.kl_cache:
            v = float(self.kl_fn(c))
            if not math.isfinite(v):
                raise ValueError(f"kl({c}) returned {v!r}")
            self.kl_cache[k] = v
            self.trace.append({"phase": phase, "n_tb": c.n_tb, "k_chunk": dict(c.k_chunk), "kl": v,
                               **note})
        return self.kl_cache[k]


def _check_steps(k_steps) -> tuple[int, ...]:
    steps = tuple(k_steps)
    if (len(steps) < 2 or steps[0] != 0 or any(not _is_int(k) for k in steps)
            or any(b <= a for a, b in zip(steps, steps[1:])) or steps[-1] > formats.CHUNK):
        raise ValueError(f"k_steps must be increasing ints from 0 up to at most {formats.CHUNK}, "
                         f"got {k_steps!r:.80}")
    return steps


def _check_args(n_tb_choices, target, k_steps, max_seconds, reps, tie_tol, margin):
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target < 10:
        raise ValueError(f"target must be a slowdown fraction in (0, 10) (0.025 = 2.5%), got {target!r}")
    choices = sorted(set(n_tb_choices))
    if not choices:
        raise ValueError("n_tb_choices is empty")
    for n in choices:
        EngineConfig.uniform(n, 0)  # ValueError for a bad n_tb
    steps = _check_steps(k_steps)
    if not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0, got {max_seconds!r}")
    if not 0 <= tie_tol < 1:
        raise ValueError(f"tie_tol must be a fraction of the base time in [0, 1), got {tie_tol!r}")
    if not 0 <= margin < target:
        raise ValueError(f"margin must be in [0, target), got {margin!r}")
    for name, v in reps.items():
        if not _is_int(v) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    return choices, steps


def _next_rung(steps, k):
    for s in steps:
        if s > k:
            return s
    return None


def _base_and_phase1(s: _Session, choices, target, steps, base_us, base_reps, tie_tol):
    """The reference time and the paper's phase 1.  Returns (n_tb, uniform k, path), path being
    the uniform configs of the chosen n_tb that fitted, in climbing order."""
    if base_us is None:
        base = EngineConfig.uniform(choices[0], 0)
        base_us = statistics.median([s.raw(base, "base") for _ in range(base_reps)])
    elif (isinstance(base_us, bool) or not isinstance(base_us, (int, float))
          or not math.isfinite(base_us) or base_us <= 0):
        raise ValueError(f"base_us must be a positive time in us, got {base_us!r}")
    s.base_us = float(base_us)
    s.cache[s.key(EngineConfig.uniform(choices[0], 0))] = s.base_us
    limit = s.base_us * (1.0 + target)
    climbs = []   # (n_tb, k reached, path, time at the first rung past the bound or at the top)
    for n_tb in choices:
        if s.out_of_time():
            break
        path, t_edge = [], math.inf
        for k in steps[1:]:
            if s.out_of_time():
                t_edge = math.inf  # an unfinished climb cannot win a tie
                break
            c = EngineConfig.uniform(n_tb, k)
            t_edge = s.time(c, "phase1")
            if t_edge > limit:
                break
            path.append(c)
        climbs.append((n_tb, path[-1].k_chunk["qkv"] if path else 0, path, t_edge))
        s.trace.append({"phase": "phase1", "n_tb": n_tb, "uniform_k": climbs[-1][1],
                        "edge_us": t_edge})
    if not climbs:
        return choices[0], 0, []
    k_best = max(c[1] for c in climbs)
    tied = [c for c in climbs if c[1] == k_best]
    t_min = min(c[3] for c in tied)
    n_tb, k, path, _ = next(c for c in tied if c[3] <= t_min + tie_tol * s.base_us)
    return n_tb, k, path


def _verify(s: _Session, path: list[EngineConfig], target, confirm_reps, margin):
    """Walk back along path (last first) until a config's re-measured slowdown fits.  Returns
    (config, base_us, tuned_us, backoffs); config None if only the base (DEC off) is left."""
    backoffs = 0
    for c in reversed(path):
        if c.is_base:
            break
        base_t, cand_t = [], []
        for _ in range(confirm_reps):  # interleaved, so drift hits both alike
            base_t.append(s.raw(EngineConfig.uniform(c.n_tb, 0), "verify", role="base"))
            cand_t.append(s.raw(c, "verify", role="candidate"))
        b, t = statistics.median(base_t), statistics.median(cand_t)
        ok = t / b - 1.0 <= target - margin
        s.trace.append({"phase": "verify", "n_tb": c.n_tb, "k_chunk": dict(c.k_chunk),
                        "base_us": b, "us": t, "slowdown": t / b - 1.0, "accepted": ok})
        if ok:
            return c, b, t, backoffs
        backoffs += 1
    return None, None, None, backoffs


def _greedy(s: _Session, path, steps, limit, lookahead, shapes, score):
    """Phase 2 from path[-1]: each round, for every module type, the candidates one rung up (up to
    `lookahead` rungs up; a type's climb stops at its first candidate past the bound, as higher
    rungs cost more still); score(module, candidate, t, t_current) -> sort key (smallest wins) or
    None (not eligible).  Appends the chosen configs to path; returns "converged" or "time"."""
    current = path[-1]
    t_cur = s.base_us if current.is_base else s.time(current, "phase1")
    if s.out_of_time():
        return "time"
    while True:
        options = []
        for m in MODULE_TYPES:
            k = current.k_chunk[m]
            for _ in range(lookahead):
                k = _next_rung(steps, k)
                if shapes is not None:  # rungs that fetch no more bytes (tiny partial chunks)
                    while k is not None and (type_fetch_nbytes(shapes, m, k)
                                             <= type_fetch_nbytes(shapes, m, current.k_chunk[m])):
                        k = _next_rung(steps, k)
                if k is None:
                    break
                if s.out_of_time():
                    return "time"
                cand = current.replace(**{m: k})
                t = s.time(cand, "phase2", module=m)
                if t > limit:
                    break
                key = score(m, cand, t, t_cur)
                if key is not None:
                    options.append((key, MODULE_TYPES.index(m), k, cand, t))
        if not options:
            return "converged"
        key, i, _, current, t_cur = min(options)
        s.trace.append({"phase": "phase2", "chosen": MODULE_TYPES[i], "n_tb": current.n_tb,
                        "k_chunk": dict(current.k_chunk), "us": t_cur, "score": key[0]})
        path.append(current)


def _finish(s, mode, target, path, confirm_reps, margin, stopped):
    config, b, t, backoffs = _verify(s, path, target, confirm_reps, margin)
    if config is None:  # backed off to the base: DEC off everywhere
        config, b, t = path[0], s.base_us, s.base_us
    return TuneResult(config, b, t, t / b - 1.0, target, mode, s.trace, s.clock() - s.t0, s.n,
                      backoffs, stopped)


def tune_latency(measure: Callable[[EngineConfig], float], n_tb_choices: Iterable[int], target: float,
                 base_us: float | None = None, k_steps: Sequence[int] = K_STEPS,
                 max_seconds: float = 120, *, layer_shapes=None, lookahead: int = 1,
                 confirm_reps: int = 3, base_reps: int = 3, margin: float = 0.0,
                 tie_tol: float = 0.005, clock: Callable[[], float] = time.monotonic) -> TuneResult:
    """The paper's tuner on whole decode steps: the most compensation whose step time stays within
    (1 + target) x the base step (all k_chunk 0).

    measure(config) -> us of one decode step.  n_tb_choices: the n_tb values to try (e.g.
    decdec.gpu.n_tb_choices(SMs)).  target: slowdown fraction (0.025 = 2.5%).  base_us: the base
    step time if already known (several targets can share one); else measured base_reps times
    (median).  k_steps: the ladder (K_STEPS).  max_seconds: the search stops early past this
    (stopped = "time"); the verification still runs, so the result still fits.

    Phase 1 (n_tb): the n_tb whose uniform k_chunk climbs highest within the bound.  This
    measures every n_tb where it matters, at the bound, instead of at one small uniform k where
    DEC hides under the base GEMV everywhere and the ranking would be noise.  Ties (common on a
    coarse ladder; every n_tb ties at 0 when DEC's fixed latency alone exceeds the bound) go to
    the n_tb with the lowest time at the first rung past the bound (already measured: it says
    which has more headroom), unless that is within tie_tol x base (replay noise) of the smaller
    n_tb's: then to the smaller n_tb, which leaves more SMs to the base GEMV (the paper found H100
    GEMVs slow down when DEC holds SMs) and to the rest of the step.

    Phase 2 (greedy): per round, one candidate per module type, its next rung (lookahead > 1 also
    tries jumps of up to that many rungs); among those within the bound, the one adding least
    time per added fetched residual byte (max(dt, 0) / dbytes, ties to the most bytes).  Per
    byte, not per unit of k: the types differ in bytes per unit of k (on Llama-3-8B down reads 14
    chunks of 4096-wide rows per unit of k, o 4 chunks of 4096, qkv 4 chunks of 6144), and what
    buys accuracy is the residual volume applied (the paper compares residual formats at equal
    traffic), so per-k scoring would favour types that compensate little per k.  Needs
    layer_shapes ({type: [(d_in, d_out), ...]} of a block, e.g. layer_shapes_of(config)); without
    it the score falls back to time per unit of k.

    Then the verification and back-off of the module docstring (confirm_reps interleaved
    re-measurements each of base and choice; kept if the re-measured slowdown <= target - margin).
    """
    choices, steps = _check_args(n_tb_choices, target, k_steps, max_seconds,
                                 {"confirm_reps": confirm_reps, "base_reps": base_reps,
                                  "lookahead": lookahead}, tie_tol, margin)
    shapes = None if layer_shapes is None else _check_layer_shapes(layer_shapes)
    s = _Session(measure, None, max_seconds, clock)
    n_tb, _, p1 = _base_and_phase1(s, choices, target, steps, base_us, base_reps, tie_tol)
    path = [EngineConfig.uniform(n_tb, 0)] + p1

    def score(m, cand, t, t_cur):
        prev = path[-1].k_chunk[m]
        gain = (type_fetch_nbytes(shapes, m, cand.k_chunk[m]) - type_fetch_nbytes(shapes, m, prev)
                if shapes is not None else cand.k_chunk[m] - prev)
        return (max(t - t_cur, 0.0) / gain, -gain)

    stopped = _greedy(s, path, steps, s.base_us * (1.0 + target), lookahead, shapes, score)
    return _finish(s, "latency", target, path, confirm_reps, margin, stopped)


def tune_quality(measure: Callable[[EngineConfig], float], kl: Callable[[EngineConfig], float],
                 n_tb_choices: Iterable[int], target: float, base_us: float | None = None,
                 k_steps: Sequence[int] = K_STEPS, max_seconds: float = 120, *,
                 start: str = "uniform", lookahead: int = 4, cost_floor: float = 1e-3,
                 layer_shapes=None, confirm_reps: int = 3, base_reps: int = 3,
                 margin: float = 0.0, tie_tol: float = 0.005, compare_latency: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> TuneResult:
    """Quality-aware tuning (beyond the paper): the same bound, phase 1, verification and back-off
    as tune_latency, but each greedy step takes the candidate with the largest KL reduction per
    microsecond of added step time,
        (kl(current) - kl(candidate)) / max(t(candidate) - t(current), cost_floor x base_us),
    among those within the bound that reduce KL at all.  The floor makes steps that hide under the
    base GEMV (dt ~ 0, i.e. within noise) rank by their KL gain instead of by noise.

    lookahead (default 4): a candidate may jump up to that many rungs of one type.  DEC has a fixed
    cost per layer (launch, x load, selection: a few us, KERNELS.md), so the first rung of a type
    costs nearly as much as the fourth while gaining a fraction of its KL; one-rung steps would
    rank such a type last forever (the knapsack trap of fixed costs).  lookahead 1 = plain steps.
    start "uniform" (default): phase 2 climbs from phase 1's uniform k, as tune_latency does;
    start "zero": from all 0 at phase 1's n_tb, the whole budget spent by KL per us (more
    measurements and kl() calls; better when some type's KL gain is small).  kl() is called
    once per configuration and only for candidates within the bound.  The result's kl and
    base_kl are kl() of the returned config and of the base.

    compare_latency (default True): also run tune_latency under the same bound and return
    whichever verified configuration has the lower kl(), so this mode never does worse on its
    own objective than the paper's.  Why: a greedy KL-per-microsecond walk can stop with budget
    left (on SmolLM2 at +100% it reached +95.8% with a higher calibration KL, 0.550, than the
    latency tuner's 0.528 at +99.7%: bench/results/engine.md).
    """
    choices, steps = _check_args(n_tb_choices, target, k_steps, max_seconds,
                                 {"confirm_reps": confirm_reps, "base_reps": base_reps,
                                  "lookahead": lookahead}, tie_tol, margin)
    if start not in ("zero", "uniform"):
        raise ValueError(f"start must be 'zero' or 'uniform', got {start!r}")
    if isinstance(cost_floor, bool) or not isinstance(cost_floor, (int, float)) or not 0 < cost_floor < 1:
        raise ValueError(f"cost_floor must be a fraction of the base time in (0, 1), got {cost_floor!r}")
    shapes = None if layer_shapes is None else _check_layer_shapes(layer_shapes)
    s = _Session(measure, kl, max_seconds, clock)
    n_tb, _, p1 = _base_and_phase1(s, choices, target, steps, base_us, base_reps, tie_tol)
    floor_us = cost_floor * s.base_us
    path = [EngineConfig.uniform(n_tb, 0)] + (p1 if start == "uniform" else [])
    base_kl = s.kl(path[0], "base")

    def score(m, cand, t, t_cur):
        gain = s.kl(path[-1], "phase2") - s.kl(cand, "phase2", module=m)
        return (-gain / max(t - t_cur, floor_us),) if gain > 0 else None

    stopped = _greedy(s, path, steps, s.base_us * (1.0 + target), lookahead, shapes, score)
    r = _finish(s, "quality", target, path, confirm_reps, margin, stopped)
    r.kl, r.base_kl = s.kl(r.config, "result"), base_kl
    if compare_latency:
        left = max(max_seconds - (s.clock() - s.t0), 1.0)
        lat = tune_latency(measure, choices, target, base_us=s.base_us, k_steps=steps, max_seconds=left,
                           layer_shapes=layer_shapes, confirm_reps=confirm_reps, base_reps=base_reps,
                           margin=margin, tie_tol=tie_tol, clock=clock)
        lat_kl = s.kl(lat.config, "latency-candidate")
        s.trace.append({"phase": "compare", "latency_config": lat.config.as_dict(), "latency_kl": lat_kl,
                        "quality_config": r.config.as_dict(), "quality_kl": r.kl,
                        "chosen": "latency" if lat_kl < r.kl else "quality"})
        if lat_kl < r.kl:
            r = TuneResult(lat.config, lat.base_us, lat.tuned_us, lat.slowdown, target, "quality", s.trace,
                           s.clock() - s.t0, s.n + lat.n_measurements, r.backoffs + lat.backoffs, lat.stopped,
                           kl=lat_kl, base_kl=base_kl)
        else:
            r.seconds, r.n_measurements = s.clock() - s.t0, s.n + lat.n_measurements
    return r


# ---- knee model ---------------------------------------------------------------------------------

def _knee(d_in, d_out, bits, hbm_gbs, zero_copy_gbs, dec_latency_us, group_size, base_efficiency,
          share, k_steps) -> dict:
    for name, v in (("hbm_gbs", hbm_gbs), ("zero_copy_gbs", zero_copy_gbs)):
        if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be a positive bandwidth in GB/s, got {v!r}")
    if not 0 < base_efficiency <= 1:
        raise ValueError(f"base_efficiency must be in (0, 1], got {base_efficiency!r}")
    if not share > 0 or not dec_latency_us >= 0:
        raise ValueError(f"share must be > 0 and dec_latency_us >= 0, got {share!r}, {dec_latency_us!r}")
    # 1 GB/s = 1e3 bytes/us
    t_base = base_read_nbytes(d_in, d_out, bits, group_size) / (hbm_gbs * base_efficiency * 1e3)
    budget = t_base * share

    def t_dec(k):
        return 0.0 if k == 0 else dec_latency_us + fetch_nbytes(d_in, d_out, k) / (zero_copy_gbs * 1e3)

    knee = max(k for k in k_steps if t_dec(k) <= budget)
    lo, hi = 0, formats.CHUNK  # largest integer k with t_dec(k) <= budget (t_dec rises with k)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if t_dec(mid) <= budget else (lo, mid - 1)
    return {"knee": knee, "k_max": lo, "t_base_us": t_base, "t_dec_us": t_dec(knee)}


def predict_knee(d_in: int, d_out: int, bits: int, hbm_gbs: float, zero_copy_gbs: float,
                 dec_latency_us: float = 0.0, *, group_size: int = 128, base_efficiency: float = 1.0,
                 share: float = 1.0, k_steps: Sequence[int] = K_STEPS) -> int:
    """The largest k_chunk on the ladder whose DEC still hides under the base GEMV of one layer:
        t_base    = base_read_nbytes(d_in, d_out, bits) / (hbm_gbs x base_efficiency)
        t_dec(k)  = dec_latency_us + fetch_nbytes(d_in, d_out, k) / zero_copy_gbs   (t_dec(0) = 0)
        knee      = max k in k_steps with t_dec(k) <= share x t_base
    base_efficiency: the fraction of the HBM bandwidth the measured base kernel reaches; share: how
    much of the base GEMV's time DEC may overlap (1 = all of it).  Without latency and scales this
    is the paper's k_knee = 1024 / R_bw x bits / 4, R_bw = hbm / zero-copy (rounded down to a rung).
    """
    return _knee(d_in, d_out, bits, hbm_gbs, zero_copy_gbs, dec_latency_us, group_size,
                 base_efficiency, share, _check_steps(k_steps))["knee"]


def predict_model_knees(layer_shapes, bits: int, hbm_gbs: float, zero_copy_gbs: float,
                        dec_latency_us: float = 0.0, *, group_size: int = 128,
                        base_efficiency: float = 1.0, share: float = 1.0,
                        k_steps: Sequence[int] = K_STEPS) -> dict[str, dict]:
    """predict_knee per module type: {type: {"knee", "k_max", "t_base_us", "t_dec_us", "limiting",
    "shapes"}}.  A type's k_chunk serves all its layers and each layer's DEC hides under its own
    GEMV, so the type's knee is the smallest of its layers' (the `limiting` (d_in, d_out));
    k_max is the same bound over every integer k, not only the ladder; the times are the
    limiting layer's, t_dec at the knee."""
    shapes = _check_layer_shapes(layer_shapes)
    steps = _check_steps(k_steps)
    table = {}
    for m in MODULE_TYPES:
        rows = {s: _knee(*s, bits, hbm_gbs, zero_copy_gbs, dec_latency_us, group_size,
                         base_efficiency, share, steps) for s in dict.fromkeys(shapes[m])}
        limiting = min(rows, key=lambda s: (rows[s]["knee"], rows[s]["k_max"]))
        table[m] = dict(rows[limiting], limiting=limiting, shapes=shapes[m],
                        k_max=min(r["k_max"] for r in rows.values()))
    return table


def format_knees(predicted: Mapping[str, dict], tuned=None) -> str:
    """A markdown table of predicted knees beside tuned k_chunk (an EngineConfig, a TuneResult,
    a {type: k} dict, or a {label: any of those} dict for several columns)."""
    def ks(t):
        if isinstance(t, TuneResult):
            t = t.config
        if isinstance(t, EngineConfig):
            return t.k_chunk
        return t
    cols = {}
    if tuned is not None:
        if isinstance(tuned, (TuneResult, EngineConfig)) or set(tuned) <= set(MODULE_TYPES):
            cols["tuned"] = ks(tuned)
        else:
            cols = {str(label): ks(t) for label, t in tuned.items()}
    head = "| module | limiting (d_in, d_out) | predicted knee | k_max | t_base us | t_dec(knee) us |"
    head += "".join(f" {c} |" for c in cols)
    lines = [head, "|" + "---|" * (6 + len(cols))]
    for m in MODULE_TYPES:
        p = predicted[m]
        row = (f"| {m} | {p['limiting'][0]} x {p['limiting'][1]} | {p['knee']} | {p['k_max']} | "
               f"{p['t_base_us']:.2f} | {p['t_dec_us']:.2f} |")
        lines.append(row + "".join(f" {c[m]} |" for c in cols.values()))
    return "\n".join(lines) + "\n"


# ---- simulated engine ---------------------------------------------------------------------------

class SimulatedEngine:
    """A cost model of a whole-model decode engine, with measure(config) and kl(config).

    Per linear layer (n_layers blocks of layer_shapes, `bits`):
        base      = base_read_nbytes / (hbm_gbs x base_efficiency)                       us
        base'     = base x (1 + sm_penalty x n_tb / n_sm)   when its type's k_chunk > 0 (DEC holds
                    n_tb SMs the GEMV no longer has), else base
        dec(k)    = dec_latency_us + fetch_nbytes(k) / (zero_copy_gbs x min(1, n_tb / n_tb_saturate))
                    (too few blocks cannot keep the zero-copy reads in flight)
        layer     = base' + max(0, dec(k) - share x base')     (hidden up to a share, then exposed)
    step = other_us + sum of every layer.  measure() multiplies by (1 + noise x N(0, 1)), seeded;
    time_us() is the noise-free value.

    kl(config) = kl_floor + sum over types of kl_weight[m] x exp(-k_m / kl_scale[m]): decreasing
    in each k with diminishing returns.  Deterministic (KL on fixed text is)."""

    def __init__(self, layer_shapes=None, *, n_layers: int = 1, bits: int = 3, group_size: int = 128,
                 hbm_gbs: float = 4000.0, zero_copy_gbs: float = 50.0, dec_latency_us: float = 1.0,
                 base_efficiency: float = 0.8, share: float = 1.0, other_us: float = 0.0,
                 n_sm: int = 132, n_tb_saturate: int = 16, sm_penalty: float = 0.0,
                 noise: float = 0.0, seed: int = 0, kl_weight: Mapping[str, float] | None = None,
                 kl_scale: Mapping[str, float] | None = None, kl_floor: float = 0.0):
        import random
        if layer_shapes is None:  # Llama-3-8B's block
            layer_shapes = llama_layer_shapes(4096, 32, 8, 128, 14336)
        self.layer_shapes = _check_layer_shapes(layer_shapes)
        if not _is_int(n_layers) or n_layers < 1:
            raise ValueError(f"n_layers must be an int >= 1, got {n_layers!r}")
        if not (noise >= 0 and sm_penalty >= 0 and other_us >= 0 and dec_latency_us >= 0):
            raise ValueError("noise, sm_penalty, other_us and dec_latency_us must be >= 0")
        if not (hbm_gbs > 0 and zero_copy_gbs > 0 and 0 < base_efficiency <= 1 and share > 0
                and n_sm >= 1 and n_tb_saturate >= 1):
            raise ValueError("bandwidths, share, n_sm and n_tb_saturate must be > 0 and "
                             "base_efficiency in (0, 1]")
        self.n_layers, self.bits, self.group_size = n_layers, bits, group_size
        self.hbm_gbs, self.zero_copy_gbs, self.dec_latency_us = hbm_gbs, zero_copy_gbs, dec_latency_us
        self.base_efficiency, self.share, self.other_us = base_efficiency, share, other_us
        self.n_sm, self.n_tb_saturate, self.sm_penalty = n_sm, n_tb_saturate, sm_penalty
        self.noise = noise
        self.kl_weight = dict(kl_weight or {"qkv": 0.02, "o": 0.01, "gate_up": 0.03, "down": 0.04})
        self.kl_scale = dict(kl_scale or {m: 16.0 for m in MODULE_TYPES})
        for name, d in (("kl_weight", self.kl_weight), ("kl_scale", self.kl_scale)):
            if set(d) != set(MODULE_TYPES):
                raise ValueError(f"{name} must have exactly the module types {MODULE_TYPES}")
        if any(v <= 0 for v in self.kl_scale.values()) or any(v < 0 for v in self.kl_weight.values()):
            raise ValueError("kl_scale values must be > 0 and kl_weight values >= 0")
        self.kl_floor = kl_floor
        self._rng = random.Random(seed)
        self.n_calls = 0
        self._base = {m: [base_read_nbytes(d_in, d_out, bits, group_size) / (hbm_gbs * base_efficiency * 1e3)
                          for d_in, d_out in self.layer_shapes[m]] for m in MODULE_TYPES}

    def type_us(self, module: str, n_tb: int, k: int) -> float:
        """Noise-free time of one block's layers of one module type (us)."""
        total = 0.0
        for (d_in, d_out), base in zip(self.layer_shapes[module], self._base[module]):
            if k == 0:
                total += base
                continue
            b = base * (1.0 + self.sm_penalty * n_tb / self.n_sm)
            bw = self.zero_copy_gbs * min(1.0, n_tb / self.n_tb_saturate) * 1e3
            dec = self.dec_latency_us + fetch_nbytes(d_in, d_out, k) / bw
            total += b + max(0.0, dec - self.share * b)
        return total

    def time_us(self, config: EngineConfig) -> float:
        """Noise-free step time (us)."""
        return self.other_us + self.n_layers * sum(self.type_us(m, config.n_tb, config.k_chunk[m])
                                                   for m in MODULE_TYPES)

    def measure(self, config: EngineConfig) -> float:
        self.n_calls += 1
        t = self.time_us(config)
        return t * (1.0 + self.noise * self._rng.gauss(0.0, 1.0)) if self.noise else t

    def slowdown(self, config: EngineConfig) -> float:
        """Noise-free slowdown of config over the base step."""
        return self.time_us(config) / self.time_us(EngineConfig.uniform(config.n_tb, 0)) - 1.0

    def kl(self, config: EngineConfig) -> float:
        return self.kl_floor + sum(self.kl_weight[m] * math.exp(-config.k_chunk[m] / self.kl_scale[m])
                                   for m in MODULE_TYPES)


# ---- tuned configuration files ------------------------------------------------------------------

CONFIG_FORMAT = "decdec-engine-config"
CONFIG_FORMAT_VERSION = 1
TUNED_CONFIG_NAME = "tuned.json"


class TunedConfigError(ValueError):
    """A tuned configuration file is malformed or was tuned for something else."""


def tuned_config_path(artifact_dir, target: float | None = None) -> Path:
    """Where a tuned configuration lives: inside the artifact directory, beside its manifest, so
    that re-saving the artifact (decdec.artifacts.save replaces the directory) drops it too.
    target None -> <artifact>/tuned.json; target 0.025 -> <artifact>/tuned-2.5pct.json."""
    d = Path(artifact_dir)
    if target is None:
        return d / TUNED_CONFIG_NAME
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target < 10:
        raise ValueError(f"target must be a slowdown fraction in (0, 10), got {target!r}")
    stem, suffix = os.path.splitext(TUNED_CONFIG_NAME)
    return d / f"{stem}-{round(100 * target, 6):g}pct{suffix}"


def artifact_checksum(artifact_dir) -> str:
    """sha256 of an artifact's manifest.json, which lists every file's sha256: it identifies the
    artifact's whole content.  Meant for the meta of save_config (key "artifact_sha256")."""
    from .artifacts import MANIFEST
    return hashlib.sha256((Path(artifact_dir) / MANIFEST).read_bytes()).hexdigest()


class LoadedConfig(NamedTuple):
    config: EngineConfig
    meta: dict


def save_config(path, config: EngineConfig, meta: Mapping[str, Any] | None = None) -> Path:
    """Write config (and meta: any JSON object, e.g. {"artifact_sha256", "gpu", "target",
    "tuned_us", "slowdown"}) to path atomically (decdec.fileio.atomic_write_text: readers see the
    old file or the whole new one)."""
    if not isinstance(config, EngineConfig):
        raise TypeError(f"config must be an EngineConfig, got {type(config).__name__}")
    config.validate()
    meta = {} if meta is None else dict(meta)
    text = json.dumps({"format": CONFIG_FORMAT, "format_version": CONFIG_FORMAT_VERSION,
                       "config": config.as_dict(), "meta": meta}, indent=1, allow_nan=False)
    path = Path(path)
    atomic_write_text(path, text + "\n")
    return path


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise TunedConfigError(f"key {k!r} appears twice")
        d[k] = v
    return d


def _no_constant(name):
    raise TunedConfigError(f"{name} is not allowed")


def load_config(path, expect_meta: Mapping[str, Any] | None = None,
                n_sm: int | None = None) -> LoadedConfig:
    """Read a file written by save_config: (config, meta).  Every problem raises TunedConfigError
    (a ValueError) naming the file and the problem: not JSON, wrong format or version, missing,
    unknown or repeated keys, n_tb or k_chunk out of range (n_tb against a GPU of n_sm SMs when
    given), or a meta entry differing from expect_meta (e.g. {"artifact_sha256": ..., "gpu": ...}:
    a configuration tuned for another artifact or GPU).  A missing file raises FileNotFoundError."""
    path = Path(path)
    raw = path.read_bytes()

    def bad(problem):
        return TunedConfigError(f"{path}: {problem}")

    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates,
                         parse_constant=_no_constant)
    except TunedConfigError as e:
        raise bad(f"bad keys or values: {e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise bad(f"not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise bad(f"must hold a JSON object, got {type(doc).__name__}")
    if doc.get("format") != CONFIG_FORMAT:
        raise bad(f"format is {doc.get('format')!r:.60}, expected {CONFIG_FORMAT!r}")
    v = doc.get("format_version")
    if not _is_int(v) or v != CONFIG_FORMAT_VERSION:
        raise bad(f"format_version {v!r:.40} is not supported (this decdec reads version "
                  f"{CONFIG_FORMAT_VERSION})")
    expected = {"format", "format_version", "config", "meta"}
    if set(doc) != expected:
        missing, unknown = sorted(expected - set(doc)), sorted(set(doc) - expected)
        raise bad("bad keys: " + "; ".join(filter(None, [f"missing {missing}" if missing else "",
                                                        f"unknown {unknown}" if unknown else ""])))
    try:
        config = EngineConfig.from_json(doc["config"])
        if n_sm is not None:
            config.validate(n_sm)
    except ValueError as e:
        raise bad(f"bad config: {e}") from None
    meta = doc["meta"]
    if not isinstance(meta, dict):
        raise bad(f"meta must be an object, got {type(meta).__name__}")
    for key, want in (expect_meta or {}).items():
        if key not in meta:
            raise bad(f"meta lacks {key!r} (expected {want!r:.80}): tuned for something else?")
        if meta[key] != want:
            raise bad(f"meta {key!r} is {meta[key]!r:.80}, expected {want!r:.80}: tuned for a "
                      f"different {key}; re-tune")
    return LoadedConfig(config, meta)


__all__ = ["MODULE_TYPES", "LINEAR_TO_TYPE", "K_STEPS", "EngineConfig", "TuneResult", "tune_latency",
           "tune_quality", "fetch_nbytes", "base_read_nbytes", "llama_layer_shapes", "layer_shapes_of",
           "type_fetch_nbytes", "predict_knee", "predict_model_knees", "format_knees",
           "SimulatedEngine", "CONFIG_FORMAT", "CONFIG_FORMAT_VERSION", "TUNED_CONFIG_NAME",
           "TunedConfigError", "tuned_config_path", "artifact_checksum", "LoadedConfig",
           "save_config", "load_config"]
