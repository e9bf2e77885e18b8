#!/bin/bash
# Engine device call B (right after A, same warm machine): the second part of the SmolLM2
# artifact, then GPU-vs-CPU agreement, the end-to-end tuner on SmolLM2 (latency and quality modes,
# GPU perplexity at each) and on synthetic Llama-3-8B 3-bit.
cd "$(dirname "$0")/.."
. bench/gpu_env.sh
python3 bench/stage.py put .stage --stash /root/stash 2>&1 | tail -1
python3 bench/stage.py join art_awq3 --stash /root/stash --dest /root/art 2>&1 | tail -1
python3 -c "import decdec" 2>/dev/null || timeout 240 python3 -m pip install -q --no-build-isolation --no-deps -e . > $OUT/pip.log 2>&1
A=/root/art/art_awq3
timeout 150 python3 bench/engine_agreement.py gpu --artifact $A --cpu .stage/cpu_ref.npz --json $OUT/agreement.json > $OUT/agreement.txt 2>&1; echo "agreement rc=$?"; cut -c1-400 $OUT/agreement.txt | tail -30
timeout 260 python3 bench/engine_tune_run.py --artifact $A --cpu-ref .stage/cpu_ref.npz --max-seconds 30 --json $OUT/tuner_smollm2.json > $OUT/tuner_smollm2.txt 2>&1; echo "tune smollm2 rc=$?"; cut -c1-300 $OUT/tuner_smollm2.txt | tail -30
timeout ${TUNE8_T:-150} python3 bench/engine_tune_run.py --synthetic llama3-8b --bits 3 --modes latency --max-seconds 25 --json $OUT/tuner_8b.json > $OUT/tuner_8b.txt 2>&1; echo "tune 8b rc=$?"; cut -c1-300 $OUT/tuner_8b.txt | tail -20
