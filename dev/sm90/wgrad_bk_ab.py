"""A/B of the sm90a wgrad pipeline shapes (MOE_FUSED_WGRAD_BK=32 vs 64), interleaved in one
process: fwd+bwd median ms and the two wgrad kernels' times, Qwen3-30B-A3B bf16."""
import os
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import moe_fused  # noqa: F401
from moe_fused import moe_experts

H, I, E, k = 2048, 768, 128, 8
for T in [int(a) for a in sys.argv[1:]] or [4096, 16384]:
    torch.manual_seed(0)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    s, idx = torch.topk(torch.randn(T, E, device="cuda").softmax(-1), k)
    s = (s / s.sum(-1, keepdim=True)).bfloat16().requires_grad_()
    w1 = (torch.randn(E, 2 * I, H, device="cuda") * H**-0.5).bfloat16().requires_grad_()
    w2 = (torch.randn(E, H, I, device="cuda") * I**-0.5).bfloat16().requires_grad_()
    dout = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)

    def fb():
        moe_experts(x, idx, s, w1, w2).backward(dout)

    res = {"32": [], "64": []}
    for _ in range(3):
        for bk in ("32", "64"):
            os.environ["MOE_FUSED_WGRAD_BK"] = bk
            for _ in range(3):
                fb()
            torch.cuda.synchronize()
            for _ in range(5):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fb()
                b.record()
                b.synchronize()
                res[bk].append(a.elapsed_time(b))
    for bk in ("32", "64"):
        os.environ["MOE_FUSED_WGRAD_BK"] = bk
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fb()
            torch.cuda.synchronize()
        wg = [(e.key.split("<")[1][:40], (getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)) / 1e3)
              for e in prof.key_averages() if "wgrad_sm90" in e.key]
        print(f"T={T} BK={bk}: fwd+bwd {statistics.median(res[bk]):.3f} ms; wgrad kernels {wg}")
