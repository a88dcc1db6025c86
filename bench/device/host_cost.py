"""Host time of one moe_fused experts fwd+bwd, split into the C calls and the Python around
them (no GPU sync inside a step; medians over the steps).

    python bench/device/host_cost.py [T]
"""
import statistics
import sys
import time

import torch

import moe_fused  # noqa: F401
from experts_inputs import make
from moe_fused import _lib, moe_experts
from moe_fused.ops import cuda_index_check

T = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
x, idx, s, w1, w2, dout = make(T)

lib = _lib.lib()
spent = {}


def timed(name):
    fn = getattr(lib, name)

    def wrapper(*a):
        t0 = time.perf_counter()
        r = fn(*a)
        spent.setdefault(name, []).append((time.perf_counter() - t0) * 1e6)
        return r

    setattr(lib, name, wrapper)


for name in ("moe_experts_forward", "moe_experts_backward"):
    timed(name)

steps = {"fwd": [], "bwd": [], "first_kernel_us": []}
with cuda_index_check(False):
    for i in range(60):
        for t in (x, s, w1, w2):
            t.grad = None
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        a.record()
        out = moe_experts(x, idx, s, w1, w2)
        t1 = time.perf_counter()
        out.backward(dout)
        t2 = time.perf_counter()
        b.record()
        torch.cuda.synchronize()
        if i >= 10:
            steps["fwd"].append((t1 - t0) * 1e6)
            steps["bwd"].append((t2 - t1) * 1e6)
for key, v in steps.items():
    if v:
        print(f"{key:24s} median {statistics.median(v):8.1f} us")
for name, v in spent.items():
    print(f"{name:24s} median {statistics.median(v[10:]):8.1f} us (C call, host)")
