"""Benchmark of the MoE experts layer: moe-fused against Hugging Face Transformers v5.

    moe-fused bench                       # CPU, scaled-down Qwen3-30B-A3B shapes
    moe-fused bench --device cuda         # Qwen3-30B-A3B and Qwen3-235B-A22B, T = 512, 4096, 16384
    python -m moe_fused.bench --help      # the same; bench/bench_layer.py too

One process, identical weights, inputs and routing for every implementation: the experts
module of a real Transformers ``Qwen3MoeSparseMoeBlock`` (random weights), its router
producing (top_k_index, top_k_weights) from the hidden states, then

    hf-eager            the module with experts_implementation="eager" (per-expert loop)
    hf-grouped_mm       the module with experts_implementation="grouped_mm"
    moe_fused           moe_fused.moe_experts on the module's own gate_up_proj / down_proj
    moe_fused-portable  the same call with the Hopper (sm90a) kernels off: MOE_FUSED_PORTABLE=1
                        around its calls only (CUDA only; on by default there)
    moe_fused-windows   the same call with its per-pair rows made in token windows where the
                        layer's size rule takes them (ops.set_one_token_window(False)): less
                        workspace at large T, where the default takes one window if the GPU
                        has the memory (CUDA only; on by default there)
    moe_fused-ctypes    the same call with the C++ fast path off (ops.set_torch_ops(False)):
                        the Python ctypes glue allocates, describes and calls instead, as
                        where moe_fused._torch_ops is not built (CUDA only; on by default there)
    moe_fused-nopdl     the same call with programmatic dependent launch off (MOE_FUSED_PDL=0
                        around its calls only): each kernel starts only after the previous one
                        has finished (CUDA only; on by default there)
    sonicmoe            SonicMoE (CuTe-DSL Hopper kernels), when `import sonicmoe` works and
                        --sonic-shapes (or --impls sonicmoe) asks for it: its first call per
                        shape JIT-compiles, so that first call is timed apart and reported

each timed forward and forward+backward (gradients for hidden states, routing weights and
both expert weights), round-robin (one run of each in turn, so background load hits all
alike). Reported: median ms, effective TFLOP/s (forward 6*T*k*H*I flops,
forward+backward 18*T*k*H*I), on CUDA the peak extra memory of one forward+backward over
the baseline (with and without the weight gradients, which every implementation allocates
alike), the forward's own peak, and the memory the forward keeps for backward (beyond its
output), and the ratios
of moe_fused (and of each other moe_fused variant and sonicmoe) against each other path, plus the
wall time of each implementation's first forward+backward at each shape and T.
A table is printed; JSON and a PNG plot are saved to --out (bench/results by default).

    moe-fused bench --device cuda --sonic-shapes 30b-a3b:16384     # + SonicMoE at one point
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pathlib
import platform
import random
import statistics
import sys
import time

import torch

# name -> (H, I, E, k)
SHAPES = {
    "30b-a3b": (2048, 768, 128, 8),
    "235b-a22b": (4096, 1536, 128, 8),
    # Qwen3-30B-A3B scaled down for a CPU: H and I halved, E / 4, k kept
    "30b-a3b-cpu": (1024, 384, 32, 8),
}
DEFAULTS = {
    "cpu": dict(shapes=["30b-a3b-cpu"], tokens=[256, 1024, 4096], dtype="float32"),
    "cuda": dict(shapes=["30b-a3b", "235b-a22b"], tokens=[512, 4096, 16384], dtype="bfloat16"),
}
IMPLS = ["hf-eager", "hf-grouped_mm", "moe_fused"]  # the default set on every device
CUDA_EXTRA = ["moe_fused-portable", "moe_fused-windows", "moe_fused-ctypes", "moe_fused-nopdl"]  # default on CUDA
EXTRA_IMPLS = CUDA_EXTRA + ["sonicmoe"]  # CUDA only
ALL_IMPLS = IMPLS + EXTRA_IMPLS
OURS = ("moe_fused",) + tuple(CUDA_EXTRA)
PORTABLE_ENV = "MOE_FUSED_PORTABLE"  # read by libmoe_fused at every call
PDL_ENV = "MOE_FUSED_PDL"  # the same


@contextlib.contextmanager
def env_set(name, value):
    """os.environ[name] = value inside; the previous value, or its absence, is restored on
    the way out, exceptions included. Wrap forward AND backward: the backward op reads the
    library's variables too."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def portable_env():
    """MOE_FUSED_PORTABLE=1 inside: libmoe_fused runs its portable kernels, not the sm90a ones."""
    return env_set(PORTABLE_ENV, "1")


