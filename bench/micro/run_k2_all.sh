#!/bin/bash
# One device call: kernel 2 correctness + sanitizers + timing (run_gpu_gemv_hopper.sh), then
# Nsight Compute stall reasons of kernels 0 and 2 (run_probe_k2.sh).
cd "$(dirname "$0")/../.."
SANITIZE=${SANITIZE:-1} QUICK=1 bash bench/run_gpu_gemv_hopper.sh
bash bench/micro/run_probe_k2.sh
