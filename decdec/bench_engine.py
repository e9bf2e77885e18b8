"""`python -m decdec bench engine`: whole-model decode speed of the GPU engine, its roofline and
its torch peers measured in the same run, and the end-to-end tuner on the real decode graph.

Models: SmolLM2 from an artifact (--artifact, real weights) and synthetic models of real shapes
with random packed weights generated on the machine (decdec.engine.synthetic_model): Llama-3-8B
and Llama-3-70B-layer-shaped (8 of its 80 blocks: the 70B model does not fit host memory for
its pinned residuals).  Speed: the decode step is one CUDA graph; the figure is the median over
reps of the mean of n replays (CUDA events) at a fixed context position.  Roofline: bytes one
step must read (quantized weights, fp16 head, KV cache up to the position) / the HBM read
bandwidth measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from .fileio import atomic_write_text


def _hbm_gbs() -> dict:
    from . import _C
    # the zero-copy figure with 32 x 512 threads: what `bench bandwidth` reports as the plateau
    hbm, zc, h2d = _C._cuda_bandwidth(1 << 31, 32)
    return {"hbm_gbs": hbm, "zero_copy_gbs": zc, "h2d_gbs": h2d, "device": _C._cuda_device_name(0)}


def _peer(preset: str, variant: str, pos: int, layers: int | None, prefill: int = 0) -> dict:
    try:
        sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent / "bench"))
        from engine_peers import measure_peer  # noqa: E402  (bench/engine_peers.py, torch)
    except Exception as e:  # noqa: BLE001
        return {"variant": variant, "error": f"peer unavailable: {e}"}
    try:
        kw = {"n_layers": layers} if layers else {}
        if prefill and variant == "bf16":
            kw.update(prefill=True, prefill_tokens=prefill)
        return measure_peer(preset, variant, pos=pos, **kw)
    except Exception as e:  # noqa: BLE001
        return {"variant": variant, "error": f"{type(e).__name__}: {e}"}


def measure_engine(eng, label: str, bits, k_chunks, pos: int, n: int, reps: int, bw: dict) -> list[dict]:
    recs = []
    for k in k_chunks:
        eng.set_k_chunk(k)
        us = eng.step_us(pos=pos, n=n, reps=reps)
        b = eng.bytes_per_step(pos)
        rec = {"model": label, "bits": bits, "k_chunk": k, "n_tb": eng.n_tb, "pos": pos,
               "us_per_step": us, "tokens_per_s": 1e6 / us, "bytes_per_step": b["total"],
               "roofline_us": b["total"] / (bw["hbm_gbs"] * 1e3) if bw.get("hbm_gbs") else None}
        rec["roofline_fraction"] = rec["roofline_us"] / us if rec["roofline_us"] else None
        recs.append(rec)
    return recs


def _print(recs):
    print(f"{'model':<28} {'bits':>4} {'k':>4} {'n_tb':>4} {'us/step':>9} {'tok/s':>8} {'MB/step':>8} "
          f"{'roofline':>8}  peers")
    for r in recs:
        peers = "  ".join(f"{p}: x{v:.2f}" for p, v in r.get("vs_peers", {}).items())
        rf = f"{100 * r['roofline_fraction']:.1f}%" if r.get("roofline_fraction") else "-"
        print(f"{r['model']:<28} {r['bits']!s:>4} {r['k_chunk']:>4} {r['n_tb']:>4} {r['us_per_step']:>9.1f} "
              f"{r['tokens_per_s']:>8.1f} {r['bytes_per_step'] / 1e6:>8.1f} {rf:>8}  {peers}")


def main(argv=None) -> int:
    from . import engine as E
    p = argparse.ArgumentParser(prog="python -m decdec bench engine", description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["llama3-8b"],
                   help="synthetic presets (llama3-8b, llama3-70b-layers, smollm2-135m) and/or 'artifact'")
    p.add_argument("--artifact", default=None, help="artifact directory for the model 'artifact'")
    p.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    p.add_argument("--k-chunks", type=int, nargs="+", default=[0, 8, 16])
    p.add_argument("--pos", type=int, default=256, help="context position of the timed steps")
    p.add_argument("--steps", type=int, default=32, help="graph replays per timing")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--layers-70b", type=int, default=8)
    p.add_argument("--peers", nargs="*", default=["bf16", "int4"], help="torch peers (empty: none)")
    p.add_argument("--prefill", type=int, default=512, help="prefill tokens timed (0: skip)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    bw = _hbm_gbs()
    print(f"# HBM read {bw['hbm_gbs']:.0f} GB/s, zero-copy {bw['zero_copy_gbs']:.1f} GB/s" if bw["hbm_gbs"] else "# no bandwidth probe")
    all_recs = []
    for model in args.models:
        for bits in (args.bits if model != "artifact" else [None]):
            t0 = time.time()
            if model == "artifact":
                from . import artifacts
                qm = artifacts.load(args.artifact)
                label, preset = f"SmolLM2 {qm.label()} (real)", "smollm2-135m"
                bits = qm.label()
            else:
                n_layers = args.layers_70b if model == "llama3-70b-layers" else None
                qm = E.synthetic_model(model, bits=bits, n_layers=n_layers, max_seq=args.pos + args.steps + 8)
                label, preset = f"{model} synthetic", model
            eng = E.GpuEngine(qm, max_seq=max(args.pos + args.steps + 8, args.prefill + 8), max_prefill=512)
            build_s = time.time() - t0
            recs = measure_engine(eng, label, bits, args.k_chunks, args.pos, args.steps, args.reps, bw)
            if args.prefill:
                ids = np.random.default_rng(0).integers(0, qm.config.vocab_size, args.prefill + 1)
                eng.set_k_chunk(0)
                times = []
                for _ in range(3):
                    eng._e.reset(ids)
                    t1 = time.perf_counter()
                    eng._e.prefill(args.prefill)
                    eng._e.read("tokens", 0, 1)
                    times.append(time.perf_counter() - t1)
                for r in recs:
                    r["prefill_tokens_per_s"] = args.prefill / float(np.median(times))
            for r in recs:
                r["build_seconds"] = build_s
            del eng, qm
            all_recs += recs
            peers = {}
            for v in args.peers:
                peers[v] = _peer(preset, v, args.pos, args.layers_70b if model == "llama3-70b-layers" else None,
                                 args.prefill)
            for r in recs:
                r["peers"] = peers
                r["vs_peers"] = {v: pr["us_per_step"] / r["us_per_step"] for v, pr in peers.items()
                                 if pr.get("us_per_step")}
            _print(recs)
            for v, pr in peers.items():
                if pr.get("error"):
                    print(f"  peer {v}: {pr['error']}")
                else:
                    print(f"  peer {v}: {pr['us_per_step']:.1f} us/step ({pr.get('tokens_per_s', 0):.1f} tok/s), "
                          f"prefill {pr.get('prefill_tokens_per_s') or 0:.0f} tok/s")
    if args.json:
        atomic_write_text(args.json, json.dumps({"bandwidth": bw, "records": all_recs}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