def impl_env(impl):
    """The environment an implementation's calls (forward and backward) run in."""
    if impl == "moe_fused-portable":
        return portable_env()
    if impl == "moe_fused-nopdl":
        return env_set(PDL_ENV, "0")
    if impl == "moe_fused-windows":  # token windows by the layer's size rule, never one for speed
        from moe_fused.ops import one_token_window

        return one_token_window(False)
    if impl == "moe_fused-ctypes":
        return _ctypes_glue()
    return contextlib.nullcontext()


@contextlib.contextmanager
def _ctypes_glue():
    """The experts calls through the Python ctypes glue inside (the C++ fast path off)."""
    from moe_fused.ops import set_torch_ops

    previous = set_torch_ops(False)
    try:
        yield
    finally:
        set_torch_ops(previous)


def sonic_selected(spec, shape, T):
    """Whether --sonic-shapes `spec` (None = everywhere; entries "all", "SHAPE" or
    "SHAPE:T") selects SonicMoE at (shape, T)."""
    if spec is None:
        return True
    for s in spec:
        if s == "all":
            return True
        name, _, t = s.partition(":")
        if name == shape and (not t or int(t) == T):
            return True
    return False


def _load_sonicmoe(log):
    try:
        import sonicmoe
        import sonicmoe.enums  # noqa: F401
    except Exception as exc:  # ImportError, or a broken CuTe-DSL / CUDA library install
        log(f"sonicmoe: SKIPPED, `import sonicmoe` failed ({type(exc).__name__}: {str(exc)[:200]}); "
            "bench/device/run_all.sh step `sonic` installs it from .sonic-wheels")
        return None
    return sonicmoe


def _sonic_call(sonicmoe, x, idx, w, gate_up, down, token_idx):
    """SonicMoE's moe_general_routing_inputs as Transformers' own "sonicmoe" experts
    implementation calls it: pairs flattened token-major (pair t*k + j), token_idx = the
    token of each pair (int32, ascending, as SonicMoE requires), weights permuted to
    (2I, H, E) / (H, I, E), concat_layout=True = gate rows then up rows, like HF's gate_up_proj."""
    out, _ = sonicmoe.moe_general_routing_inputs(
        x, w.reshape(-1).to(x.dtype), token_idx, idx.reshape(-1).int(),
        gate_up.permute(1, 2, 0), None, down.permute(1, 2, 0), None,
        E=gate_up.shape[0], stream_id=torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else 0,
        activation_type=sonicmoe.enums.ActivationType.SWIGLU,
        is_inference_mode_enabled=not torch.is_grad_enabled(), concat_layout=True,
    )
    return out


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _flops(mode, T, H, I, k):
    return (6 if mode == "fwd" else 18) * T * k * H * I


