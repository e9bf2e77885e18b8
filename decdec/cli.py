"""Command line: python -m decdec {fetch, quantize, eval, generate, demo, bench, tune}.

The CLI only composes the library (fetch, loaders, pipeline, artifacts, evaluate, generate);
every number it prints comes from those modules.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from pathlib import Path

DEMO_PROMPT = "Write one sentence about the sea."


def _load_source(model: str | None):
    """(LlamaWeights, Tokenizer) of a GGUF file, a Hugging Face directory, or SmolLM2 (default)."""
    from .loaders import load_model
    return load_model(model, verbose=True)


def _read_text(path: str) -> str:
    from . import data
    if path in data.TEXTS:
        return data.text(path)
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"decdec: text file {path!r} not found (or name one of {sorted(data.TEXTS)})")
    raw = p.read_bytes()
    if b"\0" in raw:
        raise SystemExit(f"decdec: {path} looks binary (it holds NUL bytes): give a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SystemExit(f"decdec: {path} is not UTF-8 text (byte {e.start}: {e.reason}); "
                         f"convert it first, e.g. iconv -t UTF-8") from None


def _warn_short_text(n_text_tokens: int, protocol) -> None:
    """Say on stderr when the text scores fewer tokens than asked, or fills fewer than two windows
    (one window's perplexity has no spread to judge it by)."""
    n = min(n_text_tokens, protocol.n_tokens)
    if n < protocol.n_tokens:
        print(f"decdec: warning: the text has {n_text_tokens} tokens, fewer than the {protocol.n_tokens} "
              f"asked (--tokens): scoring {n}", file=sys.stderr)
    if n < 2 * (protocol.context - 1):
        print(f"decdec: warning: {n} tokens fill fewer than two windows of {protocol.context - 1}: the "
              f"perplexity below is one window's and can move a lot with the text", file=sys.stderr)


def _bits(s: str):
    if s in ("3", "4"):
        return int(s)
    if s == "3.5":
        return 3.5
    raise argparse.ArgumentTypeError(f"bits must be 3, 3.5 or 4, got {s!r}")


# ----------------------------------------------------------------------------------- commands
def cmd_fetch(args) -> int:
    from .fetch import fetch_smollm2
    print(fetch_smollm2(args.cache_dir, verbose=True))
    return 0


def cmd_quantize_stream(args) -> int:
    from . import stream
    model = args.model
    if model is None:   # the default model: the SmolLM2 GGUF, fetched once
        from .fetch import fetch_smollm2
        model = fetch_smollm2(verbose=False)
    calib = _read_text(args.calib_text)
    r = stream.stream_quantize(model, args.out, args.bits, method=args.method,
                               group_size=args.group_size, calib_tokens=calib,
                               n_windows=args.calib_windows, resume=args.resume,
                               overwrite=args.overwrite, workers=args.workers)
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in r.seconds.items())
    print(f"saved {args.bits}-bit {args.method.upper()} (streamed) to {r.path}")
    if r.skipped_blocks:
        print(f"resumed: blocks {r.skipped_blocks} were finished and verified")
    print(f"time: {stages}; peak RSS {r.peak_rss_bytes / 2**30:.2f} GiB")
    return 0


def cmd_quantize(args) -> int:
    from . import artifacts, pipeline
    if args.resume and not args.stream:
        print("decdec: error: --resume continues an interrupted --stream run; add --stream "
              "(the in-memory quantizer keeps no journal to resume from)", file=sys.stderr)
        return 2
    if args.workers is not None and not args.stream:
        print("decdec: error: --workers applies to --stream only", file=sys.stderr)
        return 2
    if args.stream:
        return cmd_quantize_stream(args)
    weights, tok = _load_source(args.model)
    calib = tok.encode(_read_text(args.calib_text))
    qm = pipeline.quantize_model(weights, calib, args.bits, method=args.method,
                                 group_size=args.group_size, n_windows=args.calib_windows,
                                 tokenizer=tok)
    out = artifacts.save(qm, args.out, overwrite=args.overwrite)
    gb = qm.gpu_bytes()
    print(f"saved {qm.label()} (bits per block {qm.bits_per_layer}) to {out}")
    print(f"quantized linears {gb['linears'] / 1e6:.1f} MB; residual cheatsheets (host memory) "
          f"{qm.residual_host_bytes() / 1e6:.1f} MB")
    return 0


