#!/usr/bin/env bash
# A/B of build-time kernel knobs on one GPU: builds one library per variant and times each
# fwd+bwd with bench/device/profile_kernels.py, alternating A B A B (the second round is the
# one to read; the first warms the GPU). Variants are NAME=FLAGS, FLAGS a quoted list of -D
# options, or NAME=+DIR: a copy of the tree with the files under DIR (same relative paths,
# e.g. an older csrc/cuda/x.cu) laid over it. "base" (the tree, no flags) is always first.
# ARCHS as run_all.sh (default 90a). dev/ab/ is git-ignored: pass the device tool
# carry: ["dev/ab"] for an overlay kept there.
#   bash bench/device/ab.sh "bn=-DMOE_GEMM_BN=256" "old=+dev/ab/old"
# A variant with no flags ("ctl=") builds the tree again as a control: one kernel with
# identical SASS in two builds has timed 1% apart in every round (GEMM1, session 18), so
# differences that small need the control beside them.
# Shapes: AB_SHAPES (default 30b-a3b; profile_kernels.py's names, NAME:T,T for their own T
# values, e.g. "30b-a3b 235b-a22b:16384"). T values: AB_T (default "4096 16384"); rounds:
# AB_ROUNDS (default 2; the first only warms up when there are more). The summary at the end
# (also in $OUT/ab_summary.txt) divides each kernel's time by GEMM1's in the same round too,
# as the clock moves between rounds, then lists every round's time of each kernel. AB_TESTS
# (e.g. tests/test_gpu_sm90.py) runs those tests against each variant's library before any
# timing: a variant that fails them is not timed.
# The variants build at once, and their tests run at once.
set -u
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/moe_out}"; mkdir -p "$OUT"
names=(base); flags=(""); pys=("$PWD/python"); jobs_=(); t0=$(date +%s)
for v in "$@"; do names+=("${v%%=*}"); flags+=("${v#*=}"); done
for i in "${!names[@]}"; do
  d=$PWD/build/ab-${names[$i]}; src=.; f=${flags[$i]}
  if [ "${f:0:1}" = "+" ]; then  # overlay variant: a copy of the tree with DIR's files on top
    [ -d "${f:1}" ] || { echo "overlay ${f:1} is missing (git-ignored and not carried?)"; exit 1; }
    src=/tmp/ab-src-${names[$i]}; rm -rf "$src"; mkdir -p "$src"
    cp -r CMakeLists.txt cmake csrc python "$src"/ 2>/dev/null; cp -r "${f:1}"/. "$src"/; f=""
  fi
  pys[$i]="$(cd "$src" && pwd)/python"  # an overlay's own Python package (its ABI)
  # all variants build at once (device time is the scarce thing; nvcc is mostly one file a core)
  { cmake -S "$src" -B $d -G Ninja -DMOE_FUSED_CUDA=ON -DMOE_FUSED_CUDA_ARCHS="${ARCHS:-90a}" -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_CUDA_FLAGS="$f" && cmake --build $d -j16; } > "$OUT/ab_build_${names[$i]}.log" 2>&1 &
  jobs_[$i]=$!
done
failed=0
for i in "${!names[@]}"; do
  wait ${jobs_[$i]} || { echo "build ${names[$i]} FAILED"; tail -20 "$OUT/ab_build_${names[$i]}.log"; failed=1; }
done
[ $failed -eq 1 ] && exit 1
echo "builds: $(( $(date +%s) - t0 )) s"
timed=("${!names[@]}")  # indices of the variants to time: those whose tests pass
if [ -n "${AB_TESTS:-}" ]; then
  for i in "${!names[@]}"; do  # at once too: correctness only, one GPU has room for them
    PYTHONPATH="${pys[$i]}" MOE_FUSED_LIBRARY="$PWD/build/ab-${names[$i]}/libmoe_fused.so" timeout 300 \
      python3 -m pytest -q -x -p no:cacheprovider $AB_TESTS > "$OUT/ab_tests_${names[$i]}.log" 2>&1 &
    jobs_[$i]=$!
  done
  for i in "${!names[@]}"; do
    wait ${jobs_[$i]}
    r=$?; echo "tests ${names[$i]}: exit $r, $(tail -1 "$OUT/ab_tests_${names[$i]}.log")"
    if [ $r -ne 0 ]; then
      [ $i -eq 0 ] && { echo "base fails its tests: nothing timed"; exit 1; }
      echo "variant ${names[$i]} fails its tests: not timed"; grep -E "^(FAILED|E )" "$OUT/ab_tests_${names[$i]}.log" | head -8
      t=(); for j in "${timed[@]}"; do [ "$j" != "$i" ] && t+=("$j"); done; timed=("${t[@]}")
    fi
  done
fi
for round in $(seq 1 ${AB_ROUNDS:-2}); do
  for i in ${timed[@]}; do
    for spec in ${AB_SHAPES:-30b-a3b}; do
      shape=${spec%%:*}; ts=${AB_T:-4096 16384}; [ "$spec" != "$shape" ] && ts=${spec#*:}
      echo "== round $round: ${names[$i]} (${flags[$i]:-no flags})"
      PYTHONPATH="${pys[$i]}" MOE_FUSED_LIBRARY="$PWD/build/ab-${names[$i]}/libmoe_fused.so" timeout 120 python3 bench/device/profile_kernels.py \
        --shape $shape -T ${ts//,/ } 2>&1 | grep -v -i warn | tee -a "$OUT/ab_${names[$i]}.log" | cut -c1-100 | grep -E "^==|row_gemm|wgrad_sm90|combine"
    done
  done
done
echo "== summary (bench/device/ab_summary.py: medians of the rounds after the first)"
python3 bench/device/ab_summary.py --rounds "$OUT" $(for i in ${timed[@]}; do echo "${names[$i]}"; done) | tee "$OUT/ab_summary.txt"
