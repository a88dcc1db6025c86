#!/usr/bin/env python3
"""Per-GEMM benchmark of the experts layer (issue 5's per-GEMM target): every GEMM of
moe_fused's forward+backward, measured alone, against torch._grouped_mm on the same problem.

    python bench/bench_gemms.py                                   # CUDA: 30b-a3b, 235b-a22b x T 4096 16384
    python bench/bench_gemms.py --shapes 30b-a3b -T 4096 --paths moe_fused
    python bench/bench_gemms.py --device cpu                      # CPU dry run: plan, torch side, check

The six GEMMs (n = T*k (token, slot) pairs sorted by expert; per expert e its rows):

    GEMM1  h = x W1[e]^T       [n,H]  x [E,H,2I] -> [n,2I]   (ours: x rows gathered, SwiGLU epilogue)
    GEMM2  y = a W2[e]^T       [n,I]  x [E,I,H]  -> [n,H]    (ours: in token windows at large T)
    dA'    dout W2[e]          [n,H]  x [E,H,I]  -> [n,I]    (ours: dSwiGLU epilogue)
    dX     dh W1[e]            [n,2I] x [E,2I,H] -> [n,H]    (ours: possibly several token windows)
    dW1    dh_e^T x_e          K-grouped         -> [E,2I,H]
    dW2    dout_e^T (s a)_e    K-grouped         -> [E,H,I]

torch side: torch._grouped_mm on operands already gathered and sorted by expert (x[tok],
dout[tok], s*a, ...: the best case for torch; the gathers are not timed), CUDA events,
median of --iters after --warmup. For the 3-D operand both layouts are timed (the one HF's
grouped_mm path / autograd uses, and the other, materialised beforehand) and the faster is
compared; for the K-grouped ones, A as autograd passes it (a transposed view) and A
materialised row-major. A --check pass (default on) composes the layer forward+backward from
exactly these problems at a small T and compares it with moe_fused, so a wrong operand shows.

our side: one moe_fused.moe_experts forward+backward per torch.profiler window (CUDA
activity), --steps windows; each CUDA kernel is attributed to a GEMM by its name (template
arguments) and launch order (row GEMMs: EPI 1 = GEMM1, EPI 0 + B_KN/B_MN false = GEMM2,
EPI 2 = dA', EPI 0 + true = dX, summed over its launches; wgrad: first launch dW2, second
dW1), median over windows. Every other kernel (plan, combine, ...) is listed with its time,
never dropped. These steps run with kernel chaining off (MOE_FUSED_PDL=0): with it each
kernel starts during the previous one's last wave, waits there, and its profiled time would
include that wait (the fwd+bwd figure is timed with the default, chaining on;
--chained-profile keeps it on, to read those waits). Both paths: moe_fused (sm90a kernels
where they apply) and moe_fused-portable (MOE_FUSED_PORTABLE=1 around its calls).
Speedup = torch ms / ours ms: >= 1 meets the target. JSON to --out/gemms_<device>.json.

Same work: GEMM1 and dA' write more than torch's GEMM does (GEMM1: h and a = SwiGLU(h);
dA': dh, s*a and the routing-weight gradient's partials, from h read back), so beside the bare
GEMM each of them is also compared with torch's GEMM plus the bytes an unfused epilogue must
move after it (its GEMM output read back, the other inputs, the extra outputs: epilogue_bytes)
at the device's copy rate (a large tensor copy, timed here). A GEMM followed by an unfused
epilogue kernel takes at least that sum: a lower bound on torch doing the fused kernel's work.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import pathlib
import platform
import re
import statistics
import sys
import time

import torch

if importlib.util.find_spec("moe_fused") is None:  # source checkout, not installed
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "python"))

# name -> (H, I, E, k)
SHAPES = {"30b-a3b": (2048, 768, 128, 8), "235b-a22b": (4096, 1536, 128, 8)}
DEFAULTS = {
    "cuda": dict(shapes=["30b-a3b", "235b-a22b"], tokens=[4096, 16384], dtype="bfloat16"),
    "cpu": dict(shapes=["256x128x16x4"], tokens=[512], dtype="float32"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GEMMS = ("GEMM1", "GEMM2", "dA'", "dX", "dW1", "dW2")
# flops of each GEMM in units of 2*n*H*I (n = T*k): sums to 9, i.e. 18*n*H*I for the layer
FLOP_UNITS = {"GEMM1": 2, "GEMM2": 1, "dA'": 1, "dX": 2, "dW1": 2, "dW2": 1}
PATHS = ("moe_fused", "moe_fused-portable")


def epilogue_bytes(gemm: str, n: int, I: int, esize: int) -> int:
    """Bytes an unfused epilogue moves after torch's GEMM to produce what our fused GEMM
    writes, for n rows and elements of esize bytes; 0 for the GEMMs whose output is torch's.
    GEMM1: read h [n,2I], write a [n,I]. dA': read dA [n,I], h [n,2I] and s [n], write dh
    [n,2I], s*a [n,I] and the routing-weight gradient [n] (fp32)."""
    if gemm == "GEMM1":
        return n * 3 * I * esize
    if gemm == "dA'":
        return n * (6 * I * esize + esize + 4)
    return 0


# ---- kernel name -> GEMM (pure Python: tested on the CPU in tests/test_bench_tools.py) ----------

# row-grouped GEMM kernels: template <T, int EPI, bool B_KN (portable) / B_MN (sm90)>
_ROW_KERNELS = {"grouped_gemm_kernel": "portable", "row_gemm_sm90": "sm90"}
_GEMM1_KERNELS = {"gemm1_swiglu_sm90": "sm90"}  # old name of the sm90 GEMM1 (EPI fixed)
_WGRAD_KERNELS = {"wgrad_kernel": "portable", "wgrad_sm90": "sm90"}
_BASES = {**_ROW_KERNELS, **_GEMM1_KERNELS, **_WGRAD_KERNELS}


def normalize_kernel_name(name: str) -> str:
    """Demangled kernel name without `(anonymous namespace)::` and with single spaces."""
    name = re.sub(r"\(anonymous namespace\)::", "", name)
    name = re.sub(r"`anonymous namespace'::", "", name)
    return re.sub(r"\s+", " ", name).strip()


def _template_args(name: str, start: int) -> list[str] | None:
    """The top-level template arguments of the `<...>` that opens at name[start]."""
    if start >= len(name) or name[start] != "<":
        return None
    depth, args, cur = 0, [], []
    for ch in name[start:]:
        if ch in "<(":
            depth += 1
            if depth == 1 and ch == "<":
                continue
        elif ch in ">)":
            depth -= 1
            if depth == 0:
                args.append("".join(cur).strip())
                return args
        elif ch == "," and depth == 1:
            args.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    return None  # unbalanced (truncated name)


def _int_arg(a: str) -> int | None:
    """A non-type template argument as an int: 1, (moe::cuda::Epilogue)1, 1u, true/false, (bool)0."""
    a = a.strip()
    if a in ("true", "false"):
        return int(a == "true")
    for enum_name, v in (("EPI_STORE", 0), ("EPI_SWIGLU", 1), ("EPI_DSWIGLU", 2), ("EPI_SWIGLU_A", 3)):
        if a.endswith(enum_name):
            return v
    m = re.search(r"(-?\d+)[uUlL]*\s*$", a)
    return int(m.group(1)) if m else None


def classify_kernel(name: str) -> tuple[str | None, str | None]:
    """(label, path) of one CUDA kernel of moe_fused: label one of GEMM1, GEMM2, dA', dX,
    "wgrad" (dW1 / dW2: told apart by launch order) or None (not a GEMM of the layer, or a
    GEMM kernel whose template arguments cannot be read: then path is set and label None);
    path "sm90" or "portable" for moe_fused's GEMM kernels, else None."""
    n = normalize_kernel_name(name)
    for base, path in _BASES.items():
        m = re.search(r"\b" + base + r"\b", n)
        if m:
            if base in _WGRAD_KERNELS:
                return "wgrad", path
            if base in _GEMM1_KERNELS:
                return "GEMM1", path
            args = _template_args(n, m.end())
            if args is None or len(args) < 3:
                return None, path
            epi, b = _int_arg(args[1]), _int_arg(args[2])
            return _row_label(epi, b), path
        # mangled (demangling failed): ...row_gemm_sm90I13__nv_bfloat16Li1ELb0EE...
        m = re.search(base + r"I.*?Li(-?\d+)ELb([01])E", name)
        if m:
            if base in _WGRAD_KERNELS:
                return "wgrad", path
            if base in _GEMM1_KERNELS:
                return "GEMM1", path
            return _row_label(int(m.group(1)), int(m.group(2))), path
        if base in name:  # mangled without readable template arguments
            if base in _WGRAD_KERNELS:
                return "wgrad", path
            if base in _GEMM1_KERNELS:
                return "GEMM1", path
            return None, path
    return None, None


