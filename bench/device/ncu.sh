#!/usr/bin/env bash
# Nsight Compute on one fwd+bwd step: speed of light, warp stalls, occupancy of each
# moe-fused GEMM kernel. Usage: bench/device/ncu.sh [T] (output to $OUT/ncu.txt)
here="$(cd "$(dirname "$0")" && pwd)"
out="${OUT:-/tmp}"
ncu --clock-control none -k "regex:grouped_gemm|wgrad" -c 6 \
  --section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats \
  --section ComputeWorkloadAnalysis \
  python3 "$here/one_step.py" "${1:-4096}" > "$out/ncu.txt" 2>&1
echo "ncu: exit $?"
grep -E "grouped_gemm_kernel|wgrad_kernel|Duration|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Issue Slots Busy|Executed Ipc A|Warp Cycles Per Issued|Registers Per|Stall" "$out/ncu.txt" | grep -v "^ *$" | cut -c1-150 | head -90
