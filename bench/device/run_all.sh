#!/usr/bin/env bash
# One device call: build the CUDA library, run the GPU tests, the sanitizer, the
# per-kernel profile and the layer benchmark. Output files go to $OUT (or /tmp/moe_out).
#   bench/device/run_all.sh [build] [sonic] [test] [sm90] [testall] [sanitize] [ncu] [profile] [profilesonic] [variants] [gemms] [bench] [benchfull]
# (no argument = build test sanitize profile bench). ARCHS (default 90a: the sm90a kernels
# are real only in an sm_90a image; 90 builds their stubs) picks the arch.
# Steps run in the order above, whatever the order of the arguments; each is time-bounded.
#   sonic   installs SonicMoE from ./.sonic-wheels (made by ../shared/tools/sonicmoe-wheels.sh;
#           pass carry [".sonic-wheels"], 55 MB); then bench / benchfull also time SonicMoE at
#           SONIC_SHAPES (default 30b-a3b) / SONIC_SHAPES_FULL (default all), JIT warm-up reported.
#           Its autotuning takes many minutes per shape and T: its choices are kept across
#           calls through $OUT/sonic_autotune.tar -> .sonic-tune/ (see the step). One T a
#           call: SONIC_SHAPES=30b-a3b:16384 BENCH_TOKENS=16384 run_all.sh build sonic bench
#   gemms   bench/bench_gemms.py: each GEMM of the layer alone vs torch._grouped_mm, both paths
#           (GEMMS_ARGS adds arguments, e.g. "--shapes 30b-a3b -T 4096"); gemms.json / gemms.log.
# e.g. one call: bash bench/device/run_all.sh build sonic gemms bench
# Beside it: ab.sh (time build variants A B A B in one session), ncu_source.sh (stall samples
# per SASS instruction of one launch; stall_regions.py sums them by role and wait),
# ncu_sm90.sh (speed of light + stall reasons),
# step_timeline.py (a step's GPU idle gaps and host time, ours and HF's), bench/host_overhead.py
# --device cuda (host microseconds of the Python wrapper and the C calls), host_stages.py (the
# wrapper's stages timed inside real steps) and host_trace.py (a step's host events and launches).
set -u
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/moe_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
steps="${*:-build test sanitize profile bench}"
has() { case " $steps " in *" $1 "*) return 0;; esac; return 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader 2>/dev/null
B=build/device
# A fresh machine has no build from an earlier call: build first rather than run every step
# against a missing library (device time is the scarce thing).
if ! has build && [ ! -f $B/libmoe_fused.so ]; then
  echo "no $B/libmoe_fused.so here (a fresh machine): building first"; steps="build $steps"
fi
if has build; then
  t0=$(date +%s)
  cmake -S . -B $B -G Ninja -DMOE_FUSED_CUDA=ON -DMOE_FUSED_CUDA_ARCHS="${ARCHS:-90a}" \
    -DCMAKE_BUILD_TYPE=Release > "$OUT/build.log" 2>&1 && cmake --build $B -j16 >> "$OUT/build.log" 2>&1
  r=$?; echo "build: exit $r in $(( $(date +%s) - t0 )) s"; grep -i "spill\|error" "$OUT/build.log" | grep -v " 0 bytes spill" | head -20
  [ $r -ne 0 ] && tail -40 "$OUT/build.log" && exit 1
