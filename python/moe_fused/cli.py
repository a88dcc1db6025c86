"""The `moe-fused` command.

    moe-fused demo [...]    the main job (moe_fused.demo): a run of the fused layer
    moe-fused bench [...]   experts layer benchmark vs Transformers v5 (moe_fused.bench)
    moe-fused info          versions, the native library in use, CUDA availability
"""

from __future__ import annotations

import os
import sys

USAGE = """usage: moe-fused <command> [options]

commands:
  demo    run the main job (see `moe-fused demo --help`)
  bench   benchmark the experts layer against Transformers v5 eager / grouped_mm
          (see `moe-fused bench --help`)
  info    show versions, the native library in use and whether CUDA is available
"""


def _pdl_status(torch) -> str:
    """What the library decides at every call (csrc/cuda/pdl.cu), as far as Python sees it."""
    if os.environ.get("MOE_FUSED_PDL") == "0":
        return "off (MOE_FUSED_PDL=0)"
    if not torch.cuda.is_available():
        return "on for compute capability 9.0+ GPUs (none visible); MOE_FUSED_PDL=0 turns it off"
    cc = torch.cuda.get_device_capability()
    if cc[0] < 9:
        return f"off (compute capability {cc[0]}.{cc[1]}: it needs 9.0+)"
    return "on (MOE_FUSED_PDL=0 turns it off)"


def _info() -> int:
    import torch

    import moe_fused
    from moe_fused import _lib

    print(f"moe_fused {moe_fused.__version__} ({moe_fused.__file__})")
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    try:
        import transformers

        print(f"transformers {transformers.__version__}")
    except ImportError:
        print("transformers: not installed")
    try:
        _lib.lib()
        print(f"libmoe_fused: {_lib.library_path()} (ABI {_lib.ABI_VERSION}, "
              f"{'with' if _lib.has_cuda() else 'without'} the CUDA path)")
        print(f"C++ fast path (moe_fused._torch_ops): {_lib.torch_ops_status()}")
        if _lib.has_cuda():
            print(f"kernel chaining (programmatic dependent launch): {_pdl_status(torch)}")
    except _lib.LibraryLoadError as exc:
        print(f"libmoe_fused: NOT LOADED: {exc}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "bench":
        from moe_fused.bench import main as bench_main

        return bench_main(rest) or 0
    if cmd == "demo":
        try:
            from moe_fused.demo import main as demo_main
        except ImportError as exc:
            if getattr(exc, "name", None) != "moe_fused.demo":
                raise
            print("moe-fused demo is not available in this build; try `moe-fused bench`", file=sys.stderr)
            return 2
        return demo_main(rest) or 0
    if cmd == "info":
        return _info()
    print(f"moe-fused: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
