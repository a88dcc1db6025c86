"""Host microseconds of the pieces of moe_fused's forward wrapper on CUDA tensors (each timed
alone, synchronised between repetitions so the GPU queue never pushes back).

    python bench/device/py_overhead.py [T]
"""
import statistics
import sys
import time

import torch

import moe_fused  # noqa: F401
from experts_inputs import SHAPES, make
from moe_fused import _lib, moe_experts, ops
from moe_fused.ops import cuda_index_check

T = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
H, I, E, k = SHAPES["30b-a3b"]
dev = torch.device("cuda")
x, idx, s, w1, w2, _ = make(T)


def host_us(fn, n=40):
    out = []
    for i in range(n + 5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        if i >= 5:
            out.append((t1 - t0) * 1e6)
    return statistics.median(out)


with cuda_index_check(False):
    rows = [
        ("moe_experts fwd (autograd)", lambda: moe_experts(x, idx, s, w1, w2)),
        ("moe_experts fwd (no_grad)", lambda: torch.no_grad()(moe_experts)(x, idx, s, w1, w2)),
        ("_experts_forward_impl", lambda: ops._experts_forward_impl(x, idx, s, w1, w2)),
        ("_check_experts", lambda: ops._check_experts(x, idx, s, w1, w2)),
        ("torch.empty x5", lambda: [torch.empty(8, device=dev) for _ in range(5)]),
        ("_lib.tensor x7", lambda: [_lib.tensor(x, "hidden_states") for _ in range(7)]),
        ("workspace sizes x2", lambda: (_lib.experts_workspace_size(dev, T, k, H, I, E),
                                        _lib.routing_plan_workspace_size(dev, T * k, E))),
        ("_lib.context", lambda: _lib.context(dev, 1 << 20)),
        ("torch.cuda.device ctx", lambda: torch.cuda.device(dev).__enter__()),
        ("current_stream", lambda: torch.cuda.current_stream()),
    ]
    for name, fn in rows:
        print(f"{name:30s} {host_us(fn):9.1f} us")
