#!/bin/bash
# Last device call of the v2 work: rebuild, the GPU pytest files, the GPU fuzz targets after the
# fixes, and the kernel benchmark (quick: two shapes) to check the refactor left the kernels' speed.
OUT=${OUT:-/tmp/out}
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
set -o pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export CUDA_HOME=$(dirname $(dirname $(readlink -f $(which nvcc)))) DECDEC_CUDA_ARCHS=90 MAX_JOBS=16
timeout 150 python3 -m pip install -q --no-build-isolation --no-deps -e . > $OUT/pip.log 2>&1; echo "pip rc=$?"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_device_array.py tests/test_declinear_v2_gpu.py tests/test_threads.py 2>&1 | tail -3
timeout 90 python3 bench/reliability.py --target cuda_array_interface --target dlpack --n ${FUZZ_N:-4000} --json $OUT/reliability_gpu.json > $OUT/reliability_gpu.txt 2>&1; echo "fuzz gpu rc=$?"; tail -6 $OUT/reliability_gpu.txt
timeout 100 python3 -m decdec.bench kernels --quick --json $OUT/kernels_quick.json > $OUT/bench_kernels_quick.txt 2>&1; echo "bench rc=$?"; cat $OUT/bench_kernels_quick.txt | cut -c1-170 | head -40
