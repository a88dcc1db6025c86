"""The no-grad experts forward: when no backward can follow (grad mode off, or no input that
requires grad), the eager path of moe_experts asks the C core for out alone (h NULL) and
allocates no h. out must be bit-identical to the forward that stores h, on every shape: ragged
routing, empty experts, one token, degenerate sizes. The registered op keeps h."""

from __future__ import annotations

import pytest
import torch

import moe_fused
from moe_fused import ops
from reference import DEVICES, make_experts_inputs

# (T, H, I, E, k, empty_experts, skew)
SHAPES = [
    pytest.param((1, 16, 8, 4, 1, 0, 0.0), id="T1-k1"),
    pytest.param((1, 32, 16, 8, 8, 0, 0.0), id="T1-k8"),
    pytest.param((2, 8, 4, 6, 1, 3, 0.0), id="tiny-3-empty"),
    pytest.param((53, 37, 19, 7, 3, 2, 1.0), id="odd-ragged-2-empty"),
    pytest.param((64, 64, 32, 16, 8, 3, 2.0), id="k8-ragged-3-empty"),
    pytest.param((300, 24, 10, 2, 2, 0, 3.0), id="more-rows-than-a-cpu-chunk"),
    pytest.param((33, 129, 65, 9, 4, 1, 0.5), id="odd-129-65"),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FLOATS = ("x", "w", "w1", "w2")


def _args(shape, dtype, device, seed=0):
    T, H, I, E, k, empty, skew = shape
    inp = make_experts_inputs(T, H, I, E, k, seed=seed, empty_experts=empty, skew=skew)
    t = {n: inp[n].to(device=device, dtype=dtype) for n in FLOATS}
    return t["x"], inp["idx"].to(device), t["w"], t["w1"], t["w2"]


@pytest.fixture
def need_h_seen(monkeypatch):
    """need_h of every experts forward that allocates its outputs (fake and real kernels)."""
    seen = []
    outputs = ops._experts_outputs

    def record(x, idx, w1, factory, need_h=True):
        seen.append(need_h)
        return outputs(x, idx, w1, factory, need_h)

    monkeypatch.setattr(ops, "_experts_outputs", record)
    fast = ops._fast_ops()  # the C++ fast path allocates in C++: its need_h argument
    if fast is not None:
        forward = fast.experts_forward

        def record_fast(x, idx, w, w1, w2, need_h, *rest):
            result = forward(x, idx, w, w1, w2, need_h, *rest)
            if result[-1] != fast.FALLBACK:
                seen.append(need_h)
            return result

        monkeypatch.setattr(fast, "experts_forward", record_fast)
    return seen


def _with_h(x, idx, w, w1, w2):
    """The forward that stores h (inputs requiring grad, grad mode on)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, w1, w2)]
    out = moe_fused.moe_experts(leaves[0], idx, leaves[1], leaves[2], leaves[3])
    assert out.requires_grad
    return out.detach()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_no_grad_out_is_bit_identical(device, dtype, shape, need_h_seen):
    args = _args(shape, dtype, device, seed=7)
    ref = _with_h(*args)
    with torch.no_grad():
        out = moe_fused.moe_experts(*args)
    with torch.inference_mode():
        out_inf = moe_fused.moe_experts(*args)
    assert need_h_seen == [True, False, False]
    assert torch.equal(out, ref) and torch.equal(out_inf, ref)


def test_no_grad_out_is_bit_identical_float64(need_h_seen):
    args = _args((29, 21, 9, 6, 3, 1, 1.0), torch.float64, "cpu")
    ref = _with_h(*args)
    with torch.no_grad():
        out = moe_fused.moe_experts(*args)
    assert need_h_seen == [True, False] and torch.equal(out, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_nothing_requires_grad_keeps_no_h(device, need_h_seen):
    args = _args((40, 32, 16, 8, 4, 2, 1.0), torch.bfloat16, device)
    out = moe_fused.moe_experts(*args)  # grad mode on, no input requires grad
    assert need_h_seen == [False]
    assert not out.requires_grad and out.grad_fn is None
    assert torch.equal(out, _with_h(*args))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", FLOATS)
def test_one_input_requiring_grad_keeps_h(device, which, need_h_seen):
    args = list(_args((17, 16, 8, 5, 2, 1, 0.0), torch.float32, device))
    pos = {"x": 0, "w": 2, "w1": 3, "w2": 4}[which]
    args[pos] = args[pos].clone().requires_grad_()
    out = moe_fused.moe_experts(*args)
    assert need_h_seen == [True]
    out.sum().backward()
    assert args[pos].grad is not None and args[pos].grad.shape == args[pos].shape
    with torch.no_grad():  # the same inputs (one requires grad), grad mode off: no h
        again = moe_fused.moe_experts(*args)
    assert need_h_seen == [True, False] and torch.equal(again, out.detach())


@pytest.mark.parametrize("device", DEVICES)
def test_forward_impl_without_h(device):
    """The kernel itself: the same out and plan, h empty [0, 2I] (neither allocated nor
    written)."""
    x, idx, w, w1, w2 = _args((45, 24, 12, 7, 3, 2, 2.0), torch.bfloat16, device)
    with_h = ops._experts_forward_impl(x, idx, w, w1, w2)
    without = ops._experts_forward_impl(x, idx, w, w1, w2, False)
    assert with_h[1].shape == (45 * 3, 24) and without[1].shape == (0, 24)
    assert without[1].dtype == x.dtype and without[1].device == x.device
    for a, b in zip(with_h[:1] + with_h[2:], without[:1] + without[2:]):  # out, plan
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_registered_op_keeps_h_under_no_grad(device):
    x, idx, w, w1, w2 = _args((13, 16, 8, 4, 2, 0, 0.0), torch.float32, device)
    with torch.no_grad():
        out, h, *_ = torch.ops.moe_fused.experts_forward(x, idx, w, w1, w2)
        fast = moe_fused.moe_experts(x, idx, w, w1, w2)
    assert h.shape == (13 * 2, 16) and torch.equal(out, fast)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "T,H,I,E,k", [(0, 8, 4, 3, 2), (5, 6, 3, 4, 0), (5, 6, 0, 4, 2), (5, 0, 3, 4, 2), (0, 6, 3, 0, 2)]
)
def test_no_grad_degenerate_sizes(device, T, H, I, E, k):
    x = torch.randn(T, H, device=device)
    idx = torch.randint(0, max(E, 1), (T, k), device=device)
    w = torch.rand(T, k, device=device)
    w1, w2 = torch.randn(E, 2 * I, H, device=device), torch.randn(E, H, I, device=device)
    with torch.no_grad():
        out = moe_fused.moe_experts(x, idx, w, w1, w2)
    assert out.shape == (T, H) and torch.count_nonzero(out) == 0
    _, h, *_ = ops._experts_forward_impl(x, idx, w, w1, w2, False)
    assert h.shape == (0, 2 * I)


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_bad_input_errors(device):
    x, idx, w, w1, w2 = _args((9, 16, 8, 4, 2, 0, 0.0), torch.float32, device)
    with torch.no_grad():
        with pytest.raises(IndexError, match="top_k_index"):
            moe_fused.moe_experts(x, torch.full_like(idx, 4), w, w1, w2)
        with pytest.raises(ValueError, match="down_proj"):
            moe_fused.moe_experts(x, idx, w, w1, w2[:, :, :-1])
        with pytest.raises(TypeError, match="gate_up_proj"):
            moe_fused.moe_experts(x, idx, w, w1.double(), w2)
