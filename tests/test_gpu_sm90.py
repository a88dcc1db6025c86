"""GPU tests of the sm90a (Hopper wgmma + TMA) kernels: the row-grouped GEMMs (GEMM1 + SwiGLU,
GEMM2, dA' + dSwiGLU, dX, moe_fused_linear forward and dX) and the weight-gradient GEMMs (dW1,
dW2, linear dW).

Both paths on the same inputs: the portable mma.sync kernels (env MOE_FUSED_PORTABLE=1) and the
sm90a kernels (env MOE_FUSED_SM90=1, no MOE_FUSED_PORTABLE): the routing plan identical, h within
one rounding step of each other and of the float64 reference, the output and every gradient
as close to float64 as the portable path's; ragged segments, empty experts, T=1, odd T, shapes
where only some GEMMs fit the sm90a kernels (the rest fall back); CUDA-graph capture of forward
and backward; determinism; layouts the kernels do not take fall back to the portable ones.
Skipped unless the device is compute capability 9.0. Which kernels ran is read from the profiler.

Timing (not a test): python tests/test_gpu_sm90.py bench   (30B-A3B, T=4096 and 16384)
"""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch

if __name__ != "__main__":
    from test_gpu_ops import TOL, capture_no_grad, make_experts, ops_step, ref_experts, ref_linear, rel, run_experts

import moe_fused  # noqa: F401
from moe_fused import _lib, moe_experts, moe_fused_linear

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.usefixtures("token_windows_by_rule"),
    pytest.mark.skipif(
        not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)),
        reason="needs a compute capability 9.0 GPU (H100/H200)",
    ),
]

SM90_KERNEL = "row_gemm_sm90"  # every sm90a row-grouped GEMM (GEMM1 among them)
SM90_WGRAD = "wgrad_sm90"
PORTABLE_KERNELS = ("grouped_gemm_kernel", "wgrad_kernel")
GEMM1_SM90 = "row_gemm_sm90<__nv_bfloat16, 1,"  # template arguments: dtype, epilogue, B N-major
GEMM1_PORTABLE = "grouped_gemm_kernel<__nv_bfloat16, 1,"


@contextlib.contextmanager
def path(which):
    """which: 'sm90' or 'portable' (set through the environment, read per call)."""
    old = {k: os.environ.get(k) for k in ("MOE_FUSED_PORTABLE", "MOE_FUSED_SM90")}
    os.environ.pop("MOE_FUSED_PORTABLE", None)
    os.environ.pop("MOE_FUSED_SM90", None)
    if which == "portable":
        os.environ["MOE_FUSED_PORTABLE"] = "1"
    else:
        os.environ["MOE_FUSED_SM90"] = "1"
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def fwd_raw(d, w1=None):
    """torch.ops.moe_fused.experts_forward as (out, h, offsets, sorted_pairs, pair_rows)."""
    w1 = d["w1"].cuda() if w1 is None else w1
    with torch.no_grad():
        out, h, plan = torch.ops.moe_fused.experts_forward(d["x"].cuda(), d["idx"].cuda(), d["s"].cuda(), w1, d["w2"].cuda())
    torch.cuda.synchronize()
    return (out, h) + _lib.packed_plan_views(plan, w1.shape[0], d["idx"].numel())


