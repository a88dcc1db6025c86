"""moe-fused demo: fine-tune a small Qwen3-MoE model on real text, and time it against HF.

    moe-fused demo                      # CPU, a couple of minutes
    moe-fused demo --device cuda        # Qwen3-30B-A3B layer shapes (H=2048, I=768, E=128, k=8)

A Qwen3-MoE model is built from a config (random init, no model hub, no
tokenizer download) with experts_implementation="moe_fused" and trained on the
source files of Python's standard library, read as bytes (vocabulary: the 256
byte values plus BOS/EOS/PAD). It prints the loss under a progress bar, saves
the loss curve (PNG) and a JSON record, then runs the same first steps with
Transformers' own experts implementations ("grouped_mm" and "eager") from the
same initial weights on the same batches, and prints tokens/s side by side
(and how far their losses are from moe_fused's).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import sysconfig
import time
from pathlib import Path

IMPLS = ("moe_fused", "grouped_mm", "eager")
BOS, EOS, PAD = 256, 257, 258
VOCAB = 260  # 256 bytes + BOS/EOS/PAD, rounded up to an even size


# ------------------------------------------------------------------ arguments --


def _positive_int(name):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {v}")
        return v

    return parse


def _nonneg_int(name):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < 0:
            raise argparse.ArgumentTypeError(f"{name} must be >= 0, got {v}")
        return v

    return parse


def _positive_float(name):
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"{name} must be a positive number, got {text}")
        return v

    return parse


def _impl_list(text):
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in IMPLS[1:]]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown implementation(s) {', '.join(bad)}; choose from {', '.join(IMPLS[1:])} (or 'none')"
        )
    return items


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-fused demo",
        description=(
            "Fine-tune a small Qwen3-MoE model (random init) on Python's standard library sources read "
            "as bytes, with experts_implementation='moe_fused', and compare tokens/s with Transformers' "
            "'grouped_mm' and 'eager' on the same weights and batches."
        ),
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                   help="cpu (default), cuda (Qwen3-30B-A3B layer shapes), or auto")
    p.add_argument("--steps", type=_positive_int("--steps"), default=None,
                   help="fine-tuning steps with moe_fused (default: cpu 200, cuda 100)")
    p.add_argument("--compare-steps", type=_nonneg_int("--compare-steps"), default=None,
                   help="steps run for each other implementation (default: cpu 16, cuda 8; eager on cuda at "
                        "most 6; 0 = none)")
    p.add_argument("--compare", type=lambda s: [] if s == "none" else _impl_list(s),
                   default=["grouped_mm", "eager"],
                   help="implementations to compare with, comma separated (default grouped_mm,eager; 'none')")
    p.add_argument("--batch-size", type=_positive_int("--batch-size"), default=None,
                   help="sequences per step (default: cpu 8, cuda 16)")
    p.add_argument("--seq-len", type=_positive_int("--seq-len"), default=None,
                   help="tokens per sequence (default: cpu 256, cuda 1024)")
    p.add_argument("--layers", type=_positive_int("--layers"), default=None,
                   help="decoder layers (default: cpu 2, cuda 2)")
    p.add_argument("--lr", type=_positive_float("--lr"), default=None,
                   help="AdamW learning rate (default: cpu 3e-3, cuda 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the init weights and the batches")
    p.add_argument("--data", type=Path, default=None,
                   help="directory of text/source files to train on (default: Python's standard library)")
    p.add_argument("--max-bytes", type=_positive_int("--max-bytes"), default=4_000_000,
                   help="read at most this many bytes of text (default 4 MB)")
    p.add_argument("--out-dir", type=Path, default=Path("moe_fused_demo"),
                   help="where the loss curve PNG and the JSON go (default ./moe_fused_demo)")
    p.add_argument("--log-every", type=_positive_int("--log-every"), default=10, help="print the loss every N steps")
    p.add_argument("--threads", type=_positive_int("--threads"), default=None,
                   help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (plain log lines)")
    return p


# ----------------------------------------------------------------------- data --


def load_corpus(root: Path | None, max_bytes: int) -> tuple[bytes, str, int]:
    """Concatenated bytes of the .py files under root (sorted, deterministic), EOS-separated later."""
    if root is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        what = f"Python {platform.python_version()} standard library ({root})"
    else:
        what = str(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: not a directory")
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    if not files:
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".txt", ".md", ".rst", ".py"))
    chunks, total, n = [], 0, 0
    for f in files:
        try:
            b = f.read_bytes()
        except OSError:
            continue
        if not b:
            continue
        chunks.append(b)
        total += len(b) + 1
        n += 1
        if total >= max_bytes:
            break
    if total < 4096:
        raise ValueError(f"--data {root}: found only {total} bytes of text (need at least 4 KB)")
    return b"".join(c + bytes([0]) for c in chunks)[:max_bytes], what, n


def tokenize(corpus: bytes):
    import torch

    t = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long()
    t[t == 0] = EOS  # file separators (NUL never occurs in source text)
    return t


def batches(tokens, batch_size: int, seq_len: int, steps: int, seed: int):
    """`steps` (input, labels) batches of random windows, identical for every implementation."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    span = tokens.numel() - seq_len - 1
    out = []
    for _ in range(steps):
        starts = torch.randint(0, span, (batch_size,), generator=g)
        win = torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])
        win[:, 0] = BOS
        out.append(win)
    return out


