#!/bin/bash
# Run 3: v4 (baseline, same machine) and v7 (v4 + SwiGLU epilogue), torch._grouped_mm again.
cd "$(dirname "$0")"
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvcc -gencode=arch=compute_90a,code=sm_90a -std=c++17 -O3 -Xptxas -v -o gemm1 gemm1_wgmma.cu > $OUT/build.log 2>&1 || { cat $OUT/build.log; exit 1; }
timeout 40 ./gemm1 4,7 20 2>&1 | tee $OUT/v47.log
PYTHONUNBUFFERED=1 timeout 45 python3 bench_torch.py 2>&1 | tee $OUT/torch.log
