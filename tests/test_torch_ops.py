"""The C++ fast path of the experts and linear calls (moe_fused._torch_ops, csrc/torch/torch_ops.cpp):
it allocates, describes and calls what the ctypes path does, so every result must be
bit-identical to the ctypes path's, its errors the same exceptions with the same messages,
and the degenerate shapes it hands back (FALLBACK) still handled. Skipped where the module
is not built for this torch (CI builds it: .ci/run checks that it loads)."""

from __future__ import annotations

import os

import pytest
import torch

import moe_fused
from moe_fused import _lib, ops
from reference import DEVICES, make_experts_inputs

pytestmark = pytest.mark.skipif(
    not _lib.is_available() or _lib.torch_ops() is None,
    reason="the C++ fast path is not built for this torch: " + (
        _lib.torch_ops_status() if _lib.is_available() else "no library"),
)

# (T, H, I, E, k, empty_experts, skew)
SHAPES = [
    pytest.param((1, 16, 8, 4, 1, 0, 0.0), id="T1-k1"),
    pytest.param((53, 37, 19, 7, 3, 2, 1.0), id="odd-ragged-2-empty"),
    pytest.param((64, 64, 32, 16, 8, 3, 2.0), id="k8-ragged-3-empty"),
    pytest.param((0, 16, 8, 4, 2, 0, 0.0), id="T0-fallback"),
]


def _spy_on_fast_calls(monkeypatch, names):
    """A list that gets the name of each of the fast path's calls `names` that ran (not handed
    back as FALLBACK)."""
    fast = _lib.torch_ops()
    calls = []
    for name in names:
        fn = getattr(fast, name)

        def spy(*args, _fn=fn, _name=name):
            result = _fn(*args)
            if result[-1] != fast.FALLBACK:
                calls.append(_name)
            return result

        monkeypatch.setattr(fast, name, spy)
    return calls


@pytest.fixture
def fast_calls(monkeypatch):
    monkeypatch.setattr(ops, "_torch_ops_wanted", True)  # the fast path on (restored after)
    return _spy_on_fast_calls(monkeypatch, ("experts_forward", "experts_backward"))


def _inputs(shape, dtype, device):
    T, H, I, E, k, empty, skew = shape
    inp = make_experts_inputs(T, H, I, E, k, seed=3, empty_experts=empty, skew=skew)
    leaves = [inp[n].to(device=device, dtype=dtype).requires_grad_() for n in ("x", "w", "w1", "w2")]
    return leaves, inp["idx"].to(device), inp["grad"].to(device=device, dtype=dtype)


def _run(shape, dtype, device, fast):
    """out, the no-grad out and every gradient, with the fast path on or off."""
    previous = ops.set_torch_ops(fast)
    try:
        (x, w, w1, w2), idx, grad = _inputs(shape, dtype, device)
        out = moe_fused.moe_experts(x, idx, w, w1, w2)
        out.backward(grad)
        with torch.no_grad():
            out_ng = moe_fused.moe_experts(x, idx, w, w1, w2)
        return [out.detach(), out_ng, x.grad, w.grad, w1.grad, w2.grad]
    finally:
        ops.set_torch_ops(previous)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_fast_path_is_bit_identical_to_ctypes_path(device, dtype, shape, fast_calls):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is CPU only")
    fast = _run(shape, dtype, device, True)
    degenerate = shape[0] == 0 or shape[2] == 0
    # the fast path ran both calls, unless the shape is one it hands back
    assert fast_calls == ([] if degenerate else ["experts_forward", "experts_backward", "experts_forward"])
    fast_calls.clear()
    slow = _run(shape, dtype, device, False)
    assert fast_calls == []
    for name, a, b in zip(("out", "out no-grad", "dx", "dw", "dw1", "dw2"), fast, slow):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.equal(a, b), name