fi
SONIC_OK=0
if has sonic; then
  if [ -d .sonic-wheels ] && ls .sonic-wheels/*.whl >/dev/null 2>&1; then
    t0=$(date +%s)
    S=$(python3 -c "import site;print(site.getsitepackages()[0])")
    timeout 240 tar -C "$S" -xJf .sonic-wheels/cu13.tar.xz \
      && timeout 120 python3 -m pip install -q --no-index --no-deps .sonic-wheels/*.whl > "$OUT/sonic_install.log" 2>&1
    r=$?
    if [ $r -eq 0 ] && timeout 120 python3 -c "import sonicmoe, sonicmoe.enums; print('sonicmoe', sonicmoe.__version__)" >> "$OUT/sonic_install.log" 2>&1; then
      SONIC_OK=1; echo "sonic: installed in $(( $(date +%s) - t0 )) s: $(tail -1 "$OUT/sonic_install.log")"
      # SonicMoE's GEMMs (QuACK) autotune at each new shape and T: each compiles its 9-22
      # configs in subprocesses (68-133 s a GEMM on the H100 machine, notes/hopper.md session
      # 8), then times them. The choices (small JSON files) are kept: saved to
      # $OUT/sonic_autotune.tar on exit, read back from .sonic-tune/sonic_autotune.tar (copy it
      # there and carry .sonic-tune), so a later call compiles only the chosen configs.
      export QUACK_CACHE_AUTOTUNING=1 QUACK_CACHE_DIR=/tmp/quack_cache QUACK_COMPILE_WORKERS=16 \
        QUACK_PRINT_AUTOTUNING=1 CUTE_DSL_CACHE_DIR=/tmp/cute_cache
      mkdir -p "$QUACK_CACHE_DIR"
      if [ -f .sonic-tune/sonic_autotune.tar ]; then
        tar -C "$QUACK_CACHE_DIR" -xf .sonic-tune/sonic_autotune.tar
        echo "sonic: $(tar -tf .sonic-tune/sonic_autotune.tar | grep -c 'autotune.json$') autotune choices read back"
      fi
      trap '(cd "$QUACK_CACHE_DIR" && find . -name "*.autotune.json" | tar -cf "$OUT/sonic_autotune.tar" -T -)' EXIT
    else
      echo "sonic: install or import FAILED (exit $r); SonicMoE not benchmarked"; tail -15 "$OUT/sonic_install.log"
    fi
  else
    echo "sonic: no .sonic-wheels here (make it with ../shared/tools/sonicmoe-wheels.sh and carry it); SonicMoE not benchmarked"
  fi
fi
export MOE_FUSED_LIBRARY="$PWD/$B/libmoe_fused.so"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import moe_fused._lib as L; L.lib(); print('C++ fast path:', L.torch_ops_status())" 2>&1 | tail -1
rc=0
if has test; then
  timeout 300 python3 -m pytest -q -rs -x --timeout 240 -p no:cacheprovider tests/test_gpu_ops.py ${TESTS_EXTRA:-} > "$OUT/tests.log" 2>&1
  r=$?; echo "gpu tests: exit $r"; tail -25 "$OUT/tests.log" | grep -v "^$"; [ $r -ne 0 ] && rc=1
fi
if has sm90; then  # the sm90a kernels: their tests, then both paths' per-kernel times (~70 s)
  (cd tests && timeout 200 python3 -m pytest -q -x --timeout 60 -p no:cacheprovider test_gpu_sm90.py > "$OUT/tests_sm90.log" 2>&1)
  r=$?; echo "sm90 tests: exit $r"; tail -3 "$OUT/tests_sm90.log"; [ $r -ne 0 ] && rc=1
  timeout 150 python3 tests/test_gpu_sm90.py bench 2>&1 | tee "$OUT/sm90_bench.log" | grep -A8 "sm90 "
fi
if has testall; then
  timeout 450 python3 -m pytest -q -rs --timeout 240 -p no:cacheprovider tests/ > "$OUT/tests_all.log" 2>&1
  echo "all tests: exit $?"; tail -8 "$OUT/tests_all.log"
fi
if has sanitize; then
  timeout 240 bash bench/device/sanitize.sh "$OUT" || rc=1
fi
if has ncu; then
  timeout 300 bash bench/device/ncu.sh 4096
fi
if has profile; then
  timeout 240 python3 bench/device/profile_kernels.py --shape 30b-a3b -T ${PROFILE_T:-4096 16384} --json "$OUT/profile.json" 2>&1 | grep -v Warn | grep -v _warn_once | tee "$OUT/profile.log"
fi
if has profilesonic && [ $SONIC_OK -eq 1 ]; then  # SonicMoE's kernels on the same inputs (its JIT first)
  timeout 400 python3 bench/device/profile_kernels.py --impl sonicmoe --no-fwd --sequence --shape 30b-a3b -T ${PROFILE_T:-16384} \
    --json "$OUT/profile_sonic.json" 2>&1 | grep -v Warn | grep -v _warn_once | grep -v -i "autotun" | tee "$OUT/profile_sonic.log"
fi
if has variants; then  # the same profile with other compile-time GEMM configs
  for V in ${VARIANTS:-BN=256}; do
    VB=build/device-$V
    cmake -S . -B $VB -G Ninja -DMOE_FUSED_CUDA=ON -DMOE_FUSED_CUDA_ARCHS="${ARCHS:-90a}" -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_CUDA_FLAGS="-DMOE_GEMM_$V" > "$OUT/build_$V.log" 2>&1 && cmake --build $VB -j16 >> "$OUT/build_$V.log" 2>&1 || { echo "variant $V build failed"; continue; }
    echo "== variant MOE_GEMM_$V"
    MOE_FUSED_LIBRARY="$PWD/$VB/libmoe_fused.so" timeout 200 python3 bench/device/profile_kernels.py --shape 30b-a3b -T 4096 16384 2>&1 | grep -v Warn | grep -v _warn_once
  done
fi
if has gemms; then
  timeout ${GEMMS_TIMEOUT:-300} python3 bench/bench_gemms.py --out "$OUT" --name gemms ${GEMMS_ARGS:-} 2>&1 \
    | grep -v Warn | grep -v _warn_once > "$OUT/gemms.log"
  echo "gemms: exit ${PIPESTATUS[0]}"; grep -v "^      " "$OUT/gemms.log" | tail -60
fi
SONIC_ARGS=(); [ $SONIC_OK -eq 1 ] && SONIC_ARGS=(--sonic-shapes ${SONIC_SHAPES:-30b-a3b})
if has bench; then
  timeout $([ $SONIC_OK -eq 1 ] && echo 500 || echo 400) python3 bench/bench_layer.py --device cuda --shapes 30b-a3b --tokens ${BENCH_TOKENS:-4096 16384} \
    --impls hf-grouped_mm moe_fused moe_fused-nopdl moe_fused-windows moe_fused-portable --iters 10 --max-seconds 5 ${SONIC_ARGS[@]+"${SONIC_ARGS[@]}"} \
    --out "$OUT" --name layer_cuda_quick --no-plot > "$OUT/bench.log" 2>&1
  echo "bench: exit $?"; tail -40 "$OUT/bench.log"
fi
[ $SONIC_OK -eq 1 ] && SONIC_ARGS=(--sonic-shapes ${SONIC_SHAPES_FULL:-all})
if has benchfull; then
  timeout 560 python3 bench/bench_layer.py --device cuda --iters 10 --max-seconds 4 --eager-max-tokens ${EAGER_MAX:-4096} \
    ${SONIC_ARGS[@]+"${SONIC_ARGS[@]}"} --out "$OUT" > "$OUT/bench_full.log" 2>&1
  echo "benchfull: exit $?"; tail -50 "$OUT/bench_full.log"
fi
exit $rc
