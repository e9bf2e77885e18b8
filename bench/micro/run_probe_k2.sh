#!/bin/bash
# Device call (issue 9): Nsight Compute stall reasons of base kernels 0 and 2 (one launch each).
cd "$(dirname "$0")/../.."
. bench/gpu_env.sh
B=/tmp/ddprobe; mkdir -p $B
for f in csrc/cpu/*.c csrc/dd_host.c; do gcc -O2 -std=c11 -fopenmp -DDD_WITH_CUDA=1 -Icsrc -I"$CUDA_HOME/include" -c "$f" -o "$B/$(basename $f .c).o"; done
nvcc -O3 -std=c++17 -gencode=arch=compute_90,code=sm_90 -lineinfo -Icsrc -o $B/gemv_probe bench/micro/gemv_probe.cu csrc/cuda/dd_cuda_*.cu $B/*.o -Xcompiler -fopenmp -lgomp > $OUT/build.log 2>&1; echo "build rc=$?"
M=smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_lg_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_wait_per_issue_active.ratio,smsp__average_warps_issue_stalled_not_selected_per_issue_active.ratio,smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio,smsp__average_warps_issue_stalled_no_instruction_per_issue_active.ratio,smsp__average_warps_issue_stalled_dispatch_stall_per_issue_active.ratio,smsp__average_warps_issue_stalled_selected_per_issue_active.ratio,smsp__average_warps_issue_stalled_tex_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_drain_per_issue_active.ratio,smsp__average_warps_issue_stalled_branch_resolving_per_issue_active.ratio,smsp__issue_active.avg.pct_of_peak_sustained_active,dram__throughput.avg.pct_of_peak_sustained_elapsed,smsp__inst_executed.sum,gpu__time_duration.sum,sm__warps_active.avg.pct_of_peak_sustained_active,l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum,lts__t_sectors_srcunit_tex_op_read.sum,smsp__cycles_active.avg
for k in 0 2; do for sh in "8192 28672 3" "8192 28672 4" "14336 4096 4"; do
  tag=$(echo "$sh" | tr ' ' _)_k$k
  timeout 60 ncu --clock-control none --kernel-name regex:"gemv_(base|k2)_kernel" --launch-skip 3 --launch-count 1 --metrics $M \
    $B/gemv_probe one $sh $k 8 > $OUT/ncu_$tag.txt 2>&1; echo "== $tag rc=$?"
  grep -E "stalled|issue_active|dram__|inst_executed|duration|warps_active|requests|sectors|cycles_active" $OUT/ncu_$tag.txt | sed 's/smsp__average_warps_issue_stalled_//; s/_per_issue_active.ratio//' | awk '{printf "%s=%s ", $1, $NF} END {print ""}'
done; done
