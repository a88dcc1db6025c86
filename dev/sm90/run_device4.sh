#!/bin/bash
# Run 4: v4 and v7 (baselines, same machine) against v8/v9 (staged bulk-copy epilogue).
cd "$(dirname "$0")"
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvcc -gencode=arch=compute_90a,code=sm_90a -std=c++17 -O3 -Xptxas -v -o gemm1 gemm1_wgmma.cu > $OUT/build.log 2>&1 || { cat $OUT/build.log; exit 1; }
timeout 40 ./gemm1 4,7 20 2>&1 | tee $OUT/v47.log
timeout 40 ./gemm1 8,9 20 2>&1 | tee $OUT/v89.log
