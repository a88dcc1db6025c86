"""Where a fwd+bwd step's wall time goes beyond its kernels: GPU idle gaps and host time.

    python bench/device/step_timeline.py --shape 30b-a3b -T 4096 16384 [--impls moe_fused hf-grouped_mm]

For each implementation and T, on the layer benchmark's inputs (bf16, leaf x and routing
weights, weight grads allocated by autograd as in bench_layer):
  - wall: median CUDA-event time of one step;
  - host: median perf_counter time to enqueue one step (no sync);
  - from a profiler trace of one step started on an idle GPU (as the timed runs are): when its
    first GPU op starts, when its last ends, the GPU busy time (kernels, memsets, copies) and
    the largest idle gaps, with the GPU ops on either side.
moe_fused runs without its CUDA index check (as the benchmarks do) unless --index-check.
"""
import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import torch

import moe_fused  # noqa: F401
from moe_fused import moe_experts
from moe_fused.bench import _build, impl_env, median_ms

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from experts_inputs import SHAPES  # noqa: E402

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def make_step(impl, cfg, block, T, H):
    """One fwd+bwd of the bench's Qwen3 block experts (its router's routing), as bench_layer."""
    experts = block.experts
    g = torch.Generator(device="cpu").manual_seed(T)
    hidden = torch.randn(T, H, generator=g).to(device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        _, top_k_weights, top_k_index = block.gate(hidden)
    dout = torch.randn(T, H, generator=g).to(device="cuda", dtype=torch.bfloat16)
    x = hidden.clone().requires_grad_(True)
    s = top_k_weights.clone().requires_grad_(True)
    leaves = (x, s, experts.gate_up_proj, experts.down_proj)

    def call():
        if impl.startswith("moe_fused"):
            return moe_experts(x, top_k_index, s, experts.gate_up_proj, experts.down_proj)
        cfg._experts_implementation = impl[len("hf-"):]
        return experts(x, top_k_index, s)

    def step():
        for t in leaves:
            t.grad = None
        with impl_env(impl):  # moe_fused-ctypes: the C++ fast path off, forward and backward
            call().backward(dout)

    return step


def trace_steps(trace_path):
    """Per profiled step: its CPU range (the record_function) and the GPU ops launched in it."""
    with open(trace_path) as f:
        evs = json.load(f)["traceEvents"]
    gpu = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in evs
                 if e.get("ph") == "X" and e.get("cat") in GPU_CATS)
    cpu = sorted((e["ts"], e["ts"] + e["dur"]) for e in evs
                 if e.get("ph") == "X" and e.get("name") == "timeline_step" and e.get("cat") == "user_annotation")
    steps = []
    for i, (c0, c1) in enumerate(cpu):
        nxt = cpu[i + 1][0] if i + 1 < len(cpu) else float("inf")
        steps.append((c0, c1, [g for g in gpu if c0 <= g[0] < nxt]))
    return steps


def analyse(c0, c1, ops, top=8):
    """Times in us from the step's CPU start c0: first GPU op, end of the last, GPU busy and
    the idle gaps between ops (a gap means the GPU waited on the host or a launch)."""
    busy, gaps, end, prev = 0.0, [], ops[0][0], "(step start)"
    gaps.append((ops[0][0] - c0, prev, ops[0][2]))
    for s, e, name in ops:
        if s > end:
            gaps.append((s - end, prev, name))
        busy += max(0.0, e - max(s, end))
        end = max(end, e)
        prev = name
    gaps.sort(reverse=True)
    return dict(host_us=c1 - c0, first_op_us=ops[0][0] - c0, end_us=end - c0, busy_us=busy,
                idle_us=end - c0 - busy, n_gpu_ops=len(ops),
                gaps=[(round(g, 1), a[:60], b[:60]) for g, a, b in gaps[:top]])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="30b-a3b")
    p.add_argument("-T", nargs="+", type=int, default=[4096, 16384])
    p.add_argument("--impls", nargs="+", default=["moe_fused", "hf-grouped_mm"])
    p.add_argument("--json")
    p.add_argument("--index-check", action="store_true", help="keep moe_fused's CUDA index check (a host sync)")
    args = p.parse_args()
    from moe_fused.ops import cuda_index_check
    with cuda_index_check(args.index_check):
        run(args)


def run(args):
    H, I, E, k = SHAPES[args.shape]
    res = []
    cfg, block = _build(H, I, E, k, torch.bfloat16, torch.device("cuda"), seed=0)
    for T in args.T:
        for impl in args.impls:
            step = make_step(impl, cfg, block, T, H)
            wall = median_ms(step, torch.device("cuda"), 3, 20)
            host = []
            for _ in range(20):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                step()
                host.append((time.perf_counter() - t0) * 1e3)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(3):  # each step from an idle GPU, as the timed runs
                    with torch.profiler.record_function("timeline_step"):
                        step()
                    torch.cuda.synchronize()
            path = os.path.join(tempfile.mkdtemp(), "trace.json")
            prof.export_chrome_trace(path)
            st = analyse(*trace_steps(path)[-1])
            r = dict(shape=args.shape, T=T, impl=impl, wall_ms=wall, host_ms=statistics.median(host), **st)
            res.append(r)
            print(f"== {args.shape} T={T} {impl}: wall {wall:.3f} ms; profiled step: host {st['host_us'] / 1e3:.3f} ms, "
                  f"GPU end {st['end_us'] / 1e3:.3f} ms = busy {st['busy_us'] / 1e3:.3f} + idle {st['idle_us'] / 1e3:.3f} "
                  f"(first op at {st['first_op_us']:.0f} us; {st['n_gpu_ops']} GPU ops)")
            for g, a, b in st["gaps"]:
                print(f"    idle {g:7.1f} us  after {a}  before {b}")
            del step
            torch.cuda.empty_cache()
    if args.json:
        json.dump(res, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
