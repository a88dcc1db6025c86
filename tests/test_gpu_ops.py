"""GPU tests of the CUDA backend (marked `gpu`; skipped without CUDA).

Every op and gradient on CUDA against (a) a float64 torch reference, (b) the CPU core
(the same moe_fused ops on CPU tensors), and (c) Hugging Face v5 eager experts on the
Qwen3-30B-A3B shape; ragged / empty-expert / T=1 / odd sizes; the routing plan bit-exact
against the CPU plan; CUDA-graph capture and replay; determinism (bit-identical reruns).
"""

from __future__ import annotations

import re

import pytest
import torch

import moe_fused  # noqa: F401
from moe_fused import _lib, moe_experts, moe_fused_linear

# token_windows_by_rule: the windowed path where these shapes take windows (test_one_token_window_*
# check the one-window path against it).
pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("token_windows_by_rule")]

DEV = "cuda"


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


def make_experts(T, k, H, I, E, dtype, seed=0, route="random", sw_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    w1 = torch.randn(E, 2 * I, H, generator=g) * H**-0.5
    w2 = torch.randn(E, H, I, generator=g) * I**-0.5
    if route == "random":
        idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.empty(0, k, dtype=torch.int64)
    elif route == "skewed":  # most tokens on a few experts, many experts empty
        idx = torch.stack([torch.randperm(min(E, max(k, 3)), generator=g)[:k] for _ in range(T)])
    else:
        raise ValueError(route)
    s = torch.rand(T, k, generator=g) + 0.1
    s = s / s.sum(-1, keepdim=True)
    dout = torch.randn(T, H, generator=g)
    sw_dtype = sw_dtype or dtype
    return dict(x=x.to(dtype), idx=idx, s=s.to(sw_dtype), w1=w1.to(dtype), w2=w2.to(dtype), dout=dout.to(dtype))


def ref_experts(x, idx, s, w1, w2, dout):
    """float64 reference (per-expert loop, on the GPU): out and (dx, ds, dw1, dw2) by autograd."""
    dev = DEV if torch.cuda.is_available() else "cpu"
    x, s, w1, w2 = (t.detach().to(dev, torch.float64).requires_grad_() for t in (x, s, w1, w2))
    idx = idx.to(dev).long()
    I = w1.shape[1] // 2
    out = torch.zeros_like(x)
    for e in torch.unique(idx).tolist():
        tok, slot = torch.nonzero(idx == e, as_tuple=True)
        h = x[tok] @ w1[e].T
        a = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
        y = a @ w2[e].T
        out = out.index_add(0, tok, s[tok, slot].unsqueeze(1) * y)
    out.backward(dout.to(dev, torch.float64))
    z = lambda g, t: g if g is not None else torch.zeros_like(t)  # noqa: E731
    return out.detach(), z(x.grad, x), z(s.grad, s), z(w1.grad, w1), z(w2.grad, w2)


def run_experts(d, device, need=(True, True, True, True)):
    x = d["x"].to(device).requires_grad_(need[0])
    s = d["s"].to(device).requires_grad_(need[1])
    w1 = d["w1"].to(device).requires_grad_(need[2])
    w2 = d["w2"].to(device).requires_grad_(need[3])
    out = moe_experts(x, d["idx"].to(device), s, w1, w2)
    out.backward(d["dout"].to(device))
    return out.detach(), x.grad, s.grad, w1.grad, w2.grad


def ops_step(x, idx, s, w1, w2, dout):
    """Forward + backward through the registered ops (no autograd): out, dx, ds, dw1, dw2."""
    ops = torch.ops.moe_fused
    out, h, plan = ops.experts_forward(x, idx, s, w1, w2)
    return (out,) + tuple(ops.experts_backward(dout, x, s, w1, w2, plan, h, True, True, True, True))


def experts_step(x, idx, s, w1, w2, dout):
    """Forward + backward through moe_experts (autograd): out, dx, ds, dw1, dw2."""
    out = moe_experts(x, idx, s, w1, w2)
    return (out.detach(),) + torch.autograd.grad(out, (x, s, w1, w2), dout)


def capture_no_grad(fn):
    """fn() captured in a CUDA graph after two warm-up calls on a side stream, all without
    autograd: (graph, what the captured call returned)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = fn()
    return graph, out


CASES = [
    # T, k, H, I, E, route
    (64, 4, 128, 64, 8, "random"),
    (1, 2, 256, 128, 4, "random"),  # T = 1
    (300, 8, 192, 96, 16, "skewed"),  # ragged + many empty experts
    (37, 3, 136, 40, 7, "random"),  # odd-ish sizes (multiples of 8)
    (129, 2, 512, 256, 3, "random"),  # tiles crossing expert boundaries
    # token windows (GEMM2 and dX a window of tokens at a time: ceil(H / I) of them while an
    # expert gets >= 256 rows a window)
    (2048, 4, 256, 64, 4, "random"),  # 4 windows of 512 tokens
    (4099, 2, 128, 64, 8, "skewed"),  # 2 windows (2050 + 2049 tokens), 5 experts empty
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}k{}H{}I{}E{}{}".format(*c))
def test_experts_vs_float64(case, dtype):
    T, k, H, I, E, route = case
    d = make_experts(T, k, H, I, E, dtype, seed=T + E, route=route)
    got = run_experts(d, DEV)
    ref = ref_experts(d["x"], d["idx"], d["s"], d["w1"], d["w2"], d["dout"])
    names = ["out", "dx", "ds", "dw1", "dw2"]
    errs = {n: rel(g, r) for n, g, r in zip(names, got, ref)}
    print(case, dtype, errs)
    for n in names:
        assert errs[n] < TOL[dtype], (n, errs)


@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: "T{}k{}H{}I{}E{}{}".format(*c))
def test_experts_vs_cpu_core(case):
    T, k, H, I, E, route = case
    dtype = torch.bfloat16
    d = make_experts(T, k, H, I, E, dtype, seed=1 + T, route=route)
    got = run_experts(d, DEV)
    cpu = run_experts(d, "cpu")
    for n, g, c in zip(["out", "dx", "ds", "dw1", "dw2"], got, cpu):
        assert rel(g, c) < TOL[dtype], n


def test_experts_odd_sizes_scalar_path():
    # H, I not multiples of 8: the guarded scalar loaders / stores.
    d = make_experts(23, 3, 50, 27, 5, torch.bfloat16, seed=5)
    got = run_experts(d, DEV)
    ref = ref_experts(d["x"], d["idx"], d["s"], d["w1"], d["w2"], d["dout"])
    for n, g, r in zip(["out", "dx", "ds", "dw1", "dw2"], got, ref):
        assert rel(g, r) < 2e-2, n


def test_experts_float32_routing_weights_and_int32_index():
    d = make_experts(50, 4, 128, 64, 8, torch.bfloat16, seed=9, sw_dtype=torch.float32)
    d["idx"] = d["idx"].to(torch.int32)
    got = run_experts(d, DEV)
    ref = ref_experts(d["x"], d["idx"].long(), d["s"], d["w1"], d["w2"], d["dout"])
    for n, g, r in zip(["out", "dx", "ds", "dw1", "dw2"], got, ref):
        assert rel(g, r) < 2e-2, n


def test_experts_partial_grads():
    d = make_experts(40, 2, 128, 64, 6, torch.bfloat16, seed=11)
    full = run_experts(d, DEV)
    for need in [(True, False, False, False), (False, True, False, False), (False, False, True, False), (False, False, False, True)]:
        got = run_experts(d, DEV, need)
        for i, n in enumerate(need):
            if n:
                assert torch.equal(got[i + 1], full[i + 1])


def _kernel_names(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize(
    "T,H,I,E,windows",
    [(2048, 256, 64, 2, 4), (2048, 128, 64, 2, 2), (4099, 128, 64, 8, 2), (1000, 128, 64, 8, 1), (4096, 128, 128, 2, 1)],
)
def test_token_windows_taken(T, H, I, E, windows):
    """GEMM2 and dX run in ceil(H / I) token windows (at most 4, and only while an expert gets
    >= 256 rows a window): one combine per window in the forward and one in the backward."""
    d = make_experts(T, 2, H, I, E, torch.bfloat16, seed=5)
    names = _kernel_names(lambda: run_experts(d, DEV))
    assert sum("combine_kernel" in n for n in names) == 2 * windows, names
    # the forward's full tile list comes with the plan (plan_scan); the backward's, and each
    # window's, from tiles_kernel
    assert sum("plan_scan" in n for n in names) == 1, names
    assert sum("tiles_kernel" in n for n in names) == (1 + 2 * windows if windows > 1 else 1)


@pytest.mark.parametrize("T,H,I,E,windows", [(2048, 256, 64, 2, 4), (4099, 128, 64, 8, 2)])
def test_one_token_window_is_bit_identical(T, H, I, E, windows):
    """set_one_token_window(True): one combine in the forward and one in the backward, the
    same bits as the windowed run (fp32 sums in slot order either way)."""
    from moe_fused import ops

    d = make_experts(T, 2, H, I, E, torch.bfloat16, seed=7)
    windowed = run_experts(d, DEV)
    ops.set_one_token_window(True)  # the fixture restores it
    names = _kernel_names(lambda: run_experts(d, DEV))
    assert sum("combine_kernel" in n for n in names) == 2, names
    one = run_experts(d, DEV)
    lora = run_experts(d, DEV, need=(True, True, False, False))  # dX windows without dW1 scratch
    ops.set_one_token_window(False)
    lora_windowed = run_experts(d, DEV, need=(True, True, False, False))
    for a, b in zip(one, windowed):
        assert torch.equal(a, b)
    for a, b in zip(lora[:3], lora_windowed[:3]):
        assert torch.equal(a, b)


def test_one_token_window_auto_rule(monkeypatch):
    """Auto: one window while T*k*H elements fit in 1/50 of the GPU's memory."""
    from moe_fused import _lib, ops

    ops.set_one_token_window(None)
    x = torch.empty(16384, 2048, dtype=torch.bfloat16, device=DEV)  # 30B-A3B: 512 MiB of rows at k=8
    rows = x.numel() * 8 * 2
    monkeypatch.setattr(ops, "_device_memory", lambda index: 50 * rows)
    assert ops._window_flag(x, 8) == _lib.MOE_FLAG_ONE_WINDOW
    monkeypatch.setattr(ops, "_device_memory", lambda index: 50 * rows - 50)
    assert ops._window_flag(x, 8) == 0
    assert ops._window_flag(x.cpu(), 8) == 0
    ops.set_one_token_window(True)
    assert ops._window_flag(x, 8) == _lib.MOE_FLAG_ONE_WINDOW
    with pytest.raises(TypeError, match="enabled"):
        ops.set_one_token_window("yes")


def _backward_peak(d, overwrite, need=(True, True, True, True)):
    from moe_fused import ops

    previous = ops.set_backward_overwrite_h(overwrite)
    try:
        leaves = [d[n].cuda().requires_grad_(r) for n, r in zip(("x", "s", "w1", "w2"), need)]
        out = moe_experts(leaves[0], d["idx"].cuda(), *leaves[1:])
        dout = d["dout"].cuda()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out.backward(dout)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, [t.grad for t in leaves]
    finally:
        ops.set_backward_overwrite_h(previous)


def test_backward_overwriting_h_saves_its_buffer():
    """dh written over the saved h: the backward's peak drops by one [T*k, 2I] buffer, and
    the gradients are bit-identical to those of the backward that keeps h."""
    T, k, H, I, E = 4096, 4, 256, 512, 8  # one token window (H <= I)
    d = make_experts(T, k, H, I, E, torch.bfloat16, seed=9)
    n = T * k
    dh_bytes, sa_bytes, win_bytes = n * 2 * I * 2, n * I * 2, n * H * 2
    slack = 2**21  # the caching allocator rounds large blocks to 2 MiB
    for need in [(True, True, True, True), (True, True, False, False)]:
        kept, g_kept = _backward_peak(d, False, need)
        over, g_over = _backward_peak(d, True, need)
        assert kept - over >= dh_bytes - slack, (need, kept, over, dh_bytes)
        for a, b in zip(g_kept, g_over):
            assert (a is None and b is None) or torch.equal(a, b)
    # Without dW2 (frozen experts, e.g. LoRA) no s*a buffer: only the dx window remains.
    full, _ = _backward_peak(d, True)
    lean, _ = _backward_peak(d, True, (True, True, False, False))
    weight_grads = 3 * E * H * I * 2
    assert full - lean >= weight_grads + sa_bytes - win_bytes - slack, (full, lean)


def test_weight_grad_buffer_holds_the_backward_scratch():
    """A dense grad_gate_up_proj holds s*a and dX's per-pair rows until dW1 writes it: the
    backward needs no buffer of its own for them, and every gradient is bit-identical to the
    run whose scratch is the workspace (dW1 not asked for)."""
    T, k, H, I, E = 1024, 4, 256, 512, 8  # s*a [4096, 512] and dx rows [4096, 256] fit in [8, 1024, 256]
    d = make_experts(T, k, H, I, E, torch.bfloat16, seed=13)
    full, g_full = _backward_peak(d, True)
    lean, g_lean = _backward_peak(d, True, (True, True, False, True))
    n = T * k
    w1_grad = E * 2 * I * H * 2
    # Without the scratch the workspace holds s*a (n I) or the rows (n H), whichever is larger.
    assert full - w1_grad <= lean - n * max(I, H) * 2 + 2**21, (full, lean)
    for i in (0, 1, 3):
        assert torch.equal(g_full[i], g_lean[i]), i


def test_backward_workspace_queries():
    from moe_fused import _lib

    dev = torch.device("cuda")
    T, k, H, I, E = 4096, 8, 2048, 768, 128
    bf16, everything = torch.bfloat16, 0xF
    kept = _lib.experts_backward_workspace_size(dev, bf16, T, k, H, I, E, everything, 0)
    over = _lib.experts_backward_workspace_size(dev, bf16, T, k, H, I, E, everything, _lib.MOE_FLAG_OVERWRITE_H)
    assert kept - over >= T * k * 2 * I * 2
    no_dw2 = everything & ~_lib.MOE_GRAD_DOWN_PROJ
    assert _lib.experts_backward_workspace_size(dev, bf16, T, k, H, I, E, no_dw2, 0) <= kept
    # s*a [T*k, I] shares its buffer with the dx window: it decides the size when I is wide
    small = (4096, 4, 256, 512, 8)
    assert _lib.experts_backward_workspace_size(dev, bf16, *small, no_dw2, 0) < \
        _lib.experts_backward_workspace_size(dev, bf16, *small, everything, 0)
    # float32 (the SIMT path) has its own, larger scratch; the dtype-free query covers both
    f32 = _lib.experts_backward_workspace_size(dev, torch.float32, T, k, H, I, E, everything, 0)
    fwd = _lib.experts_forward_workspace_size(dev, bf16, T, k, H, I, E)
    one = _lib.experts_forward_workspace_size(dev, bf16, T, k, H, I, E, _lib.MOE_FLAG_ONE_WINDOW)
    assert max(kept, f32, fwd, one) <= _lib.experts_workspace_size(dev, T, k, H, I, E)


@pytest.mark.parametrize("T,k,E", [(1000, 8, 64), (777, 4, 300), (5, 2, 1), (3000, 2, 1030)])
def test_plan_matches_cpu_exactly(T, k, E):
    """The CUDA plan (histogram, plan_scan: column scans, then its last block's offsets and
    tile list, scatter) equals the CPU plan, with more experts than plan_scan's 256 threads
    (its offsets and tiles loops run more than once) and with one; the forward, which walks
    that tile list, agrees with the CPU's."""
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, E, (T, k), generator=g)
    idx[:, 0] = E // 2  # a hot expert
    x = torch.randn(T, 16, dtype=torch.bfloat16, generator=g)
    s = torch.full((T, k), 1.0 / k, dtype=torch.bfloat16)
    w1 = torch.randn(E, 16, 16, dtype=torch.bfloat16, generator=g)
    w2 = torch.randn(E, 16, 8, dtype=torch.bfloat16, generator=g)
    cpu = torch.ops.moe_fused.experts_forward(x, idx, s, w1, w2)
    gpu = torch.ops.moe_fused.experts_forward(x.cuda(), idx.cuda(), s.cuda(), w1.cuda(), w2.cuda())
    views = lambda plan: _lib.packed_plan_views(plan, E, T * k)  # noqa: E731
    for c, gg in zip(views(cpu[2]), views(gpu[2].cpu())):
        assert torch.equal(c, gg)
    ref = cpu[0].float()
    assert (gpu[0].cpu().float() - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_determinism_bit_identical():
    d = make_experts(700, 8, 256, 128, 32, torch.bfloat16, seed=21)
    a = run_experts(d, DEV)
    b = run_experts(d, DEV)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("one_window", [False, None], ids=["windows-by-rule", "auto"])
def test_cuda_graph_capture_and_replay(one_window):
    from moe_fused import ops

    ops.set_one_token_window(one_window)  # the fixture restores it
    T, k, H, I, E = 256, 4, 256, 128, 16
    d = make_experts(T, k, H, I, E, torch.bfloat16, seed=31)
    x = d["x"].cuda().requires_grad_()
    s = d["s"].cuda().requires_grad_()
    w1 = d["w1"].cuda().requires_grad_()
    w2 = d["w2"].cuda().requires_grad_()
    idx = d["idx"].cuda()
    dout = d["dout"].cuda()

    def step():
        for t in (x, s, w1, w2):
            t.grad = None
        out = moe_experts(x, idx, s, w1, w2)
        out.backward(dout)
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    for t in (x, s, w1, w2):
        t.grad = None
    ops._device_memory.cache_clear()  # auto: the GPU's memory is first asked for while capturing
    with torch.cuda.graph(graph):
        out_g = moe_experts(x, idx, s, w1, w2)
        out_g.backward(dout)
    # new inputs, same buffers
    d2 = make_experts(T, k, H, I, E, torch.bfloat16, seed=32)
    with torch.no_grad():
        x.copy_(d2["x"])
        idx.copy_(d2["idx"])
        dout.copy_(d2["dout"])
    graph.replay()
    torch.cuda.synchronize()
    ref = ref_experts(x, idx, s, w1, w2, dout)
    for n, g, r in zip(["out", "dx", "ds", "dw1", "dw2"], (out_g, x.grad, s.grad, w1.grad, w2.grad), ref):
        assert rel(g, r) < 2e-2, n


def test_float32_simt_path():
    # float32 runs on CUDA through the simple SIMT path (exact fp32, slow)
    d = make_experts(30, 3, 64, 40, 6, torch.float32, seed=41)
    got = run_experts(d, DEV)
    ref = ref_experts(d["x"], d["idx"], d["s"], d["w1"], d["w2"], d["dout"])
    for n, g, r in zip(["out", "dx", "ds", "dw1", "dw2"], got, ref):
        assert rel(g, r) < 1e-5, n
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(21, 17, generator=g), torch.randn(4, 9, 17, generator=g)
    sel, dy = torch.randint(0, 3, (21,), generator=g), torch.randn(21, 9, generator=g)
    xd, wd = x.cuda().requires_grad_(), w.cuda().requires_grad_()
    y = moe_fused_linear(xd, wd, sel.cuda())
    y.backward(dy.cuda())
    for gg, r in zip((y.detach(), xd.grad, wd.grad), ref_linear(x, w, sel, dy)):
        assert rel(gg, r) < 1e-5


def test_out_of_range_index_raises():
    d = make_experts(8, 2, 64, 32, 4, torch.bfloat16)
    idx = d["idx"].clone()
    idx[3, 1] = 4
    with pytest.raises(IndexError):
        moe_experts(d["x"].cuda(), idx.cuda(), d["s"].cuda(), d["w1"].cuda(), d["w2"].cuda())


# ---- the no-grad forward: h NULL, GEMM1 stores a alone ------------------------------------


def _kernel_names(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def _row_gemm_epilogues(names):
    """Epilogues (template argument 2) of the row-grouped GEMMs that ran, either path:
    1 GEMM1 storing h and a, 3 GEMM1 storing a alone, 0 GEMM2."""
    pat = re.compile(r"(?:grouped_gemm_kernel|row_gemm_sm90)<[^,<>]+, (\d+), (?:true|false)>")
    return {int(m.group(1)) for n in names for m in [pat.search(n)] if m}


@pytest.mark.parametrize("portable", [False, True], ids=["default-path", "portable"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}k{}H{}I{}E{}{}".format(*c))
def test_no_grad_forward_is_bit_identical(case, dtype, portable, monkeypatch):
    """moe_experts under no_grad (h NULL: the a-only GEMM1 epilogue, or h in the float32
    path's workspace) gives out bit-identical to the forward that stores h, on the default
    path (sm90a where it applies) and on the portable kernels (MOE_FUSED_PORTABLE=1)."""
    if portable:
        monkeypatch.setenv("MOE_FUSED_PORTABLE", "1")
    T, k, H, I, E, route = case
    d = make_experts(T, k, H, I, E, dtype, seed=T + 5 * E, route=route)
    x, idx, s, w1, w2 = (d[n].to(DEV) for n in ("x", "idx", "s", "w1", "w2"))
    with torch.no_grad():
        ref, h, *_ = torch.ops.moe_fused.experts_forward(x, idx, s, w1, w2)  # the op keeps h
        out = moe_experts(x, idx, s, w1, w2)
        names = _kernel_names(lambda: moe_experts(x, idx, s, w1, w2))
    assert h.shape == (T * k, 2 * I)
    assert torch.equal(out, ref)
    if dtype != torch.float32:  # the SIMT path has no epilogues
        assert _row_gemm_epilogues(names) == {3, 0}, names
        with_h = _kernel_names(lambda: torch.ops.moe_fused.experts_forward(x, idx, s, w1, w2))
        assert _row_gemm_epilogues(with_h) == {1, 0}, with_h


def _forward_peak(d, grad):
    leaves = [d[n].to(DEV).requires_grad_(grad) for n in ("x", "s", "w1", "w2")]
    idx = d["idx"].to(DEV)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = moe_experts(leaves[0], idx, *leaves[1:])
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, out.detach()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_no_grad_forward_peak_drops_by_h(dtype):
    """The forward that no backward follows neither allocates nor writes h [T*k, 2I]: its
    peak is h's size below the training forward's (the workspace is the same)."""
    T, k, H, I, E = 4096, 4, 256, 512, 8
    d = make_experts(T, k, H, I, E, dtype, seed=19)
    h_bytes = T * k * 2 * I * 2  # 32 MiB
    slack = 2**21  # the caching allocator rounds large blocks to 2 MiB
    train, out_train = _forward_peak(d, True)
    infer, out_infer = _forward_peak(d, False)
    assert h_bytes - slack <= train - infer <= h_bytes + slack, (train, infer, h_bytes)
    assert torch.equal(out_train, out_infer)


# ---- moe_fused_linear ---------------------------------------------------------------

LIN_CASES = [
    # N, E, in, out
    (200, 8, 256, 128),
    (1, 4, 64, 32),  # tiny N
    (3, 6, 2048, 16),  # thin out (LoRA B^T side)
    (77, 5, 16, 2048),  # thin in (LoRA A side)
    (50, 4, 24, 40),  # thin both, multiples of 8
    (33, 3, 17, 13),  # odd sizes: scalar path
    (500, 16, 64, 64),
]


def ref_linear(x, w, sel, dy):
    x, w = x.detach().double().cpu().requires_grad_(), w.detach().double().cpu().requires_grad_()
    y = torch.einsum("ni,noi->no", x, w[sel.cpu()])
    y.backward(dy.double().cpu())
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", LIN_CASES, ids=lambda c: "N{}E{}in{}out{}".format(*c))
def test_linear_vs_float64_and_cpu(case, dtype):
    N, E, fi, fo = case
    g = torch.Generator().manual_seed(N + fi)
    x = torch.randn(N, fi, generator=g).to(dtype)
    w = (torch.randn(E, fo, fi, generator=g) * fi**-0.5).to(dtype)
    sel = torch.randint(0, max(1, E // 2), (N,), generator=g)  # leaves experts empty
    dy = torch.randn(N, fo, generator=g).to(dtype)
    res = {}
    for dev in ("cuda", "cpu"):
        xd, wd = x.to(dev).requires_grad_(), w.to(dev).requires_grad_()
        y = moe_fused_linear(xd, wd, sel.to(dev))
        y.backward(dy.to(dev))
        res[dev] = (y.detach(), xd.grad, wd.grad)
    ref = ref_linear(x, w, sel, dy)
    for n, gg, c, r in zip(["y", "dx", "dw"], res["cuda"], res["cpu"], ref):
        assert rel(gg, r) < TOL[dtype], (n, rel(gg, r))
        assert rel(gg, c) < TOL[dtype], (n, rel(gg, c))


# ---- HF v5 eager on the Qwen3-30B-A3B shape -------------------------------------------


def test_vs_hf_eager_qwen3_30b_a3b_shape():
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    H, I, E, k, T = 2048, 768, 128, 8, 512
    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, intermediate_size=I, num_experts=E,
                         num_experts_per_tok=k, norm_topk_prob=True, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    block = Qwen3MoeSparseMoeBlock(cfg)
    with torch.no_grad():
        block.experts.gate_up_proj.normal_(0.0, H**-0.5)
        block.experts.down_proj.normal_(0.0, I**-0.5)
        block.gate.weight.normal_(0.0, H**-0.5)
    block = block.to(device=DEV, dtype=torch.bfloat16)
    experts = block.experts
    x = torch.randn(T, H, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        _, s, idx = block.gate(x)
    dout = torch.randn(T, H, device=DEV, dtype=torch.bfloat16)

    def run(fn):
        xx = x.clone().requires_grad_()
        ss = s.detach().clone().requires_grad_()
        for p in experts.parameters():
            p.grad = None
        out = fn(xx, ss)
        out.backward(dout)
        return out.detach(), xx.grad, ss.grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()

    hf = run(lambda xx, ss: experts(xx, idx, ss))
    ours = run(lambda xx, ss: moe_experts(xx, idx, ss, experts.gate_up_proj, experts.down_proj))
    ref = ref_experts(x, idx, s, experts.gate_up_proj, experts.down_proj, dout)
    for n, o, h, r in zip(["out", "dx", "ds", "dw1", "dw2"], ours, hf, ref):
        e_ours, e_hf, e_vs = rel(o, r), rel(h, r), rel(o, h)
        print(f"{n}: ours-vs-f64 {e_ours:.2e}  hf-vs-f64 {e_hf:.2e}  ours-vs-hf {e_vs:.2e}")
        assert e_vs < 2e-2, n
        assert e_ours < max(2 * e_hf, 1e-2), n
