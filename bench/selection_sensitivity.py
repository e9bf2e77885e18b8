# Is the GPU-vs-CPU top-1 disagreement at k_chunk > 0 inherent to selection sensitivity?  CPU model
# at k_chunk K with every DecLinear input rounded to fp16 (what the GPU sees), against the fp32 CPU.
import sys, numpy as np
import argparse
p = argparse.ArgumentParser(description="CPU model with fp16-rounded DecLinear inputs against the fp32 CPU (bench/engine_agreement.py cpu output)")
p.add_argument("--artifact", required=True); p.add_argument("--cpu-ref", required=True)
args = p.parse_args()
from decdec import artifacts, pipeline, data
from decdec.evaluate import log_softmax, eval_windows, PerplexityProtocol
qm = artifacts.load(args.artifact)
ref = np.load(args.cpu_ref)
P = PerplexityProtocol(512, 511, 1533)
toks = qm.tokenizer.encode(data.text("pride_and_prejudice"))
class R16:
    def __init__(s, l): s.l = l; s.in_features = l.in_features; s.out_features = l.out_features
    def forward(s, x): return s.l.forward(np.asarray(x, np.float32).astype(np.float16).astype(np.float32))
for k in (0, 8, 16):
    m = pipeline.build_model(qm, k_chunk=k)
    m.linears = {key: R16(l) for key, l in m.linears.items()}
    nll, top = [], []
    for ids, first in eval_windows(toks, P, qm.config.bos_id):
        lp = log_softmax(m.forward(ids))[:-1][first:]
        tgt = ids[1:][first:]
        nll.append(-lp[np.arange(len(tgt)), tgt]); top.append(lp.argmax(-1))
    nll, top = np.concatenate(nll), np.concatenate(top)
    print(f"k {k}: fp16-input CPU ppl {np.exp(nll.mean()):.3f} vs fp32 CPU {np.exp(ref[f'nll_k{k}'].mean()):.3f}; "
          f"top-1 agreement {100*(top == ref[f'top1_k{k}']).mean():.2f}%, max |dNLL| {np.abs(nll - ref[f'nll_k{k}']).max():.3f}", flush=True)
