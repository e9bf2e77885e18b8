#!/bin/bash
# Device call (issue 9): what limits the base GEMV -- access pattern or math.  ~3 minutes.
#   access.log   plain reads in the kernels' access patterns (bench/micro/gemv_probe.cu access)
#   ncu_*.txt    Nsight Compute of one base GEMV launch, kernel 0 and kernel 1
cd "$(dirname "$0")/../.."
. bench/gpu_env.sh
B=/tmp/ddprobe; mkdir -p $B
for f in csrc/cpu/*.c csrc/dd_host.c; do gcc -O2 -std=c11 -fopenmp -DDD_WITH_CUDA=1 -Icsrc -I"$CUDA_HOME/include" -c "$f" -o "$B/$(basename $f .c).o"; done
nvcc -O3 -std=c++17 -gencode=arch=compute_90,code=sm_90 -lineinfo -Icsrc -o $B/gemv_probe bench/micro/gemv_probe.cu csrc/cuda/dd_cuda_*.cu $B/*.o -Xcompiler -fopenmp -lgomp > $OUT/build.log 2>&1; echo "build rc=$?"; tail -3 $OUT/build.log
timeout 120 $B/gemv_probe access > $OUT/access.log 2>&1; echo "access rc=$?"; cat $OUT/access.log
for k in 0 1; do for sh in "8192 28672 3" "8192 28672 4" "14336 4096 3"; do
  tag=$(echo "$sh" | tr ' ' _)_k$k
  timeout 60 ncu --clock-control none --kernel-name regex:"gemv_(base|k1)_kernel" --launch-skip 3 --launch-count 1 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section SchedulerStats --section LaunchStats \
    $B/gemv_probe one $sh $k 8 > $OUT/ncu_$tag.txt 2>&1; echo "ncu $tag rc=$?"
  grep -E "Duration|DRAM Throughput|Memory Throughput|Issue Slots Busy|Achieved Occupancy|Registers Per|No Eligible|Stall|Warp Cycles Per Issued" $OUT/ncu_$tag.txt | head -14
done; done
