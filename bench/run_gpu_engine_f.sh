#!/bin/bash
# Device call F (right after E): the quality-aware tuner against the paper's latency-only one on
# SmolLM2 at slowdown targets where DEC fits at all on its small layers (100%, 150%).
cd "$(dirname "$0")/.."
. bench/gpu_env.sh
python3 bench/stage.py put .stage --stash /root/stash 2>&1 | tail -1
python3 bench/stage.py join art_awq3 --stash /root/stash --dest /root/art 2>&1 | tail -1
A=/root/art/art_awq3
timeout 150 python3 bench/engine_tune_run.py --artifact $A --cpu-ref .stage/cpu_ref.npz --targets 1.0 1.5 --max-seconds 25 --json $OUT/tuner_smollm2_wide.json > $OUT/tuner_smollm2_wide.txt 2>&1; echo "tune rc=$?"; cut -c1-300 $OUT/tuner_smollm2_wide.txt | grep -v "^|" | tail -12
