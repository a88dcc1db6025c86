#!/usr/bin/env bash
# compute-sanitizer memcheck + racecheck on a small case (every moe-fused kernel once).
# Needs MOE_FUSED_LIBRARY (or an installed moe_fused) with the CUDA path.
# Usage: bench/device/sanitize.sh [logdir]
set -u
here="$(cd "$(dirname "$0")" && pwd)"
log="${1:-${OUT:-/tmp}}"
rc=0
: > "$log/sanitize.log"
for tool in memcheck racecheck; do
  extra=""
  [ "$tool" = memcheck ] && extra="--leak-check no"
  compute-sanitizer --tool "$tool" $extra --kernel-name kns=moe --error-exitcode 3 \
    python3 "$here/sanitize_case.py" > "$log/sanitize_tmp.log" 2>&1
  r=$?
  echo "sanitize $tool: exit $r; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log/sanitize_tmp.log" | tail -1)"
  [ $r -ne 0 ] && rc=$r && tail -30 "$log/sanitize_tmp.log"
  { echo "==== $tool (exit $r)"; cat "$log/sanitize_tmp.log"; } >> "$log/sanitize.log"
  rm -f "$log/sanitize_tmp.log"
done
exit $rc
