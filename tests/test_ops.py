"""Values and gradients of moe_fused.moe_experts and moe_fused.moe_fused_linear against
plain PyTorch per-expert loops in float64 (tests/reference.py), on every device."""

from __future__ import annotations

import os
import random

import pytest
import torch

import moe_fused
from reference import (
    DEVICES,
    make_experts_inputs,
    max_err,
    ref_experts,
    ref_linear,
    run_with_grads,
    scale_of,
)

# (T, H, I, E, k, empty_experts, skew)
EXPERTS_SHAPES = [
    pytest.param(1, 16, 8, 4, 1, 0, 0.0, id="T1-k1"),
    pytest.param(1, 32, 16, 8, 8, 0, 0.0, id="T1-k8-all-experts"),
    pytest.param(2, 8, 4, 6, 1, 3, 0.0, id="tiny-3-empty"),
    pytest.param(53, 37, 19, 7, 3, 2, 1.0, id="odd-sizes-ragged-2-empty"),
    pytest.param(64, 64, 32, 16, 8, 3, 2.0, id="k8-ragged-3-empty"),
    pytest.param(130, 96, 48, 5, 2, 0, 3.0, id="heavy-skew"),
    pytest.param(17, 8, 1, 3, 2, 0, 0.0, id="I1"),
    pytest.param(33, 129, 65, 9, 4, 1, 0.5, id="odd-129-65"),
    pytest.param(200, 256, 128, 16, 8, 0, 40.0, id="medium-k8-all-tokens-on-the-same-8-experts"),
]

GRAD_NAMES = ("x", "w", "w1", "w2")


def _ours_experts(x, idx, w, w1, w2):
    return moe_fused.moe_experts(x, idx, w, w1, w2)


def _ref_experts(x, idx, w, w1, w2):
    return ref_experts(x, idx, w, w1, w2)


def _experts_case(inp, dtype, device, fn, w_dtype=None, index_dtype=torch.int64):
    floats = {"x": inp["x"], "w": inp["w"], "w1": inp["w1"], "w2": inp["w2"]}
    floats = {n: t.to(dtype) for n, t in floats.items()}
    if w_dtype is not None:
        floats["w"] = inp["w"].to(w_dtype)
    return run_with_grads(fn, floats, {"idx": inp["idx"].to(index_dtype)}, inp["grad"], device=device)


def _ref_from(inp, dtype, w_dtype=None):
    """float64 reference on the inputs rounded to `dtype` (what the kernel actually sees)."""
    rounded = dict(inp)
    for n in ("x", "w1", "w2"):
        rounded[n] = inp[n].to(dtype).double()
    rounded["w"] = inp["w"].to(w_dtype or dtype).double()
    rounded["grad"] = inp["grad"].to(dtype).double()
    return _experts_case(rounded, torch.float64, "cpu", _ref_experts), rounded


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,H,I,E,k,empty,skew", EXPERTS_SHAPES)
def test_experts_fp32_tight(device, T, H, I, E, k, empty, skew):
    inp = make_experts_inputs(T, H, I, E, k, seed=T * 7 + H, empty_experts=empty, skew=skew)
    (ref_out, ref_g), _ = _ref_from(inp, torch.float32)
    out, grads = _experts_case(inp, torch.float32, device, _ours_experts)
    assert out.dtype == torch.float32 and out.shape == (T, H) and out.device.type == device
    tol = 2e-5
    assert max_err(out, ref_out) <= tol * scale_of(ref_out), "out"
    for n in GRAD_NAMES:
        assert grads[n].dtype == torch.float32 and grads[n].shape == inp[n].shape, n
        assert max_err(grads[n], ref_g[n]) <= tol * scale_of(ref_g[n]), f"grad of {n}"


