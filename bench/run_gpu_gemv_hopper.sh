#!/bin/bash
# Device call (issue 9 item 1): base kernel 1 -- the cp.async-ring + in-block split-K base GEMV,
# a measurement variant (dd_cuda_variant.base_kernel = 1; production unchanged).  One call on
# nvidia-h200, about 6-9 minutes.  Logs under $OUT:
#   gpu.txt           device, driver, clocks
#   build.log         harness build (sm_90)
#   test.log          cuda_harness test: the whole suite, kernel 1 included ("k1 ..." lines)
#   k1_memcheck.log   compute-sanitizer memcheck of kernel 1 on small shapes, every k-split
#   k1_racecheck.log  compute-sanitizer racecheck of the same (the ring's slot reuse, the
#                     split-K reduction's double buffer)
#   k1cmp.log         kernel 1 beside kernel 0 on the six Llama shapes, g128 then g64 (K1CMP lines
#                     for people, JSON lines for tools)
#   kernels_k1.json   (PY=1 only) python -m decdec bench kernels --base-kernel 1 --quick
# Env: SANITIZE=0 skips the sanitizers; QUICK=1 runs k1cmp at g128 only; PY=1 adds the Python run.
cd "$(dirname "$0")/.."
. bench/gpu_env.sh
B=/tmp/ddh_k1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,clocks.max.sm --format=csv | tee $OUT/gpu.txt
sh csrc/cuda/tests/build.sh $B 90 > $OUT/build.log 2>&1; echo "build rc=$?"; tail -2 $OUT/build.log
[ -x $B/cuda_harness ] || exit 1
# 1. correctness first: the full suite (kernel 0 and everything else unchanged must still pass)
timeout 300 $B/cuda_harness test > $OUT/test.log 2>&1; echo "test rc=$?"
grep -E "^(FAIL|k1 plan|TESTS)" $OUT/test.log | head -60
echo "worst kernel-1 errors vs CPU:"; grep -E "^k1 " $OUT/test.log | awk '{print $NF, $0}' | sort -g | tail -3 | cut -d' ' -f2-
# 2. sanitizers on kernel 1 alone (small shapes, every k-split, store/accumulate, misaligned x)
if [ "${SANITIZE:-1}" = 1 ]; then
  timeout 150 compute-sanitizer --tool memcheck $B/cuda_harness k1race > $OUT/k1_memcheck.log 2>&1; echo "memcheck rc=$?"; tail -3 $OUT/k1_memcheck.log
  timeout 150 compute-sanitizer --tool racecheck $B/cuda_harness k1race > $OUT/k1_racecheck.log 2>&1; echo "racecheck rc=$?"; tail -3 $OUT/k1_racecheck.log
fi
# 3. timing: kernel 1 beside kernel 0, same sessions
timeout 280 $B/cuda_harness k1cmp $([ "${QUICK:-0}" = 1 ] && echo quick) > $OUT/k1cmp.log 2>&1; echo "k1cmp rc=$?"
grep -E "^(k1cmp|K1CMP)" $OUT/k1cmp.log | cut -c1-330
# 4. optional: the Python entry point (builds the extension: a few minutes)
if [ "${PY:-0}" = 1 ]; then
  timeout 240 python3 -m pip install -q --no-build-isolation --no-deps -e . > $OUT/pip.log 2>&1; echo "pip rc=$?"; tail -3 $OUT/pip.log
  timeout 200 python3 -m decdec bench kernels --quick --no-peers --base-kernel 1 --json $OUT/kernels_k1.json 2>&1 | tee $OUT/kernels_k1.txt | grep -E "base"
fi
