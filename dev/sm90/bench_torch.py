# torch._grouped_mm on the same GEMM1 problem (materialized gathered x), cudaEvent medians.
import sys, torch
torch.manual_seed(0)
H, I, E, k = 2048, 768, 128, 8
dev = "cuda"
def med(fn, reps=20):
    for _ in range(3): fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    ts.sort(); return ts[len(ts) // 2]
W1 = torch.randn(E, 2 * I, H, device=dev, dtype=torch.bfloat16) * 0.05
for T in (4096, 16384):
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    idx = torch.rand(T, E, device=dev).topk(k, dim=1).indices.reshape(-1)
    order = torch.sort(idx, stable=True).indices
    tok = (order // k).to(torch.int64)
    counts = torch.bincount(idx, minlength=E)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    xg = x.index_select(0, tok)
    Wt = W1.transpose(-2, -1)
    out = torch._grouped_mm(xg, Wt, offs=offs)
    # spot check one expert
    e = 5; lo = int(offs[e - 1]); hi = int(offs[e])
    ref = xg[lo:hi].float() @ W1[e].float().t()
    err = ((out[lo:hi].float() - ref).norm() / ref.norm()).item()
    flop = 2.0 * T * k * 2 * I * H
    t1 = med(lambda: torch._grouped_mm(xg, Wt, offs=offs))
    t2 = med(lambda: torch._grouped_mm(x.index_select(0, tok), Wt, offs=offs))
    print(f"| torch._grouped_mm T={T} (rel err {err:.1e}) | materialized xg: {t1:.3f} ms {flop/t1/1e9:.0f} TF/s | "
          f"with index_select gather: {t2:.3f} ms {flop/t2/1e9:.0f} TF/s |", flush=True)
