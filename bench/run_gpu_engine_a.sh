#!/bin/bash
# Engine device call A (issue 8): stash the first part of the staged SmolLM2 artifact, build, the
# ops harness, the engine's GPU tests, then `bench engine` on synthetic Llama-3-8B (3/4-bit) with
# its torch peers.  Call B (run_gpu_engine_b.sh) must follow at once (the stash lives 30 s).
cd "$(dirname "$0")/.."
. bench/gpu_env.sh
python3 bench/stage.py put .stage --stash /root/stash 2>&1 | tail -2
(sh csrc/cuda/tests/build_ops.sh /tmp/ddops 90 > $OUT/ops_build.log 2>&1; echo "ops build rc=$?") &
timeout 240 python3 -m pip install -q --no-build-isolation --no-deps -e . > $OUT/pip.log 2>&1; echo "pip rc=$?"; tail -3 $OUT/pip.log
wait
timeout 60 /tmp/ddops/ops_test > $OUT/ops_test.log 2>&1; echo "ops test rc=$?"; grep -E "FAIL|OPS TESTS" $OUT/ops_test.log | head -20
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_engine.py > $OUT/pytest_engine.log 2>&1; echo "engine pytest rc=$?"; tail -25 $OUT/pytest_engine.log | cut -c1-300
timeout ${BENCH_T:-280} python3 -m decdec bench engine --models llama3-8b --bits 3 4 --k-chunks 0 4 8 16 --json $OUT/engine_8b.json > $OUT/bench_engine_8b.txt 2>&1; echo "bench engine rc=$?"; cut -c1-200 $OUT/bench_engine_8b.txt | tail -25
