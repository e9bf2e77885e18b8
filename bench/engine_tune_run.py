"""The end-to-end tuner on the GPU engine's real decode graph (issue 8, item 5), for SmolLM2 (real
weights, with GPU perplexity on Pride and Prejudice at every configuration) and synthetic
Llama-3-8B-shaped models (speed only).  Writes tuner.json records and, for an artifact, the tuned
configurations beside it (decdec.engine_tune.tuned_config_path).

  python bench/engine_tune_run.py --artifact DIR --cpu-ref cpu_ref.npz --json tuner_smollm2.json
  python bench/engine_tune_run.py --synthetic llama3-8b --bits 3 --json tuner_8b.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decdec import data, engine as E, engine_tune as T  # noqa: E402
from decdec.evaluate import PerplexityProtocol  # noqa: E402
from decdec.fileio import atomic_write_text  # noqa: E402

TARGETS = (0.025, 0.05, 0.10)
PROTOCOL = PerplexityProtocol(context=512, stride=511, n_tokens=1533)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact")
    p.add_argument("--cpu-ref", help="bench/engine_agreement.py cpu output (reference top-k on Emma)")
    p.add_argument("--synthetic")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    p.add_argument("--modes", nargs="+", default=["latency", "quality"])
    p.add_argument("--max-seconds", type=float, default=60)
    p.add_argument("--pos", type=int, default=256)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dec-latency-us", type=float, default=7.0)
    p.add_argument("--base-efficiency", type=float, default=0.45)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    from decdec import _C
    hbm, zc, _ = _C._cuda_bandwidth(1 << 31, 32)
    t0 = time.time()
    if args.artifact:
        from decdec import artifacts
        qm = artifacts.load(args.artifact)
        label = f"SmolLM2-135M-Instruct {qm.label()} (real weights: the GGUF's dequantized Q4_1 = reference)"
    else:
        qm = E.synthetic_model(args.synthetic, bits=args.bits, max_seq=args.pos + args.steps + 8)
        label = f"{args.synthetic} {args.bits}-bit synthetic (random weights)"
    eng = E.GpuEngine(qm, max_seq=max(PROTOCOL.context, args.pos + args.steps) + 8)
    print(f"# {label}: built in {time.time() - t0:.0f} s; HBM {hbm:.0f} GB/s, zero-copy {zc:.1f} GB/s", flush=True)
    text = None
    ref_top = kl_ids = None
    if args.artifact:
        text = qm.tokenizer.encode(data.text("pride_and_prejudice"))
        if args.cpu_ref:
            ref = np.load(args.cpu_ref)
            kl_ids, ref_top = ref["ref_ids"], (ref["ref_top_idx"], ref["ref_top_logp"])

    def ppl():
        return eng.perplexity(text, PROTOCOL, bos_id=qm.config.bos_id)["perplexity"] if text is not None else None

    measure = E.engine_measure(eng, args.pos, args.steps, args.reps)
    base_cfg = T.EngineConfig.uniform(eng.n_tb, 0)
    base_us = float(np.median([measure(base_cfg) for _ in range(5)]))
    recs = {"model": label, "device": _C._cuda_device_name(0), "hbm_gbs": hbm, "zero_copy_gbs": zc,
            "base_us": base_us, "pos": args.pos, "protocol": PROTOCOL.describe(), "uniform": [], "tuned": []}
    # uniform k_chunk rows: the comparison the issue asks for (slowdown and perplexity)
    for k in (0, 4, 8, 16):
        cfg = T.EngineConfig.uniform(eng.n_tb, k)
        us = float(np.median([measure(cfg) for _ in range(3)]))
        eng.set_config(cfg)
        r = {"k_chunk": k, "n_tb": eng.n_tb, "us": us, "slowdown": us / base_us - 1, "perplexity": ppl()}
        recs["uniform"].append(r)
        print(f"uniform k_chunk {k:>2}: {us:8.1f} us/step ({100 * r['slowdown']:+.2f}%)"
              + (f"  ppl {r['perplexity']:.3f}" if r["perplexity"] else ""), flush=True)
    shapes = T.layer_shapes_of(qm.config)
    # the knee model from the two bandwidths, with DEC's fixed latency and the base kernels'
    # fraction of the HBM bandwidth as measured by `bench kernels` (KERNELS.md: ~7 us, ~45%)
    knees = T.predict_model_knees(shapes, args.bits if not args.artifact else 3, hbm, zc,
                                  dec_latency_us=args.dec_latency_us, base_efficiency=args.base_efficiency)
    for target in args.targets:
        for mode in args.modes:
            if mode == "quality" and kl_ids is None:
                continue
            t1 = time.time()
            r = E.tune(eng, target, mode, kl_ids=kl_ids, ref_top=ref_top, pos=args.pos, n=args.steps,
                       reps=args.reps, max_seconds=args.max_seconds, base_us=base_us)
            rec = r.to_json()
            rec["wall_seconds"] = time.time() - t1
            rec["perplexity"] = ppl()
            recs["tuned"].append(rec)
            print(f"{r.summary()}" + (f"; ppl {rec['perplexity']:.3f}" if rec["perplexity"] else "")
                  + f" [{rec['wall_seconds']:.0f} s]", flush=True)
            if args.artifact and mode == "latency":
                meta = {"artifact_sha256": T.artifact_checksum(args.artifact), "gpu": recs["device"],
                        "target": target, "mode": mode, "tuned_us": r.tuned_us, "base_us": r.base_us,
                        "slowdown": r.slowdown, "date": time.strftime("%Y-%m-%d")}
                T.save_config(T.tuned_config_path(args.artifact, target), r.config, meta)
    tuned_cols = {f"{m} {100 * t:g}%": next((x["config"]["k_chunk"] for x in recs["tuned"]
                                            if x["mode"] == m and x["target"] == t), None)
                  for t in args.targets for m in args.modes}
    tuned_cols = {k: v for k, v in tuned_cols.items() if v is not None}
    recs["knees_predicted"] = {m: {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()
                                   if k in ("knee", "k_max", "t_base_us", "t_dec_us", "limiting")}
                               for m, d in knees.items()}
    print(T.format_knees(knees, tuned_cols))
    atomic_write_text(args.json, json.dumps(recs, indent=1, default=str))


if __name__ == "__main__":
    main()
