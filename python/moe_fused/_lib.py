"""ctypes loader of libmoe_fused and the glue between torch tensors and the C ABI.

The library is looked up in the environment variable ``MOE_FUSED_LIBRARY`` (a path to
``libmoe_fused.so``, for development builds), then in this package's directory (where
``pip install .`` puts it). A failure to load is not raised at import time: it is kept and
raised, with what was tried, at the first call that needs the library, so that
``import moe_fused`` always works (e.g. to read ``moe_fused.__version__`` or the docs).

Every C entry point returns a status; :func:`check` turns a failing status into a Python
exception carrying the library's own message (``moe_last_error()``), which names the
offending argument:

    SHAPE, STRIDE, NULL, DEVICE, WORKSPACE -> ValueError
    DTYPE                                  -> TypeError
    INDEX                                  -> IndexError
    UNSUPPORTED, CUDA, INTERNAL, others    -> RuntimeError
"""

from __future__ import annotations

import ctypes
import functools
import os
import pathlib
import struct
import threading
from ctypes import (
    POINTER,
    Structure,
    c_char_p,
    c_int32,
    c_int64,
    c_uint32,
    c_size_t,
    c_uint64,
    c_void_p,
)

import torch

ABI_VERSION = 3
MAX_DIMS = 4
LIBRARY_ENV = "MOE_FUSED_LIBRARY"
_LIB_NAME = "libmoe_fused.so"

# ---- mirrors of moe_fused.h ------------------------------------------------------------

MOE_OK = 0
MOE_ERR_SHAPE = 1
MOE_ERR_DTYPE = 2
MOE_ERR_INDEX = 3
MOE_ERR_DEVICE = 4
MOE_ERR_STRIDE = 5
MOE_ERR_NULL = 6
MOE_ERR_WORKSPACE = 7
MOE_ERR_UNSUPPORTED = 8
MOE_ERR_CUDA = 9
MOE_ERR_INTERNAL = 10

STATUS_NAMES = {
    MOE_OK: "MOE_OK",
    MOE_ERR_SHAPE: "MOE_ERR_SHAPE",
    MOE_ERR_DTYPE: "MOE_ERR_DTYPE",
    MOE_ERR_INDEX: "MOE_ERR_INDEX",
    MOE_ERR_DEVICE: "MOE_ERR_DEVICE",
    MOE_ERR_STRIDE: "MOE_ERR_STRIDE",
    MOE_ERR_NULL: "MOE_ERR_NULL",
    MOE_ERR_WORKSPACE: "MOE_ERR_WORKSPACE",
    MOE_ERR_UNSUPPORTED: "MOE_ERR_UNSUPPORTED",
    MOE_ERR_CUDA: "MOE_ERR_CUDA",
    MOE_ERR_INTERNAL: "MOE_ERR_INTERNAL",
}

_STATUS_EXCEPTIONS = {
    MOE_ERR_SHAPE: ValueError,
    MOE_ERR_STRIDE: ValueError,
    MOE_ERR_NULL: ValueError,
    MOE_ERR_DEVICE: ValueError,
    MOE_ERR_WORKSPACE: ValueError,
    MOE_ERR_DTYPE: TypeError,
    MOE_ERR_INDEX: IndexError,
}

MOE_DTYPE_F32 = 0
MOE_DTYPE_F16 = 1
MOE_DTYPE_BF16 = 2
MOE_DTYPE_F64 = 3
MOE_DTYPE_I32 = 4
MOE_DTYPE_I64 = 5

TORCH_TO_MOE_DTYPE = {
    torch.float32: MOE_DTYPE_F32,
    torch.float16: MOE_DTYPE_F16,
    torch.bfloat16: MOE_DTYPE_BF16,
    torch.float64: MOE_DTYPE_F64,
    torch.int32: MOE_DTYPE_I32,
    torch.int64: MOE_DTYPE_I64,
}

