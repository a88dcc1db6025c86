"""Plain PyTorch references for the moe-fused ops (per-expert loops, float64 by default),
and helpers shared by the op tests: devices, routings, error measures.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

# Devices every op test runs on: the CPU always, CUDA marked `gpu` (skipped without a GPU).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def ref_experts(x, idx, w, w1, w2):
    """out_t = sum_j w[t,j] * down[e] (silu(g) * u), [g; u] = gate_up[e] x_t, e = idx[t,j].

    A per-expert loop in the dtype of its inputs (differentiable by autograd)."""
    T, H = x.shape
    I = w1.shape[1] // 2
    out = torch.zeros(T, H, dtype=x.dtype, device=x.device)
    for e in range(w1.shape[0]):
        tok, slot = torch.where(idx == e)
        if tok.numel() == 0:
            continue
        h = x[tok] @ w1[e].t()
        a = F.silu(h[:, :I]) * h[:, I:]
        y = a @ w2[e].t()
        out = out.index_add(0, tok, y * w[tok, slot].unsqueeze(-1).to(y.dtype))
    return out


def ref_linear(x, weight, sel):
    """out[b, o] = sum_i weight[sel[b], o, i] * x[b, i], one expert at a time."""
    out = torch.zeros(x.shape[0], weight.shape[1], dtype=x.dtype, device=x.device)
    for e in range(weight.shape[0]):
        rows = torch.where(sel == e)[0]
        if rows.numel():
            out = out.index_copy(0, rows, x[rows] @ weight[e].t())
    return out


def run_with_grads(fn, float_inputs, other_inputs, grad_out, dtype=None, device="cpu"):
    """Run fn(**inputs) with fresh leaves (cast to dtype/device), backprop grad_out.

    float_inputs: dict name -> tensor (leaves that get grads); other_inputs: dict name ->
    tensor (moved to device). fn receives keyword arguments. Returns (out, {name: grad})."""
    leaves = {}
    for name, t in float_inputs.items():
        t = t.detach().to(device=device, dtype=dtype or t.dtype)
        leaves[name] = t.requires_grad_(True)
    others = {name: t.to(device) for name, t in other_inputs.items()}
    out = fn(**leaves, **others)
    out.backward(grad_out.to(device=device, dtype=out.dtype))
    return out.detach(), {name: t.grad for name, t in leaves.items()}


def make_routing(T, E, k, *, empty_experts=0, skew=0.0, generator=None, index_dtype=torch.int64):
    """top-k routing like a softmax router: distinct experts per token, weights summing to 1.

    empty_experts: that many experts (the last ones) receive no token.
    skew: > 0 makes the load ragged (expert e gets a logit bonus of -skew * e / E)."""
    assert k <= E - empty_experts
    logits = torch.randn(T, E, generator=generator, dtype=torch.float64)
    logits -= skew * torch.arange(E, dtype=torch.float64) / E * 4
    if empty_experts:
        logits[:, E - empty_experts:] = float("-inf")
    vals, idx = torch.topk(logits, k, dim=-1)
    w = torch.softmax(vals, dim=-1)
    return idx.to(index_dtype), w


def make_experts_inputs(T, H, I, E, k, *, seed=0, empty_experts=0, skew=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g, dtype=torch.float64)
    w1 = torch.randn(E, 2 * I, H, generator=g, dtype=torch.float64) * (scale / H**0.5)
    w2 = torch.randn(E, H, I, generator=g, dtype=torch.float64) * (scale / I**0.5)
    idx, w = make_routing(T, E, k, empty_experts=empty_experts, skew=skew, generator=g)
    grad = torch.randn(T, H, generator=g, dtype=torch.float64)
    return dict(x=x, idx=idx, w=w, w1=w1, w2=w2, grad=grad)


def max_err(a, b):
    """max |a - b| in float64 (a, b on any device)."""
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item()


def scale_of(t):
    return t.detach().double().abs().max().item() + 1e-30
