#!/bin/bash
# Device call (issue 9): base kernel 2 -- the tensor-core (mma.sync) base GEMV, a measurement
# variant (dd_cuda_variant.base_kernel = 2).  One call on nvidia-h200, about 3-6 minutes.  Logs
# under $OUT:
#   gpu.txt           device, driver, clocks
#   build.log         harness build (sm_90)
#   test.log          cuda_harness test: the whole suite, kernel 2 included ("k2 ..." lines)
#   k2_memcheck.log   compute-sanitizer memcheck of kernel 2 on small shapes, every k-split
#   k2_racecheck.log  compute-sanitizer racecheck of the same (the split-K reduction's double buffer)
#   k2cmp.log         kernel 2 beside kernel 0 on the six Llama shapes (K2CMP lines for people,
#                     JSON lines for tools)
#   kernels_k2.json   (PY=1 only) python -m decdec bench kernels --base-kernel 2 --quick
# Env: SANITIZE=0 skips the sanitizers; QUICK=1 runs k2cmp at g128 only; PY=1 adds the Python run.
cd "$(dirname "$0")/.."
. bench/gpu_env.sh
B=/tmp/ddh_k2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,clocks.max.sm --format=csv | tee $OUT/gpu.txt
sh csrc/cuda/tests/build.sh $B 90 > $OUT/build.log 2>&1; echo "build rc=$?"; tail -2 $OUT/build.log
[ -x $B/cuda_harness ] || exit 1
# 1. correctness first: the full suite (kernel 0 and everything else unchanged must still pass)
timeout 300 $B/cuda_harness test > $OUT/test.log 2>&1; echo "test rc=$?"
grep -E "^(FAIL|k2 plan|TESTS)" $OUT/test.log | head -60
echo "worst kernel-2 errors vs CPU:"; grep -E "^k2 " $OUT/test.log | awk '{print $NF, $0}' | sort -g | tail -3 | cut -d' ' -f2-
# 2. sanitizers on kernel 1 alone (small shapes, every k-split, store/accumulate, misaligned x)
if [ "${SANITIZE:-1}" = 1 ]; then
  timeout 150 compute-sanitizer --tool memcheck $B/cuda_harness k2race > $OUT/k2_memcheck.log 2>&1; echo "memcheck rc=$?"; tail -3 $OUT/k2_memcheck.log
  timeout 150 compute-sanitizer --tool racecheck $B/cuda_harness k2race > $OUT/k2_racecheck.log 2>&1; echo "racecheck rc=$?"; tail -3 $OUT/k2_racecheck.log
fi
# 3. timing: kernel 1 beside kernel 0, same sessions
timeout 280 $B/cuda_harness k2cmp $([ "${QUICK:-0}" = 1 ] && echo quick) > $OUT/k2cmp.log 2>&1; echo "k2cmp rc=$?"
grep -E "^(k2cmp|K2CMP)" $OUT/k2cmp.log | cut -c1-330
# 4. optional: the Python entry point (builds the extension: a few minutes)
if [ "${PY:-0}" = 1 ]; then
  timeout 240 python3 -m pip install -q --no-build-isolation --no-deps -e . > $OUT/pip.log 2>&1; echo "pip rc=$?"; tail -3 $OUT/pip.log
  timeout 200 python3 -m decdec bench kernels --quick --no-peers --base-kernel 2 --json $OUT/kernels_k2.json 2>&1 | tee $OUT/kernels_k2.txt | grep -E "base"
fi
