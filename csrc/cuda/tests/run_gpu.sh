#!/bin/bash
# One device call: build, correctness, sanitizers, benchmark. Logs under $OUT.
set -o pipefail
OUT=${OUT:-/tmp/out}; B=/tmp/ddh
cd "$(dirname "$0")/../../.."
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee $OUT/gpu.txt
sh csrc/cuda/tests/build.sh $B 90 2>&1 | tail -3
$B/cuda_harness test 2>&1 | tee $OUT/test.log | tail -40
if [ "${SANITIZE:-1}" = 1 ]; then
  timeout 240 compute-sanitizer --tool memcheck --leak-check full $B/cuda_harness test quick > $OUT/memcheck.log 2>&1; echo "memcheck rc=$?"; tail -4 $OUT/memcheck.log
  timeout 200 compute-sanitizer --tool racecheck $B/cuda_harness test quick > $OUT/racecheck.log 2>&1; echo "racecheck rc=$?"; tail -4 $OUT/racecheck.log
fi
[ "${PROBE:-0}" = 1 ] && $B/cuda_harness probe 2>&1 | tee $OUT/probe.log
if [ "${BENCH:-1}" = 1 ]; then
  timeout ${BENCH_TIMEOUT:-300} $B/cuda_harness bench ${BENCH_MODE:-full} > $OUT/bench.log 2>&1; echo "bench rc=$?"
  grep -E '"kind":"(bandwidth|base)"' $OUT/bench.log | cut -c1-220
  grep '"kind":"dec"' $OUT/bench.log | grep '"k_chunk":8,' | cut -c1-200
fi
