#!/usr/bin/env bash
# Runs dev/sm90/ingress_probe.cu's modes on the device (one call, ~1 min): the per-SM load
# rates of a synthetic 128 x 256 mainloop from an L2-resident buffer (16 MiB), one the size of
# x at 30B-A3B T=16384 (64 MiB) and a DRAM-streamed one (4 GiB). MODES / BUFS override;
# DEEP="NA,NB ..." runs deepA with those ring depths; COAL="modes" runs those gather modes with
# eight lanes a row (as sm90_rowgemm) too.
set -u
cd "$(dirname "$0")/../.."
build() {  # build OUTPUT [-D...]
  local out=$1; shift
  nvcc -gencode arch=compute_90a,code=sm_90a -std=c++17 -O3 -I csrc "$@" -o "$out" dev/sm90/ingress_probe.cu
}
build /tmp/ingress_probe || exit 1
[ -n "${COAL:-}" ] && { build /tmp/ingress_probe_coal -DCOAL=1 || exit 1; }
for d in ${DEEP:-}; do
  build /tmp/ingress_probe_${d/,/_} -DNA_DEEP=${d%,*} -DNB_DEEP=${d#*,} || exit 1
done
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
for b in ${BUFS:-$((16 << 20)) $((64 << 20)) $((4 << 30))}; do
  for m in ${MODES:-mmaonly fill mma mc dsmemfill dsmem gather gathermc gatherhalf gather22}; do
    timeout 60 /tmp/ingress_probe -m $m -b $b -i ${ITERS:-4000}
  done
  for m in ${COAL:-}; do echo -n "coalesced: "; timeout 60 /tmp/ingress_probe_coal -m $m -b $b -i ${ITERS:-4000}; done
  for d in ${DEEP:-}; do echo -n "deep $d: "; timeout 60 /tmp/ingress_probe_${d/,/_} -m deepA -b $b -i ${ITERS:-4000}; done
done
