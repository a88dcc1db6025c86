#!/usr/bin/env python3
"""End-to-end training step: Qwen3-30B-A3B cut to 4 decoder layers, moe_fused vs HF grouped_mm vs eager.

One process, one model (random weights, bf16, real vocabulary 151936), the same
batch for every implementation: the experts implementation is switched on the
same weights (moe_fused.patch / unpatch). A step is forward + loss + backward +
optimizer update (SGD, like the peers' figure in shared/PEERS.md; lr 0, so the weights, and
the losses, stay comparable across implementations) at
batch x seq = 16384 tokens. Reported per implementation: step ms (median),
tokens/s, peak memory, and the experts' share of the step (CUDA events around
every experts module's forward and backward, in separate instrumented steps so
the timed steps are not perturbed). JSON goes to bench/results/.

    python bench/bench_e2e.py                 # on a GPU: the real figure
    python bench/bench_e2e.py --quick         # CPU smoke run at tiny shapes
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

# "moe_fused+check": moe_fused with the CUDA host-side expert-index range check on (the
# default of moe_fused.ops; one reduction and one host sync per layer). "moe_fused" runs
# with it off, like bench_layer.py: indices from a top-k router are always in range.
IMPLS = ("moe_fused", "moe_fused+check", "grouped_mm", "eager")
HERE = Path(__file__).resolve().parent
# Before torch is imported: torch's bundled libgomp and libmoe_fused's system libgomp would
# otherwise spin against each other on the CPU (see moe_fused/__init__.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

QWEN3_30B_A3B = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
    num_experts=128, num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
    norm_topk_prob=True, rms_norm_eps=1e-6, max_position_embeddings=40960, tie_word_embeddings=False,
)
TINY = dict(
    vocab_size=1024, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    num_experts=8, num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    norm_topk_prob=True, max_position_embeddings=1024, tie_word_embeddings=False,
)


def _pos(name):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {v}")
        return v

    return parse


def _impls(text):
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in IMPLS]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"--impls: unknown {bad or text!r}; choose from {', '.join(IMPLS)}")
    return items


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke run at tiny shapes (seconds)")
    p.add_argument("--device", default=None, help="cuda (default) or cpu; --quick defaults to cpu")
    p.add_argument("--layers", type=_pos("--layers"), default=None, help="decoder layers (default 4)")
    p.add_argument("--tokens", type=_pos("--tokens"), default=None, help="tokens per step (default 16384)")
    p.add_argument("--seq-len", type=_pos("--seq-len"), default=None, help="sequence length (default 4096)")
    p.add_argument("--steps", type=_pos("--steps"), default=None, help="timed steps (default 10)")
    p.add_argument("--warmup", type=_pos("--warmup"), default=None, help="warm-up steps (default 3)")
    p.add_argument("--eager-steps", type=_pos("--eager-steps"), default=None,
                   help="timed steps for eager, which is slow (default 2)")
    p.add_argument("--impls", type=_impls, default=list(IMPLS), help="comma separated, default all three")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd", help="default sgd (no state)")
    p.add_argument("--attn", default="sdpa", help="attn_implementation (default sdpa)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/e2e_<device>_<time>.json)")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cpu" if args.quick else "cuda"
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        p.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    q = args.quick
    args.layers = args.layers or (2 if q else 4)
    args.tokens = args.tokens or (512 if q else 16384)
    args.seq_len = args.seq_len or (128 if q else 4096)
    args.steps = args.steps or (3 if q else 10)
    args.warmup = args.warmup or (1 if q else 3)
    args.eager_steps = args.eager_steps or (2 if q else 2)
    if args.tokens % args.seq_len:
        p.error(f"--tokens {args.tokens} must be a multiple of --seq-len {args.seq_len}")
    return p, args


def run(argv=None) -> int:
    parser, args = parse_args(argv)
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, Qwen3MoeConfig
    except ImportError as exc:
        parser.error(f"needs torch and transformers >= 5: {exc}")
    try:
        import moe_fused
    except ImportError as exc:
        parser.error(f"cannot import moe_fused ({exc}); pip install . or set PYTHONPATH=python")

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: PyTorch sees no CUDA GPU (use --quick for a CPU smoke run)")
        if "moe_fused" in args.impls and not moe_fused.has_cuda():
            parser.error("libmoe_fused was built without CUDA: rebuild with nvcc, or --impls grouped_mm,eager")
        if device.index is None:  # torch 2.11's set_device wants an ordinal
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = TINY if args.quick else QWEN3_30B_A3B
    config = Qwen3MoeConfig(num_hidden_layers=args.layers, **shape)
    config._attn_implementation = args.attn

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation="grouped_mm",
                                                 attn_implementation=args.attn)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: Qwen3-MoE {args.layers} layers, H={config.hidden_size}, I={config.moe_intermediate_size}, "
          f"E={config.num_experts}, k={config.num_experts_per_tok}, vocab {config.vocab_size}: "
          f"{n_params / 1e6:,.1f}M parameters, {dtype}, built in {time.perf_counter() - t0:.1f} s")
    batch = args.tokens // args.seq_len
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, config.vocab_size, (batch, args.seq_len), generator=g).to(device)
    print(f"step : {batch} x {args.seq_len} = {args.tokens} tokens, {args.optimizer}, attn {args.attn}")

    # lr 0: the update runs in full (its cost is part of the step) but the weights stay
    # the same, so every implementation sees identical weights and its loss is comparable.
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.0, foreach=True)
    from moe_fused.hf.timing import ExpertsTimer
    from moe_fused.ops import set_cuda_index_check

    index_check_default = set_cuda_index_check(True)

    timer = ExpertsTimer(model)
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    results = {}
    for impl in args.impls:
        print(f"\n== {impl}")
        try:
            hf_impl = "moe_fused" if impl.startswith("moe_fused") else impl
            if hf_impl == "moe_fused":
                moe_fused.patch(model)
                set_cuda_index_check(impl == "moe_fused+check")
            else:
                moe_fused.unpatch(model, implementation=impl)
            assert model.config._experts_implementation == hf_impl
            n = args.eager_steps if impl == "eager" else args.steps
            warm = 1 if impl == "eager" else args.warmup
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            for _ in range(warm):
                loss = step()
            sync()
            times, losses = [], []
            for _ in range(n):
                if cuda:
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    loss = step()
                    b.record()
                    torch.cuda.synchronize()
                    times.append(a.elapsed_time(b))
                else:
                    t = time.perf_counter()
                    loss = step()
                    times.append(1e3 * (time.perf_counter() - t))
                losses.append(loss.item())
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            # Instrumented steps: the experts' own time in a step.
            timer.attach()
            exp_ms, inst_ms, fwd_ms, bwd_ms = [], [], [], []
            for _ in range(min(2, n)):
                sync()
                t = time.perf_counter()
                step()
                sync()
                inst_ms.append(1e3 * (time.perf_counter() - t))
                f_ms, b_ms = timer.collect_ms()
                fwd_ms.append(f_ms)
                bwd_ms.append(b_ms)
                exp_ms.append(f_ms + b_ms)
            timer.detach()
            step_ms = statistics.median(times)
            experts_ms = statistics.median(exp_ms)
            r = {
                "step_ms": step_ms, "step_ms_all": times, "tokens_per_s": args.tokens / (step_ms / 1e3),
                "peak_mem_gb": peak, "experts_ms": experts_ms,
                "experts_fwd_ms": statistics.median(fwd_ms), "experts_bwd_ms": statistics.median(bwd_ms),
                "experts_share": experts_ms / statistics.median(inst_ms),
                "rest_ms": step_ms - experts_ms, "loss": losses[-1], "timed_steps": n,
            }
            if not all(math.isfinite(x) for x in losses):
                r["warning"] = f"non-finite loss {losses}"
            results[impl] = r
            mem = f", peak {peak:.1f} GB" if peak is not None else ""
            print(f"   step {step_ms:9.1f} ms  {r['tokens_per_s']:10,.0f} tokens/s{mem}  "
                  f"experts {experts_ms:8.1f} ms (fwd {r['experts_fwd_ms']:.1f} + bwd {r['experts_bwd_ms']:.1f}; "
                  f"{100 * r['experts_share']:.0f}% of the step)  loss {losses[-1]:.3f}")
        except Exception as exc:  # noqa: BLE001 - one failing implementation must not lose the others
            timer.detach()
            timer.pairs, timer._open = [], {}
            opt.zero_grad(set_to_none=True)
            msg = f"{type(exc).__name__}: {str(exc)[:500]}"
            results[impl] = {"error": msg}
            print(f"   FAILED: {msg}")
            if cuda:
                torch.cuda.empty_cache()

    set_cuda_index_check(index_check_default)
    ok = {k: v for k, v in results.items() if "error" not in v}
    if "moe_fused" in ok:
        for k, v in ok.items():
            v["loss_diff_vs_moe_fused"] = abs(v["loss"] - ok["moe_fused"]["loss"])
    print(f"\n{'experts_implementation':24s} {'step ms':>9s} {'tokens/s':>11s} {'peak GB':>8s} {'experts ms':>11s} "
          f"{'share':>6s} {'speedup':>8s} {'loss':>8s}")
    base = ok.get("moe_fused", {}).get("step_ms")
    for k, v in results.items():
        if "error" in v:
            print(f"{k:24s} failed: {v['error'][:90]}")
            continue
        sp = f"{v['step_ms'] / base:.2f}x" if base else "-"
        v["moe_fused_speedup"] = v["step_ms"] / base if base else None
        pk = f"{v['peak_mem_gb']:8.1f}" if v["peak_mem_gb"] is not None else f"{'-':>8s}"
        print(f"{k:24s} {v['step_ms']:9.1f} {v['tokens_per_s']:11,.0f} {pk} {v['experts_ms']:11.1f} "
              f"{100 * v['experts_share']:5.0f}% {sp:>8s} {v['loss']:8.4f}")

    record = {
        "bench": "e2e_train_step",
        "quick": args.quick,
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "moe_fused": getattr(moe_fused, "__version__", None),
        "model": {"name": "Qwen3-30B-A3B shape" if not args.quick else "tiny", "layers": args.layers,
                  **{k: shape[k] for k in ("vocab_size", "hidden_size", "moe_intermediate_size", "num_experts",
                                           "num_experts_per_tok")}, "params": n_params, "dtype": str(dtype)},
        "step": {"tokens": args.tokens, "batch": batch, "seq_len": args.seq_len, "optimizer": args.optimizer,
                 "attn": args.attn},
        "notes": {
            "moe_fused": "CUDA expert-index range check off (as bench_layer.py); top-k indices are in range",
            "moe_fused+check": "the ops' default: index range check on (one reduction + host sync per layer)",
            "experts_ms": "CUDA events around each experts module's forward and backward (hooks), "
                          "median of 2 separately instrumented steps",
            "optimizer": "lr 0: full update cost, identical weights for every implementation",
        },
        "results": results,
    }
    out = args.out
    if out is None:
        tag = "quick_cpu" if args.quick else ("cpu" if not cuda else "gpu")
        out = HERE / "results" / f"e2e_{tag}_{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"\nJSON: {out}")
    return 0 if ok else 1


def main(argv=None) -> int:
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