def wgrad_hint(name: str) -> str | None:
    """dW1 / dW2 from the template arguments of wgrad_sm90<T, GP, TR> (TR: the output written
    transposed, as for dW1 = (x^T dh)^T; dW2 has TR false), or None when they are absent or
    unreadable (the portable wgrad_kernel<T>). Used only to cross-check the launch order."""
    n = normalize_kernel_name(name)
    m = re.search(r"\bwgrad_sm90\b", n)
    if m:
        args = _template_args(n, m.end())
        tr = _int_arg(args[2]) if args and len(args) >= 3 else None
    else:
        m = re.search(r"wgrad_sm90I.*?Lb([01])ELb([01])E", name)
        tr = int(m.group(2)) if m else None
    return None if tr not in (0, 1) else ("dW1" if tr else "dW2")


def _row_label(epi, b):
    if epi in (1, 3):  # EPI_SWIGLU_A (3): the no-grad forward's GEMM1, storing a alone
        return "GEMM1"
    if epi == 2:
        return "dA'"
    if epi == 0 and b == 0:
        return "GEMM2"
    if epi == 0 and b == 1:
        return "dX"
    return None


def attribute_step(events) -> dict:
    """Kernels of ONE forward+backward, [(name, start_us, duration_us)] in any order, ->
    {"gemms": {GEMM: {"ms", "launches", "paths", "kernels"}}, "other": {name: {"ms", "launches"}},
     "unattributed": {name: {"ms", "launches", "why"}}, "warnings": [...]}.
    wgrad launches in start order: the 1st is dW2, the 2nd dW1 (the backward's order); more
    or fewer than 2 is reported in warnings and the extra ones go to unattributed."""
    gemms, other, unattributed, warnings = {}, {}, {}, []

    def add(d, key, name, dur, **extra):
        e = d.setdefault(key, {"ms": 0.0, "launches": 0, **extra})
        e["ms"] += dur / 1e3
        e["launches"] += 1
        if "kernels" in e and name not in e["kernels"]:
            e["kernels"].append(name)
        return e

    n_wgrad = 0
    for name, _start, dur in sorted(events, key=lambda e: e[1]):
        label, path = classify_kernel(name)
        if label == "wgrad":
            n_wgrad += 1
            label = {1: "dW2", 2: "dW1"}.get(n_wgrad)
            if label is None:
                add(unattributed, normalize_kernel_name(name), name, dur, why=f"wgrad launch #{n_wgrad} (expected 2)")
                continue
            hint = wgrad_hint(name)
            if hint is not None and hint != label:
                warnings.append(f"wgrad launch #{n_wgrad} is {label} by launch order, but its template arguments "
                                f"say {hint}: {normalize_kernel_name(name)[:120]}")
        if label is not None:
            e = add(gemms, label, normalize_kernel_name(name), dur, paths=[], kernels=[])
            if path not in e["paths"]:
                e["paths"].append(path)
        elif path is not None:
            add(unattributed, normalize_kernel_name(name), name, dur, why="GEMM kernel with unreadable template arguments")
        else:
            add(other, normalize_kernel_name(name), name, dur)
    if n_wgrad != 2:
        warnings.append(f"{n_wgrad} wgrad launches in one step (expected 2: dW2 then dW1)")
    missing = [g for g in GEMMS if g not in gemms]
    if missing:
        warnings.append("no kernel found for " + ", ".join(missing))
    if "dW1" in gemms and "dW2" in gemms and gemms["dW2"]["ms"] > 1.25 * gemms["dW1"]["ms"]:
        warnings.append(f"dW2 ({gemms['dW2']['ms']:.3f} ms) slower than dW1 ({gemms['dW1']['ms']:.3f} ms) with half "
                        "the flops: is the wgrad launch order still dW2 then dW1?")
    return dict(gemms=gemms, other=other, unattributed=unattributed, warnings=warnings)


