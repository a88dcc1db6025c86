"""A small case for compute-sanitizer (memcheck / racecheck): every CUDA kernel of
moe-fused once, aligned (16-byte) and odd (scalar) paths, ragged and empty experts; on an
sm90 device the third experts shape and the third linear shape run the sm90a kernels (the
first two fall back to the portable ones). The last two shapes (an expert gets > 1024 rows)
run GEMM2 and dX in two token windows, on the portable and the sm90a kernels, and then again
in one window (MOE_FLAG_ONE_WINDOW, the default on a GPU with the memory). Every backward
writes dh over h (the eager default). Each shape also runs a no-grad forward (GEMM1 stores a
alone: EPI_SWIGLU_A)."""
import torch

import moe_fused  # noqa: F401
from moe_fused import moe_experts, moe_fused_linear, ops

torch.manual_seed(0)
# The fourth: sm90a weight-gradient CTAs with several items each (128 items of dW1 for 66
# clusters), more than two k-blocks an expert and empty experts between them: the path where
# an item's second epilogue pass is written during the next item's mainloop.
SHAPES = [(70, 4, 128, 64, 8), (9, 2, 50, 27, 5), (70, 4, 256, 256, 8), (600, 4, 1024, 256, 16)]
WINDOWED = [(1030, 2, 128, 64, 2), (1030, 2, 512, 256, 2)]  # 2 token windows, unless one is asked for
CASES = [(c, False) for c in SHAPES + WINDOWED] + [(c, True) for c in WINDOWED]
for (T, k, H, I, E), one_window in CASES:
    ops.set_one_token_window(one_window)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    idx = torch.randint(0, E // 2 + 1, (T, k), device="cuda")
    s = torch.rand(T, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w1 = (torch.randn(E, 2 * I, H, device="cuda") * 0.05).bfloat16().requires_grad_()
    w2 = (torch.randn(E, H, I, device="cuda") * 0.05).bfloat16().requires_grad_()
    out = moe_experts(x, idx, s, w1, w2)
    out.backward(torch.randn_like(out))
    with torch.no_grad():
        moe_experts(x, idx, s, w1, w2)
for (N, E, fi, fo) in [(33, 5, 64, 16), (7, 3, 17, 13), (33, 5, 256, 256)]:
    x = torch.randn(N, fi, device="cuda", dtype=torch.float16, requires_grad=True)
    w = torch.randn(E, fo, fi, device="cuda", dtype=torch.float16, requires_grad=True)
    sel = torch.randint(0, E, (N,), device="cuda")
    y = moe_fused_linear(x, w, sel)
    y.backward(torch.randn_like(y))
torch.cuda.synchronize()
print("sanitize case done")
