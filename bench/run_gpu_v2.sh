#!/bin/bash
# One device call for DecLinear v2 (issue 7): build the harness and the extension (sm_90), the
# harness tests, the GPU pytest files, then the whole suite. Logs under $OUT.
# Usage on the device: OUT=$OUT bash bench/run_gpu_v2.sh   (carry .whl with the gguf wheel)
cd "$(dirname "$0")/.."
. bench/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
(sh csrc/cuda/tests/build.sh /tmp/ddh 90 > $OUT/harness_build.log 2>&1; echo "harness build rc=$?") &
timeout 240 python3 -m pip install -q --no-build-isolation --no-deps -e . > $OUT/pip.log 2>&1; echo "pip rc=$?"; tail -3 $OUT/pip.log
wait
timeout 120 /tmp/ddh/cuda_harness test > $OUT/harness_test.log 2>&1; echo "harness test rc=$?"; grep -E "FAIL|TESTS|passed|failed" $OUT/harness_test.log | tail -15
timeout 200 python3 -m pytest -q -rs ${GPU_TESTS:-tests/test_cuda.py tests/test_device_array.py tests/test_declinear_v2_gpu.py tests/test_threads.py} 2>&1 | tee $OUT/pytest_gpu.log | tail -30
if [ -n "$ALL" ]; then timeout ${ALL_TIMEOUT:-240} python3 -m pytest -q -rs tests -x -p no:cacheprovider 2>&1 | tee $OUT/pytest_all.log | tail -15; fi
