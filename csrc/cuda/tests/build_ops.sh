#!/bin/sh
# Build the standalone op test (csrc/cuda/dd_cuda_ops.cu against host references; the CPU backend
# is linked for dd_cpu_dequant_row). Usage: build_ops.sh OUTDIR [ARCHS]   (run: OUTDIR/ops_test)
set -e
cd "$(dirname "$0")/../../.."
OUT=${1:-/tmp/dd_ops}; ARCHS=${2:-90}
mkdir -p "$OUT/cpu_obj"
GENCODE=""; for a in $(echo "$ARCHS" | tr ';,' '  '); do GENCODE="$GENCODE -gencode=arch=compute_$a,code=sm_$a"; done
for f in csrc/cpu/*.c csrc/dd_host.c; do gcc -O2 -std=c11 -fopenmp -DDD_WITH_CUDA=1 -Icsrc -I"${CUDA_HOME:-/usr/local/cuda}/include" -c "$f" -o "$OUT/cpu_obj/$(basename $f .c).o"; done
# dd_cuda_ops.cu needs the error helpers and device limits of dd_cuda_runtime.cu, which references
# the layer kernels of dd_cuda_gemv.cu and dd_cuda_dec.cu (the engine and bench files are not needed)
nvcc -O3 -std=c++17 $GENCODE -lineinfo -Icsrc -DDD_WITH_CUDA=1 -o "$OUT/ops_test" csrc/cuda/tests/ops_test.cu \
    csrc/cuda/dd_cuda_ops.cu csrc/cuda/dd_cuda_runtime.cu csrc/cuda/dd_cuda_gemv.cu csrc/cuda/dd_cuda_dec.cu \
    "$OUT"/cpu_obj/*.o -Xcompiler -fopenmp -lgomp
echo "built $OUT/ops_test"