def merge_steps(steps: list[dict]) -> dict:
    """Median over profiler windows (one step each) of each GEMM's, other kernel's and
    unattributed kernel's time; launches, paths and kernel names from all windows."""
    def med(key, sub):
        names = []
        for s in steps:
            for n in s[key]:
                if n not in names:
                    names.append(n)
        out = {}
        for n in names:
            vals = [s[key][n]["ms"] if n in s[key] else 0.0 for s in steps]
            first = next(s[key][n] for s in steps if n in s[key])
            e = {"ms": statistics.median(vals), "launches": max(s[key][n]["launches"] for s in steps if n in s[key])}
            for f in sub:
                if f in first:
                    merged = []
                    for s in steps:
                        for v in s[key].get(n, {}).get(f, []):
                            if v not in merged:
                                merged.append(v)
                    e[f] = merged
            if "why" in first:
                e["why"] = first["why"]
            out[n] = e
        return out

    warnings = []
    for s in steps:
        for w in s["warnings"]:
            if w not in warnings:
                warnings.append(w)
    return dict(gemms=med("gemms", ("paths", "kernels")), other=med("other", ()),
                unattributed=med("unattributed", ()), warnings=warnings, windows=len(steps))


def kernel_events(prof) -> list[tuple[str, float, float]]:
    """[(name, start_us, duration_us)] of the device-side events (kernels, memcpy, memset)
    of a finished torch.profiler.profile."""
    from torch.autograd import DeviceType

    out = []
    for ev in prof.events():
        if getattr(ev, "device_type", None) != DeviceType.CUDA:
            continue
        tr = ev.time_range
        out.append((ev.name, float(tr.start), float(tr.end - tr.start)))
    return out


# ---- the problem -------------------------------------------------------------------------------


def _parse_shape(s):
    if s in SHAPES:
        return SHAPES[s]
    try:
        H, I, E, k = (int(v) for v in s.split("x"))
        return H, I, E, k
    except ValueError:
        raise SystemExit(f"unknown shape {s!r}: use one of {', '.join(SHAPES)} or HxIxExk")


