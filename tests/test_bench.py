"""bench kernels against a fake extension: the modes it asks for are _C's BENCH_* constants (not
positions of a re-declared enum), and the n_tb it tries fit the GPU's SM count."""
import argparse
import json

import decdec
from decdec import bench


def _fake(monkeypatch, n_sm):
    calls = []
    modes = {"BENCH_BASE": 500, "BENCH_BASE_RESERVED": 501, "BENCH_FUSED": 502, "BENCH_SERIAL": 503,
             "BENCH_READ": 504, "BENCH_DEC_ONLY": 505}
    times = {500: 10.0, 501: 11.0, 502: 12.0, 504: 8.0}
    fake = {"built_with_cuda": lambda: True, "cuda_available": lambda: True,
            "_cuda_device_name": lambda dev: "Fake GPU", "_cuda_bandwidth": lambda n, blocks: (3000.0, 50.0, 25.0),
            "_cuda_bench_create": lambda d_in, d_out, bits, gs: (d_in, d_out, bits, gs),
            "_cuda_bench_info": lambda b: (b[0] * b[1] * b[2] // 8, 64, n_sm),
            "_cuda_bench_run": lambda b, mode, k, n_tb, iters, reps: calls.append(
                (b, mode, k, n_tb, iters, reps)) or times[mode], **modes}
    for name, value in fake.items():
        monkeypatch.setattr(decdec._C, name, value, raising=False)
    return calls


def test_bench_kernels_uses_the_extensions_modes(monkeypatch, tmp_path, capsys):
    calls = _fake(monkeypatch, n_sm=132)
    out = tmp_path / "k.json"
    assert bench.main(["kernels", "--quick", "--no-peers", "--reps", "3", "--json", str(out)]) == 0
    assert {c[1] for c in calls} == {500, 501, 502, 504}
    shapes = {(4096, 4096), (14336, 4096)}  # --quick: the first and the fourth shape
    assert {c[0][:2] for c in calls} == shapes
    fused = [c for c in calls if c[1] == 502]
    # every shape x bits x n_tb (4, 8, 16, 32) x k_chunk (8, 16); k_chunk 0 reuses the base time
    assert sorted({c[3] for c in fused}) == [4, 8, 16, 32] and {c[2] for c in fused} == {8, 16}
    assert len(fused) == 2 * 2 * 4 * 2
    assert all(c[4] == 64 and c[5] == 3 for c in calls)  # graph_iters(64 copies), --reps
    recs = json.loads(out.read_text())
    dec = [r for r in recs if r["kind"] == "dec" and r["k_chunk"] == 8]
    assert all(abs(r["overhead"] - (12.0 / 10.0 - 1)) < 1e-12 for r in dec)
    base = [r for r in recs if r["kind"] == "base"]
    assert all(abs(r["fraction_of_read"] - 0.8) < 1e-12 for r in base)


def test_bench_kernels_on_a_small_gpu_tries_only_valid_n_tb(monkeypatch, capsys):
    calls = _fake(monkeypatch, n_sm=16)  # a MIG slice: n_tb_max 15
    bench.bench_kernels(argparse.Namespace(quick=True, no_peers=True, reps=1, argv=[]))
    assert sorted({c[3] for c in calls if c[1] in (501, 502)}) == [4, 8]


def test_bench_kernels_times_the_base_kernel_variant_beside_production(monkeypatch, tmp_path, capsys):
    """--base-kernel 2: one extra BENCH_BASE run per shape x bits carrying the variant dict; the
    production runs carry none (the C side then runs kernel 0)."""
    calls = []
    modes = {"BENCH_BASE": 500, "BENCH_BASE_RESERVED": 501, "BENCH_FUSED": 502, "BENCH_SERIAL": 503,
             "BENCH_READ": 504, "BENCH_DEC_ONLY": 505}
    times = {500: 10.0, 501: 11.0, 502: 12.0, 504: 8.0}

    def run(b, mode, k, n_tb, iters, reps, variant=None):
        calls.append((b, mode, k, n_tb, variant))
        return 5.0 if variant else times[mode]
    fake = {"built_with_cuda": lambda: True, "cuda_available": lambda: True,
            "_cuda_device_name": lambda dev: "Fake GPU", "_cuda_bandwidth": lambda n, blocks: (3000.0, 50.0, 25.0),
            "_cuda_bench_create": lambda d_in, d_out, bits, gs: (d_in, d_out, bits, gs),
            "_cuda_bench_info": lambda b: (b[0] * b[1] * b[2] // 8, 64, 132), "_cuda_bench_run": run, **modes}
    for name, value in fake.items():
        monkeypatch.setattr(decdec._C, name, value, raising=False)
    out = tmp_path / "k.json"
    assert bench.main(["kernels", "--quick", "--no-peers", "--reps", "3", "--base-kernel", "2",
                       "--base-ksplit", "2", "--json", str(out)]) == 0
    var = [c for c in calls if c[4] is not None]
    assert len(var) == 2 * 2 and all(c[1] == 500 and c[4] == {"base_kernel": 2, "base_ksplit": 2} for c in var)
    recs = json.loads(out.read_text())
    base = [r for r in recs if r["kind"] == "base"]
    assert len(base) == 4 and all(r["us_variant"] == 5.0 and abs(r["variant_speedup"] - 2.0) < 1e-12 for r in base)
    assert "base kernel 2 (ksplit 2)" in capsys.readouterr().out