MOE_DEVICE_CPU = 0
MOE_DEVICE_CUDA = 1

MOE_FLAG_FORCE_PORTABLE = 1 << 0
MOE_FLAG_OVERWRITE_H = 1 << 1
MOE_FLAG_ONE_WINDOW = 1 << 2
MOE_FLAG_FORWARD_NO_H = 1 << 3  # workspace queries only: a forward called with h NULL
MOE_FLAG_NO_PDL = 1 << 4  # no programmatic dependent launch (the library also reads MOE_FUSED_PDL=0)
MOE_GRAD_HIDDEN_STATES = 1 << 0
MOE_GRAD_TOP_K_WEIGHTS = 1 << 1
MOE_GRAD_GATE_UP_PROJ = 1 << 2
MOE_GRAD_DOWN_PROJ = 1 << 3

# Workspace alignment the ABI asks for.
WORKSPACE_ALIGN = 256


class MoeTensor(Structure):
    """moe_tensor_t"""

    _fields_ = [
        ("data", c_void_p),
        ("dtype", c_int32),
        ("ndim", c_int32),
        ("shape", c_int64 * MAX_DIMS),
        ("strides", c_int64 * MAX_DIMS),
        ("name", c_char_p),
    ]


class MoeContext(Structure):
    """moe_context_t"""

    _fields_ = [
        ("device_type", c_int32),
        ("device_index", c_int32),
        ("stream", c_void_p),
        ("workspace", c_void_p),
        ("workspace_bytes", c_size_t),
        ("flags", c_uint64),
    ]


class MoePlan(Structure):
    """moe_plan_t"""

    _fields_ = [
        ("expert_offsets", MoeTensor),
        ("sorted_pairs", MoeTensor),
        ("pair_rows", MoeTensor),
    ]


_T = POINTER(MoeTensor)
_C = POINTER(MoeContext)
_P = POINTER(MoePlan)

# name -> (restype, argtypes), one entry per function of moe_fused.h
_SIGNATURES = {
    "moe_abi_version": (c_int32, []),
    "moe_last_error": (c_char_p, []),
    "moe_has_cuda": (c_int32, []),
    "moe_routing_plan_workspace_size": (c_size_t, [c_int32, c_int64, c_int64]),
    "moe_routing_plan": (c_int32, [_C, _T, c_int64, _P]),
    "moe_linear_workspace_size": (c_size_t, [c_int32, c_int64, c_int64, c_int64, c_int64]),
    "moe_linear_forward": (c_int32, [_C, _T, _T, _T, _T]),
    "moe_linear_backward": (c_int32, [_C, _T, _T, _T, _T, _T, _T]),
    "moe_experts_workspace_size": (c_size_t, [c_int32, c_int64, c_int64, c_int64, c_int64, c_int64]),
    "moe_experts_forward_workspace_size": (
        c_size_t,
        [c_int32, c_int32, c_int64, c_int64, c_int64, c_int64, c_int64, c_uint64],
    ),
    "moe_experts_backward_workspace_size": (
        c_size_t,
        [c_int32, c_int32, c_int64, c_int64, c_int64, c_int64, c_int64, c_uint32, c_uint64],
    ),
    "moe_experts_forward": (c_int32, [_C, _T, _T, _T, _T, _T, _P, _T, _T]),
    "moe_experts_backward": (c_int32, [_C, _T, _T, _T, _T, _T, _P, _T, _T, _T, _T, _T]),
}


# The hot calls, also as handles whose pointer arguments are plain addresses (void *): the
# ops pass addresses into one buffer of descriptors (pack_call) instead of a ctypes object and
# a byref for each. Same functions, same checks in C.
_RAW_POINTER_ARGS = {
    "moe_experts_forward": 9,
    "moe_experts_backward": 12,
    "moe_linear_forward": 5,
    "moe_linear_backward": 7,
}
_RAW: dict = {}


