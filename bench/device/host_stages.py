"""The host time of a moe_fused fwd+bwd step, stage by stage, as the benchmark runs it.

    python bench/device/host_stages.py [--shape 30b-a3b] [-T 16384] [--reps 200]

The wrapper's pieces (checks, allocations, workspace query, context, descriptors, the C
calls) are wrapped in timers, and each step runs the way bench_layer times it: right after a
synchronize that waited on GPU work ("after a wait"; the previous step's), and, to compare,
after a synchronize on an idle GPU and 1 ms of Python spinning ("warm"). Printed: the median
start of each stage from the step's start, its median duration, and the uninstrumented time
before it. A stage that is slow only "after a wait" is paying for a CPU that slowed down
while the host waited, not for its own work.
"""
import argparse
import pathlib
import statistics
import sys
import time

import torch

import moe_fused  # noqa: F401
from moe_fused import _lib, moe_experts, ops

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from experts_inputs import add_step_args, step_inputs  # noqa: E402

_events = []  # (name, enter ns, exit ns) of the current step


def _timed(name, fn):
    def wrapper(*a, **kw):
        t0 = time.perf_counter_ns()
        try:
            return fn(*a, **kw)
        finally:
            _events.append((name, t0, time.perf_counter_ns()))
    return wrapper


def instrument():
    for mod, names in ((ops, ("_check_experts", "_eager_ok", "_autocast_dtype", "_experts_outputs",
                              "_check_index_range", "_window_flag")),
                       (_lib, ("experts_forward_call_workspace_size", "experts_backward_call_workspace_size",
                               "context_values",
                               "pack_call", "packed_plan_values"))):
        for n in names:
            if hasattr(mod, n):  # (an older moe_fused in an A/B lacks some)
                setattr(mod, n, _timed(n, getattr(mod, n)))
    ops._grad_may_follow = _timed("_grad_may_follow", ops._grad_may_follow)
    fwd = ops._ExpertsFunction.forward
    ops._ExpertsFunction.forward = staticmethod(_timed("Function.forward", fwd))
    torch.empty = _timed("torch.empty", torch.empty)  # each allocation (numbered in order)
    lib = _lib.lib()
    raw = getattr(_lib, "_RAW", None)  # the ops' raw handles (an older moe_fused: lib's attributes)
    for n in ("moe_experts_forward", "moe_experts_backward"):
        if raw:
            raw[n] = _timed("C " + n, raw[n])
        else:
            setattr(lib, n, _timed("C " + n, getattr(lib, n)))
    kernels = ops._CUDA_KERNELS
    for impl, label in ((ops._experts_forward_impl, "fwd kernel"), (ops._experts_backward_impl, "bwd kernel")):
        kernels[impl] = _timed(label, kernels[impl])


def main():
    p = argparse.ArgumentParser()
    add_step_args(p)
    p.add_argument("--reps", type=int, default=200)
    args = p.parse_args()
    (x, idx, s, w1, w2, dout), sync = step_inputs(args)
    instrument()

    def step():
        g0 = time.perf_counter_ns()
        for t in (x, s, w1, w2):
            t.grad = None
        _events.append(("grads = None", g0, time.perf_counter_ns()))
        out = moe_experts(x, idx, s, w1, w2)
        _events.append(("(moe_experts returned)", time.perf_counter_ns(), time.perf_counter_ns()))
        out.backward(dout)

    for mode in ("after a wait", "warm"):
        rows = {}
        for i in range(args.reps + 10):
            step()  # GPU work to wait on
            sync()
            if mode == "warm":
                end = time.perf_counter() + 1e-3
                while time.perf_counter() < end:
                    pass
            _events.clear()
            t0 = time.perf_counter_ns()
            step()
            total = time.perf_counter_ns() - t0
            if i < 10:
                continue
            seen = {}
            prev_end = t0
            for name, a, b in _events:
                key = (name, seen.get(name, 0))
                seen[name] = key[1] + 1
                r = rows.setdefault(key, ([], [], []))
                r[0].append((a - t0) / 1e3)
                r[1].append((b - a) / 1e3)
                r[2].append(max(0, a - prev_end) / 1e3)
                prev_end = max(prev_end, b)
            rows.setdefault(("(step total)", 0), ([], [], []))[0].append(total / 1e3)
        print(f"== {args.shape} T={args.T}, {mode}: median us over {args.reps} steps "
              f"(nested stages overlap their callers)")
        print(f"  {'start':>8} {'dur':>8} {'before':>8}  stage")
        for (name, n), (st, du, gap) in sorted(rows.items(), key=lambda kv: statistics.median(kv[1][0])):
            med = statistics.median
            label = name if n == 0 else f"{name} #{n + 1}"
            print(f"  {med(st):8.1f} {med(du) if du else 0:8.1f} {med(gap) if gap else 0:8.1f}  {label}")


if __name__ == "__main__":
    main()
