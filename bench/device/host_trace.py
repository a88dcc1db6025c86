"""Where the host time before a step's first kernels goes: the CPU side of one fwd+bwd step.

    python bench/device/host_trace.py [--shape 30b-a3b] [-T 16384] [--events 70] [--reps 300]

On the layer benchmark's inputs (bench/device/experts_inputs.py; no CUDA index check, as
the benchmarks run), each step started on an idle GPU:
  1. a profiler trace of one step: its host events in order (torch ops, CUDA runtime and
     driver calls), each with its start from the step's start, its duration and the
     uninstrumented time (Python) before it, up to --events of them; where each kernel was
     launched; the total of runtime / driver calls by name;
  2. cProfile of --reps steps: the functions with the most own time (Python and builtins).
Step 1 tells which calls the GPU waits on before the first large kernel; step 2 which Python.
"""
import argparse
import collections
import cProfile
import io
import json
import os
import pathlib
import pstats
import sys
import tempfile

import torch

import moe_fused  # noqa: F401
from moe_fused import moe_experts

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from experts_inputs import add_step_args, step_inputs  # noqa: E402

HOST_CATS = ("cpu_op", "cuda_runtime", "cuda_driver", "user_annotation")


def main():
    p = argparse.ArgumentParser()
    add_step_args(p)
    p.add_argument("--events", type=int, default=70)
    p.add_argument("--reps", type=int, default=300)
    args = p.parse_args()
    (x, idx, s, w1, w2, dout), sync = step_inputs(args)

    def step():
        for t in (x, s, w1, w2):
            t.grad = None
        with torch.profiler.record_function("host_trace_fwd"):
            out = moe_experts(x, idx, s, w1, w2)
        with torch.profiler.record_function("host_trace_bwd"):
            out.backward(dout)

    for _ in range(5):
        step()
    sync()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            with torch.profiler.record_function("host_trace_step"):
                step()
            sync()
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        evs = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    steps = sorted(e["ts"] for e in evs if e["name"] == "host_trace_step")
    t0 = steps[-1]
    host = sorted((e for e in evs if e.get("cat") in HOST_CATS and e["ts"] >= t0
                   and e["name"] != "host_trace_step"), key=lambda e: e["ts"])
    kernels = {e["args"].get("correlation"): e for e in evs if e.get("cat") == "kernel" and e["ts"] >= t0}
    first_gpu = min((e["ts"] for e in kernels.values()), default=float("nan"))
    print(f"== {args.shape} T={args.T}: host events of one step (us from its start; "
          f"first kernel starts at {first_gpu - t0:.1f})")
    print(f"  {'start':>8} {'dur':>7} {'python':>7}  event")
    covered = t0  # end of the outermost instrumented range so far
    for e in host[:args.events]:
        py = max(0.0, e["ts"] - covered)
        launched = kernels.get(e.get("args", {}).get("correlation"))
        what = f"  -> {launched['name'][:60]}" if launched is not None else ""
        print(f"  {e['ts'] - t0:8.1f} {e['dur']:7.1f} {py:7.1f}  [{e['cat']}] {e['name'][:60]}{what}")
        covered = max(covered, e["ts"] + e["dur"])
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for e in host:
        if e["cat"] in ("cuda_runtime", "cuda_driver"):
            by_name[e["name"]][0] += 1
            by_name[e["name"]][1] += e["dur"]
    print("-- runtime / driver calls in the step: count, total us")
    for name, (n, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1]):
        print(f"  {n:4d} {us:8.1f}  {name}")

    prof_c = cProfile.Profile()
    for _ in range(args.reps):
        sync()
        prof_c.enable()
        step()
        prof_c.disable()
    sync()
    buf = io.StringIO()
    pstats.Stats(prof_c, stream=buf).sort_stats("tottime").print_stats(30)
    print(f"-- cProfile of {args.reps} steps (own time; the profiler's overhead inflates Python calls)")
    print(buf.getvalue()[-9000:])


if __name__ == "__main__":
    main()
