"""Per-kernel times of moe_fused experts fwd+bwd (torch.profiler), Qwen3 shapes.

    python bench/device/profile_kernels.py --shape 30b-a3b -T 4096 16384
Prints, per T: fwd and fwd+bwd median ms (CUDA events), effective TFLOP/s, and the
CUDA kernels with their time per fwd+bwd step and share (profiled with kernel chaining off,
MOE_FUSED_PDL=0, so that no kernel's time includes a wait for the one before); JSON to --json
if given.
Like the layer benchmark, without the CUDA index check (its host sync stalls the launch queue:
~0.5 ms of the fwd+bwd wall time at 30B-A3B T=16384 on the H100) unless --index-check.
--impl sonicmoe profiles SonicMoE's kernels on the same inputs instead (installed by
run_all.sh's `sonic` step; its first call JIT-compiles and autotunes, timed and printed)."""
import argparse
import importlib.util
import json
import pathlib
import sys

import torch

import time

import moe_fused
from moe_fused.bench import PDL_ENV, _load_sonicmoe, _sonic_call, env_set, median_ms
from moe_fused import moe_experts

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from experts_inputs import SHAPES, make  # noqa: E402


# kernel name -> (GEMM label, path) from bench/bench_gemms.py (wgrad: dW2 / dW1 by launch order)
_spec = importlib.util.spec_from_file_location("bench_gemms", pathlib.Path(__file__).resolve().parents[1] / "bench_gemms.py")
_bg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bg)


def _label(name):
    label, path = _bg.classify_kernel(name)
    if label == "wgrad":
        label = "dW2+dW1"
    return f"{label or ('?' if path else '')}{'/' + path if path else ''}"


def med(fn, n=10):
    return median_ms(fn, torch.device("cuda"), 3, n)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="30b-a3b")
    p.add_argument("-T", nargs="+", type=int, default=[4096])
    p.add_argument("--json")
    p.add_argument("--index-check", action="store_true", help="keep the CUDA index check (a sync)")
    p.add_argument("--impl", choices=["moe_fused", "sonicmoe"], default="moe_fused")
    p.add_argument("--sequence", action="store_true",
                   help="also print one step's kernels in launch order (which GEMM is which)")
    p.add_argument("--no-fwd", action="store_true",
                   help="skip the no-grad forward's timing (SonicMoE compiles it apart: ~70 s)")
    args = p.parse_args()
    experts = moe_experts
    if args.impl == "sonicmoe":
        sonic = _load_sonicmoe(print)
        if sonic is None:
            sys.exit(1)

        def experts(x, idx, s, w1, w2):  # pairs token-major: token_idx = t for pair t*k + j
            tok = torch.arange(x.shape[0], device=x.device, dtype=torch.int32).repeat_interleave(idx.shape[1])
            return _sonic_call(sonic, x, idx, s, w1, w2, tok)

    if not args.index_check:
        moe_fused.ops.set_cuda_index_check(False)
    H, I, E, k = SHAPES[args.shape]
    tag = args.shape if args.impl == "moe_fused" else f"{args.shape}/{args.impl}"  # ab_summary reads it
    res = []
    for T in args.T:
        x, idx, s, w1, w2, dout = make(T, args.shape)

        def fwd():
            with torch.no_grad():
                experts(x, idx, s, w1, w2)

        def fb():
            for t in (x, s, w1, w2):
                t.grad = None
            experts(x, idx, s, w1, w2).backward(dout)

        t0 = time.perf_counter()
        fb()
        torch.cuda.synchronize()
        print(f"-- {tag} T={T}: first fwd+bwd {time.perf_counter() - t0:.1f} s")
        t_f, t_fb = (float("nan") if args.no_fwd else med(fwd)), med(fb)
        fl = 6 * T * k * H * I
        # Kernel chaining off while profiled: with it each kernel starts during the previous
        # one's last wave and its profiled time includes that wait (the medians above: on).
        with env_set(PDL_ENV, "0"), \
                torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fb()
            torch.cuda.synchronize()
        if args.sequence:  # the last step's kernels, in the order they ran
            evs = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                         key=lambda e: e.time_range.start)
            step = evs[-(len(evs) // 3):]
            print(f"-- {tag} T={T}: one step's {len(step)} kernels in order")
            for e in step:
                if e.time_range.elapsed_us() >= 20:
                    print(f"  {e.time_range.elapsed_us() / 1e3:8.3f} ms  {e.name[:120]}")
        rows = []
        for ev in prof.key_averages():
            dt = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
            if dt > 0:
                rows.append((ev.key, dt / 3 / 1e3, ev.count // 3))
        rows.sort(key=lambda r: -r[1])
        tot = sum(r[1] for r in rows)
        print(f"== {tag} T={T}: fwd {t_f:.3f} ms ({fl / t_f / 1e9:.0f} TF/s)  fwd+bwd {t_fb:.3f} ms "
              f"({3 * fl / t_fb / 1e9:.0f} TF/s); kernels sum {tot:.3f} ms/step")
        for name, ms, cnt in rows[:24]:
            print(f"  {ms:8.3f} ms {100 * ms / tot:5.1f}%  x{cnt}  {_label(name):16s} {name[:110]}")
        res.append(dict(impl=args.impl, shape=args.shape, T=T, fwd_ms=t_f, fwdbwd_ms=t_fb, kernels=rows[:30],
                        labels={r[0]: _label(r[0]) for r in rows[:30]}))
    if args.json:
        json.dump(res, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
