"""torch.library.opcheck on every moe_fused op, and torch.compile(fullgraph=True) of both
public ops, forward and backward."""

from __future__ import annotations

import pytest
import torch

import moe_fused
from reference import DEVICES, make_experts_inputs, max_err, scale_of

OPS = torch.ops.moe_fused


def _experts_args(device, dtype=torch.float32, T=13, H=24, I=10, E=5, k=3, requires_grad=True):
    inp = make_experts_inputs(T, H, I, E, k, seed=T + H, empty_experts=1, skew=1.0)
    f = lambda t: t.to(device=device, dtype=dtype).requires_grad_(requires_grad)  # noqa: E731
    return f(inp["x"]), inp["idx"].to(device), f(inp["w"]), f(inp["w1"]), f(inp["w2"]), inp["grad"].to(device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
def test_opcheck_experts_forward(device, index_dtype):
    x, idx, w, w1, w2, _ = _experts_args(device)
    torch.library.opcheck(OPS.experts_forward.default, (x, idx.to(index_dtype), w, w1, w2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("needs", [(True, True, True, True), (True, False, False, True), (False, True, True, False)])
def test_opcheck_experts_backward(device, needs):
    x, idx, w, w1, w2, grad = _experts_args(device, requires_grad=False)
    out, h, plan = OPS.experts_forward(x, idx, w, w1, w2)
    torch.library.opcheck(OPS.experts_backward.default, (grad, x, w, w1, w2, plan, h, *needs))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_linear(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(17, 12, generator=g).to(device).requires_grad_(True)
    weight = torch.randn(4, 16, 12, generator=g).to(device).requires_grad_(True)
    sel = torch.randint(0, 4, (17,), generator=g).to(device)
    torch.library.opcheck(OPS.linear_forward.default, (x, weight, sel))
    grad = torch.randn(17, 16, device=device)
    for needs in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(OPS.linear_backward.default, (grad, x.detach(), weight.detach(), sel, *needs))


def test_plan_outputs_are_a_valid_plan():
    """expert_offsets / sorted_pairs / pair_rows form the documented stable routing plan."""
    x, idx, w, w1, w2, _ = _experts_args("cpu", requires_grad=False)
    _, h, plan = OPS.experts_forward(x, idx, w, w1, w2)
    E, k = w1.shape[0], idx.shape[1]
    flat = idx.reshape(-1)
    assert plan.shape == (2 * flat.numel() + E + 1,)
    offsets, sorted_pairs, pair_rows = moe_fused._lib.packed_plan_views(plan, E, flat.numel())
    expected = torch.sort(flat, stable=True).indices
    assert offsets.dtype == sorted_pairs.dtype == pair_rows.dtype == torch.int32
    assert torch.equal(sorted_pairs.long(), expected)
    assert torch.equal(pair_rows.long()[sorted_pairs.long()], torch.arange(flat.numel()))
    counts = torch.bincount(flat, minlength=E)
    assert torch.equal(offsets.long(), torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
    # h holds [g; u] of each pair, in plan order
    p = sorted_pairs.long()
    tok = p // k
    e = flat[p]
    h_ref = torch.einsum("rh,roh->ro", x[tok].double(), w1[e].double())
    assert max_err(h, h_ref) <= 2e-5 * scale_of(h_ref)


def _compiled_vs_eager(fn, args, backend):
    eager_out = fn(*args)
    grad = torch.randn_like(eager_out)
    eager_grads = torch.autograd.grad(eager_out, [a for a in args if a.requires_grad], grad)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    out = compiled(*args)
    grads = torch.autograd.grad(out, [a for a in args if a.requires_grad], grad)
    assert max_err(out, eager_out) <= 1e-6 * scale_of(eager_out)
    for a, b in zip(grads, eager_grads):
        assert max_err(a, b) <= 1e-6 * scale_of(b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_experts(device, backend):
    x, idx, w, w1, w2, _ = _experts_args(device)

    def layer(x, w, w1, w2):
        # some ordinary ops around ours, as in a model
        return torch.nn.functional.gelu(moe_fused.moe_experts(x * 2.0, idx, w, w1, w2)) + x

    _compiled_vs_eager(layer, (x, w, w1, w2), backend)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_linear(device, backend):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(21, 12, generator=g).to(device).requires_grad_(True)
    weight = torch.randn(3, 16, 12, generator=g).to(device).requires_grad_(True)
    sel = torch.randint(0, 3, (21,), generator=g).to(device)

    def f(x, weight):
        return moe_fused.moe_fused_linear(torch.tanh(x), weight, sel) * 3.0

    _compiled_vs_eager(f, (x, weight), backend)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_dynamic_shapes_experts(device):
    """One compiled graph serves several token counts (dynamic=True)."""
    torch._dynamo.reset()
    compiled = torch.compile(moe_fused.moe_experts, fullgraph=True, dynamic=True, backend="aot_eager")
    for T in (7, 19, 33):
        x, idx, w, w1, w2, _ = _experts_args(device, T=T)
        out = compiled(x, idx, w, w1, w2)
        ref = moe_fused.moe_experts(x, idx, w, w1, w2)
        assert torch.equal(out, ref)
        out.sum().backward()
        assert x.grad is not None and w1.grad is not None