def _engine_for(args, qm, max_seq: int):
    """A GpuEngine at --k-chunk, or at the tuned configuration of --tuned (a file or a target)."""
    from .engine import GpuEngine
    eng = GpuEngine(qm, max_seq=max_seq)
    if getattr(args, "tuned", None):
        from . import engine_tune
        path = args.tuned
        if not os.path.exists(path):
            path = engine_tune.tuned_config_path(args.artifact, float(args.tuned))
        config, meta = engine_tune.load_config(path)
        eng.set_config(config)
        return eng, f"tuned {os.path.basename(str(path))}: n_tb {config.n_tb}, k_chunk {dict(config.k_chunk)}"
    eng.set_k_chunk(args.k_chunk)
    return eng, f"k_chunk {args.k_chunk}"


def cmd_eval_cuda(args, qm, tokens, protocol) -> int:
    eng, setting = _engine_for(args, qm, protocol.context)
    rows = []
    if not getattr(args, "tuned", None) and args.k_chunk:
        eng.set_k_chunk(0)
        rows.append((f"{qm.label()} k_chunk 0", eng.perplexity(tokens, protocol, bos_id=qm.config.bos_id)))
        eng.set_k_chunk(args.k_chunk)
    rows.append((f"{qm.label()} {setting}", eng.perplexity(tokens, protocol, bos_id=qm.config.bos_id)))
    print(f"protocol: {protocol.describe()} (GPU: teacher-forced decode, every token compensated on its own)")
    for name, r in rows:
        print(f"{name:<60} perplexity {r['perplexity']:9.3f}  ({r['n_tokens']} tokens, "
              f"{len(r['per_window'])} windows, {r['seconds']:.1f} s)")
    return 0


def cmd_eval(args) -> int:
    from . import artifacts, pipeline
    from .evaluate import EvalConfig, PerplexityProtocol, evaluate
    from .model import LlamaModel
    if args.device == "cuda":
        from .engine import _need_engine
        _need_engine()
    qm = artifacts.load(args.artifact)
    if qm.tokenizer is None:
        raise SystemExit(f"decdec: {args.artifact} carries no tokenizer")
    tokens = qm.tokenizer.encode(_read_text(args.text))
    protocol = PerplexityProtocol(context=args.context, stride=args.stride or args.context - 1,
                                  n_tokens=args.tokens)
    if len(tokens) == 0:
        raise SystemExit(f"decdec: {args.text} holds no text to score")
    _warn_short_text(len(tokens), protocol)
    if args.device == "cuda":
        return cmd_eval_cuda(args, qm, tokens, protocol)
    model = pipeline.build_model(qm, args.k_chunk, args.selection)
    if args.reference:
        ref_weights, _ = _load_source(args.reference)
        reference = LlamaModel(ref_weights)
        configs = [EvalConfig("reference", None)]
    else:
        # No reference: KL and top-1 are against the model itself without compensation.
        reference = pipeline.build_model(qm, 0)
        configs = []
    if args.k_chunk:   # the uncompensated row beside the compensated one (one run, same windows)
        configs.append(EvalConfig(f"{qm.label()} k_chunk 0", model, 0, args.selection))
    configs.append(EvalConfig(f"{qm.label()} k_chunk {args.k_chunk} {args.selection}", model,
                              args.k_chunk, args.selection))
    results = evaluate(reference, configs, tokens, protocol, bos_id=qm.config.bos_id)
    print(f"protocol: {protocol.describe()}")
    if not args.reference:
        print("KL / top-1 are against the same model with compensation off (pass --reference "
              "MODEL for the float model)")
    for r in results:
        print(f"{r['name']:<40} perplexity {r['perplexity']:9.3f}  KL {r['kl']:.4f}  "
              f"top-1 {r['top1']:.3f}  ({r['n_tokens']} tokens)")
    return 0


