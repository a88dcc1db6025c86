#!/usr/bin/env bash
# Nsight Compute on the sm90a kernels of one 30B-A3B fwd+bwd: speed of light, warp-state
# (stall reason) breakdown and the top stall locations in the source (the library is built
# with -lineinfo). One instance of each kernel launch (GEMM1, GEMM2, dA', dW2, dW1, dX).
# Usage: bench/device/ncu_sm90.sh [T] (default 4096); full report in $OUT/ncu_sm90.txt.
here="$(cd "$(dirname "$0")" && pwd)"
out="${OUT:-/tmp}"
timeout 280 ncu --clock-control none -k "regex:row_gemm_sm90|wgrad_sm90" -c 6 \
  --section SpeedOfLight --section WarpStateStats --section SourceCounters --print-details all \
  --import-source yes python3 "$here/one_step.py" "${1:-4096}" > "$out/ncu_sm90.txt" 2>&1
echo "ncu: exit $?"
grep -E "row_gemm_sm90|wgrad_sm90|Duration|Compute \(SM\) Throughput|L2 Cache Throughput|Stall|stall" \
  "$out/ncu_sm90.txt" | cut -c1-160 | head -120
