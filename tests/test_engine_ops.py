"""The engine's ops (csrc/cuda/dd_cuda_ops.cu: embed, add + RMSNorm, RoPE + KV store, attention over
the cache, SwiGLU, fp16 GEMV head, prefill GEMM, dequantisation, sampling and scoring) against host
references in float64, op by op: csrc/cuda/tests/ops_test.cu, built and run from pytest on a GPU
machine (skipped without nvcc or a GPU).  The whole engine against the NumPy model is
tests/test_engine.py."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import decdec

ROOT = Path(__file__).resolve().parent.parent
HAVE_GPU = decdec._C.built_with_cuda() and decdec._C.cuda_available()


@pytest.mark.skipif(not HAVE_GPU or shutil.which("nvcc") is None, reason="needs nvcc and a GPU")
def test_ops_against_host_references(tmp_path):
    arch = os.environ.get("DECDEC_CUDA_ARCHS", "90").split(";")[0].split(",")[0]
    build = subprocess.run(["sh", str(ROOT / "csrc/cuda/tests/build_ops.sh"), str(tmp_path), arch],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    run = subprocess.run([str(tmp_path / "ops_test")], capture_output=True, text=True, timeout=300)
    tail = run.stdout[-3000:]
    assert run.returncode == 0 and "OPS TESTS PASSED: 0 failure(s)" in run.stdout, tail
    assert "FAIL" not in run.stdout.replace("OPS TESTS PASSED", ""), tail


def test_ops_test_source_covers_every_op():
    # every op of the header has a case in the standalone test (so a new op cannot go untested)
    header = (ROOT / "csrc/cuda/dd_cuda_ops.h").read_text()
    test = (ROOT / "csrc/cuda/tests/ops_test.cu").read_text()
    import re
    ops = set(re.findall(r"dd_status (dd_cuda_op_\w+)\(", header))
    assert len(ops) >= 10
    missing = [op for op in sorted(ops) if op not in test]
    assert not missing, missing
