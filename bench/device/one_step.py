"""One experts fwd+bwd (Qwen3-30B-A3B shape, bf16) for ncu: python3 one_step.py [T]."""
import sys

import torch

import moe_fused  # noqa: F401
from moe_fused import moe_experts

T = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
H, I, E, k = 2048, 768, 128, 8
torch.manual_seed(0)
x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
s, idx = torch.topk(torch.randn(T, E, device="cuda").softmax(-1), k)
s = (s / s.sum(-1, keepdim=True)).bfloat16().requires_grad_()
w1 = (torch.randn(E, 2 * I, H, device="cuda") * H**-0.5).bfloat16().requires_grad_()
w2 = (torch.randn(E, H, I, device="cuda") * I**-0.5).bfloat16().requires_grad_()
moe_experts(x, idx, s, w1, w2).backward(torch.randn(T, H, device="cuda", dtype=torch.bfloat16))
torch.cuda.synchronize()