def raw(name: str):
    """The C function `name` of _RAW_POINTER_ARGS taking addresses (ints, None for NULL)."""
    if not _RAW:
        lib()
    return _RAW[name]


class LibraryLoadError(RuntimeError):
    """libmoe_fused could not be loaded (raised at first use, not at import)."""


# ---- loading --------------------------------------------------------------------------


def _candidates() -> list[pathlib.Path]:
    env = os.environ.get(LIBRARY_ENV)
    if env:
        return [pathlib.Path(env)]
    return [pathlib.Path(__file__).resolve().parent / _LIB_NAME]


def _load() -> ctypes.CDLL:
    tried = []
    for path in _candidates():
        if not path.is_file():
            tried.append(f"{path} (not found)")
            continue
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            tried.append(f"{path} ({exc})")
            continue
        missing = [name for name in _SIGNATURES if not hasattr(lib, name)]
        if missing:
            raise LibraryLoadError(
                f"moe_fused: {path} lacks the symbols {', '.join(missing)}; rebuild it from this "
                "source tree (pip install . or cmake --build)"
            )
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = argtypes
        version = lib.moe_abi_version()
        if version != ABI_VERSION:
            raise LibraryLoadError(
                f"moe_fused: {path} has ABI version {version}, this Python package needs "
                f"{ABI_VERSION}; rebuild the library from this source tree"
            )
        for name, n_pointers in _RAW_POINTER_ARGS.items():
            fn = lib[name]  # a second handle of the same function
            fn.restype = c_int32
            fn.argtypes = [c_void_p] * n_pointers
            _RAW[name] = fn
        return lib
    hint = (
        f"set {LIBRARY_ENV}=/path/to/{_LIB_NAME} (e.g. build/dev/{_LIB_NAME} after "
        "`cmake -B build/dev -DMOE_FUSED_CUDA=OFF && cmake --build build/dev`) "
        "or install the package with `pip install .`"
    )
    raise LibraryLoadError(
        f"moe_fused: could not load {_LIB_NAME}; tried: {'; '.join(tried)}. Either {hint}."
    )


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: BaseException | None = None


def lib() -> ctypes.CDLL:
    """The loaded library; loads it on first call, re-raises the first load failure."""
    global _lib, _error
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is None:
            if _error is not None:
                raise LibraryLoadError(str(_error)) from _error
            try:
                _lib = _load()
            except LibraryLoadError as exc:
                _error = exc
                raise
    return _lib


# ---- the optional C++ fast path (csrc/torch/torch_ops.cpp) ----------------------------
TORCH_OPS_ENV = "MOE_FUSED_TORCH_OPS"  # "0": never use it (the ctypes path runs)
_TORCH_OPS_NAME = "_torch_ops"
_torch_ops_tried = False
_torch_ops_module = None
_torch_ops_status = "not loaded yet"


def torch_ops():
    """The C++ fast path of the experts and linear calls (a module), or None: not built beside the
    library, built against another torch, disabled by MOE_FUSED_TORCH_OPS=0, or failed to
    load (torch_ops_status() says which). Loaded once, after the library."""
    global _torch_ops_tried, _torch_ops_module, _torch_ops_status
    if _torch_ops_tried:
        return _torch_ops_module
    lib()  # (first: it takes the lock itself)
    with _lock:
        if not _torch_ops_tried:
            _torch_ops_module, _torch_ops_status = _load_torch_ops()
            _torch_ops_tried = True
    return _torch_ops_module


def torch_ops_status() -> str:
    """How the C++ fast path stands: "on (...)", or why it is off."""
    torch_ops()
    return _torch_ops_status


