#!/bin/bash
# Engine device call D (right after C): join the SmolLM2 artifact, GPU-vs-CPU agreement, the tuner
# on SmolLM2 (GPU perplexity at every configuration) and on synthetic Llama-3-8B 3-bit, and `bench
# engine` on the real SmolLM2 weights with its torch peers.
cd "$(dirname "$0")/.."
. bench/gpu_env.sh
python3 bench/stage.py put .stage --stash /root/stash 2>&1 | tail -1
python3 bench/stage.py join art_awq3 --stash /root/stash --dest /root/art 2>&1 | tail -1
python3 -c "import decdec" 2>/dev/null || timeout 240 python3 -m pip install -q --no-build-isolation --no-deps -e . > /tmp/pip.log 2>&1
A=/root/art/art_awq3
timeout 100 python3 bench/engine_agreement.py gpu --artifact $A --cpu .stage/cpu_ref.npz --json $OUT/agreement.json > $OUT/agreement.txt 2>&1; echo "agreement rc=$?"; grep -E "^k_chunk|identical" $OUT/agreement.txt
timeout 80 python3 bench/engine_tune_run.py --artifact $A --cpu-ref .stage/cpu_ref.npz --max-seconds 15 --json $OUT/tuner_smollm2.json > $OUT/tuner_smollm2.txt 2>&1; echo "tune smollm2 rc=$?"; cut -c1-250 $OUT/tuner_smollm2.txt | grep -v "^|" | tail -12
timeout 60 python3 -m decdec bench engine --models artifact --artifact $A --k-chunks 0 8 16 --json $OUT/engine_smollm2.json > $OUT/bench_smollm2.txt 2>&1; echo "bench smollm2 rc=$?"; cut -c1-220 $OUT/bench_smollm2.txt | tail -8
timeout ${TUNE8_T:-130} python3 bench/engine_tune_run.py --synthetic llama3-8b --bits 3 --modes latency --max-seconds 20 --json $OUT/tuner_8b.json > $OUT/tuner_8b.txt 2>&1; echo "tune 8b rc=$?"; cut -c1-250 $OUT/tuner_8b.txt | tail -14
