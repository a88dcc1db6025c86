#!/bin/bash
# One device call: build, validate all cases, benchmark every variant, time torch._grouped_mm,
# ncu speed-of-light of v4 and v5 at T=16384.
cd "$(dirname "$0")"
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv 2>&1 | tee $OUT/gpu.txt
nvcc -gencode=arch=compute_90a,code=sm_90a -std=c++17 -O3 -Xptxas -v -o gemm1 gemm1_wgmma.cu > $OUT/build.log 2>&1 || { cat $OUT/build.log; exit 1; }
(command -v cuobjdump >/dev/null && cuobjdump -sass gemm1 | grep -oE "HGMMA\.[^ ]*|UTMALDG[^ ]*|LDGSTS[^ ]*|SYNCS[^ ]*" | sort | uniq -c) > $OUT/sass.txt
timeout 60 ./gemm1 1,2,3,4 ${REPS:-20} 2>&1 | tee $OUT/v1234.log
timeout 40 ./gemm1 5,6 ${REPS:-20} 2>&1 | tee $OUT/v56.log
PYTHONUNBUFFERED=1 timeout 45 python3 bench_torch.py 2>&1 | tee $OUT/torch.log
for v in 4 5; do
  timeout 30 ncu --section SpeedOfLight --metrics lts__t_bytes.sum,lts__t_sectors_srcunit_tex_op_read.sum,l1tex__m_xbar2l1tex_read_bytes.sum,sm__inst_executed_pipe_tensor_op_gmma.avg.pct_of_peak_sustained_active -k regex:gemm1_ws -c 1 ./gemm1 $v 1 2 > $OUT/ncu_v$v.txt 2>&1
  grep -E "Duration|Throughput|lts__|l1tex__m|gmma|SM Frequency" $OUT/ncu_v$v.txt | sed "s/^/v$v /"
done