def _build(H, I, E, k, dtype, device, seed):
    """A real Transformers Qwen3MoeSparseMoeBlock with random weights (experts + router),
    allocated directly on `device` in `dtype` (no fp32 or CPU copy of big expert weights)."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(
        hidden_size=H,
        moe_intermediate_size=I,
        intermediate_size=I,
        num_experts=E,
        num_experts_per_tok=k,
        norm_topk_prob=True,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    cfg._experts_implementation = "eager"
    with torch.device("meta"):
        block = Qwen3MoeSparseMoeBlock(cfg)
    block = block.to(dtype).to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        block.experts.gate_up_proj.normal_(0.0, H**-0.5)
        block.experts.down_proj.normal_(0.0, I**-0.5)
        block.gate.weight.normal_(0.0, H**-0.5)  # HF inits it to zeros: all tokens would tie
    return cfg, block


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_burst(fn, device, calls):
    """Milliseconds a call over `calls` back-to-back fn() calls and one sync at the end: each
    call's host time before its first kernel overlaps the previous call's kernels, as in a
    training loop whose host runs ahead of the GPU (only the burst's first call starts on an
    idle GPU). CUDA: events around the burst; CPU: perf_counter."""
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) * 1e3 / calls


def _run_once(fn, device):
    """Milliseconds of one fn() call, started on an idle GPU (the caller synchronised)."""
    return _run_burst(fn, device, 1)


def median_ms(fn, device, warmup=3, iters=10):
    """Median milliseconds of fn() over `iters` calls after `warmup` untimed ones (CUDA events
    around each call on CUDA, perf_counter on the CPU). Shared by the bench scripts."""
    for _ in range(warmup):
        fn()
    _sync(device)
    return statistics.median(_run_once(fn, device) for _ in range(iters))


def _time_interleaved(fns, device, warmup, iters, max_seconds, run=_run_once, calls=1):
    """{name: (median ms, runs)} of each fn, timed round-robin (one run of each in turn),
    so that a change of background load hits every implementation alike. The order is
    shuffled each round (a fixed seed: runs repeat), so that no implementation always runs
    right after the same other one (on the H100 the same kernels timed after HF's and after
    another implementation differed by up to 3% at small T: the host time before a step's
    first kernel). Each gets up to
    `iters` runs (at least 3; fewer once its own runs exceed max_seconds). Warmup stops
    after one run when that run alone takes over a second. `run(fn, device)` times one run
    (default: one call, _run_once; _run_burst for the steady-state figures), in ms a call over
    the `calls` calls it makes (what max_seconds counts)."""
    for fn in fns.values():
        for _ in range(warmup):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if time.perf_counter() - t0 > 1.0:
                break
    _sync(device)
    times = {name: [] for name in fns}
    order = random.Random(0)
    while True:
        active = [n for n in fns if len(times[n]) < iters and
                  (len(times[n]) < 3 or sum(times[n]) * calls < max_seconds * 1e3)]
        if not active:
            break
        order.shuffle(active)
        for name in active:
            times[name].append(run(fns[name], device))
    return {name: (statistics.median(t), len(t)) for name, t in times.items()}


def _memory(forward, device):
    """CUDA only: (peak extra bytes of one forward+backward, bytes the forward keeps for
    backward beyond its output, peak extra bytes of the forward alone), over the allocation
    baseline just before the call. The gradients it allocates (weights included) count, for
    every implementation alike. "Peak minus the weight grads" is the backward's peak whenever
    the weight grads exist; the forward's own peak is reported beside it, since without
    weight grads (frozen experts) it can be the larger."""
    if device.type != "cuda":
        return None, None, None
    _sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out, backward = forward()
    _sync(device)
    fwd_peak = torch.cuda.max_memory_allocated(device) - base
    kept = torch.cuda.memory_allocated(device) - base - out.numel() * out.element_size()
    backward(out)
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return int(peak), int(kept), int(fwd_peak)


def _rel_err(a, b):
    """max |a - b| / max |b|, in float32, chunked along dim 0 (the tensors can be GBs)."""
    num = den = 0.0
    step = max(1, (1 << 26) // max(1, b[0].numel()))
    for i in range(0, b.shape[0], step):
        aa, bb = a[i : i + step].float(), b[i : i + step].float()
        num = max(num, float((aa - bb).abs().max()))
        den = max(den, float(bb.abs().max()))
    return num / max(den, 1e-30)


def run_shape(name, tokens, args, device, dtype, log, sonicmoe=None):
    """All token counts of one shape, on one block (weights built once)."""
    from moe_fused import moe_experts

    H, I, E, k = SHAPES[name] if name in SHAPES else _parse_shape(name)
    cfg, block = _build(H, I, E, k, dtype, device, seed=args.seed)
    experts = block.experts
    params = [experts.gate_up_proj, experts.down_proj]
    results = []
    for T in tokens:
        log(f"\n{name} (H={H}, I={I}, E={E}, k={k}), T={T}:")
        results += _run_tokens(name, T, H, I, E, k, cfg, block, params, moe_experts, args, device, dtype, log,
                               sonicmoe)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del block, experts, params
    return results


_ERR_NAMES = ("out", "d_hidden", "d_weights", "d_gate_up", "d_down")


def _run_tokens(name, T, H, I, E, k, cfg, block, params, moe_experts, args, device, dtype, log, sonicmoe=None):
    experts = block.experts
    g = torch.Generator(device="cpu").manual_seed(args.seed + T)
    hidden = torch.randn(T, H, generator=g).to(device=device, dtype=dtype)
    with torch.no_grad():
        _, top_k_weights, top_k_index = block.gate(hidden)
    grad_out = torch.randn(T, H, generator=g).to(device=device, dtype=dtype)
    counts = torch.bincount(top_k_index.reshape(-1).cpu(), minlength=E)
    x_leaf = hidden.detach().clone().requires_grad_(True)
    w_leaf = top_k_weights.detach().clone().requires_grad_(True)
    shape = dict(shape=name, T=T, H=H, I=I, E=E, k=k)
    # SonicMoE: the token of each (token, slot) pair, pairs token-major like top_k_index.reshape(-1)
    token_idx = torch.arange(T, device=device, dtype=torch.int32).repeat_interleave(k)

    def call(impl, x, w):
        if impl in OURS:  # moe_fused-portable / -windows: the caller holds impl_env(impl)
            return moe_experts(x, top_k_index, w, experts.gate_up_proj, experts.down_proj)
        if impl == "sonicmoe":
            return _sonic_call(sonicmoe, x, top_k_index, w, experts.gate_up_proj, experts.down_proj, token_idx)
        cfg._experts_implementation = impl[len("hf-"):]
        return experts(x, top_k_index, w)

    def clear():
        for t in params + [x_leaf, w_leaf]:
            t.grad = None

    def grads():
        return [t.grad for t in (x_leaf, w_leaf, *params)]

    results = []
    reference = None  # (impl, [out, d_hidden, d_weights, d_gate_up, d_down]) of the first HF path
    fused_values = None  # moe_fused's, kept only to check sonicmoe against it
    errors = {}  # impl -> {"vs": reference impl, name: max rel err}
    errors_vs_fused = {}  # sonicmoe -> {...} against moe_fused
    first_ms = {}  # impl -> (first fwd+bwd ms, first no-grad fwd ms or None) at this shape and T
    running = []
    for impl in args.impls:
        skip = None
        if impl == "hf-eager" and args.eager_max_tokens and T > args.eager_max_tokens:
            skip = f"hf-eager at T={T} SKIPPED (--eager-max-tokens={args.eager_max_tokens}; pass 0 to run it)"
        elif impl == "sonicmoe" and not sonic_selected(args.sonic_shapes, name, T):
            skip = f"sonicmoe at {name} T={T} SKIPPED (not in --sonic-shapes {' '.join(args.sonic_shapes)})"
        if skip:
            log(f"  {skip}")
            for mode in ("fwd", "fwd+bwd"):
                results.append(dict(shape, impl=impl, mode=mode, skipped=skip))
            continue
        try:
            # values and gradients once: the reference (first HF path) or compared with it.
            # This is also the first call at this shape and T: its wall time is reported
            # (SonicMoE JIT-compiles here; its no-grad forward is another kernel, timed too).
            clear()
            _sync(device)
            t0 = time.perf_counter()
            with impl_env(impl):
                out = call(impl, x_leaf, w_leaf)
                out.backward(grad_out)
            _sync(device)
            t_first = (time.perf_counter() - t0) * 1e3
            t_first_fwd = None
            if impl == "sonicmoe":
                t0 = time.perf_counter()
                with torch.no_grad():
                    call(impl, hidden, top_k_weights)
                _sync(device)
                t_first_fwd = (time.perf_counter() - t0) * 1e3
                log(f"  sonicmoe first call at this shape and T (JIT compile included): fwd+bwd "
                    f"{t_first / 1e3:.2f} s, then no-grad fwd {t_first_fwd / 1e3:.2f} s")
            first_ms[impl] = (t_first, t_first_fwd)
            values = [out.detach()] + grads()
            del out
            if reference is None and impl.startswith("hf-"):
                reference = (impl, values)
            elif not impl.startswith("hf-"):
                if reference is not None:
                    errors[impl] = {"vs": reference[0], **{n: _rel_err(a, b) for n, a, b in zip(_ERR_NAMES, values, reference[1])}}
                    log(f"  max |{impl} - {reference[0]}| / max|{reference[0]}|: "
                        + ", ".join(f"{n} {errors[impl][n]:.2e}" for n in _ERR_NAMES))
                if impl == "sonicmoe" and fused_values is not None:
                    errors_vs_fused[impl] = {"vs": "moe_fused", **{n: _rel_err(a, b) for n, a, b in zip(_ERR_NAMES, values, fused_values)}}
                    log("  max |sonicmoe - moe_fused| / max|moe_fused|: "
                        + ", ".join(f"{n} {errors_vs_fused[impl][n]:.2e}" for n in _ERR_NAMES))
                if impl == "moe_fused" and "sonicmoe" in args.impls and sonic_selected(args.sonic_shapes, name, T):
                    fused_values = values
            del values
            running.append(impl)
        except Exception as exc:  # one failing implementation must not hide the others
            msg = f"{impl} FAILED: {type(exc).__name__}: {str(exc)[:300]}"
            log(f"  {msg}")
            for mode in ("fwd", "fwd+bwd"):
                results.append(dict(shape, impl=impl, mode=mode, error=msg))
        clear()
    del reference, fused_values

    def fwd(impl):
        def run():
            with impl_env(impl), torch.no_grad():
                return call(impl, hidden, top_k_weights)

        return run

    def fwd_bwd(impl):
        def run():
            clear()
            with impl_env(impl):
                call(impl, x_leaf, w_leaf).backward(grad_out)

        return run

    def forward_for_memory(impl):
        def run():
            out = call(impl, x_leaf, w_leaf)
            return out, lambda o: o.backward(grad_out)

        return run

    for mode, make in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        timed = _time_interleaved({impl: make(impl) for impl in running}, device, args.warmup, args.iters, args.max_seconds)
        clear()
        steady = {}
        if args.burst:  # the supplementary steady-state figure: bursts of back-to-back calls
            steady = _time_interleaved({impl: make(impl) for impl in running}, device, 0, args.burst_rounds,
                                       args.max_seconds, run=lambda fn, dev: _run_burst(fn, dev, args.burst),
                                       calls=args.burst)
            clear()
        for impl in running:
            ms, n = timed[impl]
            rec = dict(shape, impl=impl, mode=mode, ms=ms, runs=n,
                       tflops=_flops(mode, T, H, I, k) / (ms * 1e-3) / 1e12)
            if impl in steady:
                rec.update(ms_steady=steady[impl][0], steady_calls=args.burst, steady_rounds=steady[impl][1])
            t_first, t_first_fwd = first_ms.get(impl, (None, None))
            if mode == "fwd+bwd" and t_first is not None:
                rec["first_call_ms"] = t_first
            if mode == "fwd" and t_first_fwd is not None:
                rec["first_call_ms"] = t_first_fwd
            mem = f"  steady {rec['ms_steady']:8.3f} ms" if "ms_steady" in rec else ""
            if mode == "fwd+bwd" and device.type == "cuda":
                with impl_env(impl):
                    peak, kept, fwd_peak = _memory(forward_for_memory(impl), device)
                clear()
                wg = sum(p.numel() * p.element_size() for p in params)
                rec.update(peak_extra_bytes=peak, saved_bytes=kept, weight_grad_bytes=wg,
                           peak_extra_without_weight_grads_bytes=peak - wg,
                           forward_peak_extra_bytes=fwd_peak)
                mem += (f"  peak +{peak / 2**20:9.1f} MiB (without the weight grads "
                       f"+{(peak - wg) / 2**20:9.1f}; forward alone +{fwd_peak / 2**20:9.1f})  "
                       f"saved {kept / 2**20:9.1f} MiB")
            results.append(rec)
            log(f"  {impl:18s} {mode:8s} {ms:10.3f} ms  {rec['tflops']:8.3f} TFLOP/s  ({n} runs){mem}")

    # ratios: time of each other path / time of this one (> 1 means this one is faster),
    # for moe_fused (keys as before), each other moe_fused variant and sonicmoe
    for impl in OURS + ("sonicmoe",):
        ours = {r["mode"]: r for r in results if r["impl"] == impl and "ms" in r}
        for r in results:
            if r["impl"] != impl and "ms" in r and r["mode"] in ours:
                o = ours[r["mode"]]
                o[f"speedup_vs_{r['impl']}"] = r["ms"] / o["ms"]
                if "ms_steady" in r and "ms_steady" in o:
                    o[f"steady_speedup_vs_{r['impl']}"] = r["ms_steady"] / o["ms_steady"]
                for key, label in (("peak_extra_bytes", "peak_mem_ratio"),
                                   ("peak_extra_without_weight_grads_bytes", "peak_mem_without_weight_grads_ratio")):
                    if r.get(key) and o.get(key) is not None:
                        o[f"{label}_vs_{r['impl']}"] = o[key] / r[key]
                if r.get("saved_bytes") and o.get("saved_bytes") is not None:
                    o[f"saved_ratio_vs_{r['impl']}"] = o["saved_bytes"] / r["saved_bytes"]
        for o in ours.values():
            if impl in errors:
                o["max_rel_err"] = errors[impl]
            if impl in errors_vs_fused:
                o["max_rel_err_vs_moe_fused"] = errors_vs_fused[impl]
    log(f"  routing: tokens per expert min {int(counts.min())} max {int(counts.max())}, "
        f"{int((counts == 0).sum())} experts with none")
    return results


def _parse_shape(s):
    try:
        H, I, E, k = (int(v) for v in s.split("x"))
        return H, I, E, k
    except ValueError:
        raise SystemExit(f"unknown shape {s!r}: use one of {', '.join(SHAPES)} or HxIxExk (e.g. 1024x384x64x8)")


def _present(results):
    """The implementations in `results`, in ALL_IMPLS order."""
    have = {r["impl"] for r in results}
    return [i for i in ALL_IMPLS if i in have]


def _table(results):
    impls = _present(results) or IMPLS
    lines = []
    widths = {i: max(17, len(i) + 3) for i in impls}
    # speedup columns: (label, impl whose row holds the key, key)
    sp_cols = [("moe_fused speedup vs eager / grouped_mm", "moe_fused", ("speedup_vs_hf-eager", "speedup_vs_hf-grouped_mm"))]
    if "moe_fused-portable" in impls:
        sp_cols.append(("portable vs grouped_mm", "moe_fused-portable", ("speedup_vs_hf-grouped_mm",)))
    if "moe_fused-windows" in impls:
        sp_cols.append(("windows vs grouped_mm", "moe_fused-windows", ("speedup_vs_hf-grouped_mm",)))
    if "moe_fused-nopdl" in impls:
        sp_cols.append(("moe_fused vs nopdl", "moe_fused", ("speedup_vs_moe_fused-nopdl",)))
    if "sonicmoe" in impls:
        sp_cols.append(("sonicmoe vs grouped_mm", "sonicmoe", ("speedup_vs_hf-grouped_mm",)))
        sp_cols.append(("moe_fused vs sonicmoe", "moe_fused", ("speedup_vs_sonicmoe",)))
    hdr = (f"{'shape':12s} {'T':>6s} {'mode':8s} " + " ".join(f"{i + ' ms':>{widths[i]}s}" for i in impls)
           + "   " + " | ".join(label for label, _, _ in sp_cols))
    lines.append(hdr)
    lines.append("-" * len(hdr))
    keys = sorted({(r["shape"], r["T"], r["mode"]) for r in results}, key=lambda x: (x[0], x[1], x[2] != "fwd"))
    for shape, T, mode in keys:
        row = {r["impl"]: r for r in results if (r["shape"], r["T"], r["mode"]) == (shape, T, mode)}
        cells = []
        for impl in impls:
            r = row.get(impl)
            w = widths[impl]
            cells.append(f"{r['ms']:{w}.3f}" if r and "ms" in r else f"{('skipped' if r and 'skipped' in r else 'failed' if r and 'error' in r else '-'):>{w}s}")
        sps = []
        for label, impl, sp_keys in sp_cols:
            o = row.get(impl, {})
            sps.append(f"{' / '.join(f'{o[key]:.2f}x' if key in o else '-' for key in sp_keys):>{len(label)}s}")
        lines.append(f"{shape:12s} {T:6d} {mode:8s} " + " ".join(cells) + "   " + " | ".join(sps))
    steady = [r for r in results if "ms_steady" in r]
    if steady:
        lines.append("")
        st_impls = [i for i in impls if any(r["impl"] == i for r in steady)]
        calls = steady[0]["steady_calls"]
        hdr = (f"{'shape':12s} {'T':>6s} {'mode':8s} steady state, ms a call in bursts of {calls} back-to-back "
               "calls, one sync (the host runs ahead, as in training; above, every call starts on an idle "
               "GPU): " + ", ".join(st_impls) + "; moe_fused vs grouped_mm")
        lines.append(hdr)
        lines.append("-" * len(hdr))
        for shape, T, mode in sorted({(r["shape"], r["T"], r["mode"]) for r in steady},
                                     key=lambda x: (x[0], x[1], x[2] != "fwd")):
            row = {r["impl"]: r for r in steady if (r["shape"], r["T"], r["mode"]) == (shape, T, mode)}
            cells = [f"{row[i]['ms_steady']:10.3f}" if i in row else f"{'-':>10s}" for i in st_impls]
            sp = row.get("moe_fused", {}).get("steady_speedup_vs_hf-grouped_mm")
            lines.append(f"{shape:12s} {T:6d} {mode:8s} " + " ".join(cells)
                         + (f"   {sp:.2f}x" if sp is not None else "   -"))
    mem = [r for r in results if r.get("peak_extra_bytes") is not None]
    if mem:
        lines.append("")
        mem_impls = [i for i in impls if any(r["impl"] == i for r in mem)]
        hdr = (f"{'shape':12s} {'T':>6s} peak extra MiB, fwd+bwd without weight grads / forward alone / "
               "saved for backward: " + ", ".join(mem_impls))
        lines.append(hdr)
        lines.append("-" * len(hdr))
        for shape, T in sorted({(r["shape"], r["T"]) for r in mem}):
            cells = []
            for impl in mem_impls:
                r = [r for r in mem if (r["shape"], r["T"], r["impl"]) == (shape, T, impl)]
                cells.append(f"{r[0]['peak_extra_without_weight_grads_bytes'] / 2**20:9.1f} / "
                             f"{r[0].get('forward_peak_extra_bytes', 0) / 2**20:9.1f} / {r[0]['saved_bytes'] / 2**20:9.1f}"
                             if r else f"{'-':>33s}")
            lines.append(f"{shape:12s} {T:6d} " + "   ".join(cells))
    first = [r for r in results if r.get("first_call_ms") is not None and r["mode"] == "fwd+bwd"]
    if first:
        lines.append("")
        first_impls = [i for i in impls if any(r["impl"] == i for r in first)]
        hdr = (f"{'shape':12s} {'T':>6s} first fwd+bwd at this shape and T, in this process, ms "
               "(sonicmoe: JIT compile included; the timed figure in brackets): " + ", ".join(first_impls))
        lines.append(hdr)
        lines.append("-" * len(hdr))
        for shape, T in sorted({(r["shape"], r["T"]) for r in first}):
            cells = []
            for impl in first_impls:
                r = [r for r in first if (r["shape"], r["T"], r["impl"]) == (shape, T, impl)]
                cells.append(f"{r[0]['first_call_ms']:10.1f} ({r[0]['ms']:8.3f})" if r else f"{'-':>21s}")
            lines.append(f"{shape:12s} {T:6d} " + "   ".join(cells))
    return "\n".join(lines)


def _plot(results, path, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        return f"no plot ({exc})"
    impls = _present(results) or IMPLS
    modes = ["fwd", "fwd+bwd"]
    groups = sorted({(r["shape"], r["T"]) for r in results})
    fig, axes = plt.subplots(1, 2, figsize=(max(8, (0.75 * len(impls) + 0.7) * len(groups) + 3), 4.5))
    width = 0.8 / len(impls)
    for ax, mode in zip(axes, modes):
        for i, impl in enumerate(impls):
            ys = []
            for shape, T in groups:
                r = [r for r in results if (r["shape"], r["T"], r["mode"], r["impl"]) == (shape, T, mode, impl)]
                ys.append(r[0].get("tflops", 0.0) if r else 0.0)
            ax.bar([j + (i - (len(impls) - 1) / 2) * width for j in range(len(groups))], ys, width, label=impl)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{s}\nT={T}" for s, T in groups], fontsize=8)
        ax.set_ylabel("effective TFLOP/s")
        ax.set_title(mode)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="moe-fused bench",
        description="Experts layer forward and forward+backward: moe-fused vs Transformers v5 "
        "(eager, grouped_mm) on identical weights, inputs and routing.",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--shapes", nargs="+", help=f"presets {', '.join(SHAPES)} or HxIxExk "
                   "(default: 30b-a3b-cpu on cpu; 30b-a3b 235b-a22b on cuda)")
    p.add_argument("--tokens", "-T", nargs="+", type=int, help="token counts (default: 256 1024 4096 on cpu; 512 4096 16384 on cuda)")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--impls", nargs="+", choices=ALL_IMPLS,
                   help=f"default: {' '.join(IMPLS)} (cuda: + {' '.join(CUDA_EXTRA)}; + sonicmoe with --sonic-shapes)")
    p.add_argument("--sonic-shapes", nargs="+", metavar="SHAPE[:T]",
                   help="run SonicMoE (CUDA, if importable) at these points only: 'all', a shape (every T) "
                   "or shape:T, e.g. 30b-a3b:16384. Its first call per shape JIT-compiles (10-90 s), "
                   "timed apart and reported. Default: SonicMoE off, unless --impls names it (then everywhere)")
    p.add_argument("--warmup", type=int, help="default: 1 on cpu, 3 on cuda")
    p.add_argument("--iters", type=int, help="timed runs per measurement (default: 5 on cpu, 20 on cuda)")
    p.add_argument("--max-seconds", type=float, default=10.0, help="stop a measurement after this many seconds (>= 3 runs)")
    p.add_argument("--burst", type=int,
                   help="also time bursts of this many back-to-back calls with one sync (steady state, "
                   "reported beside the main figures; default: 8 on cuda, 0 = off on cpu)")
    p.add_argument("--burst-rounds", type=int, default=5, help="bursts per implementation (median; default 5)")
    p.add_argument("--eager-max-tokens", type=int, default=0,
                   help="skip hf-eager above this T (it is slow); 0 = never skip. Skips are printed and saved.")
    p.add_argument("--index-check", action="store_true",
                   help="CUDA: keep moe_fused's host-side expert-index range check (one sync per call) on while timing")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results", help="folder for the JSON and PNG (default bench/results)")
    p.add_argument("--name", help="file stem (default layer_<device>_<dtype>)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    for spec in args.sonic_shapes or []:
        t = spec.partition(":")[2]
        if t and not t.isdigit():
            p.error(f"--sonic-shapes {spec!r}: T must be an integer (SHAPE:T)")
    impls = args.impls or (IMPLS + CUDA_EXTRA if args.device == "cuda" else list(IMPLS))
    if args.sonic_shapes and "sonicmoe" not in impls:
        impls = impls + ["sonicmoe"]
    args.impls = [i for i in ALL_IMPLS if i in impls]  # HF paths first (the reference), then moe_fused, ...
    d = DEFAULTS[args.device]
    args.shapes = args.shapes or d["shapes"]
    args.tokens = args.tokens or d["tokens"]
    args.dtype = args.dtype or d["dtype"]
    args.warmup = args.warmup if args.warmup is not None else (1 if args.device == "cpu" else 3)
    args.iters = args.iters or (5 if args.device == "cpu" else 20)
    args.burst = args.burst if args.burst is not None else (0 if args.device == "cpu" else 8)
    if args.burst < 0 or args.burst_rounds < 1:
        p.error("--burst must be >= 0 and --burst-rounds >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import moe_fused

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("moe-fused bench: --device cuda but torch sees no CUDA GPU", file=sys.stderr)
            return 2
        device = torch.device("cuda", torch.cuda.current_device())
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    try:
        import transformers
    except ImportError:
        print("moe-fused bench needs Hugging Face transformers >= 5 (pip install 'moe-fused[hf]')", file=sys.stderr)
        return 2
    from moe_fused import _lib

    lines = []

    def log(s=""):
        print(s, flush=True)
        lines.append(s)

    sonicmoe = None
    if device.type != "cuda":
        dropped = [i for i in EXTRA_IMPLS if i in args.impls]
        if dropped:
            log(f"note: {', '.join(dropped)} SKIPPED: CUDA only (this run is on {device.type})")
        args.impls = [i for i in args.impls if i not in EXTRA_IMPLS]
    elif "sonicmoe" in args.impls:
        if dtype not in (torch.bfloat16, torch.float16):
            log(f"sonicmoe: SKIPPED, it takes bfloat16 / float16, not {args.dtype}")
        else:
            sonicmoe = _load_sonicmoe(log)
        if sonicmoe is None:
            args.impls.remove("sonicmoe")
    if "sonicmoe" in args.impls:
        for spec in args.sonic_shapes or []:
            if spec != "all" and spec.partition(":")[0] not in args.shapes:
                log(f"WARNING: --sonic-shapes {spec}: shape not among --shapes {' '.join(args.shapes)}")
    if "moe_fused-portable" in args.impls:
        cc = torch.cuda.get_device_capability(device)
        if cc != (9, 0):
            log(f"note: compute capability {cc[0]}.{cc[1]} is not 9.0: moe_fused and moe_fused-portable "
                "run the same (portable) kernels here")
    for var, val in ((PORTABLE_ENV, "1"), ("MOE_FUSED_SM90", "0")):
        if os.environ.get(var) == val and any(i == "moe_fused" for i in args.impls):
            log(f"WARNING: {var}={val} is set in the environment: the moe_fused rows run the portable kernels too")
    if any(i in OURS for i in args.impls):
        try:
            _lib.lib()  # a missing library is reported here, once
        except _lib.LibraryLoadError as exc:
            print(f"moe-fused bench: {exc}", file=sys.stderr)
            return 2
    env = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)",
        torch=torch.__version__, transformers=transformers.__version__, moe_fused=moe_fused.__version__,
        dtype=args.dtype, threads=torch.get_num_threads(), library=_lib.library_path(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    if sonicmoe is not None:
        env["sonicmoe"] = getattr(sonicmoe, "__version__", "?")
    log(f"moe-fused bench: experts layer, {args.dtype}, {env['device']}, torch {env['torch']}, "
        f"transformers {env['transformers']}, {env['threads']} threads"
        + (f", sonicmoe {env['sonicmoe']}" if "sonicmoe" in env else ""))
    log("flops: fwd 6*T*k*H*I, fwd+bwd 18*T*k*H*I; times are medians; speedup = HF time / moe_fused time")
    log("implementations: " + ", ".join(args.impls))
    index_check = contextlib.nullcontext()
    if device.type == "cuda" and not args.index_check:
        # Like HF's paths, which validate no index: the check's host sync would also stall
        # the launch queue inside the timed region. (--index-check turns it back on.) Only
        # for the runs: the caller's setting comes back after them.
        from moe_fused.ops import cuda_index_check

        index_check = cuda_index_check(False)
        log("note: moe_fused's host-side index range check (a sync) is off, as HF's paths have none; --index-check times it")
    if args.eager_max_tokens:
        log(f"NOTE: hf-eager is skipped above T={args.eager_max_tokens} (--eager-max-tokens)")
    results = []
    t_start = time.perf_counter()
    with index_check:
        for shape in args.shapes:
            results += run_shape(shape, args.tokens, args, device, dtype, log, sonicmoe)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    log("\n" + _table(results))
    log(f"\ntotal {time.perf_counter() - t_start:.0f} s")

    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"layer_{args.device}_{args.dtype}"
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(dict(env=env, args={k: v for k, v in vars(args).items()}, results=results), indent=1))
    saved = [str(json_path)]
    if not args.no_plot:
        saved.append(_plot(results, out_dir / f"{stem}.png", f"moe-fused experts layer, {args.dtype}, {env['device']}"))
    print("saved: " + ", ".join(saved))
    failed = [r for r in results if "error" in r and r["impl"] in OURS]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
