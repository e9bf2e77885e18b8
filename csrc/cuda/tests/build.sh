#!/bin/sh
# Build the standalone CUDA harness (CPU backend as the oracle). Usage: build.sh OUTDIR [ARCHS]
set -e
cd "$(dirname "$0")/../../.."
OUT=${1:-/tmp/dd_harness}; ARCHS=${2:-90}
mkdir -p "$OUT"
GENCODE=""; for a in $(echo "$ARCHS" | tr ';,' '  '); do GENCODE="$GENCODE -gencode=arch=compute_$a,code=sm_$a"; done
for f in csrc/cpu/*.c csrc/dd_host.c; do gcc -O2 -std=c11 -fopenmp -DDD_WITH_CUDA=1 -Icsrc -I"${CUDA_HOME:-/usr/local/cuda}/include" -c "$f" -o "$OUT/$(basename $f .c).o"; done
nvcc -O3 -std=c++17 $GENCODE -lineinfo -Icsrc -o "$OUT/cuda_harness" csrc/cuda/tests/cuda_harness.cu csrc/cuda/dd_cuda_*.cu "$OUT"/*.o -Xcompiler -fopenmp -lgomp
echo "built $OUT/cuda_harness"
