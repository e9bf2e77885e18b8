#!/bin/bash
# One device call: harness tests, extension build + pytest GPU tests, racecheck on one small layer
# (the whole suite under racecheck outlasts the budget), the full kernel benchmark, component
# timings.  Logs under $OUT.  HARNESS=path skips building the harness (carry a prebuilt one).
OUT=${OUT:-/tmp/out}
cd "$(dirname "$0")/../../.."
export PYTHONUNBUFFERED=1
set -o pipefail
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
H=${HARNESS:-}
if [ -z "$H" ]; then sh csrc/cuda/tests/build.sh /tmp/ddh 90 > $OUT/build.log 2>&1; H=/tmp/ddh/cuda_harness; fi
timeout 90 $H test > $OUT/test.log 2>&1; echo "harness test rc=$?"; grep -E "FAIL|TESTS" $OUT/test.log | head
export CUDA_HOME=$(dirname $(dirname $(readlink -f $(which nvcc)))) DECDEC_CUDA_ARCHS=90 MAX_JOBS=16
timeout 170 python3 -m pip install -q --no-build-isolation --no-deps -e . > $OUT/pip.log 2>&1; echo "pip rc=$?"; tail -3 $OUT/pip.log
timeout 100 python3 -m pytest -q -x tests/test_cuda.py tests/test_device_array.py 2>&1 | tee $OUT/pytest_gpu.log | tail -3
timeout ${SAN_TIMEOUT:-50} compute-sanitizer --tool racecheck $H race > $OUT/racecheck.log 2>&1; echo "racecheck rc=$?"; grep -E "RACECHECK SUMMARY|TESTS" $OUT/racecheck.log
timeout ${BENCH_TIMEOUT:-200} python3 -m decdec.bench kernels --json $OUT/kernels.json > $OUT/bench_kernels.txt 2>&1; echo "bench rc=$?"
grep -E "base |n_tb  8|n_tb 16" $OUT/bench_kernels.txt | cut -c1-150 | head -60
timeout ${PARTS_TIMEOUT:-60} $H parts quick > $OUT/parts.log 2>&1; echo "parts rc=$?"; cat $OUT/parts.log