def kernels_of(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def h_reference(d, offsets, sorted_pairs):
    """h in plan order, float64: h[r] = x[sorted[r] // k] @ w1[e(r)]^T."""
    x = d["x"].cuda().double()
    w1 = d["w1"].cuda().double()
    k = d["idx"].shape[1]
    off = offsets.tolist()
    h = torch.zeros(sorted_pairs.numel(), w1.shape[1], dtype=torch.float64, device=x.device)
    for e in range(w1.shape[0]):
        lo, hi = off[e], off[e + 1]
        if hi > lo:
            tok = sorted_pairs[lo:hi].long() // k
            h[lo:hi] = x[tok] @ w1[e].T
    return h


def check_close_to_rounding(h90, hp, h64, dtype):
    """Each element of the two paths within two rounding steps of the other (accumulation order
    differs: wgmma vs mma.sync), and both as close to float64 as a rounded result is."""
    eps = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    a, b = h90.double(), hp.double()
    scale = h64.abs().max().clamp_min(1e-30)
    tol = 2 * eps * torch.maximum(a.abs(), b.abs()) + 1e-5 * scale
    bad = ((a - b).abs() > tol).sum().item()
    assert bad == 0, f"{bad} elements differ by more than two rounding steps"
    e90, ep = rel(h90, h64), rel(hp, h64)
    assert e90 < 2 * eps and e90 <= 1.25 * ep + 1e-6, (e90, ep)
    return (h90 == hp).double().mean().item(), e90, ep


# T, k, H, I, E, route (H % 64 == 0 and I % 128 == 0: the sm90a kernel's layouts)
CASES = [
    (64, 4, 256, 128, 8, "random"),
    (1, 2, 256, 128, 4, "random"),  # T = 1
    (300, 8, 320, 128, 16, "skewed"),  # ragged + many empty experts
    (37, 3, 128, 256, 7, "random"),  # odd T, 2 column tiles
    (129, 2, 512, 256, 3, "random"),  # tiles crossing expert boundaries
    (1000, 8, 1024, 384, 32, "random"),  # many tiles per expert, 3 column tiles
]
IDS = ["T{}k{}H{}I{}E{}{}".format(*c) for c in CASES]


def test_sm90_kernel_selected():
    d = make_experts(64, 4, 256, 128, 8, torch.bfloat16, seed=1)
    with path("sm90"):
        names = kernels_of(lambda: fwd_raw(d))
    assert any(SM90_KERNEL in n for n in names), names
    with path("portable"):
        names = kernels_of(lambda: fwd_raw(d))
    assert not any(SM90_KERNEL in n for n in names), names
    # I = 80: neither GEMM1's N (I % 128) nor GEMM2's K (a multiple of the K-block, 32 or 64)
    # is a layout of the sm90a kernels -> portable, still correct.
    d = make_experts(50, 4, 256, 80, 8, torch.bfloat16, seed=2)
    with path("sm90"):
        names = kernels_of(lambda: fwd_raw(d))
    assert not any(SM90_KERNEL in n for n in names), names


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_sm90_vs_portable_vs_float64(case, dtype):
    T, k, H, I, E, route = case
    d = make_experts(T, k, H, I, E, dtype, seed=T + E + 7, route=route)
    with path("sm90"):
        o90, h90, off90, s90, r90 = fwd_raw(d)
    with path("portable"):
        op, hp, offp, sp, rp = fwd_raw(d)
    assert torch.equal(off90, offp) and torch.equal(s90, sp) and torch.equal(r90, rp)
    h64 = h_reference(d, offp, sp)
    same, e90, ep = check_close_to_rounding(h90, hp, h64, dtype)
    ref = ref_experts(d["x"], d["idx"], d["s"], d["w1"], d["w2"], d["dout"])
    eo90, eop = rel(o90, ref[0]), rel(op, ref[0])
    print(case, dtype, f"h bit-equal {same:.4f}, h rel err sm90 {e90:.2e} portable {ep:.2e}, out sm90 {eo90:.2e} portable {eop:.2e}")
    assert eo90 < TOL[dtype] and eo90 <= 1.5 * eop + 1e-4


@pytest.mark.parametrize("case", [CASES[2], CASES[5]], ids=[IDS[2], IDS[5]])
def test_gradients_through_sm90_h(case):
    T, k, H, I, E, route = case
    d = make_experts(T, k, H, I, E, torch.bfloat16, seed=3 + T, route=route)
    ref = ref_experts(d["x"], d["idx"], d["s"], d["w1"], d["w2"], d["dout"])
    with path("sm90"):
        got = run_experts(d, "cuda")
    for n, g, r in zip(["out", "dx", "ds", "dw1", "dw2"], got, ref):
        assert rel(g, r) < TOL[torch.bfloat16], n


def test_weight_layouts():
    T, k, H, I, E = 200, 4, 256, 128, 8
    d = make_experts(T, k, H, I, E, torch.bfloat16, seed=41)
    with path("portable"):
        op, hp, offp, sp, _ = fwd_raw(d)
    h64 = h_reference(d, offp, sp)
    w1 = d["w1"].cuda()
    # padded rows (ldb = H + 64, experts still back to back): the sm90a kernel takes it
    big = torch.zeros(E, 2 * I, H + 64, dtype=w1.dtype, device="cuda")
    big[:, :, :H] = w1
    with path("sm90"):
        names = kernels_of(lambda: fwd_raw(d, big[:, :, :H]))
        o, h, *_ = fwd_raw(d, big[:, :, :H])
    assert any(SM90_KERNEL in n for n in names)
    check_close_to_rounding(h, hp, h64, torch.bfloat16)
    # gaps between experts: not one 2-D TMA tensor -> portable GEMM1, bit-identical to it
    # (GEMM2 still runs on the sm90a kernel: its weight is contiguous)
    big2 = torch.zeros(E, 2 * I + 128, H, dtype=w1.dtype, device="cuda")
    big2[:, : 2 * I] = w1
    with path("sm90"):
        names = kernels_of(lambda: fwd_raw(d, big2[:, : 2 * I]))
        o2, h2, *_ = fwd_raw(d, big2[:, : 2 * I])
    assert not any(GEMM1_SM90 in n for n in names), names
    assert any(GEMM1_PORTABLE in n for n in names), names
    assert torch.equal(h2, hp) and torch.equal(o2, op)


def test_empty_and_degenerate():
    # every token on one expert (E - 1 empty), and T = 0
    T, k, H, I, E = 77, 1, 256, 128, 6
    d = make_experts(T, k, H, I, E, torch.bfloat16, seed=5)
    d["idx"] = torch.full((T, k), 4, dtype=torch.int64)
    with path("sm90"):
        o90, h90, *_ = fwd_raw(d)
    with path("portable"):
        op, hp, off, sp, _ = fwd_raw(d)
    check_close_to_rounding(h90, hp, h_reference(d, off, sp), torch.bfloat16)
    d0 = make_experts(0, 2, 256, 128, 4, torch.bfloat16, seed=6)
    with path("sm90"):
        o0, h0, *_ = fwd_raw(d0)
    assert o0.shape == (0, 256) and h0.shape == (0, 256)


# The no-grad forward (h NULL): GEMM1's a-only epilogue (EPI_SWIGLU_A = 3), out bit-identical
# to the forward that stores h on each path. K = H <= 2048 takes the TMA stores for full 64-row
# blocks (thread stores for a tile's partial ones); H = 4096 the thread stores only.
NO_H_CASES = CASES + [
    (64, 4, 4096, 128, 8, "random"),  # K > 2048: thread-store epilogue
    (300, 8, 2304, 256, 16, "skewed"),  # K > 2048, ragged, empty experts, 2 column tiles
]
GEMM1_A_SM90 = "row_gemm_sm90<{}, 3,"
GEMM1_A_PORTABLE = "grouped_gemm_kernel<{}, 3,"


def fwd_no_h(d, w1=None):
    """moe_experts under no_grad: the eager path's forward without h."""
    w1 = d["w1"].cuda() if w1 is None else w1
    with torch.no_grad():
        out = moe_experts(d["x"].cuda(), d["idx"].cuda(), d["s"].cuda(), w1, d["w2"].cuda())
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", NO_H_CASES, ids=["T{}k{}H{}I{}E{}{}".format(*c) for c in NO_H_CASES])
def test_no_grad_forward_bit_identical_sm90_and_portable(case, dtype):
    T, k, H, I, E, route = case
    d = make_experts(T, k, H, I, E, dtype, seed=T + E + 11, route=route)
    tname = "__nv_bfloat16" if dtype == torch.bfloat16 else "__half"
    outs = {}
    for which, gemm1_a, gemm1_h in (
        ("sm90", GEMM1_A_SM90, "row_gemm_sm90<{}, 1,"),
        ("portable", GEMM1_A_PORTABLE, "grouped_gemm_kernel<{}, 1,"),
    ):
        with path(which):
            with_h = fwd_raw(d)[0]
            outs[which] = fwd_no_h(d)
            names = kernels_of(lambda: fwd_no_h(d))
        assert torch.equal(outs[which], with_h), which
        assert any(gemm1_a.format(tname) in n for n in names), (which, names)
        assert not any(gemm1_h.format(tname) in n for n in names), (which, names)
    ref = ref_experts(d["x"], d["idx"], d["s"], d["w1"], d["w2"], d["dout"])[0]
    e90, ep = rel(outs["sm90"], ref), rel(outs["portable"], ref)
    assert e90 < TOL[dtype] and e90 <= 1.5 * ep + 1e-4, (e90, ep)


def test_no_grad_forward_falls_back_to_portable():
    """Layouts the sm90a kernel does not take (I % 128 != 0; gaps between experts in B) run
    the portable a-only epilogue, bit-identical to the portable forward with h."""
    d = make_experts(50, 4, 256, 80, 8, torch.bfloat16, seed=2)
    with path("sm90"):
        names = kernels_of(lambda: fwd_no_h(d))
        out, ref = fwd_no_h(d), fwd_raw(d)[0]
    assert any(GEMM1_A_PORTABLE.format("__nv_bfloat16") in n for n in names), names
    assert torch.equal(out, ref)
    T, k, H, I, E = 200, 4, 256, 128, 8
    d = make_experts(T, k, H, I, E, torch.bfloat16, seed=41)
    big = torch.zeros(E, 2 * I + 128, H, dtype=torch.bfloat16, device="cuda")
    big[:, : 2 * I] = d["w1"].cuda()
    with path("sm90"):
        names = kernels_of(lambda: fwd_no_h(d, big[:, : 2 * I]))
        out = fwd_no_h(d, big[:, : 2 * I])
    with path("portable"):
        ref = fwd_raw(d)[0]
    assert any(GEMM1_A_PORTABLE.format("__nv_bfloat16") in n for n in names), names
    assert torch.equal(out, ref)


def test_no_grad_forward_degenerate_sm90():
    d0 = make_experts(0, 2, 256, 128, 4, torch.bfloat16, seed=6)
    with path("sm90"):
        assert fwd_no_h(d0).shape == (0, 256)
    d = make_experts(77, 1, 256, 128, 6, torch.bfloat16, seed=5)
    d["idx"] = torch.full((77, 1), 4, dtype=torch.int64)  # one expert, 5 empty
    with path("sm90"):
        assert torch.equal(fwd_no_h(d), fwd_raw(d)[0])


def test_determinism_sm90():
    d = make_experts(700, 8, 512, 256, 32, torch.bfloat16, seed=21)
    with path("sm90"):
        a = fwd_raw(d)
        b = fwd_raw(d)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_cuda_graph_capture_sm90():
    T, k, H, I, E = 256, 4, 256, 128, 16
    d = make_experts(T, k, H, I, E, torch.bfloat16, seed=31)
    x, s, w1, w2, idx = (d[n].cuda() for n in ("x", "s", "w1", "w2", "idx"))
    with path("sm90"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):
                moe_experts(x, idx, s, w1, w2)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            out_g = moe_experts(x, idx, s, w1, w2)
        d2 = make_experts(T, k, H, I, E, torch.bfloat16, seed=32)
        x.copy_(d2["x"])
        idx.copy_(d2["idx"])
        graph.replay()
        torch.cuda.synchronize()
        with torch.no_grad():
            eager = moe_experts(x, idx, s, w1, w2)
        names = kernels_of(lambda: moe_experts(x, idx, s, w1, w2).sum().item())
    assert torch.equal(out_g, eager)
    assert any(SM90_KERNEL in n for n in names), names
    ref = ref_experts(x, idx, s, w1, w2, torch.zeros_like(x))
    assert rel(out_g, ref[0]) < 2e-2


# ---- backward and moe_fused_linear -------------------------------------------------------------

# T, k, H, I, E, route: H % 256 == 0 and I % 256 == 0 put every GEMM on an sm90a kernel.
BWD_CASES = CASES + [
    (64, 4, 256, 256, 8, "random"),
    (1, 2, 256, 256, 4, "random"),  # T = 1
    (300, 8, 512, 256, 16, "skewed"),  # ragged + many empty experts
    (37, 3, 256, 512, 7, "random"),  # odd T, 2 column tiles of a
    (1000, 8, 1024, 512, 32, "random"),  # many tiles and k-blocks per expert
    (3000, 2, 256, 256, 2, "random"),  # long segments: ~3000 rows per expert
    (3000, 2, 512, 256, 2, "random"),  # GEMM2 and dX in 2 token windows
    # I = 768 (Qwen3-30B-A3B's): 3 column tiles of dW2, 6 of dW1
    (37, 3, 256, 768, 7, "random"),  # odd T
    (1000, 8, 1024, 768, 32, "random"),  # many items a CTA
]
BWD_IDS = ["T{}k{}H{}I{}E{}{}".format(*c) for c in BWD_CASES]
GRADS = ["out", "dx", "ds", "dw1", "dw2"]


def test_sm90_backward_kernels_selected():
    d = make_experts(200, 4, 512, 256, 8, torch.bfloat16, seed=3)
    with path("sm90"):
        names = kernels_of(lambda: run_experts(d, "cuda"))
    assert sum(SM90_KERNEL in n for n in names) == 4, names  # GEMM1, GEMM2, dA', dX
    assert sum(SM90_WGRAD in n for n in names) == 2, names  # dW2, dW1
    assert not any(any(p in n for p in PORTABLE_KERNELS) for n in names), names
    with path("portable"):
        names = kernels_of(lambda: run_experts(d, "cuda"))
    assert not any(SM90_KERNEL in n or SM90_WGRAD in n for n in names), names


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", BWD_CASES, ids=BWD_IDS)
def test_fwd_bwd_sm90_vs_portable_vs_float64(case, dtype):
    T, k, H, I, E, route = case
    d = make_experts(T, k, H, I, E, dtype, seed=T + 3 * E + 1, route=route)
    ref = ref_experts(d["x"], d["idx"], d["s"], d["w1"], d["w2"], d["dout"])
    with path("sm90"):
        g90 = run_experts(d, "cuda")
    with path("portable"):
        gp = run_experts(d, "cuda")
    errs = []
    for n, a, b, r in zip(GRADS, g90, gp, ref):
        e90, ep = rel(a, r), rel(b, r)
        errs.append(f"{n} {e90:.2e}/{ep:.2e}")
        assert torch.isfinite(a).all(), n
        assert e90 < TOL[dtype] and e90 <= 1.5 * ep + 1e-4, (n, e90, ep)
    print(case, dtype, "rel err sm90/portable:", ", ".join(errs))


@pytest.mark.parametrize(
    "case",
    [(300, 8, 512, 256, 16, "skewed"), (3000, 2, 256, 256, 2, "random"), (1000, 8, 1024, 768, 32, "random")],
    ids=lambda c: "T{}k{}H{}I{}E{}{}".format(*c),
)
def test_wgrad_bk32_sm90(case, monkeypatch):
    """MOE_FUSED_WGRAD_BK=32 (the weight-gradient GEMMs' 32-row, 8-stage pipeline, kept for
    comparison) runs the BK 32 kernels and gives the default's gradients: ragged and empty
    experts, long segments, 3 and 6 column tiles."""
    T, k, H, I, E, route = case
    d = make_experts(T, k, H, I, E, torch.bfloat16, seed=T + E, route=route)
    ref = ref_experts(d["x"], d["idx"], d["s"], d["w1"], d["w2"], d["dout"])
    with path("sm90"):
        g64 = run_experts(d, "cuda")
        monkeypatch.setenv("MOE_FUSED_WGRAD_BK", "32")
        g32 = run_experts(d, "cuda")
        names = kernels_of(lambda: run_experts(d, "cuda"))
    wgrad = [n for n in names if SM90_WGRAD in n]
    # the BK template argument (followed by the multicast flag, or last)
    assert len(wgrad) == 2 and all(", 32," in n or ", 32>" in n for n in wgrad), wgrad
    for n, a, b, r in zip(GRADS, g32, g64, ref):
        assert torch.isfinite(a).all(), n
        assert rel(a, r) < TOL[torch.bfloat16] and rel(a, r) <= 1.5 * rel(b, r) + 1e-4, (n, rel(a, r), rel(b, r))


LIN_CASES = [
    # N, E, in, out: in % 64 == 0 and out % 256 == 0 (forward), in % 256 == 0 and out % 64 == 0 (dX)
    (300, 8, 256, 512),
    (1, 4, 256, 256),
    (777, 16, 512, 256),
    (129, 3, 768, 1024),
    (200, 8, 64, 256),  # forward only on sm90a (in % 256 != 0: dX and dW portable)
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", LIN_CASES, ids=lambda c: "N{}E{}in{}out{}".format(*c))
def test_linear_sm90_vs_portable_vs_float64(case, dtype):
    N, E, fi, fo = case
    g = torch.Generator().manual_seed(N + fi + fo)
    x = torch.randn(N, fi, generator=g).to(dtype)
    w = (torch.randn(E, fo, fi, generator=g) * fi**-0.5).to(dtype)
    sel = torch.randint(0, max(1, E // 2), (N,), generator=g)  # leaves experts empty
    dy = torch.randn(N, fo, generator=g).to(dtype)
    res = {}
    for which in ("sm90", "portable"):
        with path(which):
            xd, wd = x.cuda().requires_grad_(), w.cuda().requires_grad_()
            y = moe_fused_linear(xd, wd, sel.cuda())
            y.backward(dy.cuda())
            res[which] = (y.detach(), xd.grad, wd.grad)
    ref = ref_linear(x, w, sel, dy)
    for n, a, b, r in zip(["y", "dx", "dw"], res["sm90"], res["portable"], ref):
        e90, ep = rel(a, r), rel(b, r)
        assert e90 < TOL[dtype] and e90 <= 1.5 * ep + 1e-4, (n, e90, ep)
    with path("sm90"):
        xd, wd = x.cuda().requires_grad_(), w.cuda().requires_grad_()
        names = kernels_of(lambda: moe_fused_linear(xd, wd, sel.cuda()).backward(dy.cuda()))
    # forward (and dX where in % 256 == 0) on sm90a; dW stays portable: both of its operands
    # are gathered, and the sm90a wgrad needs one of them in plan order (TMA).
    assert sum(SM90_KERNEL in n for n in names) == (2 if fi % 256 == 0 else 1), names


def test_determinism_sm90_backward():
    d = make_experts(700, 8, 512, 256, 32, torch.bfloat16, seed=22)
    with path("sm90"):
        a = run_experts(d, "cuda")
        b = run_experts(d, "cuda")
    for n, x, y in zip(GRADS, a, b):
        assert torch.equal(x, y), n


def test_cuda_graph_capture_sm90_backward():
    T, k, H, I, E = 256, 4, 512, 256, 16
    d = make_experts(T, k, H, I, E, torch.bfloat16, seed=33)
    x, s, w1, w2, idx, dout = (d[n].cuda() for n in ("x", "s", "w1", "w2", "idx", "dout"))

    def step():
        return ops_step(x, idx, s, w1, w2, dout)

    with path("sm90"):
        graph, got = capture_no_grad(step)
        d2 = make_experts(T, k, H, I, E, torch.bfloat16, seed=34)
        for t, n in ((x, "x"), (idx, "idx"), (dout, "dout")):
            t.copy_(d2[n])
        graph.replay()
        torch.cuda.synchronize()
        with torch.no_grad():
            eager = step()
    for n, a, b in zip(GRADS, got, eager):
        assert torch.equal(a, b), n
    ref = ref_experts(x, idx, s, w1, w2, dout)
    for n, a, r in zip(GRADS, got, ref):
        assert rel(a, r) < TOL[torch.bfloat16], n


# ---- timing: python tests/test_gpu_sm90.py bench -----------------------------------------------


def _med(fn, n=10):
    from moe_fused.bench import median_ms

    return median_ms(fn, torch.device("cuda"), 3, n)


def bench(Ts=(4096, 16384)):
    H, I, E, k = 2048, 768, 128, 8  # Qwen3-30B-A3B experts
    print(torch.cuda.get_device_name(), "30B-A3B bf16 experts forward (median of 10, CUDA events)")
    for T in Ts:
        torch.manual_seed(0)
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        logits = torch.randn(T, E, device="cuda")
        s, idx = torch.topk(logits.softmax(-1), k)
        s = (s / s.sum(-1, keepdim=True)).bfloat16()
        w1 = (torch.randn(E, 2 * I, H, device="cuda") * H**-0.5).bfloat16()
        w2 = (torch.randn(E, H, I, device="cuda") * I**-0.5).bfloat16()
        xg, sg, w1g, w2g = (t.clone().requires_grad_() for t in (x, s, w1, w2))
        dout = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)

        def fwd():
            with torch.no_grad():
                return moe_experts(x, idx, s, w1, w2)

        def fb():
            for t in (xg, sg, w1g, w2g):
                t.grad = None
            moe_experts(xg, idx, sg, w1g, w2g).backward(dout)

        res, kern = {}, {}
        for which in ("portable", "sm90", "portable", "sm90"):  # interleaved, last pair kept
            with path(which):
                res[which] = (_med(fwd), _med(fb))
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    fb()
                    torch.cuda.synchronize()
                kern[which] = sorted(
                    ((getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)) / 1e3, e.count, e.key)
                    for e in prof.key_averages()
                    if (getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)) > 0
                )[::-1]
        for which, (t_f, t_fb) in res.items():
            fl = 18 * T * k * H * I / 1e9
            print(f"T={T} {which:9s} forward {t_f:.3f} ms  fwd+bwd {t_fb:.3f} ms ({fl / t_fb:.0f} effective TF/s)")
            for ms, cnt, key in kern[which][:10]:
                print(f"    {ms:7.3f} ms  x{cnt}  {key[:110]}")
        with path("sm90"):
            o90 = fwd()
        with path("portable"):
            op = fwd()
        print(f"T={T} out rel diff sm90 vs portable {((o90.double() - op.double()).norm() / op.double().norm()).item():.2e}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "bench":
        bench()
