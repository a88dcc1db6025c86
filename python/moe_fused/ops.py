"""torch.library custom ops of moe-fused, their fake (meta) implementations and autograd.

Ops (namespace ``moe_fused``), each defined once here with a fake implementation (so
``torch.compile(fullgraph=True)`` traces them) and a real implementation for "cpu" and
"cuda" that calls the C ABI of libmoe_fused (see ``_lib.py``):

    experts_forward(x, idx, w, w1, w2) -> (out, h, plan)
    experts_backward(grad_out, x, w, w1, w2, plan, h, need_x, need_w, need_w1, need_w2)
        -> (dx, dw, dw1, dw2)
    linear_forward(input, weight, selected_experts) -> out
    linear_backward(grad_out, input, weight, selected_experts, need_input, need_weight)
        -> (grad_input, grad_weight)

plan is the routing plan in one int32 tensor (sorted_pairs, pair_rows, expert_offsets; see
``_lib.packed_plan_views``). A gradient that is not needed is returned as an empty tensor
(numel 0) and not computed.
The experts backward needs only x, the routing weights, the expert weights, the routing
plan and h = [g; u]; a = silu(g) * u and y = down_proj[e] a are recomputed, never saved.

No-grad calls keep no h: in plain eager mode, when no backward can follow (grad mode off,
``torch.no_grad()`` / ``torch.inference_mode()``, or none of hidden_states, top_k_weights
and the expert weights requires grad), :func:`moe_experts` asks the C core for out alone
(h NULL): GEMM1 writes a but not h, and the [T*k, 2I] h is never allocated. out is
bit-identical to the forward that stores h. The registered op (torch.compile and the other
non-eager paths) always returns h.

Public functions: :func:`moe_experts` (the Transformers v5 experts contract) and
:func:`moe_fused_linear` (the seed primitive). In plain eager mode they run the same kernels
through a ``torch.autograd.Function`` instead of dispatching the op (the dispatch's host time
shows at small batches); under ``torch.compile``, torch function / dispatch modes, tensor
subclasses, functorch transforms or on meta tensors they call the registered ops.

Index range: on the CPU the C core checks every index and raises IndexError. On CUDA the
Python layer checks ``(idx < 0) | (idx >= E)`` before the launch (one small reduction and a
host sync) -- except while the current stream is being captured into a CUDA graph
(``torch.cuda.is_current_stream_capturing()``), where a sync is not allowed, or when the
check is turned off (``moe_fused.ops.set_cuda_index_check(False)`` or the environment
variable ``MOE_FUSED_CHECK_INDICES=0``; indices from a top-k router are always in range, and
the sync stops the host from running ahead of the GPU): out-of-range indices are then the
caller's responsibility. Nothing else in these ops syncs with the host.

Saved h, overwritten: in plain eager mode on CUDA the experts backward writes dh over the
saved h (it reads h once and needs it no more), which saves a [T*k, 2I] buffer at the
backward's peak. A second backward through the same graph (``retain_graph=True``) then
raises a RuntimeError that says so; ``set_backward_overwrite_h(False)`` (or the environment
variable ``MOE_FUSED_OVERWRITE_H=0``) keeps h intact. The registered op (torch.compile and
the other non-eager paths) never overwrites its inputs.

Token windows: at large T the CUDA layer may produce its down-projection's per-pair rows
(T*k rows of H, and the backward's dX rows) a token window at a time, so that buffer never
outgrows the [T*k, I] ones beside it. One window is faster (Qwen3-30B-A3B, T=16384 on the
H100: 0.16 ms a forward) and costs up to T*k*H elements of workspace. By default ("auto")
one window is taken when that buffer is at most 1/50 of the GPU's memory (Qwen3-30B-A3B at
T=16384, 512 MiB: one window on an 80 GB card, windows on a 24 GB one);
``set_one_token_window(True / False / None)`` or ``MOE_FUSED_ONE_WINDOW=1 / 0 / auto``
decide it instead. Results are bit-identical either way.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from . import _lib

__all__ = [
    "moe_experts",
    "moe_fused_linear",
    "set_cuda_index_check",
    "cuda_index_check",
    "set_backward_overwrite_h",
    "set_one_token_window",
    "one_token_window",
    "set_torch_ops",
]

_cuda_index_check = os.environ.get("MOE_FUSED_CHECK_INDICES", "1") != "0"
_overwrite_h = os.environ.get("MOE_FUSED_OVERWRITE_H", "1") != "0"
_ONE_WINDOW_ENV = {"1": True, "0": False, "auto": None}
_one_window_env = os.environ.get("MOE_FUSED_ONE_WINDOW", "auto")
if _one_window_env not in _ONE_WINDOW_ENV:
    raise ValueError(f"MOE_FUSED_ONE_WINDOW must be 1, 0 or auto, got {_one_window_env!r}")
_one_window = _ONE_WINDOW_ENV[_one_window_env]


def set_backward_overwrite_h(enabled: bool) -> bool:
    """Let the eager CUDA experts backward write dh over the saved h (the default: less
    memory at the backward's peak, one backward per forward) or keep h intact (for
    ``retain_graph=True`` and repeated backward). Returns the previous setting."""
    global _overwrite_h
    previous, _overwrite_h = _overwrite_h, bool(enabled)
    return previous


def set_one_token_window(enabled):
    """True: the CUDA experts layer makes its per-pair rows in one token window (faster, up
    to T*k*H elements more workspace); False: in windows no larger than its [T*k, I]
    buffers; None: by the GPU's memory (the default, see the module's docstring). Returns
    the previous setting."""
    global _one_window
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"set_one_token_window: enabled must be True, False or None, got {enabled!r}")
    previous, _one_window = _one_window, enabled
    return previous


@functools.lru_cache(maxsize=64)
def _device_memory(index: int) -> int:
    return torch.cuda.get_device_properties(index).total_memory


def _window_max(x) -> int:
    """The most bytes of per-pair rows (T*k*H elements) one token window may take on x's
    device; -1: never one window (the C++ fast path applies it to the call's sizes)."""
    if not x.is_cuda:
        return -1
    one = _one_window
    if one is None:  # (get_device: the index without building a torch.device)
        return _device_memory(x.get_device()) // 50
    return 1 << 62 if one else -1


def _window_flag(x, k: int) -> int:
    """MOE_FLAG_ONE_WINDOW when one token window is wanted for x [T, H] with k slots."""
    return _lib.MOE_FLAG_ONE_WINDOW if x.numel() * k * x.element_size() <= _window_max(x) else 0


# The C++ fast path of the experts and linear calls (_lib.torch_ops()), looked up at the first call;
# set_torch_ops(False) turns it off for the process (MOE_FUSED_TORCH_OPS=0 before import:
# never loaded).
_torch_ops_wanted = True
_torch_ops = None
_torch_ops_looked_up = False


def _fast_ops():
    """The fast path's module when it is on and loads, else None."""
    global _torch_ops, _torch_ops_looked_up
    if not _torch_ops_looked_up:
        _torch_ops = _lib.torch_ops()
        _torch_ops_looked_up = True
    return _torch_ops if _torch_ops_wanted else None


def set_torch_ops(enabled: bool) -> bool:
    """Use the C++ fast path for the experts and linear calls when it is built for this torch
    (the default) or always the ctypes path (False). The results are bit-identical: both
    make the same C calls. Returns the previous setting."""
    global _torch_ops_wanted
    previous, _torch_ops_wanted = _torch_ops_wanted, bool(enabled)
    return previous


def set_cuda_index_check(enabled: bool) -> bool:
    """Turn the range check of expert indices on CUDA tensors on or off (one reduction
    and one host sync per call); returns the previous setting. The CPU core always checks."""
    global _cuda_index_check
    previous, _cuda_index_check = _cuda_index_check, bool(enabled)
    return previous


@contextlib.contextmanager
def _setting_for_block(setter, value):
    """setter(value) for a block, the previous setting restored when it ends (also on an
    exception); setter returns the previous setting."""
    previous = setter(value)
    try:
        yield
    finally:
        setter(previous)


def cuda_index_check(enabled: bool):
    """``with cuda_index_check(False): ...`` -- :func:`set_cuda_index_check` for a block."""
    return _setting_for_block(set_cuda_index_check, enabled)


def one_token_window(enabled):
    """``with one_token_window(False): ...`` -- :func:`set_one_token_window` for a block."""
    return _setting_for_block(set_one_token_window, enabled)

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)

