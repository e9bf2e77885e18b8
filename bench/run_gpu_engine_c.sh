#!/bin/bash
# Engine device call C (issue 8 after fusing q|k|v and gate|up; issue 7's last checks): stash part
# 1 of the SmolLM2 artifact, build, engine GPU tests, GPU fuzz of the CUDA array interface after
# the embedded-NUL fix, compute-sanitizer memcheck over test_declinear_v2_gpu.py in 4 parallel
# groups and over test_threads.py, then (alone on the GPU) `bench engine` on synthetic Llama-3-8B
# and Llama-3-70B-layer shapes with torch peers.  Call D follows at once.
cd "$(dirname "$0")/.."
. bench/gpu_env.sh
python3 bench/stage.py put .stage --stash /root/stash 2>&1 | tail -1
timeout 240 python3 -m pip install -q --no-build-isolation --no-deps -e . > /tmp/pip.log 2>&1; echo "pip rc=$?"; tail -3 /tmp/pip.log
S="compute-sanitizer --error-exitcode 9 --tool memcheck"
mapfile -t IDS < <(python3 -m pytest --co -q -p no:cacheprovider tests/test_declinear_v2_gpu.py 2>/dev/null | grep '::')
for g in 0 1 2 3; do
  sel=(); for i in "${!IDS[@]}"; do [ $((i % 4)) -eq $g ] && sel+=("${IDS[$i]}"); done
  (timeout ${SAN_T:-220} $S python3 -m pytest -q -p no:cacheprovider "${sel[@]}" > /tmp/san_v2gpu_$g.log 2>&1; echo "memcheck v2_gpu group $g (${#sel[@]} tests) rc=$?"; grep -E "ERROR SUMMARY|passed|failed" /tmp/san_v2gpu_$g.log | tail -2) &
done
(timeout ${SAN_T:-220} $S python3 -m pytest -q -p no:cacheprovider tests/test_threads.py > /tmp/san_threads.log 2>&1; echo "memcheck test_threads rc=$?"; grep -E "ERROR SUMMARY|passed|failed|rror" /tmp/san_threads.log | tail -6 | cut -c1-300) &
(timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_device_array.py > $OUT/pytest_engine.log 2>&1; echo "engine+device_array pytest rc=$?"; grep -E "passed|failed|Error" $OUT/pytest_engine.log | tail -8 | cut -c1-300
 timeout 60 python3 bench/reliability.py --target cuda_array_interface --n 10000 > $OUT/fuzz_cai.txt 2>&1; echo "fuzz cai rc=$?"; tail -2 $OUT/fuzz_cai.txt) &
wait
timeout ${BENCH_T:-300} python3 -m decdec bench engine --models llama3-8b llama3-70b-layers --bits 3 --k-chunks 0 8 16 --json $OUT/engine_8b_70b.json > $OUT/bench_engine.txt 2>&1; echo "bench engine rc=$?"; cut -c1-220 $OUT/bench_engine.txt | tail -16
