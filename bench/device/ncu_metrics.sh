#!/usr/bin/env bash
# Memory-path throughputs of one kernel launch in a 30B-A3B fwd+bwd (one_step.py): how many
# bytes reach the SMs from L2 (xbar -> L1/smem, TMA included), L2's own load, DRAM, the SMs'
# active cycles, as one CSV row a metric. For telling SM ingress from L2 output from latency.
# Usage: bench/device/ncu_metrics.sh NAME REGEX SKIP [T]   e.g. dw1 wgrad_sm90 1 16384
# (REGEX and SKIP as in ncu_source.sh; COUNT=n for n launches, each printed with its ID).
here="$(cd "$(dirname "$0")" && pwd)"
out="${OUT:-/tmp}"; name=$1; re=$2; skip=$3; T=${4:-16384}
m=gpu__time_duration.sum,sm__cycles_active.avg,sm__cycles_elapsed.avg
m=$m,l1tex__m_xbar2l1tex_read_bytes.sum,l1tex__m_xbar2l1tex_read_bytes.sum.per_second
m=$m,l1tex__m_l1tex2xbar_write_bytes.sum
m=$m,lts__t_bytes.sum.per_second,lts__t_sectors_srcunit_tex_op_read.sum,lts__t_sector_hit_rate.pct
m=$m,lts__throughput.avg.pct_of_peak_sustained_elapsed,l1tex__throughput.avg.pct_of_peak_sustained_elapsed
m=$m,dram__bytes_read.sum.per_second,dram__bytes_write.sum.per_second
m=$m,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sectors_op_write.sum,lts__t_sector_op_read_hit_rate.pct
m=$m,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active
m=$m,smsp__inst_executed.sum,sm__warps_active.avg.per_cycle_active
timeout 200 ncu --clock-control none --kernel-name-base demangled -k "regex:$re" -s "$skip" -c "${COUNT:-1}" \
  --metrics "$m" --csv python3 "$here/one_step.py" "$T" > "$out/${name}_metrics.csv" 2> "$out/${name}_metrics.err"
echo "ncu $name: exit $?"
python3 - "$out/${name}_metrics.csv" <<'PY'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head = rows[0]; ii, ni, ui, vi = (head.index(c) for c in ("ID", "Metric Name", "Metric Unit", "Metric Value"))
for r in rows[1:]:
    print(f"  {r[ii]:>3s} {r[ni]:62s} {r[vi]:>16s} {r[ui]}")
PY
