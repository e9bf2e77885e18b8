#!/bin/bash
# Closing device call of DecLinear v2 (issue 7) on the final tree: build, harness test, GPU pytest
# files, the GPU fuzz targets at 10,000 cases each, and compute-sanitizer memcheck + synccheck on
# each GPU pytest file separately (Python under memcheck is slow: one process per file, in parallel).
cd "$(dirname "$0")/.."
. bench/gpu_env.sh
git log -1 --format='tree %h %s' 2>/dev/null | tee $OUT/tree.txt
(sh csrc/cuda/tests/build.sh /tmp/ddh 90 > $OUT/harness_build.log 2>&1; echo "harness build rc=$?") &
timeout 240 python3 -m pip install -q --no-build-isolation --no-deps -e . > $OUT/pip.log 2>&1; echo "pip rc=$?"; tail -3 $OUT/pip.log
wait
S="compute-sanitizer --error-exitcode 9"
(timeout 120 /tmp/ddh/cuda_harness test > $OUT/harness_test.log 2>&1; echo "harness test rc=$?"; grep -E "FAIL|TESTS" $OUT/harness_test.log | tail -3) &
(timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_device_array.py tests/test_declinear_v2_gpu.py tests/test_threads.py > $OUT/pytest_gpu.log 2>&1; echo "gpu pytest rc=$?"; tail -2 $OUT/pytest_gpu.log) &
(timeout ${FUZZ_T:-330} python3 bench/reliability.py --target cuda_array_interface --target dlpack --n ${FUZZ_N:-10000} --json $OUT/reliability_gpu.json > $OUT/reliability_gpu.txt 2>&1; echo "fuzz gpu rc=$?"; tail -8 $OUT/reliability_gpu.txt) &
for f in test_cuda test_device_array test_declinear_v2_gpu test_threads; do
  (timeout ${SAN_T:-330} $S --tool memcheck python3 -m pytest -q -p no:cacheprovider tests/$f.py > $OUT/san_mem_$f.log 2>&1; echo "memcheck $f rc=$?"; grep -E "ERROR SUMMARY|passed|failed" $OUT/san_mem_$f.log | tail -2) &
done
(timeout ${SAN_T:-330} $S --tool synccheck python3 -m pytest -q -p no:cacheprovider tests/test_declinear_v2_gpu.py > $OUT/san_sync_v2gpu.log 2>&1; echo "synccheck v2_gpu rc=$?"; grep -E "ERROR SUMMARY|passed|failed" $OUT/san_sync_v2gpu.log | tail -2) &
wait
