"""The quality-aware tuner's objective on the CPU: coarse KL (decdec.engine.coarse_kl) to the float
reference on the calibration window of bench/engine_agreement.py's cpu output, for per-module-type
k_chunk configurations (e.g. the ones the GPU tuners chose), with the CPU model.

    python bench/tuner_kl_check.py --artifact DIR --cpu-ref cpu_ref.npz [--config qkv,o,gate_up,down ...]
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from decdec import artifacts, pipeline  # noqa: E402
from decdec.engine import MODULE_OF, coarse_kl  # noqa: E402
from decdec.evaluate import log_softmax  # noqa: E402

DEFAULT = ["0,0,0,0", "32,16,32,16", "24,24,16,16", "16,16,16,16", "64,64,64,64"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", required=True)
    p.add_argument("--cpu-ref", required=True)
    p.add_argument("--config", nargs="+", default=DEFAULT, help="k_chunk of qkv,o,gate_up,down")
    args = p.parse_args(argv)
    qm = artifacts.load(args.artifact)
    ref = np.load(args.cpu_ref)
    ids, idx, top = ref["ref_ids"], ref["ref_top_idx"], ref["ref_top_logp"]
    model = pipeline.build_model(qm)
    for c in args.config:
        ks = dict(zip(("qkv", "o", "gate_up", "down"), (int(v) for v in c.split(","))))
        for (_, name), lin in model.linears.items():
            lin.k_chunk = ks[MODULE_OF[name]]
        kl = coarse_kl(idx, top, log_softmax(model.forward(ids))[:-1]).mean()
        print(f"k_chunk qkv/o/gate_up/down {c:>14}: coarse KL {kl:.5f}", flush=True)


if __name__ == "__main__":
    main()
