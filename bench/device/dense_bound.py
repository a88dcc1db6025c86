"""The dense-GEMM bound of an experts layer: what cuBLAS takes for the layer's six GEMMs with
every expert's rows merged into one dense problem (same FLOPs, no grouping, no gather, no
epilogue), beside HF grouped_mm's measured time divided by a target ratio.

    python bench/device/dense_bound.py [--shapes 30b-a3b 235b-a22b] [-T 16384] [--hf-ms 30b-a3b=20.89 ...]

No grouped implementation of the layer does less work than these six dense GEMMs, so when
their sum exceeds HF's time / target, that target is out of reach of any kernel that runs at
cuBLAS's dense speed on this card. Each GEMM: torch.mm (bf16, fp32 accumulate), median of
--iters CUDA-event runs after warmup, the six in turn each round (the clock moves with heat;
the layer benchmark's round-robin timer).
"""
import argparse

import torch

from moe_fused.bench import SHAPES, _time_interleaved


def problems(H, I, n):
    """(name, [M, K], [K, N]) of the six GEMMs with all n = T*k rows in one problem."""
    return [("GEMM1", (n, H), (H, 2 * I)), ("GEMM2", (n, I), (I, H)), ("dA'", (n, H), (H, I)),
            ("dX", (n, 2 * I), (2 * I, H)), ("dW1", (2 * I, n), (n, H)), ("dW2", (H, n), (n, I))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["30b-a3b", "235b-a22b"])
    ap.add_argument("-T", type=int, default=16384)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--hf-ms", nargs="*", default=[],
                    help="SHAPE=MS: HF grouped_mm's fwd+bwd ms at this T, for the target lines")
    ap.add_argument("--targets", nargs="*", type=float, default=[3.0, 2.5])
    ap.add_argument("--device", default="cuda", help="cuda (the measure) or cpu (a smoke test)")
    a = ap.parse_args(argv)
    hf = {k: float(v) for k, v in (s.split("=") for s in a.hf_ms)}
    dev = torch.device(a.device)
    name_of = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"dense bound: {name_of}, torch {torch.__version__}, bf16, T={a.T}")
    for name in a.shapes:
        H, I, E, k = SHAPES[name]
        n = a.T * k
        g = torch.Generator(device="cpu").manual_seed(0)
        fns, flop = {}, {}
        for gemm, (m, kk), (kk2, nn) in problems(H, I, n):
            x = torch.randn(m, kk, generator=g).to(dev, torch.bfloat16)
            w = torch.randn(kk2, nn, generator=g).to(dev, torch.bfloat16)
            out = torch.empty(m, nn, device=dev, dtype=torch.bfloat16)
            fns[gemm] = (lambda x=x, w=w, out=out: torch.mm(x, w, out=out))
            flop[gemm] = 2.0 * m * kk * nn
        timed = _time_interleaved(fns, dev, 3, a.iters, max_seconds=30)
        ms = {g: timed[g][0] for g in fns}
        tot = sum(ms.values())
        print(f"== {name} (H={H}, I={I}, E={E}, k={k}), n = {n} rows")
        for gemm in fns:
            print(f"  {gemm:6s} {ms[gemm]:7.3f} ms {flop[gemm] / ms[gemm] / 1e9:6.0f} TF/s")
        print(f"  six    {tot:7.3f} ms {sum(flop.values()) / tot / 1e9:6.0f} TF/s (dense, no grouping)")
        if name in hf:
            for t in a.targets:
                need = hf[name] / t
                verdict = "above the dense bound" if need >= tot else "BELOW the dense bound"
                print(f"  {t}x HF grouped_mm ({hf[name]:.2f} ms) asks {need:.3f} ms for the whole layer: "
                      f"{verdict} by {abs(need - tot):.3f} ms")
        del fns
        if dev.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
