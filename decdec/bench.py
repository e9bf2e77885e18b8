"""`python -m decdec bench kernels|bandwidth`: GPU kernel benchmark of the CUDA backend.

Everything decdec itself times runs inside the extension (csrc/cuda/dd_cuda_bench.cu): each
number is the median over replays of a CUDA graph of many calls, CUDA-event timed, with the
layer's weights rotated across enough copies (>= 256 MB) that no call finds them in the 50 MB L2.
A plain streaming read of the same bytes is timed the same way in the same run: that is the
ceiling of a batch-1 GEMV of that shape.  torch is imported only for the peers (fp16 matmul and
torch._weight_int4pack_mm), and skipped with a note when absent.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

from .fileio import atomic_write_text
from .gpu import graph_iters, n_tb_choices

SHAPES = [  # (d_in, d_out, what)
    (4096, 4096, "llama3-8b q/o"), (4096, 1024, "llama3-8b k/v"), (4096, 14336, "llama3-8b gate/up"),
    (14336, 4096, "llama3-8b down"), (8192, 8192, "llama3-70b q/o"), (8192, 28672, "llama3-70b gate/up"),
    (576, 1536, "smollm2-135m gate/up"), (1536, 576, "smollm2-135m down"), (576, 576, "smollm2-135m q/o"),
]
K_CHUNKS = [0, 1, 2, 4, 8, 12, 16, 24, 32, 64]
N_TBS = [4, 8, 16, 32]


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), check=True).stdout.strip()
    except Exception:  # not a checkout
        return "unknown"


def _torch_peers(d_in: int, d_out: int, rotate_bytes: int, reps: int) -> dict:
    """fp16 cuBLAS GEMV and torch's int4 weight-only kernel, graph-captured, weights rotated."""
    try:
        import torch
    except ImportError:
        return {"note": "torch not installed: peers skipped"}
    if not torch.cuda.is_available():
        return {"note": "torch has no CUDA: peers skipped"}
    out = {}
    dev = torch.device("cuda")

    def timed(fns):
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            for f in fns[:2]:
                f()
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=stream):
                for f in fns:
                    f()
            times = []
            for r in range(reps + 2):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record(stream)
                g.replay()
                b.record(stream)
                b.synchronize()
                if r >= 2:
                    times.append(a.elapsed_time(b) * 1000.0 / len(fns))
        times.sort()
        return times[len(times) // 2]

    try:
        nbytes = d_in * d_out * 2
        copies = max(2, min(400, -(-rotate_bytes // nbytes)))
        ws = [torch.randn(d_out, d_in, device=dev, dtype=torch.float16) * 0.02 for _ in range(copies)]
        x = torch.randn(1, d_in, device=dev, dtype=torch.float16)
        outs = [None]

        def mk(w):
            return lambda: outs.__setitem__(0, torch.matmul(x, w.t()))
        out["us_fp16"] = timed([mk(ws[i % copies]) for i in range(graph_iters(copies))])
        out["fp16_bytes"] = nbytes
        del ws
    except Exception as e:  # report, never hide
        out["fp16_error"] = repr(e)[:200]
    try:
        gs = 128
        nbytes = d_in * d_out // 2 + (d_in // gs) * d_out * 4
        copies = max(2, min(400, -(-rotate_bytes // nbytes)))
        x = torch.randn(1, d_in, device=dev, dtype=torch.bfloat16)
        packs = []
        for _ in range(copies):
            q = torch.randint(0, 256, (d_out, d_in // 2), dtype=torch.uint8, device=dev)
            packs.append(torch._convert_weight_to_int4pack(q, 8))
        sz = torch.rand(d_in // gs, d_out, 2, device=dev, dtype=torch.bfloat16) * 0.01
        res = [None]

        def mk4(p):
            return lambda: res.__setitem__(0, torch._weight_int4pack_mm(x, p, gs, sz))
        out["us_int4"] = timed([mk4(packs[i % copies]) for i in range(graph_iters(copies))])
        out["int4_bytes"] = nbytes
    except Exception as e:
        out["int4_error"] = repr(e)[:200]
    return out


def bench_kernels(args) -> list[dict]:
    from decdec import _C
    if not _C.built_with_cuda() or not _C.cuda_available():
        raise SystemExit("bench kernels: needs a CUDA build of decdec and a GPU")
    device = _C._cuda_device_name(0)
    hbm, zc, h2d = _C._cuda_bandwidth(1 << 31, 16)
    meta = {"kind": "meta", "device": device, "date": datetime.date.today().isoformat(), "commit": _commit(),
            "command": "python -m decdec bench " + " ".join(args.argv), "hbm_read_gbs": hbm,
            "zero_copy_gbs": zc, "h2d_gbs": h2d}
    records = [meta]
    print(f"# {device}  {meta['date']}  commit {meta['commit']}  HBM read {hbm:.0f} GB/s, "
          f"zero-copy {zc:.1f} GB/s, H2D {h2d:.1f} GB/s")
    base_kernel, base_ksplit = getattr(args, "base_kernel", 0), getattr(args, "base_ksplit", 0)
    shapes = SHAPES[:1] + SHAPES[3:4] if args.quick else SHAPES
    k_chunks = [0, 8, 16] if args.quick else K_CHUNKS
    for d_in, d_out, what in shapes:
        peers = _torch_peers(d_in, d_out, 256 << 20, args.reps) if not args.no_peers else {}
        for bits in (3, 4):
            b = _C._cuda_bench_create(d_in, d_out, bits, 128)
            nbytes, copies, n_sm = _C._cuda_bench_info(b)
            it = graph_iters(copies)
            t_read = _C._cuda_bench_run(b, _C.BENCH_READ, 0, 0, it, args.reps)
            t_base = _C._cuda_bench_run(b, _C.BENCH_BASE, 0, 0, it, args.reps)
            rec = {"kind": "base", "d_in": d_in, "d_out": d_out, "what": what, "bits": bits, "group_size": 128,
                   "bytes": nbytes, "copies": copies, "us": t_base, "us_read_same_bytes": t_read,
                   "fraction_of_read": t_read / t_base, "gbs": nbytes / t_base / 1e3,
                   "pct_hbm": 100 * nbytes / t_base / 1e3 / hbm}
            if "us_fp16" in peers:
                rec["us_torch_fp16"] = peers["us_fp16"]
                rec["speedup_over_fp16"] = peers["us_fp16"] / t_base
            if "us_int4" in peers:
                rec["us_torch_int4"] = peers["us_int4"]
                rec["speedup_over_int4"] = peers["us_int4"] / t_base
            for key in ("note", "fp16_error", "int4_error"):
                if key in peers:
                    rec[key] = peers[key]
            if base_kernel:
                # the measurement variant beside the production kernel, same session and weights
                var = {"base_kernel": base_kernel, "base_ksplit": base_ksplit}
                t_var = _C._cuda_bench_run(b, _C.BENCH_BASE, 0, 0, it, args.reps, variant=var)
                rec.update({"base_kernel": base_kernel, "base_ksplit": base_ksplit,
                            "us_variant": t_var, "variant_fraction_of_read": t_read / t_var,
                            "variant_pct_hbm": 100 * nbytes / t_var / 1e3 / hbm,
                            "variant_speedup": t_base / t_var})
            records.append(rec)
            if base_kernel:
                print(f"{d_in:>6}->{d_out:<6} {bits}b base kernel {base_kernel} (ksplit {base_ksplit or 'rule'}) "
                      f"{rec['us_variant']:8.2f} us ({100 * rec['variant_fraction_of_read']:5.1f}% of read, "
                      f"{rec['variant_pct_hbm']:5.1f}% HBM, x{rec['variant_speedup']:.2f} vs production)", flush=True)
            print(f"{d_in:>6}->{d_out:<6} {bits}b base {t_base:8.2f} us  read {t_read:7.2f} us "
                  f"({100 * t_read / t_base:5.1f}% of read, {rec['pct_hbm']:5.1f}% HBM)"
                  + (f"  fp16 {peers['us_fp16']:.2f} us (x{rec['speedup_over_fp16']:.2f})" if "us_fp16" in peers else "")
                  + (f"  int4 {peers['us_int4']:.2f} us (x{rec['speedup_over_int4']:.2f})" if "us_int4" in peers else ""),
                  flush=True)
            for n_tb in n_tb_choices(n_sm, N_TBS):
                t_res = _C._cuda_bench_run(b, _C.BENCH_BASE_RESERVED, 0, n_tb, it, args.reps)
                records.append({"kind": "base_reserved", "d_in": d_in, "d_out": d_out, "bits": bits,
                                "n_tb": n_tb, "us": t_res, "slowdown": t_res / t_base - 1})
                row = []
                for k in k_chunks:
                    t = _C._cuda_bench_run(b, _C.BENCH_FUSED, k, n_tb, it, args.reps) if k else t_base
                    records.append({"kind": "dec", "d_in": d_in, "d_out": d_out, "bits": bits, "k_chunk": k,
                                    "n_tb": n_tb, "us": t, "overhead": t / t_base - 1,
                                    "pct_hbm": 100 * nbytes / t / 1e3 / hbm})
                    row.append(f"{100 * (t / t_base - 1):+6.1f}%")
                print(f"    n_tb {n_tb:2d}: base w/o DEC's SMs {100 * (t_res / t_base - 1):+5.1f}% | DEC overhead "
                      + " ".join(f"k{k}:{r}" for k, r in zip(k_chunks, row)), flush=True)
            del b
    return records


def bench_bandwidth(args) -> list[dict]:
    from decdec import _C
    if not _C.built_with_cuda() or not _C.cuda_available():
        raise SystemExit("bench bandwidth: needs a CUDA build of decdec and a GPU")
    recs = [{"kind": "meta", "device": _C._cuda_device_name(0), "date": datetime.date.today().isoformat(),
             "commit": _commit()}]
    for blocks in (4, 8, 16, 32, 64):
        hbm, zc, h2d = _C._cuda_bandwidth(1 << 31, blocks)
        recs.append({"kind": "bandwidth", "zero_copy_blocks_x512_threads": blocks, "hbm_read_gbs": hbm,
                     "zero_copy_gbs": zc, "h2d_gbs": h2d})
        print(f"HBM read {hbm:7.0f} GB/s | zero-copy read with {blocks:2d}x512 threads {zc:6.1f} GB/s | "
              f"H2D pinned {h2d:5.1f} GB/s")
    return recs


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "engine":
        from . import bench_engine
        return bench_engine.main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m decdec bench", description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["kernels", "bandwidth", "engine"],
                   help="engine: whole-model decode (python -m decdec bench engine --help)")
    p.add_argument("--quick", action="store_true", help="two shapes, k_chunk 0/8/16 only")
    p.add_argument("--reps", type=int, default=7, help="graph replays per measurement (median)")
    p.add_argument("--no-peers", action="store_true", help="skip the torch peers")
    p.add_argument("--json", help="write the records here (JSON list), atomically")
    p.add_argument("--base-kernel", type=int, choices=[0, 2, 3], default=0,
                   help="also time this base GEMV kernel (dd_cuda_variant.base_kernel; 2 = kernel 2, the "
                        "tensor-core measurement variant; 3 = kernel 2 on the 3-bit FIELDS layout) beside "
                        "the production kernel, same session (kernels only)")
    p.add_argument("--base-ksplit", type=int, choices=[0, 1, 2, 4, 8], default=0,
                   help="kernel 2's input-dimension split over a block's warps (0 = its rule)")
    args = p.parse_args(argv)
    args.argv = argv
    recs = bench_kernels(args) if args.what == "kernels" else bench_bandwidth(args)
    if args.json:
        atomic_write_text(args.json, json.dumps(recs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
