"""The tuner: pick n_tb (thread blocks DEC may hold) and a k_chunk per module type so that the
linear layers of one decoder block stay within a slowdown bound over the base GEMVs alone.

The algorithm is the reference's, fed by measurements instead of Nsight traces:
  phase 1: for each n_tb, raise one uniform k_chunk in steps while the block's summed linear-layer
           time stays within (1 + target) x the base time; keep the n_tb that allows the largest k;
  phase 2: greedily add +1 k_chunk to the module type whose increase costs least, while within target.
It budgets linear-layer time only, so an end-to-end slowdown lands under the target.

`measure(module, bits, n_tb, k_chunk) -> microseconds` is any callable (k_chunk 0 = base alone);
`GpuMeasure` times graph-captured layer calls on the GPU through the extension's benchmark hooks.
"""
from __future__ import annotations

import argparse
import sys
import json
from dataclasses import asdict, dataclass, field
from typing import Callable

from . import formats
from .fileio import atomic_write_text


@dataclass(frozen=True)
class Module:
    """One module type of a decoder block: `count` linear layers of d_in -> d_out."""
    name: str
    d_in: int
    d_out: int
    count: int = 1


@dataclass
class TuneResult:
    n_tb: int
    k_chunk: dict[str, int]
    base_us: float
    tuned_us: float
    target: float
    measurements: int
    trace: list[str] = field(default_factory=list)

    @property
    def slowdown(self) -> float:
        return self.tuned_us / self.base_us - 1.0


# Module types of a Llama decoder block (k_chunk is chosen per type, as in the paper)
LLAMA_GROUPS = {"qkv": ("wq", "wk", "wv"), "o": ("wo",), "gate_up": ("w_gate", "w_up"), "down": ("w_down",)}


def llama_modules(dim: int, n_heads: int, n_kv_heads: int, head_dim: int, ffn_dim: int) -> list[Module]:
    """The linear layers of one Llama block, grouped by module type (q, k, v are separate GEMVs)."""
    return [Module("qkv", dim, n_heads * head_dim), Module("qkv", dim, n_kv_heads * head_dim, count=2),
            Module("o", n_heads * head_dim, dim), Module("gate_up", dim, ffn_dim, count=2),
            Module("down", ffn_dim, dim)]


PRESETS = {
    "llama3-8b": dict(dim=4096, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=14336),
    "llama3-70b": dict(dim=8192, n_heads=64, n_kv_heads=8, head_dim=128, ffn_dim=28672),
    "smollm2-135m": dict(dim=576, n_heads=9, n_kv_heads=3, head_dim=64, ffn_dim=1536),
}


def tune(modules: list[Module], bits: int, target: float, measure: Callable[[Module, int, int, int], float],
         n_tbs=(4, 8, 16, 32), k_step: int = 4, k_max: int = 128) -> TuneResult:
    if not modules:
        raise ValueError("no modules to tune")
    if not target > 0:
        raise ValueError(f"target must be a positive fraction (0.025 = 2.5%), got {target}")
    if k_step < 1 or k_max < 1 or k_max > formats.CHUNK:
        raise ValueError(f"k_step must be >= 1 and k_max in [1, {formats.CHUNK}]")
    n_tbs = tuple(n_tbs)
    if not n_tbs:
        raise ValueError("n_tbs is empty")
    for n_tb in n_tbs:
        formats.check_n_tb(n_tb)
    cache: dict[tuple, float] = {}

    def t(m: Module, n_tb: int, k: int) -> float:
        key = (m.d_in, m.d_out, 0 if k == 0 else n_tb, k)  # the base alone does not depend on n_tb
        if key not in cache:
            cache[key] = float(measure(m, bits, n_tb, k))
        return cache[key]

    groups = sorted({m.name for m in modules})

    def total(n_tb: int, ks: dict[str, int]) -> float:
        return sum(m.count * t(m, n_tb, ks[m.name]) for m in modules)

    base = total(n_tbs[0], {g: 0 for g in groups})
    budget = base * (1.0 + target)
    trace = [f"base {base:.2f} us, budget {budget:.2f} us (+{100 * target:.1f}%)"]

    best = None  # (k, -time, n_tb)
    for n_tb in n_tbs:
        k = 0
        while k + k_step <= k_max and total(n_tb, {g: k + k_step for g in groups}) <= budget:
            k += k_step
        time_k = total(n_tb, {g: k for g in groups})
        trace.append(f"phase 1: n_tb {n_tb:2d} -> uniform k_chunk {k} ({time_k:.2f} us)")
        cand = (k, -time_k, -n_tb)
        if best is None or cand > best:
            best = cand
    k_uniform, n_tb = best[0], -best[2]
    ks = {g: k_uniform for g in groups}

    while True:
        current = total(n_tb, ks)
        options = []
        for g in groups:
            if ks[g] + 1 > k_max:
                continue
            trial = dict(ks, **{g: ks[g] + 1})
            cost = total(n_tb, trial)
            if cost <= budget:
                options.append((cost - current, g))
        if not options:
            break
        _, g = min(options)
        ks[g] += 1
    tuned = total(n_tb, ks)
    trace.append(f"phase 2: n_tb {n_tb}, k_chunk {ks} ({tuned:.2f} us, {100 * (tuned / base - 1):+.2f}%)")
    return TuneResult(n_tb, ks, base, tuned, target, len(cache), trace)


