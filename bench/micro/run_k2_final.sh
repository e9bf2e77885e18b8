#!/bin/bash
# One device call (issue 9, 2026-12-04 close): kernel 2 (both row-pair counts) correctness,
# sanitizers and timing, then the Python GPU tests of the variant plumbing (test_declinear_v2_gpu.py).
cd "$(dirname "$0")/../.."
SECONDS=0
SANITIZE=1 QUICK=1 bash bench/run_gpu_gemv_hopper.sh 2>&1 | grep -v "k2 plan"
echo "harness part: ${SECONDS}s"
. bench/gpu_env.sh
timeout 230 python3 -m pip install -q --no-build-isolation --no-deps -e . > $OUT/pip.log 2>&1; echo "pip rc=$? (${SECONDS}s)"; tail -2 $OUT/pip.log
timeout 120 python3 -m pytest -q -x tests/test_declinear_v2_gpu.py tests/test_cuda.py > $OUT/pytest_gpu.log 2>&1; echo "pytest rc=$? (${SECONDS}s)"; tail -3 $OUT/pytest_gpu.log
