#!/usr/bin/env bash
# Where the epilogue stores' time goes: ncu memory metrics (ncu_metrics.sh: DRAM bytes read and
# written, L2 write sectors, L2 read hit rate, L2 / L1 throughput, tensor-pipe activity) of dA'
# and dW1 in a 30B-A3B T=16384 step, for the default build and for timing-only builds without
# their stores (dev/sm90/da_diag_overlays.py level 2: dA' without dh and s*a stores;
# dev/sm90/wgrad_diag_overlay.py: the weight-gradient epilogue storing nothing). If the stores
# raise the kernels' DRAM reads (L2 hit rate down), the written lines evict operands; if not,
# the cost is in the write path itself (notes/hopper.md, session 15).
# Usage: bash bench/device/store_cost.sh  (the overlays are made here: no carry needed; ~4 min)
# STORE_COST_KERNELS (default "da dw1"; also "g1": GEMM1 without any store, dev/sm90/
# rowgemm_store_overlays.py's g1n) picks the kernels; session 16 ran the default
# (bench/results/store_cost_session16_h100.txt).
set -u
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/moe_out}"; mkdir -p "$OUT" /tmp/store_cost
# kernel | its ncu regex | launches to skip | its timing-only variant (an ab.sh overlay)
ALL=("da|row_gemm_sm90<[^,]+, .int.2|0|da2" "dw1|wgrad_sm90|1|wgnoepi" "g1|row_gemm_sm90<[^,]+, .int.1|0|g1n")
want="${STORE_COST_KERNELS:-da dw1}"
sel=(); variants=()
for k in "${ALL[@]}"; do
  case " $want " in *" ${k%%|*} "*) sel+=("$k"); variants+=("${k##*|}");; esac
done
python3 dev/sm90/da_diag_overlays.py > /dev/null && python3 dev/sm90/wgrad_diag_overlay.py > /dev/null \
  && python3 dev/sm90/rowgemm_store_overlays.py > /dev/null || exit 1
# ab.sh with no timing rounds only builds the variants (its own logs stay out of $OUT)
args=(); for v in "${variants[@]}"; do args+=("$v=+dev/ab/$v"); done
OUT=/tmp/store_cost_ab AB_ROUNDS=0 bash bench/device/ab.sh "${args[@]}" > /tmp/store_cost_build.log 2>&1
for v in base "${variants[@]}"; do
  [ -f "build/ab-$v/libmoe_fused.so" ] || { echo "build $v failed"; tail -20 /tmp/store_cost_build.log; exit 1; }
done
# each kernel in the default build and in its own variant
for k in "${sel[@]}"; do
  IFS='|' read -r name re skip variant <<< "$k"
  for v in base "$variant"; do
    py=$PWD/python; [ "$v" != base ] && py=/tmp/ab-src-$v/python  # an overlay's own package
    echo "== $v: $name"
    PYTHONPATH=$py MOE_FUSED_LIBRARY=$PWD/build/ab-$v/libmoe_fused.so OUT=/tmp/store_cost \
      bash bench/device/ncu_metrics.sh "${v}_$name" "$re" "$skip" 16384
  done
done 2>&1 | tee "$OUT/store_cost.txt"
