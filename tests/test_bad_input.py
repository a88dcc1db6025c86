"""Bad input: every mistake is a ValueError / TypeError / IndexError whose message names
the argument, raised before anything is written -- never a crash or a wrong answer."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest
import torch

import moe_fused
from moe_fused import _lib
from reference import DEVICES

T, H, I, E, K = 6, 8, 4, 3, 2


def _good(device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(T, H, generator=g).to(device, dtype),
        top_k_index=torch.randint(0, E, (T, K), generator=g).to(device),
        top_k_weights=torch.rand(T, K, generator=g).to(device, dtype),
        gate_up_proj=torch.randn(E, 2 * I, H, generator=g).to(device, dtype),
        down_proj=torch.randn(E, H, I, generator=g).to(device, dtype),
    )


def _call(args):
    return moe_fused.moe_experts(
        args["hidden_states"], args["top_k_index"], args["top_k_weights"], args["gate_up_proj"], args["down_proj"]
    )


def _with(device="cpu", **changes):
    args = _good(device)
    for name, fn in changes.items():
        args[name] = fn(args[name])
    return args


# (id, changes, exception, name the message must contain)
EXPERTS_CASES = [
    ("x-rank3", dict(hidden_states=lambda t: t.unsqueeze(0)), ValueError, "hidden_states"),
    ("x-rank1", dict(hidden_states=lambda t: t[0]), ValueError, "hidden_states"),
    ("idx-rank1", dict(top_k_index=lambda t: t[:, 0]), ValueError, "top_k_index"),
    ("w-rank1", dict(top_k_weights=lambda t: t[:, 0]), ValueError, "top_k_weights"),
    ("w1-rank2", dict(gate_up_proj=lambda t: t[0]), ValueError, "gate_up_proj"),
    ("w2-rank2", dict(down_proj=lambda t: t[0]), ValueError, "down_proj"),
    ("idx-T", dict(top_k_index=lambda t: t[:-1]), ValueError, "top_k_index"),
    ("w-shape", dict(top_k_weights=lambda t: t[:, :1]), ValueError, "top_k_weights"),
    ("E-mismatch", dict(down_proj=lambda t: t[:-1]), ValueError, "down_proj"),
    ("H-mismatch-w1", dict(gate_up_proj=lambda t: t[:, :, :-1]), ValueError, "gate_up_proj"),
    ("H-mismatch-w2", dict(down_proj=lambda t: t[:, :-1, :]), ValueError, "down_proj"),
    ("I-mismatch", dict(down_proj=lambda t: t[:, :, :-1]), ValueError, "down_proj"),
    ("2I-odd", dict(gate_up_proj=lambda t: t[:, :-1, :]), ValueError, "gate_up_proj"),
    ("int-activations", dict(hidden_states=lambda t: t.long()), TypeError, "hidden_states"),
    ("int-w1", dict(gate_up_proj=lambda t: t.int()), TypeError, "gate_up_proj"),
    ("bool-activations", dict(hidden_states=lambda t: t > 0), TypeError, "hidden_states"),
    ("float-indices", dict(top_k_index=lambda t: t.float()), TypeError, "top_k_index"),
    ("int16-indices", dict(top_k_index=lambda t: t.short()), TypeError, "top_k_index"),
    ("w-int", dict(top_k_weights=lambda t: t.long()), TypeError, "top_k_weights"),
    ("w1-other-dtype", dict(gate_up_proj=lambda t: t.double()), TypeError, "gate_up_proj"),
    ("w2-other-dtype", dict(down_proj=lambda t: t.bfloat16()), TypeError, "down_proj"),
    ("w-f16-with-f32", dict(top_k_weights=lambda t: t.half()), TypeError, "top_k_weights"),
    ("idx-is-E", dict(top_k_index=lambda t: t.fill_(E)), IndexError, "top_k_index"),
    ("idx-is-minus1", dict(top_k_index=lambda t: t.index_fill(0, torch.tensor([T - 1], device=t.device), -1)), IndexError, "top_k_index"),
    ("idx-huge-int32", dict(top_k_index=lambda t: t.int().fill_(2**31 - 1)), IndexError, "top_k_index"),
    ("not-a-tensor", dict(top_k_weights=lambda t: t.tolist()), TypeError, "top_k_weights"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", EXPERTS_CASES, ids=[c[0] for c in EXPERTS_CASES])
def test_experts_bad_input(device, case):
    _, changes, exc, name = case
    args = _with(device, **changes)
    for t in args.values():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t.requires_grad_(True)
    with pytest.raises(exc, match=name):
        _call(args)


def _args_ok(args):
    """ops._experts_args_ok's answer, checked against its C++ twin's where that is built."""
    from moe_fused import ops

    values = [args[n] for n in ("hidden_states", "top_k_index", "top_k_weights", "gate_up_proj", "down_proj")]
    ok = ops._experts_args_ok(*values)
    fast = _lib.torch_ops() if _lib.is_available() else None
    if fast is not None:
        assert fast.experts_args_ok(*values) == ok
    return ok


@pytest.mark.parametrize("case", [c for c in EXPERTS_CASES if c[2] is not IndexError], ids=lambda c: c[0])
def test_experts_fast_check_rejects_what_the_checks_reject(case):
    """moe_experts runs the one-expression check (_experts_args_ok) and the detailed, naming
    checks only when it fails: it must fail on every input they reject (the index range is
    the C library's / the CUDA check's, not theirs)."""
    _, changes, _, _ = case
    assert not _args_ok(_with("cpu", **changes))


@pytest.mark.parametrize("name", ["hidden_states", "top_k_index", "top_k_weights", "gate_up_proj", "down_proj"])
def test_experts_fast_check_rejects_another_device(name):
    args = _good("cpu")
    args[name] = args[name].to("meta")
    assert not _args_ok(args)


@pytest.mark.parametrize(
    "changes",
    [{}, dict(top_k_index=lambda t: t.int()), dict(top_k_weights=lambda t: t.float())],
    ids=["f32", "int32-index", "f32-weights"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_experts_fast_check_accepts_good_input(changes, dtype):
    args = _good("cpu", dtype)
    for n, fn in changes.items():
        args[n] = fn(args[n])
    assert _args_ok(args)


def test_packed_plan_describes_its_three_views():
    """The packed plan's one descriptor pack equals the descriptors of its three views, and a
    buffer of the wrong size or dtype is refused, naming the plan."""
    n, e = 7, 3
    buf = torch.arange(_lib.packed_plan_numel(e, n), dtype=torch.int32)
    off, srt, rows = _lib.packed_plan_views(buf, e, n)
    assert off.numel() == e + 1 and srt.numel() == rows.numel() == n
    assert bytes(_lib.packed_plan(buf, e, n)) == bytes(_lib.plan(off, srt, rows))
    for bad in (buf[:-1], buf.long(), torch.zeros(2, buf.numel() // 2 + 1, dtype=torch.int32)[:, 0]):
        with pytest.raises(ValueError, match="plan"):
            _lib.packed_plan(bad, e, n)


def test_pack_call_matches_the_descriptor_objects():
    """One call's buffer (pack_call) holds byte for byte the context, plan and tensor
    descriptors that the ctypes objects hold, at the addresses it returns, NULL (None) for a
    None tensor; a tensor no descriptor can describe is refused, naming it."""
    import ctypes

    n, e = 5, 2
    plan_buf = torch.arange(_lib.packed_plan_numel(e, n), dtype=torch.int32)
    a = torch.randn(3, 4)
    b = torch.randn(2, 3, 4).transpose(1, 2)  # strided: its strides travel as they are
    c = torch.zeros(6, dtype=torch.int64)
    ctx_values, ws = _lib.context_values(torch.device("cpu"), 100, 4)
    names = tuple(_lib.name_address(x) for x in ("a", "none", "b", "c"))
    buf, (pc, pp, pa, pn, pb, pcc) = _lib.pack_call(
        ctx_values, _lib.packed_plan_values(plan_buf, e, n), (a, None, b, c), names
    )
    assert pn is None

    def at(address, obj):
        return ctypes.string_at(address, ctypes.sizeof(obj)), bytes(obj)

    ctx = _lib.MoeContext()
    _lib._CONTEXT_LAYOUT.pack_into(ctx, 0, *ctx_values)
    assert ctx_values[3] % _lib.WORKSPACE_ALIGN == 0 and ctx_values[4] == 100 and ws.numel() >= 100
    for address, obj in ((pc, ctx), (pp, _lib.packed_plan(plan_buf, e, n)), (pa, _lib.tensor(a, "a")),
                         (pb, _lib.tensor(b, "b")), (pcc, _lib.tensor(c, "c"))):
        got, want = at(address, obj)
        assert got == want
    # without a plan: the tensors follow the context
    buf2, (pc2, pa2) = _lib.pack_call(ctx_values, None, (a,), names[:1])
    assert pa2 - pc2 == ctypes.sizeof(_lib.MoeContext)
    assert at(pa2, _lib.tensor(a, "a"))[0] == bytes(_lib.tensor(a, "a"))
    with pytest.raises(TypeError, match="weird.*bool"):
        _lib.pack_call(ctx_values, None, (a.bool(),), (_lib.name_address("weird"),))
    with pytest.raises(ValueError, match="five.*rank 5"):
        _lib.pack_call(ctx_values, None, (torch.zeros(1, 1, 1, 1, 1),), (_lib.name_address("five"),))


@pytest.mark.parametrize("name", ["top_k_index", "top_k_weights", "gate_up_proj", "down_proj"])
def test_experts_wrong_device(name):
    """A tensor on another device: ValueError naming it (meta stands in for a GPU)."""
    other = "cuda" if torch.cuda.is_available() else "meta"
    args = _good("cpu")
    args[name] = args[name].to(other)
    with pytest.raises(ValueError, match=name):
        _call(args)


def test_experts_wrong_device_hidden_states():
    other = "cuda" if torch.cuda.is_available() else "meta"
    args = _good("cpu")
    args["hidden_states"] = args["hidden_states"].to(other)
    with pytest.raises(ValueError, match="top_k_index"):  # the first one that disagrees with it
        _call(args)


def test_experts_unsupported_device():
    args = {n: t.to("meta") for n, t in _good("cpu").items()}
    out = _call(args)  # meta tensors: shape inference only (the fake implementation)
    assert out.shape == (T, H) and out.device.type == "meta"


LINEAR_CASES = [
    ("input-rank3", dict(input=lambda t: t.unsqueeze(0)), ValueError, "input"),
    ("weight-rank2", dict(weight=lambda t: t[0]), ValueError, "weight"),
    ("sel-rank2", dict(selected_experts=lambda t: t.unsqueeze(1)), ValueError, "selected_experts"),
    ("in-mismatch", dict(weight=lambda t: t[:, :, :-1]), ValueError, "weight"),
    ("N-mismatch", dict(selected_experts=lambda t: t[:-1]), ValueError, "selected_experts"),
    ("int-input", dict(input=lambda t: t.int()), TypeError, "input"),
    ("weight-dtype", dict(weight=lambda t: t.half()), TypeError, "weight"),
    ("float-sel", dict(selected_experts=lambda t: t.float()), TypeError, "selected_experts"),
    ("sel-is-E", dict(selected_experts=lambda t: t.fill_(E)), IndexError, "selected_experts"),
    ("sel-minus1", dict(selected_experts=lambda t: t.fill_(-1)), IndexError, "selected_experts"),
]


def _linear_good(device):
    g = torch.Generator().manual_seed(1)
    return dict(
        input=torch.randn(5, 6, generator=g).to(device),
        weight=torch.randn(E, 7, 6, generator=g).to(device),
        selected_experts=torch.randint(0, E, (5,), generator=g).to(device),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=[c[0] for c in LINEAR_CASES])
def test_linear_bad_input(device, case):
    _, changes, exc, name = case
    args = _linear_good(device)
    for n, fn in changes.items():
        args[n] = fn(args[n])
    with pytest.raises(exc, match=name):
        moe_fused.moe_fused_linear(args["input"], args["weight"], args["selected_experts"])


def test_linear_wrong_device():
    other = "cuda" if torch.cuda.is_available() else "meta"
    args = _linear_good("cpu")
    args["weight"] = args["weight"].to(other)
    with pytest.raises(ValueError, match="weight"):
        moe_fused.moe_fused_linear(args["input"], args["weight"], args["selected_experts"])


# ---- the C ABI itself (bypassing the Python checks): names, status mapping, nothing written ----


def _abi_experts_forward(args, out, h, offsets, sorted_pairs, pair_rows, names=None):
    names = names or {}
    t = lambda n: ctypes.byref(_lib.tensor(args[n], names.get(n, n)))  # noqa: E731
    dev = args["hidden_states"].device
    # workspace for the good shapes (T, K, H, I, E), doubled: the bad ones are never larger
    nbytes = 2 * max(
        _lib.experts_workspace_size(dev, T, K, H, I, E),
        _lib.routing_plan_workspace_size(dev, T * K, E),
    )
    ctx = _lib.context(dev, nbytes)
    plan = _lib.plan(offsets, sorted_pairs, pair_rows)
    status = _lib.lib().moe_experts_forward(
        ctx.ref(), t("hidden_states"), t("top_k_index"), t("top_k_weights"), t("gate_up_proj"), t("down_proj"),
        ctypes.byref(plan), ctypes.byref(_lib.tensor(h, "h")), ctypes.byref(_lib.tensor(out, "out")),
    )
    _lib.check(status, "moe_experts_forward")


def _abi_buffers(args, sentinel=12345.0):
    T_, H_ = args["hidden_states"].shape
    k = args["top_k_index"].shape[1]
    E_, two_i = args["gate_up_proj"].shape[:2]
    dev = args["hidden_states"].device
    return dict(
        out=torch.full((T_, H_), sentinel, device=dev),
        h=torch.full((T_ * k, two_i), sentinel, device=dev),
        offsets=torch.full((E_ + 1,), -7, dtype=torch.int32, device=dev),
        sorted_pairs=torch.full((T_ * k,), -7, dtype=torch.int32, device=dev),
        pair_rows=torch.full((T_ * k,), -7, dtype=torch.int32, device=dev),
    )


ABI_CASES = [
    ("idx-is-E", dict(top_k_index=lambda t: t.index_fill(0, torch.tensor([T - 1]), E)), IndexError, "top_k_index"),
    ("idx-minus1", dict(top_k_index=lambda t: t.index_fill(0, torch.tensor([0]), -1)), IndexError, "top_k_index"),
    ("idx-int32-is-E", dict(top_k_index=lambda t: t.int().index_fill(0, torch.tensor([2]), E)), IndexError, "top_k_index"),
    ("2I-odd", dict(gate_up_proj=lambda t: t[:, :-1, :].contiguous()), ValueError, "gate_up_proj"),
    ("E-mismatch", dict(down_proj=lambda t: t[:-1].contiguous()), ValueError, "down_proj"),
    ("H-mismatch", dict(gate_up_proj=lambda t: t[:, :, :-1].contiguous()), ValueError, "gate_up_proj"),
    ("float-idx", dict(top_k_index=lambda t: t.float()), TypeError, "top_k_index"),
    ("dtype-mismatch", dict(down_proj=lambda t: t.double()), TypeError, "down_proj"),
    ("x-rank3", dict(hidden_states=lambda t: t.unsqueeze(0)), ValueError, "hidden_states"),
]


@pytest.mark.parametrize("case", ABI_CASES, ids=[c[0] for c in ABI_CASES])
def test_abi_refuses_and_writes_nothing(case):
    _, changes, exc, name = case
    args = _good("cpu")
    bufs = _abi_buffers(args)
    for n, fn in changes.items():
        args[n] = fn(args[n])
    before = {n: b.clone() for n, b in bufs.items()}
    # a caller-chosen name must appear in the message instead of the parameter's own
    names = {name: f"my_{name}"}
    with pytest.raises(exc, match=f"my_{name}"):
        _abi_experts_forward(args, names=names, **bufs)
    for n, b in bufs.items():
        assert torch.equal(b, before[n]), f"{n} was written although the call failed"


def test_abi_null_data_pointer_is_value_error():
    args = _good("cpu")
    bufs = _abi_buffers(args)
    desc = _lib.tensor(args["gate_up_proj"], "gate_up_proj")
    desc.data = None
    t = lambda n: ctypes.byref(_lib.tensor(args[n], n))  # noqa: E731
    ctx = _lib.context(torch.device("cpu"), _lib.experts_workspace_size(torch.device("cpu"), T, K, H, I, E) + _lib.routing_plan_workspace_size(torch.device("cpu"), T * K, E))
    plan = _lib.plan(bufs["offsets"], bufs["sorted_pairs"], bufs["pair_rows"])
    status = _lib.lib().moe_experts_forward(
        ctx.ref(), t("hidden_states"), t("top_k_index"), t("top_k_weights"), ctypes.byref(desc), t("down_proj"),
        ctypes.byref(plan), ctypes.byref(_lib.tensor(bufs["h"], "h")), ctypes.byref(_lib.tensor(bufs["out"], "out")),
    )
    assert status != 0
    with pytest.raises(ValueError, match="gate_up_proj"):
        _lib.check(status, "moe_experts_forward")
    assert torch.equal(bufs["out"], torch.full_like(bufs["out"], 12345.0))


def test_abi_workspace_too_small_is_value_error():
    args = _good("cpu")
    bufs = _abi_buffers(args)
    need = max(_lib.experts_workspace_size(torch.device("cpu"), T, K, H, I, E), _lib.routing_plan_workspace_size(torch.device("cpu"), T * K, E))
    if need == 0:
        pytest.skip("the CPU path needs no workspace at this size")
    t = lambda n: ctypes.byref(_lib.tensor(args[n], n))  # noqa: E731
    ctx = _lib.context(torch.device("cpu"), 0)
    plan = _lib.plan(bufs["offsets"], bufs["sorted_pairs"], bufs["pair_rows"])
    status = _lib.lib().moe_experts_forward(
        ctx.ref(), t("hidden_states"), t("top_k_index"), t("top_k_weights"), t("gate_up_proj"), t("down_proj"),
        ctypes.byref(plan), ctypes.byref(_lib.tensor(bufs["h"], "h")), ctypes.byref(_lib.tensor(bufs["out"], "out")),
    )
    with pytest.raises(ValueError):
        _lib.check(status, "moe_experts_forward")
    assert torch.equal(bufs["out"], torch.full_like(bufs["out"], 12345.0))


def test_abi_good_call_succeeds_and_matches_op():
    """The harness above is right: the same call with good arguments works."""
    args = _good("cpu")
    bufs = _abi_buffers(args)
    _abi_experts_forward(args, **bufs)
    assert torch.allclose(bufs["out"], _call(args), rtol=0, atol=0)
    assert _lib.last_error() is not None


def test_abi_version_and_status_mapping():
    assert _lib.lib().moe_abi_version() == _lib.ABI_VERSION == 3
    for status, exc in [(1, ValueError), (2, TypeError), (3, IndexError), (4, ValueError), (5, ValueError),
                        (6, ValueError), (7, ValueError), (8, RuntimeError), (9, RuntimeError), (10, RuntimeError)]:
        with pytest.raises(exc):
            _lib.check(status, "test")
    _lib.check(0, "test")


def test_cuda_tensors_without_cuda_build_are_a_clear_error():
    if not torch.cuda.is_available() or _lib.has_cuda():
        pytest.skip("needs a GPU and a CPU-only library")
    args = _good("cuda")
    with pytest.raises(RuntimeError):
        _call(args)


def test_missing_library_is_reported_at_first_use_not_import():
    code = (
        "import moe_fused, torch\n"
        "assert not moe_fused.is_available()\n"
        "try:\n"
        "    moe_fused.moe_fused_linear(torch.randn(2, 3), torch.randn(1, 4, 3), torch.zeros(2, dtype=torch.long))\n"
        "except moe_fused.LibraryLoadError as e:\n"
        "    assert '/nonexistent/libmoe_fused.so' in str(e), str(e)\n"
        "    print('OK')\n"
    )
    env = dict(os.environ, MOE_FUSED_LIBRARY="/nonexistent/libmoe_fused.so")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(moe_fused.__file__)), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr


def test_abi_backward_refuses_and_writes_nothing():
    """moe_experts_backward with a wrong grad_out shape or a corrupt plan: an error naming
    the argument, and no gradient buffer touched."""
    args = _good("cpu")
    bufs = _abi_buffers(args)
    _abi_experts_forward(args, **bufs)
    dev = torch.device("cpu")
    grads = dict(
        grad_hidden_states=torch.full((T, H), 7.0),
        grad_top_k_weights=torch.full((T, K), 7.0),
        grad_gate_up_proj=torch.full((E, 2 * I, H), 7.0),
        grad_down_proj=torch.full((E, H, I), 7.0),
    )
    d = lambda t, n: ctypes.byref(_lib.tensor(t, n))  # noqa: E731
    ctx = _lib.context(dev, _lib.experts_workspace_size(dev, T, K, H, I, E))

    def call(grad_out, offsets):
        plan = _lib.plan(offsets, bufs["sorted_pairs"], bufs["pair_rows"])
        status = _lib.lib().moe_experts_backward(
            ctx.ref(), d(grad_out, "grad_out"), d(args["hidden_states"], "hidden_states"),
            d(args["top_k_weights"], "top_k_weights"), d(args["gate_up_proj"], "gate_up_proj"),
            d(args["down_proj"], "down_proj"), ctypes.byref(plan), d(bufs["h"], "h"),
            *(d(g, n) for n, g in grads.items()),
        )
        _lib.check(status, "moe_experts_backward")

    with pytest.raises(ValueError, match="grad_out"):
        call(torch.ones(T, H + 1), bufs["offsets"])
    bad_offsets = bufs["offsets"].clone()
    bad_offsets[-1] += 5  # the plan no longer covers T*k rows
    with pytest.raises((ValueError, IndexError), match="expert_offsets"):
        call(torch.ones(T, H), bad_offsets)
    for n, g in grads.items():
        assert torch.all(g == 7.0), f"{n} was written although the call failed"
    call(torch.ones(T, H), bufs["offsets"])  # and the good call works
    assert not torch.all(grads["grad_down_proj"] == 7.0)


def test_abi_linear_refuses_and_writes_nothing():
    args = _linear_good("cpu")
    args["selected_experts"][3] = E
    out = torch.full((5, 7), 3.0)
    dev = torch.device("cpu")
    ctx = _lib.context(dev, _lib.linear_workspace_size(dev, 5, E, 6, 7))
    d = lambda n: ctypes.byref(_lib.tensor(args[n], n))  # noqa: E731
    status = _lib.lib().moe_linear_forward(ctx.ref(), d("input"), d("weight"), d("selected_experts"),
                                           ctypes.byref(_lib.tensor(out, "out")))
    with pytest.raises(IndexError, match="selected_experts"):
        _lib.check(status, "moe_linear_forward")
    assert torch.all(out == 3.0)


def test_cuda_index_check_toggle():
    from moe_fused import ops

    prev = ops.set_cuda_index_check(False)
    try:
        assert ops.set_cuda_index_check(False) is False
        # the CPU core checks regardless
        args = _with("cpu", top_k_index=lambda t: t.fill_(E))
        with pytest.raises(IndexError, match="top_k_index"):
            _call(args)
        if torch.cuda.is_available():
            assert _call(_good("cuda")).shape == (T, H)  # runs without the host-side check
    finally:
        ops.set_cuda_index_check(prev)
    assert ops.set_cuda_index_check(prev) == prev


def test_one_token_window_setting_and_block():
    from moe_fused import ops

    with pytest.raises(TypeError, match="enabled"):
        ops.set_one_token_window("yes")
    prev = ops.set_one_token_window(None)
    try:
        with pytest.raises(RuntimeError), ops.one_token_window(True):
            assert ops.set_one_token_window(True) is True
            raise RuntimeError("a failing block")
        assert ops.set_one_token_window(None) is None  # restored after the exception
        assert ops._window_flag(torch.zeros(4, 8), 2) == 0  # CPU tensors: no flag
    finally:
        ops.set_one_token_window(prev)


def test_one_token_window_env_value_is_checked():
    env = dict(os.environ, MOE_FUSED_ONE_WINDOW="yes")
    r = subprocess.run([sys.executable, "-c", "import moe_fused.ops"], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "MOE_FUSED_ONE_WINDOW must be 1, 0 or auto" in r.stderr