def _load_torch_ops():
    """(module or None, status line)."""
    if os.environ.get(TORCH_OPS_ENV) == "0":
        return None, f"off ({TORCH_OPS_ENV}=0)"
    library = _lib
    folder = pathlib.Path(library._name).resolve().parent
    import importlib.machinery
    import importlib.util

    path = next((folder / (_TORCH_OPS_NAME + suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES
                 if (folder / (_TORCH_OPS_NAME + suffix)).is_file()), None)
    if path is None:
        return None, (f"off (not built beside {library._name} for this Python; "
                      "`pip install --no-build-isolation .` builds it where torch is installed)")
    stamp = folder / (_TORCH_OPS_NAME + ".torch_version")
    built_for = stamp.read_text().strip() if stamp.is_file() else "unknown"
    if built_for != torch.__version__:
        # importing a module built against another torch may crash the process: not tried
        return None, f"off ({path.name} was built for torch {built_for}, this is {torch.__version__})"
    try:
        spec = importlib.util.spec_from_file_location("moe_fused." + _TORCH_OPS_NAME, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.init(*(ctypes.cast(getattr(library, name), c_void_p).value for name in (
            "moe_experts_forward", "moe_experts_backward", "moe_experts_forward_workspace_size",
            "moe_experts_backward_workspace_size", "moe_routing_plan_workspace_size",
            "moe_linear_forward", "moe_linear_backward", "moe_linear_workspace_size")))
    except Exception as exc:  # an unusable build must not break the ctypes path
        return None, f"off ({path}: {type(exc).__name__}: {exc})"
    return module, f"on ({path}, torch {built_for})"


def is_available() -> bool:
    """True when libmoe_fused loads (never raises)."""
    try:
        lib()
        return True
    except LibraryLoadError:
        return False


def has_cuda() -> bool:
    """True when the loaded library contains the CUDA implementation."""
    return bool(lib().moe_has_cuda())


def library_path() -> str | None:
    """Path of the loaded library, or None when it is not loaded."""
    return getattr(_lib, "_name", None)


def last_error() -> str:
    msg = lib().moe_last_error()
    return msg.decode("utf-8", "replace") if msg else ""


def check(status: int, what: str) -> None:
    """Raise the exception that maps `status` (see module doc), with moe_last_error()."""
    if status == MOE_OK:
        return
    msg = last_error() or f"{what} failed"
    exc = _STATUS_EXCEPTIONS.get(status, RuntimeError)
    name = STATUS_NAMES.get(status, f"status {status}")
    raise exc(f"{msg} [{what}: {name}]")


# ---- torch <-> C descriptors ----------------------------------------------------------


# Descriptors are written with one struct.pack_into each rather than through the ctypes
# constructors (about 2.5x less host time: a call describes 10 to 14 tensors). The layouts
# mirror MoeTensor / MoeContext (native alignment); a rank-r tensor's unused dims are zeros.
def _tensor_layout(rank: int) -> struct.Struct:
    pad = f"{8 * (MAX_DIMS - rank)}x" if rank < MAX_DIMS else ""
    return struct.Struct(f"@Pii{rank}q{pad}{rank}q{pad}P")


_TENSOR_LAYOUTS = [None] + [_tensor_layout(rank) for rank in range(1, MAX_DIMS + 1)]
_TENSOR_BYTES = ctypes.sizeof(MoeTensor)
_CONTEXT_LAYOUT = struct.Struct("@iiPPNQ")
assert all(s.size == _TENSOR_BYTES for s in _TENSOR_LAYOUTS[1:])
assert _CONTEXT_LAYOUT.size == ctypes.sizeof(MoeContext)
# name -> address of its encoded bytes, kept alive here for the process (a descriptor's
# `name` points into them).
_NAMES: dict[str, int] = {}
_NAME_BYTES: list[bytes] = []


def _name_address(name: str) -> int:
    """The address of `name`'s encoded bytes, kept alive for the process (made once)."""
    address = _NAMES.get(name)
    if address:
        return address
    encoded = name.encode()
    _NAME_BYTES.append(encoded)
    return _NAMES.setdefault(name, ctypes.cast(c_char_p(encoded), c_void_p).value)


name_address = _name_address


def _tensor_fields(t: torch.Tensor, address: int) -> tuple:
    """(rank, the moe_tensor_t fields of `t`) named by the name at `address` (_name_address);
    a tensor no descriptor can describe raises, naming it."""
    dtype = TORCH_TO_MOE_DTYPE.get(t.dtype)
    shape = t.shape
    ndim = len(shape)
    if dtype is None or not 1 <= ndim <= MAX_DIMS:
        name = next((k for k, v in _NAMES.items() if v == address), "a tensor")
        if dtype is None:
            raise TypeError(f"{name}: dtype {t.dtype} is not supported by moe_fused")
        raise ValueError(f"{name}: rank {ndim} is not supported (1..{MAX_DIMS})")
    return ndim, (t.data_ptr(), dtype, ndim, *shape, *t.stride(), address)


def _pack_tensor(buf, offset: int, t: torch.Tensor, name: str) -> None:
    """Writes the moe_tensor_t of `t` into the ctypes object `buf` at byte `offset`."""
    ndim, fields = _tensor_fields(t, _NAMES.get(name) or _name_address(name))
    _TENSOR_LAYOUTS[ndim].pack_into(buf, offset, *fields)


def tensor(t: torch.Tensor, name: str) -> MoeTensor:
    """A moe_tensor_t describing `t` (no copy; `t` must outlive the call)."""
    desc = MoeTensor()
    _pack_tensor(desc, 0, t, name)
    return desc


def plan(expert_offsets: torch.Tensor, sorted_pairs: torch.Tensor, pair_rows: torch.Tensor) -> MoePlan:
    p = MoePlan()
    _pack_tensor(p, 0, expert_offsets, "expert_offsets")
    _pack_tensor(p, _TENSOR_BYTES, sorted_pairs, "sorted_pairs")
    _pack_tensor(p, 2 * _TENSOR_BYTES, pair_rows, "pair_rows")
    return p


# ---- the routing plan in one int32 buffer -------------------------------------------------
# The experts layer keeps its routing plan (the forward's output, the backward's input) in one
# int32 tensor [2 n + E + 1]: sorted_pairs [n], pair_rows [n], expert_offsets [E + 1] back to
# back, every element written by the plan builders. One allocation instead of three, and one
# descriptor pack without views: the host time before the first kernel is time the GPU waits
# (bench/device/host_stages.py: a torch.empty of a CUDA tensor costs ~10 us on the H100
# machine's host). The kernels read the plan as single int32s (no alignment asked).
_PLAN_LAYOUT = struct.Struct("@" + 3 * _TENSOR_LAYOUTS[1].format.lstrip("@"))
assert _PLAN_LAYOUT.size == ctypes.sizeof(MoePlan)


def packed_plan_numel(num_experts, num_pairs):
    """Elements of the packed plan (SymInts welcome: the fake kernels size it under compile)."""
    return 2 * num_pairs + num_experts + 1


def packed_plan_views(buf: torch.Tensor, num_experts: int, num_pairs: int):
    """(expert_offsets [E+1], sorted_pairs [n], pair_rows [n]): views of a packed plan."""
    n = num_pairs
    return buf[2 * n : 2 * n + num_experts + 1], buf[:n], buf[n : 2 * n]


def packed_plan_values(buf: torch.Tensor, num_experts: int, num_pairs: int) -> tuple:
    """The moe_plan_t fields of a packed plan (no views made); the C library checks the sizes."""
    if (buf.dtype != torch.int32 or buf.dim() != 1 or buf.stride(0) != 1
            or buf.numel() != packed_plan_numel(num_experts, num_pairs)):
        raise ValueError(
            f"plan: a contiguous int32 [{packed_plan_numel(num_experts, num_pairs)}] tensor "
            f"is expected for {num_experts} experts and {num_pairs} pairs, got {buf.dtype} "
            f"{tuple(buf.shape)} with strides {buf.stride()}"
        )
    n, base, i32 = num_pairs, buf.data_ptr(), MOE_DTYPE_I32
    return (base + 8 * n, i32, 1, num_experts + 1, 1, _PLAN_NAMES[0],
            base, i32, 1, n, 1, _PLAN_NAMES[1],
            base + 4 * n, i32, 1, n, 1, _PLAN_NAMES[2])


_PLAN_NAMES = tuple(_name_address(n) for n in ("expert_offsets", "sorted_pairs", "pair_rows"))


def packed_plan(buf: torch.Tensor, num_experts: int, num_pairs: int) -> MoePlan:
    """The moe_plan_t of a packed plan (packed_plan_values as a ctypes object)."""
    p = MoePlan()
    _PLAN_LAYOUT.pack_into(p, 0, *packed_plan_values(buf, num_experts, num_pairs))
    return p


def device_type(device: torch.device) -> int:
    if device.type == "cpu":
        return MOE_DEVICE_CPU
    if device.type == "cuda":
        return MOE_DEVICE_CUDA
    raise ValueError(f"moe_fused runs on 'cpu' and 'cuda' tensors, not on {device.type!r}")


_tls = threading.local()


def _workspace(device: torch.device, nbytes: int) -> torch.Tensor:
    """Scratch memory for one call. CUDA: from torch's caching allocator (cheap, stream-
    ordered). CPU: a grow-only buffer kept per thread, because a fresh large CPU allocation
    is page-faulted in on every call (the CPU core's scratch is O(T*k*(H+I)))."""
    if device.type != "cpu":
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    buf = getattr(_tls, "cpu_workspace", None)
    if buf is None or buf.numel() < nbytes:
        _tls.cpu_workspace = None  # free the old one first
        buf = torch.empty(nbytes, dtype=torch.uint8)
        _tls.cpu_workspace = buf
    return buf


def release_cpu_workspace() -> None:
    """Free this thread's cached CPU workspace (it is re-allocated on the next call)."""
    _tls.cpu_workspace = None


# torch's raw current-stream getter (what torch.cuda.current_stream(i).cuda_stream reads,
# without building a Stream object: several microseconds a call on slow hosts).
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _current_stream(index: int) -> int:
    if _raw_stream is not None:
        return _raw_stream(index)
    return torch.cuda.current_stream(index).cuda_stream


class Context:
    """A moe_context_t for `device` with a workspace of `nbytes` (kept alive by this object).

    CPU: no stream. CUDA: the device's index and torch's current stream on it (so the work
    is ordered with the caller's and is captured by CUDA graphs); the workspace comes from
    torch's caching allocator (no cudaMalloc, no sync).
    """

    def __init__(self, device: torch.device, nbytes: int, flags: int = 0):
        values, self.workspace = context_values(device, nbytes, flags)
        self.ctx = MoeContext()
        _CONTEXT_LAYOUT.pack_into(self.ctx, 0, *values)

    def ref(self):
        return ctypes.byref(self.ctx)


def context_values(device: torch.device, nbytes: int, flags: int) -> tuple:
    """(the moe_context_t fields of a Context, its workspace tensor or None): the workspace
    must stay alive until the call returns (CUDA: torch's allocator keeps it for the stream)."""
    dev_type = device_type(device)
    index = stream = address = 0
    if dev_type == MOE_DEVICE_CUDA:
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = _current_stream(index)
    workspace = None
    if nbytes > 0:
        # Over-allocate so the workspace can start on a 256-byte boundary.
        workspace = _workspace(device, nbytes + WORKSPACE_ALIGN)
        base = workspace.data_ptr()
        address = base + (-base) % WORKSPACE_ALIGN
    return (dev_type, index, stream, address, nbytes if address else 0, flags), workspace


# ---- the descriptors of one call in one buffer --------------------------------------------
# The hot calls (experts and linear, forward and backward) write their context, plan and
# tensor descriptors into one buffer with one struct.pack_into and pass the raw C function
# addresses into it: ~5.9 us for a forward's context, plan and seven tensors on the
# development machine against ~8.9 us as ctypes objects packed and passed by reference one by
# one (session 14, measured with timeit); all of it is host time before the first kernel.
@functools.lru_cache(maxsize=512)
def _call_layout(has_plan: bool, ranks: tuple) -> tuple:
    """(Struct, ctypes array type, byte offsets) of a context, a plan (has_plan) and tensors
    of these ranks back to back (each a multiple of 8 bytes: the natural alignment holds)."""
    parts = [_CONTEXT_LAYOUT] + ([_PLAN_LAYOUT] if has_plan else []) + [_TENSOR_LAYOUTS[r] for r in ranks]
    offsets, offset = [], 0
    for part in parts:
        offsets.append(offset)
        offset += part.size
    layout = struct.Struct("@" + "".join(part.format.lstrip("@") for part in parts))
    assert layout.size == offset and offset % 8 == 0
    return layout, c_uint64 * (offset // 8), tuple(offsets)


def pack_call(ctx_values: tuple, plan_values: tuple | None, tensors: tuple, names: tuple):
    """(buffer, addresses) for a raw call: the context, then the plan (unless None), then a
    descriptor of each tensor (names: name_address values); addresses lists the context's,
    the plan's (if any) and each tensor's, None for a None tensor (NULL). The buffer must
    outlive the call."""
    values = [*ctx_values]
    if plan_values is not None:
        values += plan_values
    ranks = []
    for t, address in zip(tensors, names):
        if t is None:
            continue
        ndim, fields = _tensor_fields(t, address)
        ranks.append(ndim)
        values += fields
    layout, array, offsets = _call_layout(plan_values is not None, tuple(ranks))
    buf = array()
    layout.pack_into(buf, 0, *values)
    base = ctypes.addressof(buf)
    addresses = [base + offset for offset in offsets]
    if len(ranks) != len(tensors):  # None tensors: NULL in their places
        it = iter(addresses[len(offsets) - len(ranks):])
        addresses[len(offsets) - len(ranks):] = [None if t is None else next(it) for t in tensors]
    return buf, addresses


def call(name: str, ctx_values: tuple, tensors: tuple, names: tuple, plan_values=None, plan_at=0):
    """Calls the C function `name` through its raw handle on one call buffer (pack_call): the
    context's address, then the tensors' (None: NULL), the plan's inserted after the first
    `plan_at` of them when plan_values is given; raises on a failing status. The caller keeps
    the context's workspace alive until this returns."""
    buf, addresses = pack_call(ctx_values, plan_values, tensors, names)  # [ctx, plan?, tensors]
    if plan_values is not None:
        addresses.insert(plan_at + 1, addresses.pop(1))
    check(raw(name)(*addresses), name)
    del buf  # (alive until here: the C function has read it)


def dev_flags() -> int:
    """The context flags the environment asks for (MOE_FUSED_PORTABLE=1: the portable
    kernels), read at every call like the library's own environment variables."""
    return MOE_FLAG_FORCE_PORTABLE if os.environ.get("MOE_FUSED_PORTABLE") == "1" else 0


# The workspace sizes depend on the device type and the problem's sizes only: cached, since
# every call asks (a model asks the same few shapes again and again).
@functools.lru_cache(maxsize=1024)
def _routing_plan_ws(dev_type: int, num_pairs: int, num_experts: int) -> int:
    return int(lib().moe_routing_plan_workspace_size(dev_type, num_pairs, num_experts))


@functools.lru_cache(maxsize=1024)
def _experts_ws(dev_type: int, T: int, k: int, H: int, I: int, E: int) -> int:
    return int(lib().moe_experts_workspace_size(dev_type, T, k, H, I, E))


@functools.lru_cache(maxsize=1024)
def _experts_fwd_ws(dev_type: int, dt: int, T: int, k: int, H: int, I: int, E: int, flags: int) -> int:
    return int(lib().moe_experts_forward_workspace_size(dev_type, dt, T, k, H, I, E, flags))


@functools.lru_cache(maxsize=1024)
def _experts_bwd_ws(dev_type: int, dt: int, T: int, k: int, H: int, I: int, E: int, grads: int, flags: int) -> int:
    return int(lib().moe_experts_backward_workspace_size(dev_type, dt, T, k, H, I, E, grads, flags))


@functools.lru_cache(maxsize=1024)
def _linear_ws(dev_type: int, n: int, E: int, in_f: int, out_f: int) -> int:
    return int(lib().moe_linear_workspace_size(dev_type, n, E, in_f, out_f))


def routing_plan_workspace_size(device: torch.device, num_pairs: int, num_experts: int) -> int:
    return _routing_plan_ws(device_type(device), int(num_pairs), int(num_experts))


def experts_workspace_size(device: torch.device, T: int, k: int, H: int, I: int, E: int) -> int:
    return _experts_ws(device_type(device), int(T), int(k), int(H), int(I), int(E))


def experts_forward_workspace_size(
    device: torch.device, dtype: torch.dtype, T: int, k: int, H: int, I: int, E: int, flags: int = 0
) -> int:
    """Bytes of moe_experts_forward on activations of `dtype` under context flags `flags`."""
    return _experts_fwd_ws(
        device_type(device), TORCH_TO_MOE_DTYPE.get(dtype, -1), int(T), int(k), int(H), int(I), int(E),
        int(flags) | dev_flags(),
    )


def experts_backward_workspace_size(
    device: torch.device, dtype: torch.dtype, T: int, k: int, H: int, I: int, E: int, grads: int, flags: int
) -> int:
    """Bytes of moe_experts_backward on activations of `dtype`, asked for the MOE_GRAD_* bits
    `grads` under context flags `flags` (as passed to :func:`context`; the device flags are
    added here too)."""
    return _experts_bwd_ws(
        device_type(device), TORCH_TO_MOE_DTYPE.get(dtype, -1), int(T), int(k), int(H), int(I), int(E), int(grads),
        int(flags) | dev_flags(),
    )


@functools.lru_cache(maxsize=1024)
def _experts_fwd_call_ws(dev_type: int, dt: int, T: int, k: int, H: int, I: int, E: int, flags: int) -> int:
    return max(_experts_fwd_ws(dev_type, dt, T, k, H, I, E, flags), _routing_plan_ws(dev_type, T * k, E))


def experts_forward_call_workspace_size(
    device: torch.device, dtype: torch.dtype, T: int, k: int, H: int, I: int, E: int, flags: int
) -> int:
    """Bytes of one moe_experts_forward call, routing plan included, under the context flags
    `flags` as they are passed (dev_flags() included): one cached query on the hot path."""
    return _experts_fwd_call_ws(device_type(device), TORCH_TO_MOE_DTYPE.get(dtype, -1), T, k, H, I, E, flags)


def experts_backward_call_workspace_size(
    device: torch.device, dtype: torch.dtype, T: int, k: int, H: int, I: int, E: int, grads: int, flags: int
) -> int:
    """experts_backward_workspace_size under the context flags `flags` as they are passed
    (dev_flags() included)."""
    return _experts_bwd_ws(device_type(device), TORCH_TO_MOE_DTYPE.get(dtype, -1), T, k, H, I, E, grads, flags)


def linear_workspace_size(device: torch.device, n: int, E: int, in_f: int, out_f: int) -> int:
    return _linear_ws(device_type(device), int(n), int(E), int(in_f), int(out_f))


def context(device: torch.device, nbytes: int, flags: int = 0) -> Context:
    return Context(device, nbytes, flags | dev_flags())
