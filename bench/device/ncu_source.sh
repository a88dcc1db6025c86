#!/usr/bin/env bash
# Per-instruction stall samples (SASS, with the CUDA source line from -lineinfo) of one sm90a
# kernel launch in a 30B-A3B fwd+bwd, as CSV for offline sorting.
# Usage: bench/device/ncu_source.sh NAME REGEX SKIP [T]   e.g. dw1 wgrad_sm90 1 16384
# REGEX matches the demangled name, so template arguments pick a kernel:
# 'row_gemm_sm90<[^,]+, .int.2' is dA' (EPI_DSWIGLU = 2, named "(int)2"; GEMM1 = 1).
# bench/device/stall_regions.py reads the CSV on any machine: samples by role (producer,
# consumers), barrier waits and mainloop, top instructions.
# Launch order in one_step.py: row_gemm GEMM1, GEMM2 (one per token window), dA', dX...;
# wgrad dW2, dW1.
here="$(cd "$(dirname "$0")" && pwd)"
out="${OUT:-/tmp}"; name=$1; re=$2; skip=$3; T=${4:-16384}
timeout 200 ncu --clock-control none --kernel-name-base demangled -k "regex:$re" -s "$skip" -c 1 \
  --section WarpStateStats --section SourceCounters --import-source yes \
  -o "$out/$name" -f python3 "$here/one_step.py" "$T" > "$out/${name}_ncu.log" 2>&1
echo "ncu $name: exit $?"
ncu -i "$out/$name.ncu-rep" --page source --csv --print-source sass > "$out/${name}_sass.csv" 2> "$out/${name}_src.err"
echo "source page: exit $?, $(wc -l < "$out/${name}_sass.csv") lines"; head -c 600 "$out/${name}_src.err"
