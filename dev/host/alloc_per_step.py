"""Does a benchmark step make cudaMalloc / cudaFree calls or allocator retries (each a
host stall before the GPU gets work)? Runs the layer benchmark's fwd+bwd step (step_timeline's
make_step) and prints torch's allocator counters per step, and the time from the step's
start to the return of the forward call (host, perf_counter), for each T and implementation.

    python dev/host/alloc_per_step.py --shape 30b-a3b -T 512 16384 --impls moe_fused hf-grouped_mm
"""
import argparse
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "bench" / "device"))
from experts_inputs import SHAPES  # noqa: E402
from step_timeline import make_step  # noqa: E402

from moe_fused.bench import _build  # noqa: E402
from moe_fused.ops import cuda_index_check  # noqa: E402

KEYS = ("segment.all.allocated", "segment.all.freed", "num_alloc_retries", "allocation.all.allocated")

p = argparse.ArgumentParser()
p.add_argument("--shape", default="30b-a3b")
p.add_argument("-T", nargs="+", type=int, default=[512, 16384])
p.add_argument("--impls", nargs="+", default=["moe_fused", "hf-grouped_mm"])
p.add_argument("--steps", type=int, default=10)
args = p.parse_args()
H, I, E, k = SHAPES[args.shape]
cfg, block = _build(H, I, E, k, torch.bfloat16, torch.device("cuda"), seed=0)
with cuda_index_check(False):
    for T in args.T:
        for impl in args.impls:
            step = make_step(impl, cfg, block, T, H)
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            before = torch.cuda.memory_stats()
            walls = []
            for _ in range(args.steps):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                step()
                torch.cuda.synchronize()
                walls.append((time.perf_counter() - t0) * 1e3)
            after = torch.cuda.memory_stats()
            d = {key: (after.get(key, 0) - before.get(key, 0)) / args.steps for key in KEYS}
            print(f"{args.shape} T={T:6d} {impl:18s} per step: cudaMalloc {d[KEYS[0]]:.1f}, cudaFree "
                  f"{d[KEYS[1]]:.1f}, retries {d[KEYS[2]]:.1f}, allocations {d[KEYS[3]]:.1f}; "
                  f"wall (sync to sync) median {statistics.median(walls):.3f} ms")
            del step
            torch.cuda.empty_cache()
