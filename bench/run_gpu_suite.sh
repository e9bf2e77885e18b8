#!/bin/bash
# One device call: build the extension with CUDA (sm_90) and run the WHOLE test suite on the GPU
# machine (CPU backend on pinned residuals included; real-model tests skip there: no internet).
# Usage on the device: OUT=$OUT bash bench/run_gpu_suite.sh   (carry .whl with the gguf wheel)
cd "$(dirname "$0")/.."
. bench/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
timeout 200 python3 -m pip install -q --no-build-isolation --no-deps -e . > $OUT/pip.log 2>&1; echo "pip rc=$?"; tail -3 $OUT/pip.log
python3 -c "import decdec; print('cuda build', decdec.built_with_cuda(), 'gpu', decdec.cuda_available())" | tee -a $OUT/gpu.txt
timeout 300 python3 -m pytest -q -rs tests 2>&1 | tee $OUT/pytest_all.log | tail -40
