"""One experts fwd+bwd (Qwen3-30B-A3B shape, bf16) for ncu: python3 one_step.py [T]."""
import sys

import torch

import moe_fused  # noqa: F401
from experts_inputs import make
from moe_fused import moe_experts

T = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
x, idx, s, w1, w2, dout = make(T)
moe_experts(x, idx, s, w1, w2).backward(dout)
torch.cuda.synchronize()
