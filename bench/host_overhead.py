"""Host microseconds of moe_fused's experts wrapper: the Python layer around the C calls, which
the CPU and CUDA paths share, and the C calls themselves.

    python bench/host_overhead.py [--reps N] [--dtype float32|bfloat16]      # tiny CPU tensors
    python bench/host_overhead.py --device cuda [-T 4096] [--shape 30b-a3b]  # bench/device inputs

Prints medians (us) of: a whole eager fwd and bwd; the time from the call to the entry of the
C function (moe_experts_forward / moe_experts_backward; on CUDA the first kernel launches right
after it) or, with the C++ fast path, of its module function; the C calls themselves (on
CUDA: their host time, the launches; with the fast path, its C++ glue too); both glue paths
when the fast path is built; and the ctypes glue's pieces one by one. On CUDA every step starts on an idle GPU (synchronised before, not timed),
without the index check, as in the layer benchmark.
"""
import argparse
import pathlib
import statistics
import sys
import time

import torch

import moe_fused  # noqa: F401
from moe_fused import _lib, moe_experts, ops

p = argparse.ArgumentParser()
p.add_argument("--reps", type=int, default=2000)
p.add_argument("--dtype", default="float32", help="CPU only (CUDA: the bf16 bench inputs)")
p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
p.add_argument("-T", type=int, default=4096, help="CUDA only")
p.add_argument("--shape", default="30b-a3b", help="CUDA only: a shape of bench/device/experts_inputs.py")
args = p.parse_args()

if args.device == "cuda":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "device"))
    from experts_inputs import SHAPES, make

    H, I, E, k = SHAPES[args.shape]
    T = args.T
    x, idx, s, w1, w2, dout = make(T, args.shape)
    ops.set_cuda_index_check(False)
    sync = torch.cuda.synchronize
else:
    torch.set_num_threads(1)
    T, H, I, E, k = 4, 64, 32, 4, 2
    dt = getattr(torch, args.dtype)
    torch.manual_seed(0)
    x = torch.randn(T, H, dtype=dt, requires_grad=True)
    s, idx = torch.topk(torch.randn(T, E).softmax(-1), k)
    s = s.to(dt).requires_grad_()
    w1 = (torch.randn(E, 2 * I, H) * H**-0.5).to(dt).requires_grad_()
    w2 = (torch.randn(E, H, I) * I**-0.5).to(dt).requires_grad_()
    dout = torch.randn(T, H, dtype=dt)
    sync = lambda: None  # noqa: E731
dev = x.device

lib = _lib.lib()
marks = {}  # C entry point -> (perf_counter at its entry, time inside)


def _marking(fn, name):
    def wrapper(*a):
        t0 = time.perf_counter()
        r = fn(*a)
        marks[name] = (t0, time.perf_counter() - t0)
        return r

    return wrapper


# The ctypes glue calls the raw handles (_lib.raw); an older moe_fused (A/B) the library's
# attributes. The C++ fast path (moe_fused._torch_ops, session 19) calls the C functions from
# C++: its entry is marked at the module's function instead (its C++ glue then counts as "C").
raw = getattr(_lib, "_RAW", None)
for name in ("moe_experts_forward", "moe_experts_backward"):
    if raw:
        raw[name] = _marking(raw[name], name)
    else:
        setattr(lib, name, _marking(getattr(lib, name), name))
fast = _lib.torch_ops() if hasattr(_lib, "torch_ops") else None
if fast is not None:
    for name in ("experts_forward", "experts_backward"):
        setattr(fast, name, _marking(getattr(fast, name), "moe_" + name))
PATHS = [("C++ fast path", True), ("ctypes glue", False)] if fast is not None else [("ctypes glue", None)]


def median_us(fn, reps=args.reps):
    for _ in range(50):
        fn()
    out = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out) * 1e6


def step_split(reps=args.reps):
    """Medians of fwd, bwd, call -> C entry (fwd, bwd), C time (fwd, bwd)."""
    rows = {key: [] for key in ("fwd", "bwd", "fwd -> C entry", "bwd -> C entry", "C fwd", "C bwd")}
    for i in range(reps + 50):
        for t in (x, s, w1, w2):
            t.grad = None
        sync()
        t0 = time.perf_counter()
        out = moe_experts(x, idx, s, w1, w2)
        t1 = time.perf_counter()
        out.backward(dout)
        t2 = time.perf_counter()
        if i < 50:
            continue
        (f0, fc), (b0, bc) = marks["moe_experts_forward"], marks["moe_experts_backward"]
        for key, v in (("fwd", t1 - t0), ("bwd", t2 - t1), ("fwd -> C entry", f0 - t0),
                       ("bwd -> C entry", b0 - t1), ("C fwd", fc), ("C bwd", bc)):
            rows[key].append(v * 1e6)
    return {key: statistics.median(v) for key, v in rows.items()}


print(f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, T={T} H={H} I={I} E={E} k={k}, "
      f"{x.dtype}, {args.reps} reps")
for label, on in PATHS:
    previous = ops.set_torch_ops(on) if on is not None else None
    split = step_split()
    if on is not None:
        ops.set_torch_ops(previous)
    split["fwd wrapper (fwd - C fwd)"] = split["fwd"] - split["C fwd"]
    split["bwd wrapper (bwd - C bwd)"] = split["bwd"] - split["C bwd"]
    print(f"-- {label}" + (" (C: the module's call, its C++ glue included)" if on else ""))
    for key, v in split.items():
        print(f"{key:34s} {v:8.1f} us")
print("-- pieces of the ctypes glue" if fast is not None else "-- pieces")
ops.set_torch_ops(False) if fast is not None else None

out_h = ops._experts_forward_impl(x, idx, s, w1, w2)
kernel = ops._kernel(ops._experts_forward_impl, dev)
pieces = [
    ("moe_experts fwd (no_grad)", lambda: torch.no_grad()(moe_experts)(x, idx, s, w1, w2)),
    ("fwd kernel (impl + device guard)", lambda: kernel(x, idx, s, w1, w2)),
    ("_check_experts", lambda: ops._check_experts(x, idx, s, w1, w2)),
    ("_eager_ok", lambda: ops._eager_ok(x, idx, s, w1, w2)),
    ("torch.empty x5", lambda: [torch.empty(8, device=dev) for _ in range(5)]),
    ("_lib.pack_call (fwd's 9)", lambda: _lib.pack_call(
        _lib.context_values(dev, 0, 0)[0], _lib.packed_plan_values(out_h[2], E, T * k),
        (x, idx, s, w1, w2, out_h[1], out_h[0]), ops._FORWARD_NAMES)),
    ("workspace size", lambda: _lib.experts_forward_call_workspace_size(dev, x.dtype, T, k, H, I, E, 0)),
    ("_lib.context_values", lambda: _lib.context_values(dev, 1 << 20, 0)),
    ("_window_flag", lambda: ops._window_flag(x, k)),
    ("dev_flags", lambda: _lib.dev_flags()),
]
if args.device == "cuda":
    guarded = ops._cuda_guarded(lambda *a: None)
    pieces += [("device guard (no-op fn)", lambda: guarded(x)),
               ("torch.cuda.device ctx", lambda: torch.cuda.device(dev).__enter__())]
for name, fn in pieces:
    try:
        print(f"{name:34s} {median_us(fn):8.1f} us")
    except AttributeError:  # a piece an older moe_fused lacks (A/B against it)
        print(f"{name:34s}      n/a")