_LIB = torch.library.Library("moe_fused", "FRAGMENT")  # kept alive for the process

_LIB.define(
    "experts_forward(Tensor hidden_states, Tensor top_k_index, Tensor top_k_weights, "
    "Tensor gate_up_proj, Tensor down_proj) -> (Tensor, Tensor, Tensor)"
)
_LIB.define(
    "experts_backward(Tensor grad_out, Tensor hidden_states, Tensor top_k_weights, "
    "Tensor gate_up_proj, Tensor down_proj, Tensor plan, Tensor h, "
    "bool need_hidden_states, bool need_top_k_weights, "
    "bool need_gate_up_proj, bool need_down_proj) -> (Tensor, Tensor, Tensor, Tensor)"
)
_LIB.define("linear_forward(Tensor input, Tensor weight, Tensor selected_experts) -> Tensor")
_LIB.define(
    "linear_backward(Tensor grad_out, Tensor input, Tensor weight, Tensor selected_experts, "
    "bool need_input, bool need_weight) -> (Tensor, Tensor)"
)


# ---- validation (shapes, dtypes, devices only: no data access, no sync) ---------------


def _check_tensors(named: list[tuple[str, object]]) -> torch.device:
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    first_name, first = named[0]
    device = first.device
    for name, t in named[1:]:
        if t.device != device:
            raise ValueError(
                f"{name} is on {t.device}, but {first_name} is on {first.device}: all tensors "
                "must be on one device"
            )
    return device


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float32, bfloat16, float16 or float64), "
            f"got {t.dtype}"
        )


