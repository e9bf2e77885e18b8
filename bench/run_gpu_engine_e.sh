#!/bin/bash
# Device call E: stash part 1 of the SmolLM2 artifact, build, the engine's GPU tests (after the
# PyErr_Format %g fix).  Call F follows at once.
cd "$(dirname "$0")/.."
. bench/gpu_env.sh
python3 bench/stage.py put .stage --stash /root/stash 2>&1 | tail -1
timeout 200 python3 -m pip install -q --no-build-isolation --no-deps -e . > /tmp/pip.log 2>&1; echo "pip rc=$?"; tail -3 /tmp/pip.log
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py > $OUT/pytest_engine.log 2>&1; echo "engine pytest rc=$?"; tail -3 $OUT/pytest_engine.log | cut -c1-300