def _low_precision_check(inp, dtype, device, w_dtype=None, factor=4.0):
    """Our error vs the float64 reference must be within `factor` x PyTorch's own error
    (the same per-expert loop run in `dtype`) plus a small floor."""
    (ref_out, ref_g), _ = _ref_from(inp, dtype, w_dtype)
    out, grads = _experts_case(inp, dtype, device, _ours_experts, w_dtype=w_dtype)
    t_out, t_grads = _experts_case(inp, dtype, "cpu", _ref_experts, w_dtype=w_dtype)
    eps = torch.finfo(dtype).eps
    assert out.dtype == dtype
    pairs = [("out", out, t_out, ref_out)] + [(f"grad of {n}", grads[n], t_grads[n], ref_g[n]) for n in GRAD_NAMES]
    for what, ours, theirs, ref in pairs:
        assert ours.dtype == theirs.dtype, what
        ours_err, torch_err = max_err(ours, ref), max_err(theirs, ref)
        floor = eps * scale_of(ref)
        assert ours_err <= factor * torch_err + floor, (
            f"{what}: error {ours_err:.3g} vs torch {dtype} loop {torch_err:.3g} (scale {scale_of(ref):.3g})"
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,H,I,E,k,empty,skew", EXPERTS_SHAPES)
def test_experts_bf16_loose(device, T, H, I, E, k, empty, skew):
    inp = make_experts_inputs(T, H, I, E, k, seed=T * 5 + H, empty_experts=empty, skew=skew)
    _low_precision_check(inp, torch.bfloat16, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,H,I,E,k,empty,skew", EXPERTS_SHAPES[2:6])
def test_experts_fp16(device, T, H, I, E, k, empty, skew):
    inp = make_experts_inputs(T, H, I, E, k, seed=T * 3 + H, empty_experts=empty, skew=skew)
    _low_precision_check(inp, torch.float16, device)


@pytest.mark.parametrize("device", DEVICES)
def test_experts_bf16_with_fp32_routing_weights(device):
    inp = make_experts_inputs(40, 48, 24, 6, 2, seed=11, skew=1.0)
    _low_precision_check(inp, torch.bfloat16, device, w_dtype=torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(6))
def test_experts_random_shapes(device, seed):
    rnd = random.Random(seed)
    E = rnd.randint(1, 12)
    k = rnd.randint(1, min(E, 8))
    T, H, I = rnd.randint(1, 70), rnd.randint(1, 80), rnd.randint(1, 40)
    inp = make_experts_inputs(T, H, I, E, k, seed=seed, empty_experts=rnd.randint(0, E - k), skew=rnd.random() * 3)
    (ref_out, ref_g), _ = _ref_from(inp, torch.float32)
    out, grads = _experts_case(inp, torch.float32, device, _ours_experts)
    assert max_err(out, ref_out) <= 2e-5 * scale_of(ref_out), f"out T={T} H={H} I={I} E={E} k={k}"
    for n in GRAD_NAMES:
        assert max_err(grads[n], ref_g[n]) <= 2e-5 * scale_of(ref_g[n]), f"grad of {n} T={T} H={H} I={I} E={E} k={k}"


@pytest.mark.parametrize("device", DEVICES)
def test_experts_int32_index_matches_int64(device):
    inp = make_experts_inputs(29, 24, 12, 5, 2, seed=3)
    out64, g64 = _experts_case(inp, torch.float32, device, _ours_experts, index_dtype=torch.int64)
    out32, g32 = _experts_case(inp, torch.float32, device, _ours_experts, index_dtype=torch.int32)
    assert torch.equal(out64, out32)
    for n in GRAD_NAMES:
        assert torch.equal(g64[n], g32[n]), n


@pytest.mark.parametrize("device", DEVICES)
def test_experts_duplicate_expert_in_one_token(device):
    inp = make_experts_inputs(6, 16, 8, 4, 2, seed=5)
    inp["idx"][:, 1] = inp["idx"][:, 0]  # both slots of every token pick the same expert
    (ref_out, ref_g), _ = _ref_from(inp, torch.float32)
    out, grads = _experts_case(inp, torch.float32, device, _ours_experts)
    assert max_err(out, ref_out) <= 2e-5 * scale_of(ref_out)
    for n in GRAD_NAMES:
        assert max_err(grads[n], ref_g[n]) <= 2e-5 * scale_of(ref_g[n]), n


@pytest.mark.parametrize("device", DEVICES)
def test_experts_only_needed_grads(device):
    """Gradients flow only to the inputs that require them; each matches the reference."""
    inp = make_experts_inputs(20, 24, 12, 5, 3, seed=8)
    (_, ref_g), _ = _ref_from(inp, torch.float32)
    for wanted in (("x",), ("w",), ("w1",), ("w2",), ("w1", "w2"), ("x", "w")):
        t = {n: inp[n].float().to(device).requires_grad_(n in wanted) for n in GRAD_NAMES}
        out = moe_fused.moe_experts(t["x"], inp["idx"].to(device), t["w"], t["w1"], t["w2"])
        assert out.requires_grad
        out.backward(inp["grad"].float().to(device))
        for n in GRAD_NAMES:
            if n in wanted:
                assert max_err(t[n].grad, ref_g[n]) <= 2e-5 * scale_of(ref_g[n]), (wanted, n)
            else:
                assert t[n].grad is None, (wanted, n)


@pytest.mark.parametrize("device", DEVICES)
def test_experts_no_grad_needed(device):
    inp = make_experts_inputs(9, 16, 8, 4, 2, seed=1)
    args = [inp[n].float().to(device) for n in ("x", "idx", "w", "w1", "w2")]
    args[1] = inp["idx"].to(device)
    out = moe_fused.moe_experts(*args)
    assert not out.requires_grad
    with torch.no_grad():
        out2 = moe_fused.moe_experts(*args)
    assert torch.equal(out, out2)  # deterministic


@pytest.mark.parametrize("device", DEVICES)
def test_experts_non_contiguous_activations(device):
    inp = make_experts_inputs(21, 20, 10, 5, 3, seed=4)
    x = inp["x"].float().t().contiguous().t()  # same values, column-major
    idx = inp["idx"].t().contiguous().t()
    w = inp["w"].float().t().contiguous().t()
    out = moe_fused.moe_experts(x.to(device), idx.to(device), w.to(device), inp["w1"].float().to(device), inp["w2"].float().to(device))
    ref = ref_experts(inp["x"], inp["idx"], inp["w"], inp["w1"], inp["w2"])
    assert max_err(out, ref) <= 2e-5 * scale_of(ref)


def _expect_correct_or_clear_error(fn, ref_out, ref_grads, leaves, arg_name):
    try:
        out = fn()
    except ValueError as exc:
        assert arg_name in str(exc), f"refusal of a strided {arg_name} does not name it: {exc}"
        return "refused"
    assert max_err(out, ref_out) <= 2e-5 * scale_of(ref_out)
    out.backward(torch.ones_like(out))
    for n, t in leaves.items():
        assert max_err(t.grad, ref_grads[n]) <= 2e-5 * scale_of(ref_grads[n]), n
    return "correct"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["gate_up_proj", "down_proj"])
def test_experts_transposed_weight_views(device, which):
    """A weight passed as a transposed view ([E, in, out] storage seen as [E, out, in]) is
    either handled correctly or refused with a ValueError naming it."""
    inp = make_experts_inputs(15, 24, 12, 4, 2, seed=6)
    ref_leaves = {n: inp[n].clone().requires_grad_(True) for n in GRAD_NAMES}
    ref_out = ref_experts(ref_leaves["x"], inp["idx"], ref_leaves["w"], ref_leaves["w1"], ref_leaves["w2"])
    ref_out.backward(torch.ones_like(ref_out))
    ref_grads = {n: t.grad for n, t in ref_leaves.items()}

    base = {n: inp[n].float().to(device) for n in GRAD_NAMES}
    key = "w1" if which == "gate_up_proj" else "w2"
    leaves = {n: t.clone().requires_grad_(True) for n, t in base.items()}
    storage = base[key].transpose(1, 2).contiguous().requires_grad_(True)
    view = storage.transpose(1, 2)
    assert not view.is_contiguous()
    args = dict(leaves)
    args[key] = view
    leaves_checked = {n: t for n, t in leaves.items() if n != key}

    def fn():
        return moe_fused.moe_experts(args["x"], inp["idx"].to(device), args["w"], args["w1"], args["w2"])

    result = _expect_correct_or_clear_error(fn, ref_out, ref_grads, leaves_checked, which)
    if result == "correct":
        assert max_err(storage.grad.transpose(1, 2), ref_grads[key]) <= 2e-5 * scale_of(ref_grads[key])


@pytest.mark.parametrize("device", DEVICES)
def test_experts_zero_tokens(device):
    x = torch.randn(0, 8, device=device, requires_grad=True)
    w1 = torch.randn(3, 8, 8, device=device, requires_grad=True)
    w2 = torch.randn(3, 8, 4, device=device, requires_grad=True)
    out = moe_fused.moe_experts(x, torch.zeros(0, 2, dtype=torch.long, device=device), torch.zeros(0, 2, device=device), w1, w2)
    assert out.shape == (0, 8)
    out.sum().backward()
    assert torch.count_nonzero(w1.grad) == 0 and torch.count_nonzero(w2.grad) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_experts_deterministic(device):
    inp = make_experts_inputs(64, 48, 24, 8, 4, seed=2, skew=1.0)
    a = _experts_case(inp, torch.bfloat16, device, _ours_experts)
    b = _experts_case(inp, torch.bfloat16, device, _ours_experts)
    assert torch.equal(a[0], b[0])
    for n in GRAD_NAMES:
        assert torch.equal(a[1][n], b[1][n]), n


def test_experts_gradcheck_fp64():
    inp = make_experts_inputs(5, 6, 3, 4, 2, seed=9, empty_experts=1)
    leaves = [inp[n].clone().requires_grad_(True) for n in GRAD_NAMES]
    idx = inp["idx"]

    def f(x, w, w1, w2):
        return moe_fused.moe_experts(x, idx, w, w1, w2)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_experts_gradcheck_fp64_int32_k1():
    inp = make_experts_inputs(3, 4, 2, 3, 1, seed=10)
    leaves = [inp[n].clone().requires_grad_(True) for n in GRAD_NAMES]
    idx = inp["idx"].int()
    assert torch.autograd.gradcheck(lambda *a: moe_fused.moe_experts(a[0], idx, *a[1:]), leaves)


def test_experts_fp64_matches_reference_exactly_enough():
    inp = make_experts_inputs(31, 17, 9, 6, 3, seed=12, empty_experts=1, skew=1.0)
    (ref_out, ref_g), _ = _ref_from(inp, torch.float64)
    out, grads = _experts_case(inp, torch.float64, "cpu", _ours_experts)
    assert max_err(out, ref_out) <= 1e-12 * scale_of(ref_out)
    for n in GRAD_NAMES:
        assert max_err(grads[n], ref_g[n]) <= 1e-12 * scale_of(ref_g[n]), n


# ---- moe_fused_linear ---------------------------------------------------------------------

# (N, in, out, E)
LINEAR_SHAPES = [
    pytest.param(1, 1, 1, 1, id="1x1x1"),
    pytest.param(1, 32, 16, 4, id="N1"),
    pytest.param(37, 19, 16, 5, id="thin-out16"),
    pytest.param(64, 16, 64, 8, id="thin-in16"),
    pytest.param(100, 33, 47, 3, id="odd"),
    pytest.param(50, 24, 40, 12, id="some-experts-empty"),
]


def _linear_inputs(N, in_f, out_f, E, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, in_f, generator=g, dtype=torch.float64)
    weight = torch.randn(E, out_f, in_f, generator=g, dtype=torch.float64) / in_f**0.5
    sel = torch.randint(0, max(1, E // 2 + 1), (N,), generator=g)  # upper experts often empty
    grad = torch.randn(N, out_f, generator=g, dtype=torch.float64)
    return x, weight, sel, grad


def _linear_case(x, weight, sel, grad, dtype, device, fn):
    return run_with_grads(
        lambda x, weight, sel: fn(x, weight, sel),
        {"x": x.to(dtype), "weight": weight.to(dtype)},
        {"sel": sel},
        grad,
        device=device,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N,in_f,out_f,E", LINEAR_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_linear(device, N, in_f, out_f, E, dtype):
    x, weight, sel, grad = _linear_inputs(N, in_f, out_f, E, seed=N + in_f)
    xr, wr, gr = x.to(dtype).double(), weight.to(dtype).double(), grad.to(dtype).double()
    ref_out, ref_g = _linear_case(xr, wr, sel, gr, torch.float64, "cpu", ref_linear)
    out, grads = _linear_case(x, weight, sel, grad, dtype, device, moe_fused.moe_fused_linear)
    assert out.dtype == dtype and out.shape == (N, out_f)
    if dtype == torch.float32:
        assert max_err(out, ref_out) <= 2e-5 * scale_of(ref_out)
        for n in ("x", "weight"):
            assert max_err(grads[n], ref_g[n]) <= 2e-5 * scale_of(ref_g[n]), n
    else:
        t_out, t_g = _linear_case(x, weight, sel, grad, dtype, "cpu", ref_linear)
        eps = torch.finfo(dtype).eps
        for what, ours, theirs, ref in [("out", out, t_out, ref_out)] + [
            (n, grads[n], t_g[n], ref_g[n]) for n in ("x", "weight")
        ]:
            assert max_err(ours, ref) <= 4 * max_err(theirs, ref) + eps * scale_of(ref), what


@pytest.mark.parametrize("device", DEVICES)
def test_linear_int32_and_only_needed_grads(device):
    x, weight, sel, grad = _linear_inputs(30, 12, 20, 4, seed=1)
    ref_out, ref_g = _linear_case(x, weight, sel, grad, torch.float64, "cpu", ref_linear)
    xx = x.float().to(device).requires_grad_(True)
    ww = weight.float().to(device)
    out = moe_fused.moe_fused_linear(xx, ww, sel.int().to(device))
    out.backward(grad.float().to(device))
    assert max_err(out, ref_out) <= 2e-5 * scale_of(ref_out)
    assert max_err(xx.grad, ref_g["x"]) <= 2e-5 * scale_of(ref_g["x"])
    assert ww.grad is None
    ww.requires_grad_(True)
    out = moe_fused.moe_fused_linear(x.float().to(device), ww, sel.to(device))
    out.backward(grad.float().to(device))
    assert max_err(ww.grad, ref_g["weight"]) <= 2e-5 * scale_of(ref_g["weight"])


def test_linear_gradcheck_fp64():
    x, weight, sel, _ = _linear_inputs(7, 5, 4, 3, seed=2)
    assert torch.autograd.gradcheck(
        lambda a, b: moe_fused.moe_fused_linear(a, b, sel),
        (x.requires_grad_(True), weight.requires_grad_(True)),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_linear_transposed_weight_view(device):
    x, weight, sel, grad = _linear_inputs(20, 12, 16, 3, seed=3)
    ref_out, ref_g = _linear_case(x, weight, sel, grad, torch.float64, "cpu", ref_linear)
    storage = weight.float().transpose(1, 2).contiguous().to(device).requires_grad_(True)
    try:
        out = moe_fused.moe_fused_linear(x.float().to(device), storage.transpose(1, 2), sel.to(device))
    except ValueError as exc:
        assert "weight" in str(exc)
        return
    assert max_err(out, ref_out) <= 2e-5 * scale_of(ref_out)
    out.backward(grad.float().to(device))
    assert max_err(storage.grad.transpose(1, 2), ref_g["weight"]) <= 2e-5 * scale_of(ref_g["weight"])


@pytest.mark.gpu
def test_cpu_gpu_parity_bf16():
    """The CUDA path agrees with the CPU core (the reference implementation) in bf16."""
    inp = make_experts_inputs(96, 64, 32, 8, 4, seed=21, skew=1.0, empty_experts=1)
    c_out, c_g = _experts_case(inp, torch.bfloat16, "cpu", _ours_experts)
    g_out, g_g = _experts_case(inp, torch.bfloat16, "cuda", _ours_experts)
    (ref_out, ref_g), _ = _ref_from(inp, torch.bfloat16)
    eps = torch.finfo(torch.bfloat16).eps
    assert max_err(g_out, c_out) <= 4 * eps * scale_of(ref_out)
    for n in GRAD_NAMES:
        assert max_err(g_g[n], c_g[n]) <= 4 * eps * scale_of(ref_g[n]), n


# (T, H, I, E, k): sizes of 0 are valid (as in the C core): out = 0, zero gradients
DEGENERATE = [
    pytest.param(5, 6, 3, 4, 0, id="k0"),
    pytest.param(5, 6, 0, 4, 2, id="I0"),
    pytest.param(5, 0, 3, 4, 2, id="H0"),
    pytest.param(0, 6, 3, 0, 2, id="E0-T0"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,H,I,E,k", DEGENERATE)
def test_experts_degenerate_sizes(device, T, H, I, E, k):
    x = torch.randn(T, H, device=device, requires_grad=True)
    idx = torch.randint(0, max(E, 1), (T, k), device=device)
    w = torch.rand(T, k, device=device, requires_grad=True)
    w1 = torch.randn(E, 2 * I, H, device=device, requires_grad=True)
    w2 = torch.randn(E, H, I, device=device, requires_grad=True)
    out = moe_fused.moe_experts(x, idx, w, w1, w2)
    assert out.shape == (T, H) and torch.count_nonzero(out) == 0
    out.backward(torch.ones_like(out))
    for t in (x, w, w1, w2):
        assert t.grad is not None and t.grad.shape == t.shape and torch.count_nonzero(t.grad) == 0
    _, _, plan = torch.ops.moe_fused.experts_forward(x, idx, w, w1, w2)
    offsets, sorted_pairs, pair_rows = moe_fused._lib.packed_plan_views(plan, E, T * k)
    flat = idx.reshape(-1).cpu()
    assert torch.equal(offsets.cpu().long(), torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(flat, minlength=E).cumsum(0)]))
    assert torch.equal(sorted_pairs.cpu().long(), torch.sort(flat, stable=True).indices)


@pytest.mark.parametrize("device", DEVICES)
def test_experts_degenerate_sizes_still_check_indices(device):
    x = torch.randn(3, 4, device=device)
    with pytest.raises(IndexError, match="top_k_index"):  # I = 0, but index 5 names no expert
        moe_fused.moe_experts(x, torch.full((3, 2), 5, device=device), torch.rand(3, 2, device=device),
                              torch.randn(4, 0, 4, device=device), torch.randn(4, 4, 0, device=device))
    with pytest.raises(IndexError, match="top_k_index"):  # E = 0 with tokens to route
        moe_fused.moe_experts(x, torch.zeros(3, 1, dtype=torch.long, device=device), torch.rand(3, 1, device=device),
                              torch.randn(0, 6, 4, device=device), torch.randn(0, 4, 3, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_linear_degenerate_sizes(device):
    for N, in_f, out_f, E in ((0, 3, 4, 2), (5, 0, 4, 2), (5, 3, 0, 2), (0, 3, 4, 0)):
        x = torch.randn(N, in_f, device=device, requires_grad=True)
        weight = torch.randn(E, out_f, in_f, device=device, requires_grad=True)
        sel = torch.randint(0, max(E, 1), (N,), device=device)
        out = moe_fused.moe_fused_linear(x, weight, sel)
        assert out.shape == (N, out_f) and torch.count_nonzero(out) == 0
        out.backward(torch.ones_like(out))
        assert torch.count_nonzero(x.grad) == 0 and torch.count_nonzero(weight.grad) == 0
    with pytest.raises(IndexError, match="selected_experts"):
        moe_fused.moe_fused_linear(torch.randn(2, 0, device=device), torch.randn(3, 4, 0, device=device),
                                   torch.tensor([0, 3], device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_casts_like_a_matmul(device):
    """Under torch.autocast, float32 activations and weights run in the autocast dtype
    (exactly as if cast by hand); gradients reach the float32 leaves in float32."""
    inp = make_experts_inputs(24, 32, 16, 6, 2, seed=13)
    leaves = {n: inp[n].float().to(device).requires_grad_(True) for n in GRAD_NAMES}
    idx = inp["idx"].to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = moe_fused.moe_experts(leaves["x"], idx, leaves["w"], leaves["w1"], leaves["w2"])
        y = moe_fused.moe_fused_linear(leaves["x"], leaves["w1"], idx[:, 0])
    assert out.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    (out.float().sum() + y.float().sum()).backward()
    for n in GRAD_NAMES:
        assert leaves[n].grad.dtype == torch.float32, n
    manual = {n: leaves[n].detach().bfloat16().requires_grad_(True) for n in ("x", "w1", "w2")}
    out2 = moe_fused.moe_experts(manual["x"], idx, leaves["w"].detach(), manual["w1"], manual["w2"])
    assert torch.equal(out, out2)  # float32 routing weights stay float32


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_compiles(device):
    inp = make_experts_inputs(12, 16, 8, 4, 2, seed=14)
    args = [inp[n].float().to(device).requires_grad_(True) for n in GRAD_NAMES]
    idx = inp["idx"].to(device)

    def f(x, w, w1, w2):
        with torch.autocast(device, dtype=torch.bfloat16):
            return moe_fused.moe_experts(x, idx, w, w1, w2)

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, f(*args))
    out.float().sum().backward()
    assert all(a.grad is not None for a in args)


def test_experts_saves_only_x_weights_plan_and_h():
    """Autograd keeps x, the routing weights, both expert weights, the plan and h = [g; u]
    -- not a = silu(g) * u, not y, no gathered copy of x."""
    T, H, I, E, k = 10, 12, 5, 4, 3
    inp = make_experts_inputs(T, H, I, E, k, seed=15)
    leaves = {n: inp[n].float().requires_grad_(True) for n in GRAD_NAMES}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t, lambda t: t):
        out = moe_fused.moe_experts(leaves["x"], inp["idx"], leaves["w"], leaves["w1"], leaves["w2"])
    expected = [
        ((T, H), torch.float32),  # x
        ((T, k), torch.float32),  # routing weights
        ((E, 2 * I, H), torch.float32),  # gate_up_proj
        ((E, H, I), torch.float32),  # down_proj
        ((2 * T * k + E + 1,), torch.int32),  # the plan: sorted_pairs, pair_rows, expert_offsets
        ((T * k, 2 * I), torch.float32),  # h
    ]
    assert sorted(saved, key=str) == sorted(expected, key=str)
    out.sum().backward()


# ---- the eager fast path (autograd.Function) and the registered op agree --------------------


class _PassThroughMode(torch.overrides.TorchFunctionMode):
    """Any torch function mode: moe_experts must then take the registered custom op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", DEVICES)
def test_experts_eager_fast_path_matches_the_op(device, monkeypatch):
    from moe_fused import ops

    taken = []
    apply = ops._experts_apply
    monkeypatch.setattr(ops, "_experts_apply", lambda *a: taken.append(1) or apply(*a))
    inp = make_experts_inputs(37, 48, 24, 6, 3, seed=3, empty_experts=1, skew=1.0)
    fast = _experts_case(inp, torch.bfloat16, device, _ours_experts)
    assert len(taken) == 1, "a plain eager call takes the autograd.Function fast path"
    with _PassThroughMode():
        slow = _experts_case(inp, torch.bfloat16, device, _ours_experts)
    assert len(taken) == 1, "under a torch function mode the registered op runs instead"
    assert torch.equal(fast[0], slow[0])
    for name in GRAD_NAMES:
        assert torch.equal(fast[1][name], slow[1][name]), name


@pytest.mark.parametrize("device", DEVICES)
def test_experts_eager_fast_path_partial_grads_and_no_grad(device):
    inp = make_experts_inputs(9, 16, 8, 4, 2, seed=5)
    leaves = {n: inp[n].float().to(device).requires_grad_(n == "w1") for n in ("x", "w", "w1", "w2")}
    out = moe_fused.moe_experts(leaves["x"], inp["idx"].to(device), leaves["w"], leaves["w1"], leaves["w2"])
    out.backward(inp["grad"].float().to(device))
    assert leaves["w1"].grad is not None
    assert all(leaves[n].grad is None for n in ("x", "w", "w2"))
    with torch.no_grad():
        again = moe_fused.moe_experts(leaves["x"], inp["idx"].to(device), leaves["w"], leaves["w1"], leaves["w2"])
    assert not again.requires_grad and torch.equal(again, out.detach())


def _experts_twice(device, retain_first=True):
    """One forward, then backward with retain_graph=True and a second backward: the grads."""
    inp = make_experts_inputs(23, 32, 16, 5, 2, seed=8)
    leaves = {n: inp[n].bfloat16().to(device).requires_grad_() for n in ("x", "w", "w1", "w2")}
    out = moe_fused.moe_experts(leaves["x"], inp["idx"].to(device), leaves["w"], leaves["w1"], leaves["w2"])
    grad = inp["grad"].bfloat16().to(device)
    out.backward(grad, retain_graph=retain_first)
    once = {n: t.grad.clone() for n, t in leaves.items()}
    out.backward(grad)
    return once, {n: t.grad for n, t in leaves.items()}


@pytest.mark.parametrize("device", DEVICES)
def test_experts_second_backward_with_h_kept(device):
    from moe_fused import ops

    previous = ops.set_backward_overwrite_h(False)
    try:
        once, twice = _experts_twice(device)
    finally:
        ops.set_backward_overwrite_h(previous)
    for name in once:
        assert torch.equal(twice[name], once[name] + once[name]), name


@pytest.mark.parametrize("device", DEVICES)
def test_experts_second_backward_after_h_overwritten(device):
    """The eager CUDA backward writes dh over the saved h (by default): a second backward must
    fail loudly, naming the switch, not compute from garbage. The CPU core never overwrites."""
    from moe_fused import ops

    previous = ops.set_backward_overwrite_h(True)
    try:
        if device == "cuda":
            with pytest.raises(RuntimeError, match="set_backward_overwrite_h"):
                _experts_twice(device)
        else:
            once, twice = _experts_twice(device)
            for name in once:
                assert torch.equal(twice[name], once[name] + once[name]), name
        with _PassThroughMode():  # the registered op never overwrites its inputs
            once, twice = _experts_twice(device)
        for name in once:
            assert torch.equal(twice[name], once[name] + once[name]), name
    finally:
        ops.set_backward_overwrite_h(previous)


def test_experts_overwrite_h_is_the_default():
    import subprocess
    import sys

    code = "from moe_fused import ops; print(ops._overwrite_h)"
    env = dict(os.environ)
    env.pop("MOE_FUSED_OVERWRITE_H", None)
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    env["MOE_FUSED_OVERWRITE_H"] = "0"
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert (on.stdout.strip(), off.stdout.strip()) == ("True", "False")


@pytest.mark.parametrize("device", DEVICES)
def test_linear_eager_fast_path_matches_the_op(device, monkeypatch):
    from moe_fused import ops

    taken = []
    apply = ops._linear_apply
    monkeypatch.setattr(ops, "_linear_apply", lambda *a: taken.append(1) or apply(*a))
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(29, 24, generator=g).bfloat16()
    w0 = torch.randn(5, 40, 24, generator=g).bfloat16()
    sel = torch.randint(0, 5, (29,), generator=g)
    dy = torch.randn(29, 40, generator=g).bfloat16()

    def run():
        x, w = x0.to(device).requires_grad_(), w0.to(device).requires_grad_()
        y = moe_fused.moe_fused_linear(x, w, sel.to(device))
        y.backward(dy.to(device))
        return y.detach(), x.grad, w.grad

    fast = run()
    assert len(taken) == 1, "a plain eager call takes the autograd.Function fast path"
    with _PassThroughMode():
        slow = run()
    assert len(taken) == 1, "under a torch function mode the registered op runs instead"
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


def test_cuda_guard_switches_only_to_another_device(monkeypatch):
    """The CUDA kernels' device guard: skipped when the tensors' device is already current,
    torch.cuda.device(index) around the call when it is not (runs without a GPU: the device
    getter and the guard are stand-ins)."""
    from types import SimpleNamespace

    from moe_fused import ops

    entered = []

    class Guard:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            entered.append(self.index)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(ops, "_cuda_get_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Guard)
    kernel = ops._cuda_guarded(lambda t, v: (t.device.index, v))
    on = lambda i: SimpleNamespace(device=torch.device("cuda", i), get_device=lambda: i)  # noqa: E731
    assert kernel(on(0), "a") == (0, "a") and entered == []
    assert kernel(on(1), "b") == (1, "b") and entered == [1]