def _check_index(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must be an int32 or int64 tensor of expert indices, got {t.dtype}")


def _check_rank(name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if t.dim() != rank:
        raise ValueError(f"{name} must have rank {rank} {layout}, got shape {tuple(t.shape)}")


def _experts_args_ok(x, idx, w, w1, w2) -> bool:
    """True exactly when every check of _check_experts passes, as one expression: what each
    call runs (the checks' helper calls cost ~25 us a call on the H100 machine's host, before
    the first kernel); the detailed checks then run only to name what is wrong."""
    T_ = torch.Tensor
    if not (isinstance(x, T_) and isinstance(idx, T_) and isinstance(w, T_) and isinstance(w1, T_)
            and isinstance(w2, T_)):
        return False
    xs, ks, ws1 = x.shape, idx.shape, w1.shape
    if len(xs) != 2 or len(ks) != 2 or len(ws1) != 3:
        return False
    d, dt = x.device, x.dtype
    E, two_i, H = ws1
    return (
        idx.device == d and w.device == d and w1.device == d and w2.device == d
        and dt in _FLOAT_DTYPES and idx.dtype in _INDEX_DTYPES
        and w1.dtype == dt and w2.dtype == dt and (w.dtype == dt or w.dtype == torch.float32)
        and ks[0] == xs[0] and w.shape == ks and H == xs[1] and two_i % 2 == 0
        and w2.shape == (E, H, two_i // 2)
    )


def _check_experts(x, idx, w, w1, w2) -> None:
    # Its C++ twin once the fast path is looked up (at the first call's kernel), never while
    # torch.compile traces (it cannot trace into the extension).
    if _torch_ops is not None and _torch_ops_wanted and not torch.compiler.is_compiling():
        if _torch_ops.experts_args_ok(x, idx, w, w1, w2):
            return
    elif _experts_args_ok(x, idx, w, w1, w2):
        return
    names = ("hidden_states", "top_k_index", "top_k_weights", "gate_up_proj", "down_proj")
    _check_tensors(list(zip(names, (x, idx, w, w1, w2))))
    _check_float("hidden_states", x)
    _check_index("top_k_index", idx)
    _check_float("top_k_weights", w)
    _check_float("gate_up_proj", w1)
    _check_float("down_proj", w2)
    _check_rank("hidden_states", x, 2, "[T, H]")
    _check_rank("top_k_index", idx, 2, "[T, k]")
    _check_rank("top_k_weights", w, 2, "[T, k]")
    _check_rank("gate_up_proj", w1, 3, "[E, 2I, H]")
    _check_rank("down_proj", w2, 3, "[E, H, I]")
    if w1.dtype != x.dtype:
        raise TypeError(f"gate_up_proj has dtype {w1.dtype}, but hidden_states has {x.dtype}")
    if w2.dtype != x.dtype:
        raise TypeError(f"down_proj has dtype {w2.dtype}, but hidden_states has {x.dtype}")
    if w.dtype not in (x.dtype, torch.float32):
        raise TypeError(
            f"top_k_weights must have the dtype of hidden_states ({x.dtype}) or float32, got {w.dtype}"
        )
    T, H = x.shape
    if idx.shape[0] != T:
        raise ValueError(
            f"top_k_index must have shape [T={T}, k] like hidden_states [T, H], got {tuple(idx.shape)}"
        )
    if tuple(w.shape) != tuple(idx.shape):
        raise ValueError(
            f"top_k_weights must have the shape of top_k_index {tuple(idx.shape)}, got {tuple(w.shape)}"
        )
    E, two_i, H1 = w1.shape
    if two_i % 2 != 0:
        raise ValueError(
            f"gate_up_proj [E, 2I, H] must have an even second dimension (gate rows then "
            f"up rows), got {two_i}"
        )
    if H1 != H:
        raise ValueError(
            f"gate_up_proj [E, 2I, H] has H={H1}, but hidden_states [T, H] has H={H}"
        )
    I = two_i // 2
    if tuple(w2.shape) != (E, H, I):
        raise ValueError(
            f"down_proj must have shape [E, H, I] = {(E, H, I)} to match gate_up_proj "
            f"{tuple(w1.shape)} and hidden_states {tuple(x.shape)}, got {tuple(w2.shape)}"
        )


def _check_linear(x, weight, sel) -> None:
    names = ("input", "weight", "selected_experts")
    _check_tensors(list(zip(names, (x, weight, sel))))
    _check_float("input", x)
    _check_float("weight", weight)
    _check_index("selected_experts", sel)
    _check_rank("input", x, 2, "[N, in]")
    _check_rank("weight", weight, 3, "[E, out, in]")
    _check_rank("selected_experts", sel, 1, "[N]")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight has dtype {weight.dtype}, but input has {x.dtype}")
    if weight.shape[2] != x.shape[1]:
        raise ValueError(
            f"weight [E, out, in] has in={weight.shape[2]}, but input [N, in] has in={x.shape[1]}"
        )
    if sel.shape[0] != x.shape[0]:
        raise ValueError(
            f"selected_experts must have shape [N={x.shape[0]}] like input, got {tuple(sel.shape)}"
        )


def _check_index_range(name: str, idx: torch.Tensor, num_experts: int, any_device: bool = False) -> None:
    """CUDA only (the CPU core checks by itself) unless any_device; skipped under CUDA
    graph capture."""
    if (idx.device.type != "cuda" and not any_device) or idx.numel() == 0:
        return
    if idx.device.type == "cuda" and (
        (not _cuda_index_check and not any_device) or torch.cuda.is_current_stream_capturing()
    ):
        return
    bad = ((idx < 0) | (idx >= num_experts)).any()
    if bool(bad):  # one host sync
        lo, hi = int(idx.min()), int(idx.max())
        raise IndexError(
            f"{name} has values outside [0, {num_experts}) (min {lo}, max {hi}); "
            f"every index must name one of the {num_experts} experts"
        )


def _names(*names):
    """The descriptors' name addresses of a call's tensors, in its argument order."""
    return tuple(_lib.name_address(n) for n in names)


_FORWARD_NAMES = _names("hidden_states", "top_k_index", "top_k_weights", "gate_up_proj", "down_proj", "h", "out")
_BACKWARD_NAMES = _names(
    "grad_out", "hidden_states", "top_k_weights", "gate_up_proj", "down_proj", "h",
    "grad_hidden_states", "grad_top_k_weights", "grad_gate_up_proj", "grad_down_proj",
)
_LINEAR_FORWARD_NAMES = _names("input", "weight", "selected_experts", "out")
_LINEAR_BACKWARD_NAMES = _names("grad_out", "input", "weight", "selected_experts", "grad_input", "grad_weight")


# ---- experts: fake and real -------------------------------------------------------------


def _experts_outputs(x, idx, w1, factory, need_h=True):
    """(out [T, H], h [T*k, 2I] ([0, 2I] without need_h: not stored), the packed routing
    plan [2 T*k + E + 1] int32), each made by factory(shape, dtype)."""
    T, H = x.shape
    n = T * idx.shape[1]
    E, two_i = w1.shape[0], w1.shape[1]
    return (factory((T, H), x.dtype), factory((n if need_h else 0, two_i), x.dtype),
            factory((_lib.packed_plan_numel(E, n),), torch.int32))


@torch.library.register_fake("moe_fused::experts_forward", lib=_LIB)
def _experts_forward_fake(x, idx, w, w1, w2):
    _check_experts(x, idx, w, w1, w2)
    return _experts_outputs(x, idx, w1, lambda shape, dt: x.new_empty(shape, dtype=dt))


def _experts_forward_impl(x, idx, w, w1, w2, need_h=True):
    # Checked by moe_experts (and the fake kernel under compile); the C library validates
    # again, naming the argument: no second Python pass over the arguments on the hot path.
    # need_h False (the eager no-grad path only, never the op): h is neither allocated nor
    # written (the C call gets h NULL) and comes back empty [0, 2I].
    fast = _fast_ops()
    if fast is not None:
        if _cuda_index_check and x.is_cuda:
            _check_index_range("top_k_index", idx, w1.shape[0])
        out, h, plan_buf, status = fast.experts_forward(
            x, idx, w, w1, w2, need_h, _lib.dev_flags(), _window_max(x))
        if status == 0:
            return out, h, plan_buf
        if status != fast.FALLBACK:
            _lib.check(status, "moe_experts_forward")
    dev = x.device
    T, H = x.shape
    k = idx.shape[1]
    E, two_i = w1.shape[0], w1.shape[1]
    I = two_i // 2
    n = T * k
    # (sizes as arguments, not a tuple: torch parses them faster)
    out, h, plan_buf = _experts_outputs(
        x, idx, w1, lambda shape, dt: torch.empty(*shape, dtype=dt, device=dev), need_h
    )
    if n == 0 or I == 0 or H == 0:
        return _experts_forward_degenerate(idx, E, out, h, plan_buf)
    if _cuda_index_check and dev.type == "cuda":
        _check_index_range("top_k_index", idx, E)
    x, idx, w = x.contiguous(), idx.contiguous(), w.contiguous()
    # The environment is read once: the size query and the call see the same flags.
    flags = _window_flag(x, k) | _lib.dev_flags()
    ws_flags = flags if need_h else flags | _lib.MOE_FLAG_FORWARD_NO_H
    nbytes = _lib.experts_forward_call_workspace_size(dev, x.dtype, T, k, H, I, E, ws_flags)
    ctx, workspace = _lib.context_values(dev, nbytes, flags)
    _lib.call(  # (x, idx, w, w1, w2, plan, h, out); h None: NULL
        "moe_experts_forward", ctx, (x, idx, w, w1, w2, h if need_h else None, out), _FORWARD_NAMES,
        _lib.packed_plan_values(plan_buf, E, n), 5,
    )
    del workspace  # (alive until here: the call has used it)
    return out, h, plan_buf


def _experts_forward_degenerate(idx, E, out, h, plan_buf):
    """T*k, I or H is 0: out = 0; the plan from torch ops (no pair, or nothing to multiply)."""
    out.zero_()
    h.zero_()
    plan_buf.zero_()
    outs = (out, h, plan_buf)
    flat = idx.reshape(-1)
    offsets, sorted_pairs, pair_rows = _lib.packed_plan_views(plan_buf, E, flat.numel())
    if flat.numel() == 0:
        return outs
    _check_index_range("top_k_index", idx, E, any_device=True)
    order = torch.sort(flat, stable=True).indices
    sorted_pairs.copy_(order)
    pair_rows.scatter_(0, order, torch.arange(flat.numel(), device=flat.device, dtype=torch.int32))
    counts = torch.bincount(flat, minlength=E)
    offsets[0] = 0
    offsets[1:].copy_(torch.cumsum(counts, 0))
    return outs


@torch.library.register_fake("moe_fused::experts_backward", lib=_LIB)
def _experts_backward_fake(g, x, w, w1, w2, plan_buf, h, n_x, n_w, n_w1, n_w2):
    def like(t, need):
        return t.new_empty(t.shape) if need else t.new_empty((0,))

    return like(x, n_x), like(w, n_w), like(w1, n_w1), like(w2, n_w2)


def _experts_backward_impl(
    g, x, w, w1, w2, plan_buf, h, n_x, n_w, n_w1, n_w2, overwrite_h=False
):
    # overwrite_h (the eager fast path only, never the op): the C call may write dh over h.
    dev = x.device
    fast = _fast_ops()
    if fast is not None:
        flags = (_lib.MOE_FLAG_OVERWRITE_H if overwrite_h else 0) | _lib.dev_flags()
        *grads, status = fast.experts_backward(
            g, x, w, w1, w2, plan_buf, h, n_x, n_w, n_w1, n_w2, flags, _window_max(x))
        if status == 0:
            return tuple(gr if gr is not None else torch.empty((0,), dtype=src.dtype, device=dev)
                         for gr, src in zip(grads, (x, w, w1, w2)))
        if status != fast.FALLBACK:
            _lib.check(status, "moe_experts_backward")

    def alloc(t, need):
        # = torch.empty(t.shape, dtype=t.dtype, device=dev), with half its host time
        return torch.empty_like(t, memory_format=torch.contiguous_format) if need else None

    grads = (alloc(x, n_x), alloc(w, n_w), alloc(w1, n_w1), alloc(w2, n_w2))
    T, H = x.shape
    k = w.shape[1]
    E, two_i = w1.shape[0], w1.shape[1]
    I = two_i // 2
    if any(gr is not None for gr in grads):
        if T * k == 0 or I == 0 or H == 0:
            for gr in grads:
                if gr is not None:
                    gr.zero_()
        else:
            g, x, w = g.contiguous(), x.contiguous(), w.contiguous()
            flags = (
                (_lib.MOE_FLAG_OVERWRITE_H if overwrite_h else 0) | _window_flag(x, k) | _lib.dev_flags()
            )
            want = (
                (_lib.MOE_GRAD_HIDDEN_STATES if n_x else 0)
                | (_lib.MOE_GRAD_TOP_K_WEIGHTS if n_w else 0)
                | (_lib.MOE_GRAD_GATE_UP_PROJ if n_w1 else 0)
                | (_lib.MOE_GRAD_DOWN_PROJ if n_w2 else 0)
            )
            nbytes = _lib.experts_backward_call_workspace_size(dev, x.dtype, T, k, H, I, E, want, flags)
            ctx, workspace = _lib.context_values(dev, nbytes, flags)
            _lib.call(  # (g, x, w, w1, w2, plan, h, grads); a gradient not wanted: None, NULL
                "moe_experts_backward", ctx, (g, x, w, w1, w2, h, *grads), _BACKWARD_NAMES,
                _lib.packed_plan_values(plan_buf, E, T * k), 5,
            )
            del workspace
    empty = lambda t: torch.empty((0,), dtype=t.dtype, device=dev)  # noqa: E731
    return tuple(gr if gr is not None else empty(src) for gr, src in zip(grads, (x, w, w1, w2)))


# torch's raw current-device getter (no Python wrapper: the guard below asks at every call).
_cuda_get_device = getattr(torch._C, "_cuda_getDevice", None)


def _cuda_guarded(fn):
    """The CUDA kernel of an op: runs with the tensors' device current (the C side and
    torch's allocator then agree on the device even when it is not the current one)."""

    @functools.wraps(fn)
    def wrapper(*args):
        index = args[0].get_device()  # (an int: no torch.device built)
        if _cuda_get_device is not None and index == _cuda_get_device():
            return fn(*args)  # already current: torch.cuda.device would set and restore it
        with torch.cuda.device(index):
            return fn(*args)

    return wrapper


_CUDA_KERNELS = {}  # impl -> its device-guarded CUDA kernel (the op's; the fast path's too)


def _register_kernels(name, impl):
    _CUDA_KERNELS[impl] = _cuda_guarded(impl)
    torch.library.register_kernel(f"moe_fused::{name}", "cpu", impl, lib=_LIB)
    torch.library.register_kernel(f"moe_fused::{name}", "cuda", _CUDA_KERNELS[impl], lib=_LIB)


_register_kernels("experts_forward", _experts_forward_impl)
_register_kernels("experts_backward", _experts_backward_impl)


def _experts_setup_context(ctx, inputs, output):
    x, idx, w, w1, w2 = inputs
    out, h, plan_buf = output
    # Saved: x, the routing weights, both expert weights, the plan and h. Not a, not y.
    ctx.save_for_backward(x, w, w1, w2, plan_buf, h)
    ctx.mark_non_differentiable(h, plan_buf)
    # No zero-filled gradient for h (a [T*k, 2I] tensor) or the plan: they arrive as None.
    ctx.set_materialize_grads(False)


def _experts_grads(ctx, grad_out, backward):
    """The input gradients from the saved tensors, `backward` the op or its kernel."""
    x, w, w1, w2, plan_buf, h = ctx.saved_tensors
    n_x, _n_idx, n_w, n_w1, n_w2 = ctx.needs_input_grad[:5]  # (the fast path's 6th: results)
    if grad_out is None or not (n_x or n_w or n_w1 or n_w2):
        return None, None, None, None, None
    dx, dw, dw1, dw2 = backward(grad_out, x, w, w1, w2, plan_buf, h, n_x, n_w, n_w1, n_w2)
    return (dx if n_x else None, None, dw if n_w else None, dw1 if n_w1 else None, dw2 if n_w2 else None)


def _experts_backward(ctx, grad_out, _grad_h, _grad_plan):
    return _experts_grads(ctx, grad_out, torch.ops.moe_fused.experts_backward)


torch.library.register_autograd(
    "moe_fused::experts_forward", _experts_backward, setup_context=_experts_setup_context, lib=_LIB
)


# ---- eager fast path (experts; moe_fused_linear's below) ---------------------------------
# The custom op's dispatch (torch.library's autograd wrapper, redispatch, the dynamo-disabled
# frame) costs ~90 us of host time a call on the H100 machine's CPU: at decode-sized batches
# and T=4096 training steps the GPU waits on it. Plain eager calls take this autograd.Function
# instead: the same kernels (_experts_forward_impl / _experts_backward_impl), the same saved
# tensors and gradients. Everything else (torch.compile, tensor subclasses, torch function or
# dispatch modes, functorch transforms, meta tensors) keeps the registered op.
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_dispatch_stack_len = getattr(torch._C, "_len_torch_dispatch_stack", None)
_function_mode_on = getattr(torch._C, "_is_torch_function_mode_enabled", None)
_functorch_on = getattr(torch._C, "_are_functorch_transforms_active", None)
_EAGER_CHECKABLE = None not in (_dispatch_stack_len, _function_mode_on, _functorch_on)


def _eager_ok(*tensors) -> bool:
    """Whether the autograd.Function fast path may run (checked devices alike already)."""
    if not _EAGER_CHECKABLE or torch.compiler.is_compiling():
        return False
    if _dispatch_stack_len() or _function_mode_on() or _functorch_on():
        return False
    # cpu / cuda only: meta tensors (shape inference) take the op's fake implementation
    x = tensors[0]
    if not (x.is_cuda or x.is_cpu):
        return False
    for t in tensors:
        if type(t) not in _PLAIN:
            return False
    return True


def _kernel(impl, device):
    """The registered kernel of impl for device (no wrapper built per call)."""
    return _CUDA_KERNELS[impl] if device.type == "cuda" else impl


def _grad_may_follow(*tensors) -> bool:
    """Whether autograd would record a call on these inputs (a backward may follow)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class _ExpertsFunction(torch.autograd.Function):
    """The eager experts layer's graph node. Its forward gets the forward kernel's results
    (out, h, plan) made before the call, so that the kernels are launched before autograd's
    own host work: the GPU starts that much earlier (autograd's apply took ~45 us on the H100
    machine's host, bench/device/host_stages.py)."""

    @staticmethod
    def forward(ctx, x, idx, w, w1, w2, results):
        out, h, plan_buf = results
        ctx.save_for_backward(x, w, w1, w2, plan_buf, h)
        ctx.set_materialize_grads(False)
        ctx.device = x.device
        # Decided at the forward, so that a setting changed in between cannot apply half-way.
        ctx.overwrite_h = _overwrite_h and x.device.type == "cuda"
        ctx.h_overwritten = False
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.h_overwritten:
            raise RuntimeError(
                "moe_fused: a second backward through the same moe_experts call "
                "(retain_graph=True?): the first one wrote its gradients over the saved "
                "activations h to save memory. Call moe_fused.ops.set_backward_overwrite_h(False) "
                "(or set MOE_FUSED_OVERWRITE_H=0) before the forward to keep them."
            )
        kernel = _kernel(_experts_backward_impl, ctx.device)
        overwrite = ctx.overwrite_h
        grads = _experts_grads(ctx, grad_out, lambda *args: kernel(*args, overwrite))
        ctx.h_overwritten = overwrite and any(g is not None for g in grads)
        return (*grads, None)


def _direct_apply(fn_cls):
    """fn_cls.apply without torch.autograd.Function.apply's Python layer, which does nothing
    for these classes: its argument binding serves setup_context (they define none), its
    unwrapping serves dead functorch wrappers (which fail here either way: no storage). On
    the H100 machine's host the step between the checks and the forward cost ~50 us, most of
    it that layer (bench/device/host_stages.py)."""
    if fn_cls.setup_context is not torch.autograd.Function.setup_context:
        return fn_cls.apply
    return super(torch.autograd.Function, fn_cls).apply


_experts_apply = _direct_apply(_ExpertsFunction)


# ---- linear: fake and real --------------------------------------------------------------


@torch.library.register_fake("moe_fused::linear_forward", lib=_LIB)
def _linear_forward_fake(x, weight, sel):
    _check_linear(x, weight, sel)
    return x.new_empty((x.shape[0], weight.shape[1]))


def _linear_forward_impl(x, weight, sel):
    # Checked by moe_fused_linear (and the fake kernel under compile); the C library again.
    fast = _fast_ops()
    if fast is not None:
        if _cuda_index_check and x.is_cuda:
            _check_index_range("selected_experts", sel, weight.shape[0])
        out, status = fast.linear_forward(x, weight, sel, _lib.dev_flags())
        if status == 0:
            return out
        if status != fast.FALLBACK:
            _lib.check(status, "moe_linear_forward")
    dev = x.device
    N, in_f = x.shape
    E, out_f = weight.shape[0], weight.shape[1]
    out = torch.empty((N, out_f), dtype=x.dtype, device=dev)
    if N == 0 or out_f == 0 or in_f == 0:
        _check_index_range("selected_experts", sel, E, any_device=True)
        return out.zero_()
    _check_index_range("selected_experts", sel, E)
    x, sel = x.contiguous(), sel.contiguous()
    ctx, workspace = _lib.context_values(
        dev, _lib.linear_workspace_size(dev, N, E, in_f, out_f), _lib.dev_flags()
    )
    _lib.call("moe_linear_forward", ctx, (x, weight, sel, out), _LINEAR_FORWARD_NAMES)
    del workspace
    return out


@torch.library.register_fake("moe_fused::linear_backward", lib=_LIB)
def _linear_backward_fake(g, x, weight, sel, n_x, n_w):
    return (
        x.new_empty(x.shape) if n_x else x.new_empty((0,)),
        weight.new_empty(weight.shape) if n_w else weight.new_empty((0,)),
    )


def _linear_backward_impl(g, x, weight, sel, n_x, n_w):
    dev = x.device
    fast = _fast_ops()
    if fast is not None:
        dx, dw, status = fast.linear_backward(g, x, weight, sel, n_x, n_w, _lib.dev_flags())
        if status == 0:
            return (dx if dx is not None else torch.empty((0,), dtype=x.dtype, device=dev),
                    dw if dw is not None else torch.empty((0,), dtype=weight.dtype, device=dev))
        if status != fast.FALLBACK:
            _lib.check(status, "moe_linear_backward")
    N, in_f = x.shape
    E, out_f = weight.shape[0], weight.shape[1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=dev) if n_x else None
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=dev) if n_w else None
    if dx is not None or dw is not None:
        if N == 0 or in_f == 0 or out_f == 0:
            for gr in (dx, dw):
                if gr is not None:
                    gr.zero_()
        else:
            g, x, sel = g.contiguous(), x.contiguous(), sel.contiguous()
            ctx, workspace = _lib.context_values(
                dev, _lib.linear_workspace_size(dev, N, E, in_f, out_f), _lib.dev_flags()
            )
            _lib.call("moe_linear_backward", ctx, (g, x, weight, sel, dx, dw), _LINEAR_BACKWARD_NAMES)
            del workspace
    return (
        dx if dx is not None else torch.empty((0,), dtype=x.dtype, device=dev),
        dw if dw is not None else torch.empty((0,), dtype=weight.dtype, device=dev),
    )


_register_kernels("linear_forward", _linear_forward_impl)
_register_kernels("linear_backward", _linear_backward_impl)


def _linear_setup_context(ctx, inputs, output):
    x, weight, sel = inputs
    ctx.save_for_backward(x, weight, sel)


def _linear_grads(ctx, grad_out, backward):
    """The input gradients from the saved tensors, `backward` the op or its kernel."""
    x, weight, sel = ctx.saved_tensors
    n_x, n_w, _ = ctx.needs_input_grad
    if grad_out is None or not (n_x or n_w):
        return None, None, None
    dx, dw = backward(grad_out, x, weight, sel, n_x, n_w)
    return (dx if n_x else None, dw if n_w else None, None)


def _linear_backward(ctx, grad_out):
    return _linear_grads(ctx, grad_out, torch.ops.moe_fused.linear_backward)


torch.library.register_autograd(
    "moe_fused::linear_forward", _linear_backward, setup_context=_linear_setup_context, lib=_LIB
)


class _LinearFunction(torch.autograd.Function):
    """moe_fused_linear's eager fast path (see _ExpertsFunction)."""

    @staticmethod
    def forward(ctx, x, weight, sel):
        out = _kernel(_linear_forward_impl, x.device)(x, weight, sel)
        ctx.save_for_backward(x, weight, sel)
        ctx.set_materialize_grads(False)
        ctx.device = x.device
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _linear_grads(ctx, grad_out, _kernel(_linear_backward_impl, ctx.device))


# ---- public API ---------------------------------------------------------------------------


_linear_apply = _direct_apply(_LinearFunction)


# One call that says whether autocast is on for any device (most calls: no): the per-device
# query below costs more on slow hosts.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)


def _autocast_dtype(device: torch.device):
    """The autocast dtype when autocast is on for this device type, else None."""
    if _any_autocast is not None and not _any_autocast():
        return None
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _cast(t, dtype, keep_float32=False):
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == dtype:
        return t
    if keep_float32 and t.dtype == torch.float32:
        return t
    return t.to(dtype)


def moe_experts(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    """The fused MoE experts layer (the Transformers v5 experts-forward contract).

    For token t, slot j, expert e = top_k_index[t, j], s = top_k_weights[t, j]:
    ``h = gate_up_proj[e] @ x_t = [g; u]``, ``a = silu(g) * u``,
    ``out_t = sum_j s * (down_proj[e] @ a)``.

    Args:
        hidden_states: [T, H] float32, bfloat16, float16 (or float64 on the CPU).
        top_k_index: [T, k] int64 or int32, values in [0, E).
        top_k_weights: [T, k], dtype of hidden_states or float32.
        gate_up_proj: [E, 2I, H], rows 0..I-1 gate, I..2I-1 up; dtype of hidden_states.
        down_proj: [E, H, I]; dtype of hidden_states.

    Returns:
        [T, H] in the dtype of hidden_states. Differentiable in hidden_states,
        top_k_weights, gate_up_proj and down_proj (only the needed gradients are computed).

    Under ``torch.autocast`` (CPU or CUDA) the activations and weights are cast to the
    autocast dtype first (float32 routing weights stay float32), like a matmul would be;
    the gradients flow back through the casts to the original dtypes.
    """
    if isinstance(hidden_states, torch.Tensor):
        dt = _autocast_dtype(hidden_states.device)
        if dt is not None:
            hidden_states = _cast(hidden_states, dt)
            top_k_weights = _cast(top_k_weights, dt, keep_float32=True)
            gate_up_proj = _cast(gate_up_proj, dt)
            down_proj = _cast(down_proj, dt)
    _check_experts(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj)
    if _eager_ok(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj):
        kernel = _kernel(_experts_forward_impl, hidden_states.device)
        if not _grad_may_follow(hidden_states, top_k_weights, gate_up_proj, down_proj):
            # No backward can follow: no graph node, and h is neither stored nor allocated.
            return kernel(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, False)[0]
        results = kernel(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj)
        return _experts_apply(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, results)
    return torch.ops.moe_fused.experts_forward(
        hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj
    )[0]


def moe_fused_linear(input: torch.Tensor, weight: torch.Tensor, selected_experts: torch.Tensor) -> torch.Tensor:
    """``out[b, o] = sum_i weight[selected_experts[b], o, i] * input[b, i]``.

    Args:
        input: [N, in] float tensor.
        weight: [E, out, in], dtype of input.
        selected_experts: [N] int64 or int32, values in [0, E).

    Returns:
        [N, out]. Differentiable in input and weight. Under ``torch.autocast`` both are cast
        to the autocast dtype first.
    """
    if isinstance(input, torch.Tensor):
        dt = _autocast_dtype(input.device)
        if dt is not None:
            input, weight = _cast(input, dt), _cast(weight, dt)
    _check_linear(input, weight, selected_experts)
    if _eager_ok(input, weight, selected_experts):
        return _linear_apply(input, weight, selected_experts)
    return torch.ops.moe_fused.linear_forward(input, weight, selected_experts)
