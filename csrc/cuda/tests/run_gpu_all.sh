#!/bin/bash
# One device call: harness tests + sanitizers, extension build + pytest GPU tests, full benchmark.
OUT=${OUT:-/tmp/out}
cd "$(dirname "$0")/../../.."
export PYTHONUNBUFFERED=1
SANITIZE=1 BENCH=0 OUT=$OUT bash csrc/cuda/tests/run_gpu.sh 2>&1 | grep -E "TESTS|FAIL|rc=|ERROR SUMMARY|RACECHECK SUMMARY|GPU|H100" | head -20
export CUDA_HOME=$(dirname $(dirname $(readlink -f $(which nvcc)))) DECDEC_CUDA_ARCHS=90
python3 -m pip install -q --no-build-isolation --no-deps -e . > $OUT/pip.log 2>&1; echo "pip rc=$?"; tail -3 $OUT/pip.log
timeout 240 python3 -m pytest -q -x tests/test_cuda.py tests/test_device_array.py 2>&1 | tee $OUT/pytest_gpu.log | tail -6
timeout ${BENCH_TIMEOUT:-280} python3 -c "import sys; from decdec.bench import main; sys.exit(main(sys.argv[1:]))" kernels --json $OUT/kernels.json 2>&1 | tee $OUT/bench_kernels.txt | grep -v "n_tb" | tail -40
