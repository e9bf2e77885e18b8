"""Scale benchmark (issue 10): in-memory vs streaming quantization, time per stage and peak RSS.

  python bench/scale.py smollm2 [--bits 3] [--method awq] [--calib-windows 8] [--results bench/results/scale.md]
      (a) SmolLM2-135M end to end: its GGUF (~/.cache/decdec) is converted once to a float32
      safetensors directory (exact: the reference weights are the dequantized GGUF), then the
      in-memory pipeline (load_hf + quantize_model + artifacts.save) and the streaming one
      (stream_quantize) each run in a fresh process (so that each peak RSS is its own), and the
      two artifacts are compared file by file (sha256). Writes the results table.
  python bench/scale.py synth --out DIR [--shape llama3-8b|tiny] [--dtype bfloat16] [--shard-gb 5]
      (b) a synthetic random checkpoint of Llama-3-8B's shape (~16 GB of bf16; for the GPU
      machine: do not run it on a small box), written chunk by chunk (memory: one chunk).
  python bench/scale.py inmem|stream --model DIR --out ART [--bits 3] [--method awq] [--calib-windows 8]
      one run, printing one JSON line (seconds per stage, peak RSS); `smollm2` calls these.
  python bench/scale.py convert --gguf FILE --out DIR
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _peak_rss() -> int:
    from decdec.stream import peak_rss_bytes
    return peak_rss_bytes()


def cmd_convert(args) -> int:
    from decdec import hfwrite
    from decdec.loaders import load_gguf
    weights, tok = load_gguf(args.gguf)
    # float32: the GGUF's dequantized tensors exactly (bf16 would round the reference model)
    hfwrite.save_hf(weights, args.out, tokenizer=tok, dtype="float32",
                    max_shard_bytes=int(args.shard_mb) << 20, overwrite=True)
    print(args.out)
    return 0


def cmd_inmem(args) -> int:
    from decdec import artifacts, data, pipeline
    from decdec.loaders import load_hf
    seconds = {}
    t0 = time.time()
    weights, tok = load_hf(args.model)
    seconds["load"] = time.time() - t0

    # Time the pipeline's calibration passes by wrapping the module functions it calls.
    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.time()
            try:
                return fn(*a, **k)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.time() - t
        return wrapper
    pipeline.collect_gram_stats = timed("stats", pipeline.collect_gram_stats)
    pipeline.collect_thresholds = timed("thresholds", pipeline.collect_thresholds)
    calib = tok.encode(data.text("emma"))
    t0 = time.time()
    qm = pipeline.quantize_model(weights, calib, args.bits, method=args.method,
                                 n_windows=args.calib_windows, tokenizer=tok)
    total = time.time() - t0
    seconds["quantize"] = total - seconds.get("stats", 0.0) - seconds.get("thresholds", 0.0)
    t0 = time.time()
    artifacts.save(qm, args.out, overwrite=True)
    seconds["save"] = time.time() - t0
    seconds["total"] = sum(seconds.values())
    print(json.dumps({"path": "in-memory", "seconds": {k: round(v, 1) for k, v in seconds.items()},
                      "peak_rss_bytes": _peak_rss()}))
    return 0


def cmd_stream(args) -> int:
    from decdec.stream import stream_quantize
    r = stream_quantize(args.model, args.out, args.bits, method=args.method,
                        n_windows=args.calib_windows, overwrite=True, workers=args.workers)
    print(json.dumps({"path": "streaming", "seconds": {k: round(v, 1) for k, v in r.seconds.items()},
                      "peak_rss_bytes": r.peak_rss_bytes}))
    return 0


def _run(sub: str, args, out: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), sub, "--model", str(args.hf_dir),
           "--out", str(out), "--bits", str(args.bits), "--method", args.method,
           "--calib-windows", str(args.calib_windows)]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.time()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if r.returncode:
        raise SystemExit(f"{sub} failed ({r.returncode})")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["wall"] = round(time.time() - t0, 1)
    return res


def cmd_smollm2(args) -> int:
    from decdec.fetch import fetch_smollm2
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    args.hf_dir = work / "smollm2-f32"
    if not (args.hf_dir / "config.json").is_file():
        gguf = fetch_smollm2()
        print(f"converting {gguf} -> {args.hf_dir}", file=sys.stderr)
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "convert", "--gguf", str(gguf),
                        "--out", str(args.hf_dir)], check=True)
    mem = _run("inmem", args, work / "art-inmem")
    st = _run("stream", args, work / "art-stream")
    fa = json.loads((work / "art-inmem" / "manifest.json").read_text())["files"]
    fb = json.loads((work / "art-stream" / "manifest.json").read_text())["files"]
    differ = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
    ckpt_bytes = sum(p.stat().st_size for p in args.hf_dir.glob("*.safetensors"))
    lines = [
        "# Scale: in-memory vs streaming quantization (issue 10)", "",
        f"Date: {args.date}. Machine: {args.machine}. SmolLM2-135M-Instruct (30 blocks, dim 576), "
        f"its Q4_1 GGUF dequantized and written as a float32 safetensors directory "
        f"({ckpt_bytes / 2**20:.0f} MiB, `bench/scale.py convert`), {args.bits}-bit "
        f"{args.method.upper()}, group 128, default AWQ grids, calibration on "
        f"{args.calib_windows} windows of 512 Emma tokens. Each path ran once, in its own process.",
        "", "Command:", "", "```",
        f"python bench/scale.py smollm2 --bits {args.bits} --method {args.method} "
        f"--calib-windows {args.calib_windows}", "```", "",
        "| path | " + " | ".join(["stage seconds", "total s", "peak RSS"]) + " |",
        "|---|---|---|---|",
    ]
    for r in (mem, st):
        stages = ", ".join(f"{k} {v}" for k, v in r["seconds"].items() if k != "total")
        lines.append(f"| {r['path']} | {stages} | {r['seconds']['total']} | "
                     f"{r['peak_rss_bytes'] / 2**20:.0f} MiB |")
    lines += ["",
              "In-memory stages: load (load_hf: every tensor as float32), stats (Gram statistics pass "
              "over the whole float model), quantize (all blocks, 4 threads at most), thresholds "
              "(second float pass), save. Streaming stages (worker stages are summed over the "
              "threads and overlap the forward pass, so they add up to more than the total): "
              "embeddings (convert the embedding rows, gather the windows' rows), forward (read "
              "each block, run it over the windows with the statistics hook, checkpoint the "
              "stream), quantize, thresholds (the block re-run with its scales), write (block "
              "files, manifest, rename).", "",
              f"Artifacts compared file by file (sha256 of every file in the manifest): "
              f"{'identical' if not differ else 'DIFFER: ' + ', '.join(differ)} "
              f"({len(fa)} files).", ""]
    out = Path(args.results)
    from decdec.fileio import atomic_write_text
    atomic_write_text(out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if not differ else 1


def cmd_synth(args) -> int:
    from decdec import hfwrite
    from decdec.model import LlamaConfig
    if args.shape == "llama3-8b":
        config = hfwrite.LLAMA3_8B
    else:   # a tiny model of the same family (GQA 4:1, untied head) to test the writer
        config = LlamaConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=64,
                             ffn_dim=512, vocab_size=1024, norm_eps=1e-5, rope_theta=500000.0,
                             tie_embeddings=False, max_seq_len=8192, bos_id=1, eos_id=2)
    t0 = time.time()
    hfwrite.write_random_hf(args.out, config, dtype=args.dtype, seed=args.seed,
                            max_shard_bytes=int(args.shard_gb * (1 << 30)), overwrite=args.overwrite)
    size = sum(p.stat().st_size for p in Path(args.out).glob("*.safetensors"))
    print(json.dumps({"out": str(args.out), "bytes": size, "seconds": round(time.time() - t0, 1),
                      "peak_rss_bytes": _peak_rss()}))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/scale.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def run_args(s):
        s.add_argument("--bits", type=int, choices=(3, 4), default=3)
        s.add_argument("--method", choices=("awq", "rtn"), default="awq")
        s.add_argument("--calib-windows", type=int, default=8)

    s = sub.add_parser("smollm2")
    run_args(s)
    s.add_argument("--work", default=str(Path.home() / ".cache" / "decdec" / "scale"))
    s.add_argument("--results", default=str(ROOT / "bench" / "results" / "scale.md"))
    s.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    s.add_argument("--machine", default=f"{os.cpu_count()}-core CPU box")
    s.set_defaults(func=cmd_smollm2)
    for name, fn in (("inmem", cmd_inmem), ("stream", cmd_stream)):
        s = sub.add_parser(name)
        run_args(s)
        s.add_argument("--model", required=True)
        s.add_argument("--out", required=True)
        s.add_argument("--workers", type=int, default=None)
        s.set_defaults(func=fn)
    s = sub.add_parser("convert")
    s.add_argument("--gguf", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--shard-mb", type=int, default=200)
    s.set_defaults(func=cmd_convert)
    s = sub.add_parser("synth")
    s.add_argument("--out", required=True)
    s.add_argument("--shape", choices=("llama3-8b", "tiny"), default="llama3-8b")
    s.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    s.add_argument("--shard-gb", type=float, default=5.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_synth)
    args = p.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
