"""GPU tests of the row GEMMs' tile-list order (csrc/cuda/tile_order.h, MOE_FUSED_TILE_LEAD).

In lead order each expert's first tile pair runs `lead` experts ahead of its other tiles. The
tiles are the same; only the order in which the persistent GEMMs walk them changes, and each
output row is still computed by one tile with the same arithmetic. What would break if the
list were wrong (a tile dropped, written twice, or given another expert's rows): outputs or
gradients that differ from expert order. So: every result bit-identical to lead 0, on
routing where experts have no tile, one, two, three or many (the lead run is an expert's
first two tiles), on both kernel paths, with one token window and with windows (whose
per-window lists stay in expert order while the backward's whole list takes the lead).
The slots themselves are checked on the CPU (csrc/tests/test_tile_order.cpp).
"""

from __future__ import annotations

import pytest
import torch

from reference import make_experts_inputs
from test_gpu_ops import experts_step

import moe_fused  # noqa: F401
from moe_fused.bench import env_set
from moe_fused.ops import one_token_window

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

LEAD_ENV = "MOE_FUSED_TILE_LEAD"


def ragged_inputs(T, k, H, I, E, seed):
    """Ragged routing (skew 2, the last two experts empty): with 128-row tiles some experts get
    none, some one, two or three, a few many."""
    d = make_experts_inputs(T, H, I, E, k, seed=seed, empty_experts=2, skew=2.0)
    bf = lambda t: t.to("cuda", torch.bfloat16).requires_grad_()  # noqa: E731
    return (bf(d["x"]), d["idx"].cuda(), bf(d["w"]), bf(d["w1"]), bf(d["w2"]),
            d["grad"].to("cuda", torch.bfloat16))


# H, I multiples of 256 (the sm90a kernels where the GPU has them); the first shape takes
# token windows by the size rule when they are not turned off.
SHAPES = [(1500, 4, 512, 256, 14), (333, 2, 256, 256, 10), (1, 2, 256, 256, 4)]


@pytest.mark.parametrize("portable", [False, True], ids=["default_path", "portable"])
@pytest.mark.parametrize("windows", [True, False], ids=["windows", "one_window"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}k{}H{}I{}E{}".format(*s))
def test_lead_order_bit_identical_to_expert_order(shape, windows, portable, monkeypatch):
    if portable:
        monkeypatch.setenv("MOE_FUSED_PORTABLE", "1")
    args = ragged_inputs(*shape, seed=shape[0] + shape[4])
    counts = torch.bincount(args[1].reshape(-1).cpu(), minlength=shape[4])
    tiles = (counts + 127) // 128
    if shape[0] > 1:  # the routing has what the test is about
        assert (tiles == 0).any() and (tiles == 1).any() and (tiles >= 3).any(), tiles.tolist()
    with one_token_window(not windows):
        with env_set(LEAD_ENV, "0"):
            want = experts_step(*args)
        for lead in ("1", "2", "5", "64"):
            with env_set(LEAD_ENV, lead):
                got = experts_step(*args)
            for name, a, b in zip(("out", "dx", "ds", "dw1", "dw2"), got, want):
                assert torch.equal(a, b), (lead, name)
