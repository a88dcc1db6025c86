"""GPU tests of programmatic dependent launch (PDL, csrc/cuda/pdl.h): on sm90 the library's
kernels are launched so that each may start during the previous one's last wave, and wait in
the kernel for its inputs.

What would break if the rule in pdl.h were broken (a kernel reading its inputs, or writing
over a buffer the previous kernel still reads, before its wait): results that differ from
the serialised launches (MOE_FUSED_PDL=0). So: many forward+backward steps queued back to
back with no host sync between them (the launches overlap as they would in training), every
result bit-identical to the serialised run; the same for moe_fused_linear, for token windows
and one window, and for a CUDA graph replayed several times. That PDL is really on is read
from the profiler: with it, some kernel of a step starts before the previous one has ended;
with MOE_FUSED_PDL=0, none does.
Skipped unless the device is compute capability 9.0 or later.
"""

from __future__ import annotations

import functools

import pytest
import torch

from test_gpu_ops import capture_no_grad, experts_step, make_experts, ops_step

import moe_fused  # noqa: F401
from moe_fused import moe_fused_linear
from moe_fused.bench import PDL_ENV, env_set
from moe_fused.ops import one_token_window

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9),
        reason="needs a compute capability 9.0+ GPU (PDL)",
    ),
]


def pdl(on):
    """PDL on or off inside (MOE_FUSED_PDL, read by the library at every call)."""
    return env_set(PDL_ENV, "1" if on else "0")


def experts_inputs(T, k, H, I, E, seed):
    d = make_experts(T, k, H, I, E, torch.bfloat16, seed=seed)
    x, s, w1, w2 = (d[n].cuda().requires_grad_() for n in ("x", "s", "w1", "w2"))
    return x, d["idx"].cuda(), s, w1, w2, d["dout"].cuda()


# H, I multiples of 256: every GEMM on the sm90a kernels. T*k >= 2 * 256 * E and H > I:
# the layer takes token windows by its size rule (several combines and tile lists a step).
SHAPES = [
    (3000, 8, 512, 256, 32),  # windows by rule
    (333, 4, 256, 256, 8),  # one window; T not a multiple of any tile
    (1, 2, 256, 256, 4),  # one token: most experts empty
]


@pytest.mark.parametrize("windows", [True, False], ids=["windows", "one_window"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}k{}H{}I{}E{}".format(*s))
def test_pdl_steps_back_to_back_bit_identical(shape, windows):
    args = experts_inputs(*shape, seed=shape[0])
    with one_token_window(not windows):
        with pdl(False):
            want = experts_step(*args)
        with pdl(True):
            got = [experts_step(*args) for _ in range(12)]  # queued, no sync in between
    torch.cuda.synchronize()
    for i, step in enumerate(got):
        for name, a, b in zip(("out", "dx", "ds", "dw1", "dw2"), step, want):
            assert torch.equal(a, b), (i, name)


def test_pdl_linear_back_to_back_bit_identical():
    N, E, fi, fo = 2500, 16, 512, 768
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, fi, generator=g).to(torch.bfloat16).cuda().requires_grad_()
    w = (torch.randn(E, fo, fi, generator=g) * fi**-0.5).to(torch.bfloat16).cuda().requires_grad_()
    sel = torch.randint(0, E, (N,), generator=g).cuda()
    dy = torch.randn(N, fo, generator=g).to(torch.bfloat16).cuda()

    def step():
        y = moe_fused_linear(x, w, sel)
        return (y.detach(),) + torch.autograd.grad(y, (x, w), dy)

    with pdl(False):
        want = step()
    with pdl(True):
        got = [step() for _ in range(12)]
    torch.cuda.synchronize()
    for i, r in enumerate(got):
        for name, a, b in zip(("y", "dx", "dw"), r, want):
            assert torch.equal(a, b), (i, name)


def test_pdl_graph_replays_bit_identical():
    T, k, H, I, E = 1024, 8, 512, 256, 16
    d = make_experts(T, k, H, I, E, torch.bfloat16, seed=41)
    step = functools.partial(ops_step, *(d[n].cuda() for n in ("x", "idx", "s", "w1", "w2", "dout")))
    with pdl(True):
        graph, got = capture_no_grad(step)
    with pdl(False), torch.no_grad():
        want = [t.clone() for t in step()]
    for _ in range(5):
        for t in got:
            t.zero_()
        graph.replay()
        torch.cuda.synchronize()
        for n, a, b in zip(("out", "dx", "ds", "dw1", "dw2"), got, want):
            assert torch.equal(a, b), n


def kernel_overlaps(fn):
    """(overlapping, total): consecutive CUDA kernels of one fn() in which the later starts
    before the earlier has ended, and the number of kernels."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm: nothing lazily set up inside the profiled step
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ks = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                 and "Memset" not in e.name and "Memcpy" not in e.name),
                key=lambda e: e.time_range.start)
    over = sum(b.time_range.start < a.time_range.end for a, b in zip(ks, ks[1:]))
    return over, len(ks)


def test_pdl_is_on_by_default_and_off_by_env():
    args = experts_inputs(3000, 8, 512, 256, 32, seed=5)
    with pdl(True):
        on, n_on = kernel_overlaps(lambda: experts_step(*args))
    with pdl(False):
        off, n_off = kernel_overlaps(lambda: experts_step(*args))
    assert n_on == n_off > 0
    assert off == 0, f"{off} of {n_off} kernels overlap with MOE_FUSED_PDL=0"
    assert on > 0, f"no kernel of {n_on} starts before the previous one ends with PDL on"