@pytest.mark.parametrize("device", DEVICES)
def test_fast_path_backward_of_some_gradients(device, fast_calls):
    """Gradients not asked for are neither computed nor returned (None), as on the ctypes path."""
    (x, w, w1, w2), idx, grad = _inputs((20, 16, 8, 4, 2, 1, 1.0), torch.float32, device)
    w.requires_grad_(False)
    w1.requires_grad_(False)
    moe_fused.moe_experts(x, idx, w, w1, w2).backward(grad)
    assert "experts_backward" in fast_calls
    assert x.grad is not None and w2.grad is not None and w.grad is None and w1.grad is None
    dx, dw2 = x.grad.clone(), w2.grad.clone()
    x.grad = w2.grad = None
    ops.set_torch_ops(False)
    moe_fused.moe_experts(x, idx, w, w1, w2).backward(grad)
    assert torch.equal(dx, x.grad) and torch.equal(dw2, w2.grad)


def _error(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - compared below
        return type(exc), str(exc)
    return None


@pytest.mark.parametrize("fast", [True, False])
def test_fast_path_raises_the_c_librarys_errors(fast):
    """An index out of range reaches the C core's check (CPU): IndexError naming top_k_index,
    the same message on both paths."""
    (x, w, w1, w2), idx, _ = _inputs((6, 16, 8, 4, 2, 0, 0.0), torch.float32, "cpu")
    idx = idx.clone()
    idx[3, 1] = 4
    previous = ops.set_torch_ops(fast)
    try:
        err = _error(lambda: moe_fused.moe_experts(x, idx, w, w1, w2))
    finally:
        ops.set_torch_ops(previous)
    assert err is not None and err[0] is IndexError and "top_k_index" in err[1], err
    ops.set_torch_ops(not fast)
    try:
        assert _error(lambda: moe_fused.moe_experts(x, idx, w, w1, w2)) == err
    finally:
        ops.set_torch_ops(previous)


def test_fast_path_backward_error_is_raised():
    """A failing backward status is raised (here: a plan that does not match the shapes
    reaches the C library, which names it)."""
    (x, w, w1, w2), idx, grad = _inputs((6, 16, 8, 4, 2, 0, 0.0), torch.float32, "cpu")
    with torch.no_grad():
        out, h, plan = ops._experts_forward_impl(x, idx, w, w1, w2)
    bad_plan = plan.clone()
    bad_plan[-1] = 7  # expert_offsets[E] != T*k
    errors = []
    for fast in (True, False):
        previous = ops.set_torch_ops(fast)
        try:
            errors.append(_error(lambda: ops._experts_backward_impl(
                grad, x, w, w1, w2, bad_plan, h, True, True, True, True)))
        finally:
            ops.set_torch_ops(previous)
    assert errors[0] is not None and errors[0] == errors[1], errors
    assert errors[0][0] is IndexError and "expert_offsets" in errors[0][1], errors


def test_loader_refuses_another_torch(monkeypatch):
    """A module built for another torch is never imported (the ctypes path runs instead)."""
    monkeypatch.setattr(_lib.torch, "__version__", "0.0.0-other")
    module, status = _lib._load_torch_ops()
    assert module is None and "built for torch" in status and "0.0.0-other" in status


def test_loader_honours_the_environment(monkeypatch):
    monkeypatch.setenv(_lib.TORCH_OPS_ENV, "0")
    module, status = _lib._load_torch_ops()
    assert module is None and status == f"off ({_lib.TORCH_OPS_ENV}=0)"


def test_status_says_on():
    assert _lib.torch_ops_status().startswith("on (")
    assert os.path.basename(_lib.torch_ops().__file__).startswith("_torch_ops")


@pytest.fixture
def linear_fast_calls(monkeypatch):
    monkeypatch.setattr(ops, "_torch_ops_wanted", True)  # the fast path on (restored after)
    return _spy_on_fast_calls(monkeypatch, ("linear_forward", "linear_backward"))


def _linear_run(N, E, in_f, out_f, dtype, device, fast):
    previous = ops.set_torch_ops(fast)
    try:
        g = torch.Generator().manual_seed(5)
        x = torch.randn(N, in_f, generator=g).to(device=device, dtype=dtype).requires_grad_()
        weight = (torch.randn(E, out_f, in_f, generator=g) / in_f**0.5).to(device=device, dtype=dtype).requires_grad_()
        sel = torch.randint(0, E, (N,), generator=g).to(device)
        grad = torch.randn(N, out_f, generator=g).to(device=device, dtype=dtype)
        out = moe_fused.moe_fused_linear(x, weight, sel)
        out.backward(grad)
        return [out.detach(), x.grad, weight.grad]
    finally:
        ops.set_torch_ops(previous)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N, E, in_f, out_f", [(1, 3, 16, 8), (77, 5, 33, 19), (0, 4, 16, 8)],
                         ids=["N1", "odd-77", "N0-fallback"])