def cmd_generate_cuda(args) -> int:
    from . import artifacts
    from .engine import _need_engine
    _need_engine()    # before minutes of loading: say at once when there is no GPU engine here
    if not args.artifact:
        raise SystemExit("decdec: generate --device cuda needs --artifact (a quantized model)")
    qm = artifacts.load(args.artifact)
    tok = qm.tokenizer
    if tok is None:
        raise SystemExit(f"decdec: {args.artifact} carries no tokenizer")
    text = args.prompt if args.raw else tok.format_chat(args.prompt, None)
    ids = tok.encode(text)
    if ids.size == 0:
        ids = np.asarray([tok.bos_id], dtype=np.int64)
    eng, setting = _engine_for(args, qm, int(ids.size) + args.max_new_tokens + 1)
    temperature = 0.0 if args.greedy else args.temperature
    print(f"[{qm.label()}, {setting}, GPU engine]", file=sys.stderr)
    r = eng.generate(ids, args.max_new_tokens, temperature=temperature, top_p=args.top_p, seed=args.seed)
    new = [int(t) for t in r.tokens]
    stop = next((i for i, t in enumerate(new) if t in tok.stop_ids), None)
    if stop is not None:
        new = new[:stop]
    print(tok.decode(new, skip_special_tokens=True))
    print(f"[{len(new)} tokens, prefill {r.prompt_tokens / max(r.prefill_seconds, 1e-9):.0f} tok/s, "
          f"decode {r.tokens_per_second:.1f} tok/s (graph replays, GPU sampling), stopped by "
          f"{'eos' if stop is not None else 'max_new_tokens'}]", file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    from . import artifacts, pipeline
    from .generate import generate
    from .model import LlamaModel
    if args.device == "cuda":
        return cmd_generate_cuda(args)
    if args.artifact:
        qm = artifacts.load(args.artifact)
        tok = qm.tokenizer
        if tok is None:
            raise SystemExit(f"decdec: {args.artifact} carries no tokenizer")
        model = pipeline.build_model(qm, args.k_chunk, args.selection)
        label = f"{qm.label()}, k_chunk {args.k_chunk}"
    else:
        weights, tok = _load_source(args.model)
        model = LlamaModel(weights)
        label = "float reference"
    temperature = 0.0 if args.greedy else args.temperature
    print(f"[{label}]", file=sys.stderr)
    _, stats = generate(model, tok, args.prompt, args.max_new_tokens, temperature=temperature,
                        top_p=args.top_p, seed=args.seed, chat=not args.raw,
                        on_token=lambda s: print(s, end="", flush=True))
    print()
    print(f"[{stats.new_tokens} tokens, prefill {stats.prefill_tokens_per_second:.1f} tok/s, "
          f"decode {stats.tokens_per_second:.2f} tok/s, stopped by {stats.stopped_by}]",
          file=sys.stderr)
    return 0


def run_demo(eval_tokens: int = 1533, calib_windows: int = 8, method: str = "awq",
             text: str = "pride_and_prejudice", max_new_tokens: int = 24, out=sys.stdout) -> list[dict]:
    """The README's first command: quantize SmolLM2, calibrate DecDEC, measure, generate.

    The same settings as bench/quality_sweep.py (so its rows match the sweep's AWQ rows):
    calibration on 8 windows of 512 Emma tokens, the default AWQ grids, 3.5-bit sensitivity on 256
    tokens, evaluation on the first 1533 tokens of Pride and Prejudice (3 windows of BOS + 511).
    About 5 minutes on 2 cores.
    """
    from . import data, pipeline
    from .cache import cache_entry, cached_quantize_models, is_cached
    from .evaluate import EvalConfig, PerplexityProtocol, evaluate
    from .fetch import GGUF_SHA256, fetch_smollm2
    from .generate import generate
    from .loaders import load_gguf
    from .model import LlamaModel

    t0 = time.time()
    print("decdec demo: SmolLM2-135M-Instruct, 3/3.5/4-bit, DecDEC on the CPU", file=out)
    path = fetch_smollm2(verbose=True)
    weights, tok = load_gguf(path)
    print(f"model: {path.name} (reference = its dequantized Q4_1 weights), "
          f"{weights.config.n_layers} blocks", file=out)
    calib = tok.encode(data.text("emma"))
    bits = (3, 3.5, 4)
    entry = cache_entry(GGUF_SHA256, calib, bits, method, 128, calib_windows, 256)
    print("quantized artifacts: " + (f"cached by an earlier run ({entry}); evaluation only" if is_cached(entry, bits)
          else "none cached yet: quantizing at 3, 3.5 and 4 bits first (about 8 minutes in all on 2 idle "
          f"cores); a second run reuses them from {entry.parent}"), file=out)
    qms, _ = cached_quantize_models(weights, calib, bits, model_id=GGUF_SHA256, method=method, group_size=128,
                                    n_windows=calib_windows, sensitivity_tokens=256, tokenizer=tok)
    m3 = pipeline.build_model(qms[3])
    configs = [
        EvalConfig("reference (dequantized Q4_1)", None, meta={"qm": None, "k": 0}),
        EvalConfig(f"4-bit {method.upper()}", pipeline.build_model(qms[4]), 0, meta={"qm": qms[4], "k": 0}),
        EvalConfig(f"3.5-bit {method.upper()}", pipeline.build_model(qms[3.5]), 0, meta={"qm": qms[3.5], "k": 0}),
        EvalConfig(f"3-bit {method.upper()}", m3, 0, "bucket", meta={"qm": qms[3], "k": 0}),
        EvalConfig(f"3-bit {method.upper()} + DecDEC k_chunk 8", m3, 8, "bucket", meta={"qm": qms[3], "k": 8}),
        EvalConfig(f"3-bit {method.upper()} + DecDEC k_chunk 16", m3, 16, "bucket", meta={"qm": qms[3], "k": 16}),
    ]
    protocol = PerplexityProtocol(context=512, stride=511, n_tokens=eval_tokens)
    reference = LlamaModel(weights)
    results = evaluate(reference, configs, tok.encode(data.text(text)), protocol)
    ref_bytes = 2 * sum(a.size for a in (weights.tok_embeddings, weights.norm)) + 2 * sum(
        v.size for layer in weights.layers for v in layer.values() if v is not None)
    if weights.lm_head is not weights.tok_embeddings:
        ref_bytes += 2 * weights.lm_head.size
    print("", file=out)
    print(f"evaluation: {text}, {protocol.describe()}", file=out)
    print(f"calibration: Emma, {calib_windows} windows of 512 tokens", file=out)
    head = (f"{'model':<36} {'perplexity':>10} {'KL':>8} {'top-1':>7} {'GPU MB':>8} "
            f"{'residual KB/token':>18}")
    print(head, file=out)
    print("-" * len(head), file=out)
    for cfg, r in zip(configs, results):
        qm = cfg.meta["qm"]
        gpu = ref_bytes if qm is None else qm.gpu_bytes()["total"]
        fetched = 0 if qm is None else qm.residual_bytes_per_token(cfg.meta["k"])
        r["gpu_bytes"] = int(gpu)
        r["residual_bytes_per_token"] = int(fetched)
        r.pop("qm", None)
        print(f"{cfg.name:<36} {r['perplexity']:>10.3f} {r['kl']:>8.4f} {r['top1']:>7.3f} "
              f"{gpu / 1e6:>8.1f} {fetched / 1e3:>18.1f}", file=out)
    print("(GPU MB: weights a GPU would hold, fp16 for float tensors; the cheatsheets stay in host "
          "memory and only the selected rows cross the bus)", file=out)
    text_out, stats = generate(pipeline.with_compensation(m3, 16, "bucket"), tok, DEMO_PROMPT,
                               max_new_tokens, chat=True)
    print("", file=out)
    print(f"3-bit + DecDEC k_chunk 16 > {DEMO_PROMPT}", file=out)
    print(f"  {text_out.strip()}", file=out)
    print(f"  ({stats.new_tokens} tokens, {stats.tokens_per_second:.1f} tok/s decode on the CPU)", file=out)
    print(f"demo finished in {time.time() - t0:.0f} s", file=out)
    return results


def cmd_demo(args) -> int:
    run_demo(args.eval_tokens, args.calib_windows, args.method)
    return 0


def cmd_bench(argv) -> int:
    try:
        from . import bench
    except ImportError as e:
        raise SystemExit(f"decdec: the bench module is unavailable ({e})") from None
    return int(bench.main(argv) or 0)


# ----------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m decdec",
                                description="DecDEC: 3/4-bit LLM layers with dynamic error compensation")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("fetch", help="download and verify SmolLM2-135M-Instruct (GGUF)")
    s.add_argument("--cache-dir", default=None)
    s.set_defaults(func=cmd_fetch)

    s = sub.add_parser("quantize", help="quantize a model and save an artifact directory")
    s.add_argument("--model", default=None, help="GGUF file or Hugging Face directory (default SmolLM2)")
    s.add_argument("--bits", type=_bits, default=3)
    s.add_argument("--method", choices=("awq", "rtn"), default="awq")
    s.add_argument("--group-size", type=int, choices=(64, 128), default=128)
    s.add_argument("--calib-text", default="emma", help="text file or shipped text name (default emma)")
    s.add_argument("--calib-windows", type=int, default=16, help="windows of 512 tokens")
    s.add_argument("--out", required=True)
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--stream", action="store_true",
                   help="quantize block by block from a Hugging Face safetensors directory or a GGUF "
                        "file (memory: a few blocks, not the model); bits 3 or 4")
    s.add_argument("--resume", action="store_true",
                   help="with --stream: continue an interrupted run of the same settings")
    s.add_argument("--workers", type=int, default=None,
                   help="with --stream: blocks quantized at once (default min(2, CPUs))")
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("eval", help="perplexity (and KL / top-1) of an artifact on a text file")
    s.add_argument("text", help="text file, or a shipped text: emma, persuasion, pride_and_prejudice")
    s.add_argument("--artifact", required=True)
    s.add_argument("--k-chunk", type=int, default=8)
    s.add_argument("--selection", choices=("bucket", "exact"), default="bucket")
    s.add_argument("--tokens", type=int, default=2044)
    s.add_argument("--context", type=int, default=512)
    s.add_argument("--stride", type=int, default=None, help="default context - 1 (no overlap)")
    s.add_argument("--reference", default=None,
                   help="float model for KL / top-1: 'smollm2', a GGUF file or an HF directory")
    s.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: the GPU engine, teacher-forced decode (default cpu)")
    s.add_argument("--tuned", default=None,
                   help="with --device cuda: a tuned configuration file, or a target such as 0.025 "
                        "(the file `python -m decdec tune --engine` wrote beside the artifact)")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("generate", help="generate text (CPU, or the GPU engine with --device cuda)")
    s.add_argument("prompt")
    s.add_argument("--artifact", default=None, help="quantized model (default: the float SmolLM2)")
    s.add_argument("--model", default=None)
    s.add_argument("--k-chunk", type=int, default=8)
    s.add_argument("--selection", choices=("bucket", "exact"), default="bucket")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--greedy", action="store_true")
    s.add_argument("--temperature", type=float, default=0.7)
    s.add_argument("--top-p", type=float, default=0.9)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--raw", action="store_true", help="no chat template")
    s.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: the GPU engine (prefill, then graph-replayed decode; default cpu)")
    s.add_argument("--tuned", default=None, help="with --device cuda: tuned configuration file or target")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("demo", help="the main job: quantize, calibrate, measure, generate (<10 min)")
    s.add_argument("--eval-tokens", type=int, default=1533)
    s.add_argument("--calib-windows", type=int, default=8)
    s.add_argument("--method", choices=("awq", "rtn"), default="awq")
    s.set_defaults(func=cmd_demo)

    sub.add_parser("bench", help="benchmarks (python -m decdec bench --help)", add_help=False)
    sub.add_parser("tune", help="pick n_tb and per-module k_chunk under a slowdown bound (GPU)", add_help=False)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return cmd_bench(argv[1:])
    if argv and argv[0] == "tune":
        from . import tune
        from .engine import EngineUnavailable
        try:
            return int(tune.main(argv[1:]) or 0)
        except EngineUnavailable as e:
            print(f"decdec: error: tune --engine: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    from .engine import EngineUnavailable
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except EngineUnavailable as e:
        print(f"decdec: error: --device cuda: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as e:
        # Library errors carry a message naming the cause; show it without a traceback.
        if os.environ.get("DECDEC_DEBUG"):
            raise
        print(f"decdec: error: {e}", file=sys.stderr)
        return 2
