"""Random experts-layer inputs for the device scripts (bf16 leaves with grads, softmax top-k
routing renormalised over the k slots), seeded: the same tensors in every script."""
import torch

SHAPES = {"30b-a3b": (2048, 768, 128, 8), "235b-a22b": (4096, 1536, 128, 8)}


def make(T, shape="30b-a3b", device="cuda"):
    """(x, idx, s, w1, w2, dout) for T tokens of `shape`."""
    H, I, E, k = SHAPES[shape]
    torch.manual_seed(0)
    x = torch.randn(T, H, device=device, dtype=torch.bfloat16, requires_grad=True)
    s, idx = torch.topk(torch.randn(T, E, device=device).softmax(-1), k)
    s = (s / s.sum(-1, keepdim=True)).bfloat16().requires_grad_()
    w1 = (torch.randn(E, 2 * I, H, device=device) * H**-0.5).bfloat16().requires_grad_()
    w2 = (torch.randn(E, H, I, device=device) * I**-0.5).bfloat16().requires_grad_()
    dout = torch.randn(T, H, device=device, dtype=torch.bfloat16)
    return x, idx, s, w1, w2, dout


def add_step_args(parser, T=16384):
    """--shape, -T and --device (cpu: to try a device script itself) of the host-time scripts."""
    parser.add_argument("--shape", default="30b-a3b", choices=sorted(SHAPES))
    parser.add_argument("-T", type=int, default=T)
    parser.add_argument("--device", default="cuda", help="cpu: to try the script itself")


def step_inputs(args):
    """(x, idx, s, w1, w2, dout), sync for args of add_step_args; moe_fused's CUDA index check
    off, as the benchmarks run."""
    import moe_fused.ops

    moe_fused.ops.set_cuda_index_check(False)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    return make(args.T, args.shape, args.device), sync