def apply(result: TuneResult, linears: dict, groups: dict = LLAMA_GROUPS, n_sm: int | None = None) -> int:
    """Set k_chunk and n_tb on DecLinear objects of a model ({(layer, name): DecLinear}); returns
    how many were set.  Layers whose name is in no group are left alone.

    Every setting is checked first, with the limits of the C binding (formats.check_n_tb: a CUDA
    layer takes 1..n_tb_max(SMs of its GPU; `n_sm`, default: `_C.cuda_sm_count()`), a CPU layer
    1..N_TB_LIMIT; k_chunk 0..CHUNK), so a result that does not fit raises ValueError and changes
    nothing.  The layers are changed in place (each call of a layer uses the settings it started
    with); use `DecLinear.with_settings` for a tuned copy that leaves the originals alone."""
    by_name = {name: g for g, names in groups.items() for name in names}
    chosen = []
    for key, layer in linears.items():
        g = by_name.get(key[1])
        if g is None or g not in result.k_chunk:
            continue
        k = int(result.k_chunk[g])
        if not 0 <= k <= formats.CHUNK:
            raise ValueError(f"k_chunk {k} for {key} is outside [0, {formats.CHUNK}]")
        if getattr(layer, "backend", "cpu") == "cuda":
            if n_sm is None:
                from .gpu import sm_count
                n_sm = sm_count()
            n_tb = formats.check_n_tb(result.n_tb, n_sm)
        else:
            n_tb = formats.check_n_tb(result.n_tb)
        chosen.append((layer, k, n_tb))
    for layer, k, n_tb in chosen:
        layer.k_chunk = k
        layer.n_tb = n_tb
    return len(chosen)


class GpuMeasure:
    """Times one layer call (graph-captured, weights rotated past L2, median of `reps`) on the GPU,
    through the same hooks as `python -m decdec bench kernels`."""

    def __init__(self, reps: int = 7):
        from . import _C
        if not (_C.built_with_cuda() and _C.cuda_available()):
            raise RuntimeError("GpuMeasure needs a CUDA build of decdec and a GPU")
        self._C = _C
        self.reps = reps
        self._benches: dict[tuple, tuple] = {}
        self._times: dict[tuple, float] = {}  # shared by several tune() calls (targets)

    def __call__(self, m: Module, bits: int, n_tb: int, k_chunk: int) -> float:
        memo = (m.d_in, m.d_out, bits, n_tb if k_chunk else 0, k_chunk)
        if memo not in self._times:
            self._times[memo] = self._time(m, bits, n_tb, k_chunk)
        return self._times[memo]

    def _time(self, m: Module, bits: int, n_tb: int, k_chunk: int) -> float:
        from .gpu import graph_iters
        key = (m.d_in, m.d_out, bits)
        if key not in self._benches:
            b = self._C._cuda_bench_create(m.d_in, m.d_out, bits, 128)
            _, copies, _ = self._C._cuda_bench_info(b)
            self._benches[key] = (b, graph_iters(copies))
        b, iters = self._benches[key]
        mode = self._C.BENCH_FUSED if k_chunk else self._C.BENCH_BASE
        return self._C._cuda_bench_run(b, mode, k_chunk, n_tb, iters, self.reps)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--engine" in argv:
        from .engine import tune_main
        return tune_main([a for a in argv if a != "--engine"])
    p = argparse.ArgumentParser(prog="python -m decdec tune",
                                epilog="--engine --artifact DIR: tune the whole decode step of the GPU engine "
                                       "instead (python -m decdec tune --engine --help)",
                                description="pick n_tb and per-module k_chunk under a slowdown bound (GPU)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama3-8b")
    p.add_argument("--bits", type=int, choices=(3, 4), default=3)
    p.add_argument("--targets", default="0.025,0.05,0.10", help="slowdown bounds, comma separated")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    measure = GpuMeasure()
    from .gpu import n_tb_choices, sm_count
    n_tbs = n_tb_choices(sm_count())  # 4, 8, 16, 32 where the GPU has the SMs for them
    modules = llama_modules(**PRESETS[args.preset])
    results = []
    print("| preset | bits | target | n_tb | k_chunk (qkv, o, gate_up, down) | base us/block | tuned us | slowdown |")
    print("|---|---|---|---|---|---|---|---|")
    for target in (float(v) for v in args.targets.split(",")):
        r = tune(modules, args.bits, target, measure, n_tbs=n_tbs)
        ks = ", ".join(str(r.k_chunk[g]) for g in ("qkv", "o", "gate_up", "down"))
        print(f"| {args.preset} | {args.bits} | {100 * target:.1f}% | {r.n_tb} | {ks} | {r.base_us:.2f} | "
              f"{r.tuned_us:.2f} | {100 * r.slowdown:+.2f}% |", flush=True)
        results.append(dict(asdict(r), preset=args.preset, bits=args.bits, slowdown=r.slowdown))
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