def test_linear_fast_path_is_bit_identical_to_ctypes_path(device, dtype, N, E, in_f, out_f, linear_fast_calls):
    fast = _linear_run(N, E, in_f, out_f, dtype, device, True)
    assert linear_fast_calls == ([] if N == 0 else ["linear_forward", "linear_backward"])
    linear_fast_calls.clear()
    slow = _linear_run(N, E, in_f, out_f, dtype, device, False)
    assert linear_fast_calls == []
    for name, a, b in zip(("out", "grad_input", "grad_weight"), fast, slow):
        assert a.shape == b.shape and torch.equal(a, b), name


def test_linear_fast_path_raises_the_c_librarys_errors():
    x, weight = torch.randn(4, 8), torch.randn(3, 5, 8)
    sel = torch.tensor([0, 1, 3, 2])  # 3 is out of range
    errors = []
    for fast in (True, False):
        previous = ops.set_torch_ops(fast)
        try:
            errors.append(_error(lambda: moe_fused.moe_fused_linear(x, weight, sel)))
        finally:
            ops.set_torch_ops(previous)
    assert errors[0] is not None and errors[0] == errors[1], errors
    assert errors[0][0] is IndexError and "selected_experts" in errors[0][1], errors


@pytest.mark.parametrize("fast", [True, False])
def test_c_call_runs_without_the_gil(fast):
    """The CPU layer computes inside the C call: other Python threads must run meanwhile, on
    the fast path as on the ctypes path (ctypes drops the GIL for foreign calls)."""
    import threading
    import time

    (x, w, w1, w2), idx, _ = _inputs((1024, 512, 512, 8, 4, 0, 0.0), torch.float32, "cpu")
    previous = ops.set_torch_ops(fast)
    try:
        with torch.no_grad():
            moe_fused.moe_experts(x, idx, w, w1, w2)  # warm
            t0 = time.perf_counter()
            moe_fused.moe_experts(x, idx, w, w1, w2)
            alone = time.perf_counter() - t0
            gaps, done = [], threading.Event()

            def spin():
                last = time.perf_counter()
                while not done.is_set():
                    now = time.perf_counter()
                    gaps.append(now - last)
                    last = now

            spinner = threading.Thread(target=spin)
            spinner.start()
            t0 = time.perf_counter()
            for _ in range(3):
                moe_fused.moe_experts(x, idx, w, w1, w2)
            took = time.perf_counter() - t0
            done.set()
            spinner.join()
    finally:
        ops.set_torch_ops(previous)
    assert alone > 0.01, f"the call ({alone * 1e3:.1f} ms) is too short to tell"
    # with the GIL held through a call, the spinner would stall for a whole call
    assert max(gaps) < 0.5 * took / 3, (max(gaps), took)


def test_fast_path_hands_a_malformed_plan_to_the_python_checks(fast_calls):
    """A plan of the wrong size is not described by the fast path (FALLBACK): the Python path
    raises, naming the plan."""
    (x, w, w1, w2), idx, grad = _inputs((6, 16, 8, 4, 2, 0, 0.0), torch.float32, "cpu")
    with torch.no_grad():
        _, h, plan = ops._experts_forward_impl(x, idx, w, w1, w2)
    with pytest.raises(ValueError, match="plan"):
        ops._experts_backward_impl(grad, x, w, w1, w2, plan[:-1], h, True, True, True, True)
    assert "experts_backward" not in fast_calls