def make_inputs(H, I, E, k, T, device, dtype, seed):
    """Random layer inputs: x, softmax top-k routing (weights renormalised), W1 [E,2I,H],
    W2 [E,H,I], dout; generated on `device`."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T, H, device=device, generator=g).to(dtype)
    logits = torch.randn(T, E, device=device, generator=g)
    s, idx = torch.topk(logits.softmax(-1), k)
    s = (s / s.sum(-1, keepdim=True)).to(dtype)
    w1 = (torch.randn(E, 2 * I, H, device=device, generator=g) * H**-0.5).to(dtype)
    w2 = (torch.randn(E, H, I, device=device, generator=g) * I**-0.5).to(dtype)
    dout = torch.randn(T, H, device=device, generator=g).to(dtype)
    return x, idx, s, w1, w2, dout


def make_plan(idx, E):
    """(order, tok, offs): pairs p = t*k + j sorted by expert (stable), the token of each
    sorted pair, and int32 cumulative row offsets per expert (torch._grouped_mm's offs)."""
    k = idx.shape[1]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tok = order // k
    offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
    return order, tok, offs


def torch_layer(x, idx, s, w1, w2, dout, plan):
    """The layer forward+backward composed of the six torch._grouped_mm problems (plus the
    gathers, SwiGLU and its backward in fp32): {"out", "dx", "ds", "dw1", "dw2"} and the
    operands of each GEMM {"GEMM1": (a, b), ...} (the pre-gathered inputs that are timed)."""
    order, tok, offs = plan
    T, k = idx.shape
    I = w2.shape[2]
    gm = torch._grouped_mm
    x_g, dout_g = x[tok], dout[tok]
    s_g = s.reshape(-1)[order].float()[:, None]
    ops = {}
    ops["GEMM1"] = (x_g, w1.transpose(1, 2))
    h = gm(*ops["GEMM1"], offs=offs)
    g_, u = h[:, :I].float(), h[:, I:].float()
    sig = torch.sigmoid(g_)
    a32 = g_ * sig * u
    a = a32.to(x.dtype)
    ops["GEMM2"] = (a, w2.transpose(1, 2))
    y = gm(*ops["GEMM2"], offs=offs)
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, tok, y.float() * s_g)
    ops["dA'"] = (dout_g, w2)
    dA = gm(*ops["dA'"], offs=offs).float()
    ds_sorted = (dA * a.float()).sum(-1)
    ds = torch.empty_like(ds_sorted)
    ds[order] = ds_sorted
    da = dA * s_g
    dg = da * u * sig * (1 + g_ * (1 - sig))
    du = da * g_ * sig
    dh = torch.cat([dg, du], 1).to(x.dtype)
    ops["dX"] = (dh, w1)
    dx_rows = gm(*ops["dX"], offs=offs)
    dx = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    dx.index_add_(0, tok, dx_rows.float())
    ops["dW1"] = (dh.t(), x_g)
    dw1 = gm(*ops["dW1"], offs=offs)
    sa = (a32 * s_g).to(x.dtype)
    ops["dW2"] = (dout_g.t(), sa)
    dw2 = gm(*ops["dW2"], offs=offs)
    res = dict(out=out.to(x.dtype), dx=dx.to(x.dtype), ds=ds.reshape(T, k), dw1=dw1, dw2=dw2)
    return res, ops


def layout_variants(gemm, a, b):
    """{layout name: (a, b)}: the operands as HF / autograd pass them, and the other layout
    of the operand that can be laid out either way (materialised here, outside the timing)."""
    def flip(t):  # same values, the other memory order of the last two dims (a copy)
        if t.stride(-1) == 1:  # row-major -> column-major
            return t.transpose(-2, -1).contiguous().transpose(-2, -1)
        return t.contiguous()  # column-major -> row-major

    if gemm in ("GEMM1", "GEMM2", "dA'", "dX"):
        col = b.stride(-1) != 1
        return {f"B {'col' if col else 'row'}-major (as HF)": (a, b),
                f"B {'row' if col else 'col'}-major (copy)": (a, flip(b))}
    # K-grouped (dW1, dW2): only the layout autograd uses. With A row-major the grouped
    # dimension is the contiguous one, and torch then wants every group's size * 2 bytes to be
    # a multiple of 16 (device-side assert, which poisons the CUDA context: not catchable).
    return {"A col-major (as autograd)": (a, b)}


def problem_str(gemm, H, I):
    return {
        "GEMM1": f"[n,{H}] x [E,{H},{2 * I}] -> [n,{2 * I}]",
        "GEMM2": f"[n,{I}] x [E,{I},{H}] -> [n,{H}]",
        "dA'": f"[n,{H}] x [E,{H},{I}] -> [n,{I}]",
        "dX": f"[n,{2 * I}] x [E,{2 * I},{H}] -> [n,{H}]",
        "dW1": f"[{2 * I},n] x [n,{H}] -> [E,{2 * I},{H}] (K-grouped)",
        "dW2": f"[{H},n] x [n,{I}] -> [E,{H},{I}] (K-grouped)",
    }[gemm]


# ---- timing ------------------------------------------------------------------------------------


