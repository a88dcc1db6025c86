#!/usr/bin/env bash
# A/B of build-time kernel knobs on one GPU: builds one library per variant and times each
# fwd+bwd with bench/device/profile_kernels.py, alternating A B A B (the second round is the
# one to read; the first warms the GPU). Variants are NAME=FLAGS, FLAGS a quoted list of -D
# options; "base" (no flags) is always first. ARCHS as run_all.sh (default 90a).
#   bash bench/device/ab.sh "s3=-DMOE_SM90_DSWIGLU_STAGES=3" "nopf=-DMOE_SM90_H_PREFETCH=0"
# T values: AB_T (default "4096 16384").
set -u
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/moe_out}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
names=(base); flags=("")
for v in "$@"; do names+=("${v%%=*}"); flags+=("${v#*=}"); done
for i in "${!names[@]}"; do
  d=build/ab-${names[$i]}
  cmake -S . -B $d -G Ninja -DMOE_FUSED_CUDA=ON -DMOE_FUSED_CUDA_ARCHS="${ARCHS:-90a}" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CUDA_FLAGS="${flags[$i]}" > "$OUT/ab_build_${names[$i]}.log" 2>&1 \
    && cmake --build $d -j16 >> "$OUT/ab_build_${names[$i]}.log" 2>&1 || { echo "build ${names[$i]} FAILED"; tail -20 "$OUT/ab_build_${names[$i]}.log"; exit 1; }
done
for round in 1 2; do
  for i in "${!names[@]}"; do
    echo "== round $round: ${names[$i]} (${flags[$i]:-no flags})"
    MOE_FUSED_LIBRARY="$PWD/build/ab-${names[$i]}/libmoe_fused.so" timeout 120 python3 bench/device/profile_kernels.py \
      --shape 30b-a3b -T ${AB_T:-4096 16384} 2>&1 | grep -v -i warn | tee -a "$OUT/ab_${names[$i]}.log" | cut -c1-100 | grep -E "^==|row_gemm|wgrad_sm90|combine"
  done
done
