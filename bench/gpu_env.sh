# Sourced by the bench/run_gpu_*.sh device scripts: wheels carried in .whl (gguf), CUDA_HOME from
# nvcc, one architecture (sm_90), unbuffered Python, pipefail, logs under $OUT.
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1
set -o pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export CUDA_HOME=$(dirname $(dirname $(readlink -f $(which nvcc)))) DECDEC_CUDA_ARCHS=90 MAX_JOBS=16
