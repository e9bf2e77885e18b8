"""GPU engine against the CPU path on the same artifact: perplexity, teacher-forced top-1 agreement
and greedy text, for k_chunk 0 / 8 / 16 (issue 8, item 4).

Two halves, because the CPU figures take minutes on the CPU machine and the logits are too big to
carry to the GPU machine:
  python bench/engine_agreement.py cpu --artifact DIR --out cpu_ref.npz      (CPU machine)
      per position: the CPU model's NLL of the target and its argmax (and top-2 margin), per
      k_chunk, on the README protocol (Pride and Prejudice, first 1533 tokens, windows of BOS +
      511); greedy 64-token continuations of three prompts (prefill with compensation, as the
      CPU generator does).
  python bench/engine_agreement.py gpu --artifact DIR --cpu cpu_ref.npz --json out.json  (GPU)
      the same windows by teacher-forced decode on the engine (every position one compensated
      decode step, logits read back per step), the same prompts greedily (the prompt decoded
      token by token with compensation, so both sides see the same computation), and the table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decdec import artifacts, data, pipeline  # noqa: E402
from decdec.evaluate import PerplexityProtocol, eval_windows, log_softmax  # noqa: E402
from decdec.fileio import atomic_write_text  # noqa: E402

K_CHUNKS = (0, 8, 16)
PROMPTS = ("Write a short story about a lighthouse keeper.",
           "What are the three primary colors?",
           "Explain why the sky is blue in two sentences.")
PROTOCOL = PerplexityProtocol(context=512, stride=511, n_tokens=1533)
STEPS = 64
REF_POSITIONS = 128   # calibration positions of the quality-aware tuner's KL
REF_TOP = 1024


def _windows(qm):
    toks = qm.tokenizer.encode(data.text("pride_and_prejudice"))
    return eval_windows(toks, PROTOCOL, qm.config.bos_id)


def _prompt_ids(qm, prompt):
    return np.asarray(qm.tokenizer.encode(qm.tokenizer.format_chat(prompt, None)), dtype=np.int64)


def cpu(args):
    qm = artifacts.load(args.artifact)
    out = {}
    for k in K_CHUNKS:
        model = pipeline.build_model(qm, k_chunk=k)
        nll, top1, margin = [], [], []
        for ids, first in _windows(qm):
            lp = log_softmax(model.forward(ids))[:-1][first:]
            tgt = ids[1:][first:]
            nll.append(-lp[np.arange(len(tgt)), tgt])
            srt = np.sort(lp, axis=-1)
            top1.append(lp.argmax(-1))
            margin.append(srt[:, -1] - srt[:, -2])
        out[f"nll_k{k}"] = np.concatenate(nll)
        out[f"top1_k{k}"] = np.concatenate(top1)
        out[f"margin_k{k}"] = np.concatenate(margin)
        print(f"CPU k_chunk {k}: perplexity {np.exp(out[f'nll_k{k}'].mean()):.3f}", flush=True)
    # greedy: token by token with a KV cache, prompt prefilled WITH compensation (CPU DecLinear
    # compensates every row); the GPU side decodes the prompt step by step to match
    model = pipeline.build_model(qm, k_chunk=8)
    for i, prompt in enumerate(PROMPTS):
        ids = _prompt_ids(qm, prompt)
        cache = model.new_cache(ids.size + STEPS)
        logits = model.forward(ids, cache=cache)[-1]
        new = []
        for _ in range(STEPS):
            t = int(np.argmax(logits))
            new.append(t)
            logits = model.forward(np.asarray([t]), cache=cache)[-1]
        out[f"greedy_{i}"] = np.asarray(new, dtype=np.int64)
    # the quality-aware tuner's reference: the float model (the GGUF's dequantized weights) on one
    # calibration window of Emma, kept as its top REF_TOP log-probabilities per position (the KL of
    # the distributions coarsened to those tokens + the rest lumped: a lower bound of the full KL,
    # 0.6 MB instead of 25 MB to carry)
    from decdec.fetch import fetch_smollm2
    from decdec.loaders import load_gguf
    from decdec.model import LlamaModel
    weights, tok = load_gguf(fetch_smollm2(verbose=False))
    ids = np.concatenate([[qm.config.bos_id], tok.encode(data.text("emma"))[:REF_POSITIONS]]).astype(np.int64)
    lp = log_softmax(LlamaModel(weights).forward(ids))[:-1]
    idx = np.argsort(-lp, axis=-1)[:, :REF_TOP]
    out["ref_ids"] = ids
    out["ref_top_idx"] = idx.astype(np.int32)
    out["ref_top_logp"] = np.take_along_axis(lp, idx, -1).astype(np.float32)
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out}")


def gpu(args):
    from decdec.engine import GpuEngine
    qm = artifacts.load(args.artifact)
    ref = np.load(args.cpu)
    eng = GpuEngine(qm, max_seq=PROTOCOL.context + 8)
    rows = []
    for k in K_CHUNKS:
        eng.set_k_chunk(k)
        t0 = time.perf_counter()
        nll, top1 = [], []
        for ids, first in _windows(qm):
            eng._e.reset(ids)
            lg = []
            for _ in range(len(ids) - 1):
                eng._e.decode(1)
                lg.append(eng.logits())
            lp = log_softmax(np.stack(lg))[first:]
            tgt = ids[1:][first:]
            nll.append(-lp[np.arange(len(tgt)), tgt])
            top1.append(lp.argmax(-1))
        nll, top1 = np.concatenate(nll), np.concatenate(top1)
        # the graph-replayed scoring path (what `eval --device cuda` runs) must give the same NLLs
        graph_nll = np.concatenate([eng.score(ids)[first:] for ids, first in _windows(qm)])
        cpu_nll, cpu_top1 = ref[f"nll_k{k}"], ref[f"top1_k{k}"]
        agree = float((top1 == cpu_top1).mean())
        near_tie = ref[f"margin_k{k}"] < 1e-2
        rows.append({"k_chunk": k, "cpu_ppl": float(np.exp(cpu_nll.mean())),
                     "gpu_ppl": float(np.exp(nll.mean())), "gpu_graph_ppl": float(np.exp(graph_nll.mean())),
                     "ppl_rel_diff": float(np.exp(nll.mean()) / np.exp(cpu_nll.mean()) - 1),
                     "top1_agreement": agree,
                     "top1_agreement_excluding_near_ties": float((top1 == cpu_top1)[~near_tie].mean()),
                     "max_abs_nll_diff": float(np.abs(nll - cpu_nll).max()),
                     "graph_vs_stepwise_max_abs_nll_diff": float(np.abs(graph_nll - nll).max()),
                     "n_tokens": int(nll.size), "seconds": time.perf_counter() - t0})
        r = rows[-1]
        print(f"k_chunk {k:>2}: CPU ppl {r['cpu_ppl']:.3f}  GPU ppl {r['gpu_ppl']:.3f} "
              f"({100 * r['ppl_rel_diff']:+.3f}%)  graph {r['gpu_graph_ppl']:.3f}  top-1 agreement "
              f"{100 * agree:.2f}%  (max |dNLL| {r['max_abs_nll_diff']:.3f}, {r['n_tokens']} tokens)", flush=True)
    texts = []
    eng.set_k_chunk(8)
    for i, prompt in enumerate(PROMPTS):
        ids = _prompt_ids(qm, prompt)
        g = eng.generate(ids, STEPS, temperature=0.0, prefill=False).tokens
        g_pre = eng.generate(ids, STEPS, temperature=0.0, prefill=True).tokens
        c = ref[f"greedy_{i}"]
        same = int(np.argmax(np.concatenate([g != c, [True]])))
        texts.append({"prompt": prompt, "cpu": qm.tokenizer.decode(c.tolist(), skip_special_tokens=True),
                      "gpu": qm.tokenizer.decode(g.tolist(), skip_special_tokens=True),
                      "gpu_prefill": qm.tokenizer.decode(g_pre.tolist(), skip_special_tokens=True),
                      "identical_prefix_tokens": same})
        print(f"\n> {prompt}\n  CPU: {texts[-1]['cpu']!r}\n  GPU: {texts[-1]['gpu']!r}\n"
              f"  GPU (uncompensated prefill): {texts[-1]['gpu_prefill']!r}\n  identical for {same} of {STEPS} tokens")
    if args.json:
        atomic_write_text(args.json, json.dumps({"artifact": qm.label(), "protocol": PROTOCOL.describe(),
                                                 "rows": rows, "greedy_k8": texts}, indent=1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("side", choices=("cpu", "gpu"))
    p.add_argument("--artifact", required=True)
    p.add_argument("--out", default="cpu_ref.npz")
    p.add_argument("--cpu", default="cpu_ref.npz")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cpu(args) if args.side == "cpu" else gpu(args)


if __name__ == "__main__":
    main()
