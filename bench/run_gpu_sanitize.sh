#!/bin/bash
# One device call after bench/run_gpu_v2.sh (same warm machine, or it rebuilds): compute-sanitizer
# memcheck / racecheck / synccheck on the harness, memcheck on the GPU pytest files, the whole
# suite, the GPU fuzz targets (CUDA array interface, DLPack) and the soak with CUDA layers.
cd "$(dirname "$0")/.."
. bench/gpu_env.sh
[ -x /tmp/ddh/cuda_harness ] || sh csrc/cuda/tests/build.sh /tmp/ddh 90 > $OUT/harness_build.log 2>&1
python3 -c "import decdec" 2>/dev/null || timeout 240 python3 -m pip install -q --no-build-isolation --no-deps -e . > $OUT/pip.log 2>&1
H=/tmp/ddh/cuda_harness
S="compute-sanitizer --error-exitcode 9"
(timeout 150 $S --tool memcheck --leak-check full $H test > $OUT/san_memcheck.log 2>&1; echo "memcheck harness rc=$?") &
(timeout 150 $S --tool synccheck $H race > $OUT/san_synccheck.log 2>&1; echo "synccheck harness rc=$?") &
(timeout 150 $S --tool racecheck $H race > $OUT/san_racecheck.log 2>&1; echo "racecheck harness rc=$?") &
(timeout 200 python3 -m pytest -q -rs tests -p no:cacheprovider > $OUT/pytest_all.log 2>&1; echo "suite rc=$?"; tail -3 $OUT/pytest_all.log) &
wait
grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|TESTS" $OUT/san_*.log
(timeout 200 $S --tool memcheck python3 -m pytest -q -x -p no:cacheprovider tests/test_declinear_v2_gpu.py tests/test_device_array.py > $OUT/san_memcheck_pytest.log 2>&1; echo "memcheck pytest rc=$?"; grep -E "ERROR SUMMARY|passed|failed" $OUT/san_memcheck_pytest.log | tail -3) &
(timeout 200 python3 bench/reliability.py --target cuda_array_interface --target dlpack --n ${FUZZ_N:-10000} --json $OUT/reliability_gpu.json > $OUT/reliability_gpu.txt 2>&1; echo "fuzz gpu rc=$?"; tail -8 $OUT/reliability_gpu.txt) &
(timeout 200 python3 bench/reliability.py --target soak --cycles 10000 --model-cycles 1000 --json $OUT/soak_gpu.json > $OUT/soak_gpu.txt 2>&1; echo "soak rc=$?"; tail -12 $OUT/soak_gpu.txt) &
wait
