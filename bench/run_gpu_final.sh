#!/bin/bash
# Last device call of the v2 work: rebuild, the GPU pytest files, the GPU fuzz targets after the
# fixes, and the kernel benchmark (quick: two shapes) to check the refactor left the kernels' speed.
cd "$(dirname "$0")/.."
. bench/gpu_env.sh
timeout 150 python3 -m pip install -q --no-build-isolation --no-deps -e . > $OUT/pip.log 2>&1; echo "pip rc=$?"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_device_array.py tests/test_declinear_v2_gpu.py tests/test_threads.py 2>&1 | tail -3
timeout 90 python3 bench/reliability.py --target cuda_array_interface --target dlpack --n ${FUZZ_N:-4000} --json $OUT/reliability_gpu.json > $OUT/reliability_gpu.txt 2>&1; echo "fuzz gpu rc=$?"; tail -6 $OUT/reliability_gpu.txt
timeout 100 python3 -m decdec.bench kernels --quick --json $OUT/kernels_quick.json > $OUT/bench_kernels_quick.txt 2>&1; echo "bench rc=$?"; cat $OUT/bench_kernels_quick.txt | cut -c1-170 | head -40