def time_ms(fn, device, warmup, iters):
    """Median ms of fn(): CUDA events around each call on CUDA, perf_counter on the CPU."""
    from moe_fused.bench import median_ms

    return median_ms(fn, device, warmup, iters)


def path_env(path):
    from moe_fused.bench import impl_env

    return impl_env(path)


def profile_ours(fb, steps, device):
    """Kernel attribution of `steps` forward+backward steps, one profiler window each."""
    if device.type != "cuda":
        raise RuntimeError("per-kernel attribution needs CUDA (torch.profiler CUDA activity)")
    from torch.profiler import ProfilerActivity, profile

    per_step = []
    for _ in range(steps):
        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fb()
            torch.cuda.synchronize(device)
        evs = kernel_events(prof)
        if not evs:
            raise RuntimeError("torch.profiler recorded no CUDA kernel events (CUPTI unavailable?): "
                               "cannot attribute kernels to GEMMs")
        per_step.append(attribute_step(evs))
    return merge_steps(per_step)


def kernel_ms(fn, device, calls=5):
    """Device time per call of fn() summed over all its kernels (torch.profiler), without
    launch gaps: the same measure as ours, for comparison with the CUDA-event time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize(device)
    evs = kernel_events(prof)
    if not evs:
        raise RuntimeError("torch.profiler recorded no CUDA kernel events (CUPTI unavailable?)")
    return sum(e[2] for e in evs) / calls / 1e3


def copy_rate_gbs(device, dtype, warmup, iters, nbytes=None) -> float:
    """GB/s (bytes read + written) of one large tensor copy on device: the rate a memory-bound
    elementwise kernel can reach at best (default 1 GiB a side on CUDA, 16 MiB on the CPU)."""
    nbytes = nbytes or ((1 << 30) if device.type == "cuda" else (16 << 20))
    esize = torch.empty((), dtype=dtype).element_size()
    src = torch.ones(nbytes // esize, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup, iters)
    return 2 * src.numel() * esize / ms / 1e6


def _rel(a, b):
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check(H, I, E, k, T, device, dtype, seed, paths, log):
    """Compose the layer from the six torch problems at a small T and compare with moe_fused
    (each path): max rel err of out, dx, ds, dW1, dW2. Returns {path: {name: err}}."""
    from moe_fused import moe_experts

    x, idx, s, w1, w2, dout = make_inputs(H, I, E, k, T, device, dtype, seed)
    ref, _ = torch_layer(x, idx, s, w1, w2, dout, make_plan(idx, E))
    res = {}
    for path in paths:
        xl, sl, w1l, w2l = (t.detach().clone().requires_grad_(True) for t in (x, s, w1, w2))
        with path_env(path):
            out = moe_experts(xl, idx, sl, w1l, w2l)
            out.backward(dout)
        got = dict(out=out.detach(), dx=xl.grad, ds=sl.grad, dw1=w1l.grad, dw2=w2l.grad)
        res[path] = {n: _rel(got[n], ref[n]) for n in ref}
        log(f"  check T={T}: max |{path} - torch-composed| / max|torch-composed|: "
            + ", ".join(f"{n} {e:.2e}" for n, e in res[path].items()))
    return res


def run_point(name, T, args, device, dtype, log):
    from moe_fused import moe_experts

    H, I, E, k = _parse_shape(name)
    n = T * k
    rec = dict(shape=name, T=T, H=H, I=I, E=E, k=k, n=n, gemms={}, paths={})
    log(f"\n== {name} (H={H}, I={I}, E={E}, k={k}), T={T}: n = {n} pairs")
    if args.check:
        tol = 3e-2 if dtype != torch.float32 else 1e-4
        errs = check(H, I, E, k, min(T, args.check_tokens), device, dtype, args.seed + 1, args.paths, log)
        rec["check"] = errs
        bad = {p: {n_: e for n_, e in v.items() if not e < tol} for p, v in errs.items()}
        bad = {p: v for p, v in bad.items() if v}
        if bad:
            log(f"  CHECK FAILED (tolerance {tol:g}): {bad}: the torch problems below are not the layer's GEMMs, "
                "or moe_fused is wrong")
            rec["check_failed"] = bad
    x, idx, s, w1, w2, dout = make_inputs(H, I, E, k, T, device, dtype, args.seed)
    plan = make_plan(idx, E)
    counts = torch.diff(plan[2], prepend=torch.zeros(1, dtype=torch.int32, device=device))
    rec["rows_per_expert"] = dict(min=int(counts.min()), max=int(counts.max()), empty=int((counts == 0).sum()))
    with torch.no_grad():
        _, ops = torch_layer(x, idx, s, w1, w2, dout, plan)
    offs = plan[2]
    gm = torch._grouped_mm
    for gemm in GEMMS:
        flop = FLOP_UNITS[gemm] * 2 * n * H * I
        variants, fns, errs = {}, {}, {}
        for lay, (a, b) in layout_variants(gemm, *ops[gemm]).items():
            fns[lay] = lambda a=a, b=b: gm(a, b, offs=offs)
            try:
                variants[lay] = time_ms(fns[lay], device, args.warmup, args.iters)
            except Exception as exc:  # one layout torch refuses must not hide the other
                errs[lay] = f"{type(exc).__name__}: {str(exc)[:200]}"
                log(f"  torch._grouped_mm {gemm} with {lay} FAILED: {errs[lay]}")
        if variants:
            best = min(variants, key=variants.get)
            ms = variants[best]
            t = dict(ms=ms, tflops=flop / ms / 1e9, layout=best, layouts=variants)
            if device.type == "cuda":
                t["kernel_ms"] = kernel_ms(fns[best], device)
        else:
            t = dict(error="; ".join(f"{k_}: {v}" for k_, v in errs.items()))
        ebytes = epilogue_bytes(gemm, n, I, torch.empty((), dtype=dtype).element_size())
        if ebytes and "ms" in t:
            if "copy_gbs" not in rec:
                rec["copy_gbs"] = copy_rate_gbs(device, dtype, args.warmup, args.iters)
            t["epilogue_bytes"] = ebytes
            t["same_work_ms"] = t["ms"] + ebytes / rec["copy_gbs"] / 1e6
        if errs:
            t["layout_errors"] = errs
        del fns
        rec["gemms"][gemm] = dict(problem=problem_str(gemm, H, I), gflop=flop / 1e9, torch=t)
    del ops
    if device.type == "cuda":
        torch.cuda.empty_cache()

    xl, sl, w1l, w2l = (t.detach().clone().requires_grad_(True) for t in (x, s, w1, w2))

    def fb():
        for t in (xl, sl, w1l, w2l):
            t.grad = None
        moe_experts(xl, idx, sl, w1l, w2l).backward(dout)

    for path in args.paths:
        p = {}
        try:
            with path_env(path):
                p["fwd_bwd_ms"] = time_ms(fb, device, args.warmup, args.iters)
                if device.type == "cuda":
                    # Chaining off for the attribution (unless --chained-profile): with it a
                    # kernel starts during the previous one's last wave and its profiled time
                    # includes that wait.
                    from moe_fused.bench import PDL_ENV, env_set

                    with env_set(PDL_ENV, "1" if getattr(args, "chained_profile", False) else "0"):
                        att = profile_ours(fb, args.steps, device)
                else:
                    att = None
        except Exception as exc:
            msg = f"{path} FAILED: {type(exc).__name__}: {str(exc)[:300]}"
            log(f"  {msg}")
            p["error"] = msg
            rec["paths"][path] = p
            continue
        p["fwd_bwd_tflops"] = 18 * n * H * I / p["fwd_bwd_ms"] / 1e9
        if att is None:
            log(f"  {path}: fwd+bwd {p['fwd_bwd_ms']:.3f} ms; per-GEMM attribution SKIPPED "
                f"(needs CUDA: torch.profiler CUDA kernel events)")
            rec["paths"][path] = p
            continue
        for w in fill_ours(rec, path, p, att, expect_sm90=getattr(args, "expect_sm90", False)):
            log(f"  {w}")
    log(_table_point(rec, args.paths))
    return rec


def fill_ours(rec, path, p, att, expect_sm90=False):
    """Put one path's merged attribution `att` into rec (per GEMM: ms, TF/s, speedup over
    torch, launches, which path's kernels ran) and p (other kernels, sums, warnings);
    returns the lines to print (warnings, notes)."""
    p.update(other=att["other"], unattributed=att["unattributed"], warnings=list(att["warnings"]),
             windows=att["windows"])
    p["gemm_ms_sum"] = sum(g["ms"] for g in att["gemms"].values())
    p["other_ms_sum"] = sum(o["ms"] for o in att["other"].values()) + sum(o["ms"] for o in att["unattributed"].values())
    rec["paths"][path] = p
    for gemm in GEMMS:
        g = att["gemms"].get(gemm)
        if g is None:
            continue
        r = rec["gemms"][gemm]
        r[path] = dict(ms=g["ms"], tflops=r["gflop"] / g["ms"], launches=g["launches"], paths=g["paths"],
                       kernels=g["kernels"])
        if "ms" in r["torch"]:
            r[path]["speedup"] = r["torch"]["ms"] / g["ms"]
        if "kernel_ms" in r["torch"]:  # like for like: both sides' kernel time from the profiler
            r[path]["speedup_kernel"] = r["torch"]["kernel_ms"] / g["ms"]
        if "same_work_ms" in r["torch"]:  # torch's GEMM + an unfused epilogue at the copy rate
            r[path]["speedup_same_work"] = r["torch"]["same_work_ms"] / g["ms"]
    if path == "moe_fused-portable":
        wrong = [gm for gm, g in att["gemms"].items() if any(pp != "portable" for pp in g["paths"])]
        if wrong:
            p["warnings"].append(f"{', '.join(wrong)} ran a non-portable kernel under MOE_FUSED_PORTABLE=1")
    lines = [f"WARNING {path}: {w}" for w in p["warnings"]]
    if path == "moe_fused" and expect_sm90:
        portable = [gm for gm in GEMMS if gm in att["gemms"] and "sm90" not in att["gemms"][gm]["paths"]]
        if portable:
            p["portable_gemms"] = portable
            lines.append(f"note {path}: the portable kernel ran for {', '.join(portable)} (no sm90a kernel taken)")
    return lines


def _tf(v):
    return f"{v:5.0f}" if v >= 10 else f"{v:5.2f}"


def _table_point(rec, paths):
    lines = []
    w = 49
    hdr = f"  {'GEMM':6s} {'problem (n = T*k rows)':{w}s} {'GFLOP':>7s} | {'torch ms':>8s} {'kern':>6s} {'TF/s':>5s}"
    for p in paths:
        hdr += f" | {p + ' ms':>{max(12, len(p) + 3)}s} {'TF/s':>5s} {'x torch':>7s} {'x kern':>6s} {'path':8s}"
    lines.append(hdr)
    lines.append("  " + "-" * (len(hdr) - 2))
    tot = {"torch": 0.0, **{p: 0.0 for p in paths}}
    for gemm in GEMMS:
        r = rec["gemms"].get(gemm)
        if r is None:
            continue
        t = r["torch"]
        tot["torch"] += t.get("ms", 0.0)
        kern = f"{t['kernel_ms']:6.3f}" if "kernel_ms" in t else f"{'-':>6s}"
        if "ms" in t:
            line = f"  {gemm:6s} {r['problem']:{w}s} {r['gflop']:7.1f} | {t['ms']:8.3f} {kern} {_tf(t['tflops'])}"
        else:
            line = f"  {gemm:6s} {r['problem']:{w}s} {r['gflop']:7.1f} | {'failed':>8s} {kern} {'':5s}"
        for p in paths:
            wp = max(12, len(p) + 3)
            o = r.get(p)
            if o:
                tot[p] += o["ms"]
                mark = "" if o.get("speedup", 1) >= 1 else " <"
                launches = f" x{o['launches']}" if o["launches"] > 1 else ""
                sp = f"{o['speedup']:6.2f}x" if "speedup" in o else f"{'-':>7s}"
                spk = f"{o['speedup_kernel']:5.2f}x" if "speedup_kernel" in o else f"{'-':>6s}"
                line += (f" | {o['ms']:{wp}.3f} {_tf(o['tflops'])} {sp} {spk} "
                         f"{'+'.join(o['paths']) + launches + mark:8s}")
            else:
                line += f" | {'-':>{wp}s} {'':5s} {'':7s} {'':6s} {'':8s}"
        lines.append(line)
    gf = sum(r["gflop"] for r in rec["gemms"].values())
    line = (f"  {'sum':6s} {'six GEMMs (torch: each alone, best layout)':{w}s} {gf:7.1f} | {tot['torch']:8.3f} "
            f"{'':6s} {_tf(gf / max(tot['torch'], 1e-9))}")
    for p in paths:
        wp = max(12, len(p) + 3)
        if tot[p] > 0:
            line += f" | {tot[p]:{wp}.3f} {_tf(gf / tot[p])} {tot['torch'] / tot[p]:6.2f}x {'':6s} {'':8s}"
        else:
            line += f" | {'-':>{wp}s} {'':5s} {'':7s} {'':6s} {'':8s}"
    lines.append(line)
    lines.append("  (x torch = torch ms / ours ms: >= 1 meets the per-GEMM target; '<' marks a miss. "
                 "ours: kernel time from torch.profiler; torch: CUDA events around the call (perf_counter on the CPU), "
                 "kern = its kernels' time from torch.profiler; x kern = torch kern / ours: both kernel times from "
                 "the profiler, like for like; the two readings of torch come from different runs)")
    for gemm in GEMMS:
        t = rec["gemms"].get(gemm, {}).get("torch", {})
        if "same_work_ms" not in t:
            continue
        line = (f"  same work, {gemm}: torch {t['ms']:.3f} ms + its unfused epilogue's "
                f"{t['epilogue_bytes'] / 1e6:.0f} MB at the copy rate ({rec['copy_gbs']:.0f} GB/s) "
                f"= {t['same_work_ms']:.3f} ms (a lower bound)")
        for p in paths:
            o = rec["gemms"][gemm].get(p, {})
            if "speedup_same_work" in o:
                line += f"; {p} {o['speedup_same_work']:.2f}x"
        lines.append(line)
    for p in paths:
        pr = rec["paths"].get(p, {})
        if "fwd_bwd_ms" in pr:
            s = f"  {p}: fwd+bwd {pr['fwd_bwd_ms']:.3f} ms ({_tf(pr['fwd_bwd_tflops']).strip()} TF/s)"
            if "gemm_ms_sum" in pr:
                s += f"; kernels per step: GEMMs {pr['gemm_ms_sum']:.3f} ms + other {pr['other_ms_sum']:.3f} ms"
            lines.append(s)
            items = sorted([(v["ms"], v["launches"], k_, "") for k_, v in pr.get("other", {}).items()]
                           + [(v["ms"], v["launches"], k_, " UNATTRIBUTED: " + v.get("why", ""))
                              for k_, v in pr.get("unattributed", {}).items()], reverse=True)
            for ms, launches, k_, why in items:
                lines.append(f"      {ms:8.3f} ms x{launches:<3d} {k_[:110]}{why}")
    return "\n".join(lines)


def _device_slug(name):
    s = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return re.sub(r"^nvidia_", "", s) or "device"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench_gemms.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: dry run (plan, torch side, --check; no per-kernel attribution)")
    p.add_argument("--shapes", nargs="+", help=f"presets {', '.join(SHAPES)} or HxIxExk (default: 30b-a3b 235b-a22b)")
    p.add_argument("--tokens", "-T", nargs="+", type=int, help="token counts (default 4096 16384)")
    p.add_argument("--dtype", choices=list(DTYPES), help="default bfloat16 (torch._grouped_mm on CUDA takes bf16 only)")
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS),
                   help="our paths: moe_fused (sm90a where it applies) and moe_fused-portable (MOE_FUSED_PORTABLE=1)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20, help="timed runs (median) per torch GEMM and per fwd+bwd")
    p.add_argument("--steps", type=int, default=5, help="profiler windows (one fwd+bwd each) per path; median")
    p.add_argument("--chained-profile", action="store_true",
                   help="profile with kernel chaining on (the default turns it off there): each kernel's "
                        "time then also holds its wait for the previous kernel's last wave, so the "
                        "difference from a default run is that kernel's predecessor's tail")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip composing the layer from the torch problems and comparing with moe_fused")
    p.add_argument("--check-tokens", type=int, default=512, help="T of the check (default 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results", help="folder for the JSON (default bench/results)")
    p.add_argument("--name", help="file stem (default gemms_<device>)")
    args = p.parse_args(argv)
    d = DEFAULTS[args.device]
    args.shapes = args.shapes or d["shapes"]
    args.tokens = args.tokens or d["tokens"]
    args.dtype = args.dtype or d["dtype"]
    for s in args.shapes:
        _parse_shape(s)
    return args


def main(argv=None) -> int:
    from moe_fused.ops import cuda_index_check

    # The index check's host sync is no GEMM (and HF's paths have none): off for the runs,
    # the caller's setting back afterwards.
    with cuda_index_check(False):
        return _main(argv)


def _main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("bench_gemms.py: --device cuda but torch sees no CUDA GPU (use --device cpu for a dry run)",
                  file=sys.stderr)
            return 2
        device = torch.device("cuda", torch.cuda.current_device())
        if args.dtype != "bfloat16":
            print("bench_gemms.py: torch._grouped_mm on CUDA takes bfloat16 only", file=sys.stderr)
            return 2
    dtype = DTYPES[args.dtype]
    import moe_fused
    from moe_fused import _lib
    try:
        _lib.lib()
    except _lib.LibraryLoadError as exc:
        print(f"bench_gemms.py: {exc}", file=sys.stderr)
        return 2
    dev_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)")
    env = dict(device=dev_name, torch=torch.__version__, moe_fused=moe_fused.__version__, dtype=args.dtype,
               library=_lib.library_path(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    if device.type == "cuda":
        cc = torch.cuda.get_device_capability(device)
        env["capability"] = f"{cc[0]}.{cc[1]}"
    lines = []

    def log(s=""):
        print(s, flush=True)
        lines.append(s)

    log(f"bench_gemms: {args.dtype}, {dev_name}, torch {env['torch']}, moe_fused {env['moe_fused']}; "
        f"torch: median of {args.iters} CUDA-event runs; ours: median of {args.steps} profiler windows")
    for var, val in (("MOE_FUSED_PORTABLE", "1"), ("MOE_FUSED_SM90", "0")):
        if os.environ.get(var) == val:
            log(f"WARNING: {var}={val} is set in the environment: the moe_fused path runs the portable kernels too")
    if device.type == "cuda" and env.get("capability") != "9.0" and "moe_fused-portable" in args.paths:
        log(f"note: compute capability {env['capability']}: no sm90a kernels; both paths run the portable ones")
    if device.type != "cuda":
        log("note: CPU dry run: per-GEMM attribution of our kernels needs CUDA and is SKIPPED")
    args.expect_sm90 = device.type == "cuda" and env.get("capability") == "9.0"
    results = []
    t0 = time.perf_counter()
    for shape in args.shapes:
        for T in args.tokens:
            results.append(run_point(shape, T, args, device, dtype, log))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    log(f"\ntotal {time.perf_counter() - t0:.0f} s")
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"gemms_{_device_slug(dev_name) if device.type == 'cuda' else 'cpu'}"
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(dict(env=env, args=vars(args), results=results), indent=1))
    print(f"saved: {path}")
    failed = any("error" in p for r in results for p in r["paths"].values()) or any("check_failed" in r for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
