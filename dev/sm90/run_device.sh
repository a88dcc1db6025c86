#!/bin/bash
# One device call: build, validate all cases, benchmark every variant, time torch._grouped_mm.
cd "$(dirname "$0")"
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv 2>&1 | tee $OUT/gpu.txt
nvcc -gencode=arch=compute_90a,code=sm_90a -std=c++17 -O3 -Xptxas -v -o gemm1 gemm1_wgmma.cu > $OUT/build.log 2>&1 || { cat $OUT/build.log; exit 1; }
(command -v cuobjdump >/dev/null && cuobjdump -sass gemm1 | grep -oE "HGMMA\.[^ ]*|UTMALDG[^ ]*|LDGSTS[^ ]*|SYNCS[^ ]*" | sort | uniq -c) | tee $OUT/sass.txt
timeout 120 ./gemm1 1,2,3 ${REPS:-20} 2>&1 | tee $OUT/v123.log
timeout 40 ./gemm1 4 ${REPS:-20} 2>&1 | tee $OUT/v4.log
PYTHONUNBUFFERED=1 timeout 90 python3 bench_torch.py 2>&1 | tee $OUT/torch.log