# ---------------------------------------------------------------------- model --


def make_config(device: str, layers: int):
    from transformers import Qwen3MoeConfig

    if device == "cuda":  # Qwen3-30B-A3B layer shapes
        shape = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                     num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128)
    else:
        shape = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_experts=32,
                     num_experts_per_tok=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    return Qwen3MoeConfig(
        vocab_size=VOCAB, num_hidden_layers=layers, norm_topk_prob=True, max_position_embeddings=4096,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False,
        output_router_logits=False, **shape,
    )


def build_model(config, impl: str, device, dtype):
    """Random init straight on the device (fast even at Qwen3-30B-A3B layer shapes)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, experts_implementation=impl, dtype=dtype)
    model.train()
    return model


def use(model, impl: str, state):
    """The same model object, back to the initial weights, switched to another experts implementation."""
    import moe_fused

    model.load_state_dict(state)
    if impl == "moe_fused":
        moe_fused.patch(model)
    else:
        moe_fused.unpatch(model, implementation=impl)
    assert model.config._experts_implementation == impl
    return model


# ---------------------------------------------------------------------- train --


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(model, data, lr, device, desc, progress=True, log_every=10, warmup=2, instrument=2, log=print):
    """One AdamW step per batch.

    Returns (losses, per-step seconds, experts share). Steps after the warm-up are timed
    (their seconds; None for the others), except the last `instrument` ones, which time
    the experts modules (hooks) to give the experts' share of a step.
    """
    import torch

    from .hf.timing import ExpertsTimer

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, foreach=True)
    timer = ExpertsTimer(model)
    n = len(data)
    # Keep at least one plainly timed step where there are enough steps; else time the hooked ones.
    instrument = min(instrument, max(1, n - warmup - 1)) if n > 1 else 0
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc=desc, unit="step", dynamic_ncols=True, leave=True)
        except ImportError:
            bar = None
    losses, dts, inst_s, inst_experts_ms = [], [], 0.0, 0.0
    for i, ids in enumerate(data):
        ids = ids.to(device, non_blocking=True)
        instrumented = i >= n - instrument
        if instrumented:
            timer.attach()
        _sync(device)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()  # syncs
        dt = time.perf_counter() - t0
        if instrumented:
            timer.detach()
            inst_s += dt
            inst_experts_ms += sum(timer.collect_ms())
        dts.append(dt if (not instrumented and i >= min(warmup, n - 1)) else None)
        if not math.isfinite(value):
            raise FloatingPointError(f"{desc}: loss became {value} at step {i + 1}")
        losses.append(value)
        if bar is not None:
            bar.set_postfix(loss=f"{value:.3f}", tok_s=f"{ids.numel() / dt:,.0f}")
            bar.update(1)
            if (i + 1) % log_every == 0 or i + 1 == n:
                bar.write(f"  {desc} step {i + 1:4d}/{n}  loss {value:.4f}")
        elif (i + 1) % log_every == 0 or i + 1 == n:
            log(f"  {desc} step {i + 1:4d}/{n}  loss {value:.4f}  ({ids.numel() / dt:,.0f} tokens/s)")
    if bar is not None:
        bar.close()
    del opt
    share = (inst_experts_ms / 1e3) / inst_s if inst_s else None
    return losses, dts, share


def throughput(dts, tokens_per_step, steps=None):
    """(tokens/s, step ms) from the median timed step (those in `steps` if given): robust to
    the bursts of other work on a shared machine."""
    import statistics

    times = [d for i, d in enumerate(dts) if d is not None and (steps is None or i in steps)]
    if not times:
        return None, None
    med = statistics.median(times)
    return tokens_per_step / med, 1e3 * med


def evaluate(model, data, device) -> float:
    import torch

    model.eval()
    total = 0.0
    with torch.no_grad():
        for ids in data:
            ids = ids.to(device)
            total += model(input_ids=ids, labels=ids).loss.item()
    model.train()
    return total / max(len(data), 1)


def sample(model, device, prompt: bytes = b"def ", n: int = 80) -> str:
    import torch

    model.eval()
    ids = torch.tensor([[BOS, *prompt]], device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=True,
                             temperature=0.7, top_k=20, pad_token_id=PAD, eos_token_id=EOS)
    model.train()
    toks = [t for t in out[0, 1:].tolist() if t < 256]
    return bytes(toks).decode("utf-8", errors="replace")


def plot(path: Path, curves: dict, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, ys in curves.items():
        if ys:
            ax.plot(range(1, len(ys) + 1), ys, label=label, lw=1.5 if label.startswith("moe_fused") else 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats / byte)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------- main --


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    try:
        import torch
    except ImportError:
        parser.error("the demo needs PyTorch (pip install torch)")
    try:
        import transformers  # noqa: F401
    except ImportError:
        parser.error("the demo needs Hugging Face transformers >= 5 (pip install 'moe-fused[hf]')")

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            "--device cuda requested, but PyTorch sees no CUDA GPU "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); use --device cpu"
        )
    import moe_fused

    if args.device == "cuda" and not moe_fused.has_cuda():
        parser.error("--device cuda requested, but this libmoe_fused was built without CUDA; use --device cpu")
    cuda = args.device == "cuda"
    steps = args.steps or (100 if cuda else 200)
    cmp_steps = args.compare_steps if args.compare_steps is not None else (8 if cuda else 16)
    bs = args.batch_size or (16 if cuda else 8)
    seq = args.seq_len or (1024 if cuda else 256)
    layers = args.layers or 2
    lr = args.lr or (1e-3 if cuda else 3e-3)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if cuda else torch.float32

    try:
        corpus, what, nfiles = load_corpus(args.data, args.max_bytes)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    tokens = tokenize(corpus)
    if tokens.numel() < 2 * (seq + 1):
        parser.error(f"--seq-len {seq} is too long for {tokens.numel()} tokens of text")
    n_eval = max(2, min(8, steps // 10))
    split = int(tokens.numel() * 0.95)
    train_tok, eval_tok = tokens[:split], tokens[split:]
    if eval_tok.numel() < 2 * (seq + 1):
        train_tok = eval_tok = tokens
    train_data = batches(train_tok, bs, seq, steps, args.seed)
    eval_data = batches(eval_tok, bs, seq, n_eval, args.seed + 100)

    config = make_config(args.device, layers)
    torch.manual_seed(args.seed)
    model = build_model(config, "moe_fused", device, dtype)
    # The initial weights, kept (on the CPU) for the comparison runs.
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())

    args.out_dir.mkdir(parents=True, exist_ok=True)
    where = torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine())
    print(f"moe-fused demo on {args.device} ({where}, {torch.get_num_threads()} CPU threads)")
    print(f"  data : {what}: {nfiles} files, {tokens.numel():,} byte tokens")
    print(f"  model: Qwen3-MoE, {layers} layers, H={config.hidden_size}, I={config.moe_intermediate_size}, "
          f"E={config.num_experts}, k={config.num_experts_per_tok}, {n_params / 1e6:.1f}M parameters, {dtype}")
    print(f"  train: {steps} steps x {bs} x {seq} tokens, AdamW lr {lr}")

    # 1. The fine-tune, with moe_fused.
    eval_before = evaluate(model, eval_data, device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    try:
        losses, dts, share = train(
            model, train_data, lr, device, "moe_fused", not args.no_progress, args.log_every
        )
    except FloatingPointError as exc:
        print(f"moe-fused demo: {exc}; try a lower --lr (now {lr})", file=sys.stderr)
        return 1
    eval_after = evaluate(model, eval_data, device)
    text = sample(model, device)
    results = {
        "moe_fused": {
            # tokens/s and step ms are set below, over the same steps as the comparisons
            "tokens_per_s_whole_run": throughput(dts, bs * seq)[0],
            "steps": len(losses), "losses": losses, "experts_share": share,
            "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        }
    }
    print(f"\n  eval loss {eval_before:.3f} -> {eval_after:.3f} nats/byte after {steps} steps")
    print(f"  sample (temperature 0.7) after 'def ': {text!r}\n")

    # 2. The same first steps with Transformers' own experts implementations.
    n_cmp = min(cmp_steps, steps)
    if n_cmp and args.compare:
        for impl in args.compare:
            m_steps = n_cmp if not (cuda and impl == "eager") else min(n_cmp, 6)
            use(model, impl, state)
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                l2, d2, sh2 = train(model, train_data[:m_steps], lr, device, impl, not args.no_progress,
                                        args.log_every, warmup=min(2, m_steps - 1))
                diff = max(abs(a - b) for a, b in zip(l2, losses))
                results[impl] = {
                    "tokens_per_s": throughput(d2, bs * seq)[0], "step_ms": throughput(d2, bs * seq)[1],
                    "timed_steps": [i + 1 for i, d in enumerate(d2) if d is not None],
                    "steps": len(l2), "losses": l2, "max_abs_loss_diff_vs_moe_fused": diff, "experts_share": sh2,
                    "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
                }
            except Exception as exc:  # noqa: BLE001 - report and go on (e.g. out of memory)
                results[impl] = {"error": f"{type(exc).__name__}: {exc}"}
            if cuda:
                torch.cuda.empty_cache()

    # 3. Report.
    # moe_fused over the very steps (same batches) the others were timed on; else its whole run.
    same = [set(r["timed_steps"]) for r in results.values() if "timed_steps" in r]
    window = {i - 1 for i in set.intersection(*same)} if same else None
    rf = results["moe_fused"]
    rf["tokens_per_s"], rf["step_ms"] = throughput(dts, bs * seq, window)
    if rf["tokens_per_s"] is None:
        rf["tokens_per_s"], rf["step_ms"] = throughput(dts, bs * seq)
    else:
        rf["timed_steps"] = sorted(i + 1 for i in window if dts[i] is not None)
    base = rf["tokens_per_s"]
    print(f"{'experts_implementation':24s} {'tokens/s':>12s} {'step ms':>10s} {'experts share':>14s} "
          f"{'moe_fused speedup':>18s}{'  peak GB' if cuda else ''}  {'max |loss diff|':>15s}")
    for impl, r in results.items():
        if "error" in r:
            print(f"{impl:24s} failed: {r['error']}")
            continue
        speedup = (base / r["tokens_per_s"]) if (base and r["tokens_per_s"]) else float("nan")
        r["moe_fused_speedup"] = speedup
        mem = f"  {r['peak_mem_gb']:7.2f}" if cuda else ""
        d = r.get("max_abs_loss_diff_vs_moe_fused")
        sh = "-" if r.get("experts_share") is None else f"{100 * r['experts_share']:.0f}%"
        print(f"{impl:24s} {r['tokens_per_s'] or float('nan'):12,.0f} {r['step_ms'] or float('nan'):10.1f} {sh:>14s} "
              f"{'-' if impl == 'moe_fused' else f'{speedup:.2f}x':>18s}{mem}  "
              f"{'-' if d is None else f'{d:.2e}':>15s}")
    if rf.get("timed_steps"):
        first, last = rf["timed_steps"][0], rf["timed_steps"][-1]
        whole = rf["tokens_per_s_whole_run"] or float("nan")
        print(f"(tokens/s: median step of steps {first}-{last}, the same batches for each; "
              f"moe_fused over its whole run: {whole:,.0f} tokens/s)")
    png = args.out_dir / "loss_curve.png"
    curves = {f"{k} ({v['steps']} steps)": v.get("losses", []) for k, v in results.items()}
    title = (f"Qwen3-MoE ({layers}L, H={config.hidden_size}, E={config.num_experts}, k={config.num_experts_per_tok}) "
             f"on stdlib bytes, {args.device}")
    if plot(png, curves, title):
        print(f"\nloss curve: {png}")
    else:
        print("\n(matplotlib not installed: no loss-curve PNG; pip install matplotlib)")
    record = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "moe_fused": getattr(moe_fused, "__version__", None), "threads": torch.get_num_threads(),
        "config": {"layers": layers, "hidden": config.hidden_size, "moe_intermediate": config.moe_intermediate_size,
                   "experts": config.num_experts, "top_k": config.num_experts_per_tok, "vocab": VOCAB,
                   "dtype": str(dtype), "params": n_params},
        "train": {"steps": steps, "batch_size": bs, "seq_len": seq, "lr": lr, "seed": args.seed, "data": what},
        "eval_loss_before": eval_before, "eval_loss_after": eval_after, "sample": text,
        "results": results,
    }
    js = args.out_dir / "demo_results.json"
    js.write_text(json.dumps(record, indent=2))
    print(f"results   : {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
