"""pytest setup shared by all moe-fused tests.

- `gpu` marker: tests that need a CUDA GPU; skipped (with a reason) when there is none.
- Running from a source checkout without `pip install .`: when MOE_FUSED_LIBRARY is set (a
  built libmoe_fused.so) or `moe_fused` is not installed, python/ is put first on sys.path.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

# Before torch is imported: torch's bundled libgomp and the system libgomp of libmoe_fused
# spin against each other otherwise (5-50x slower CPU tests on 2 cores). [hf engineer]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

_ROOT = pathlib.Path(__file__).resolve().parents[1]
# Dev mode (MOE_FUSED_LIBRARY set, or the package not installed): test this source tree,
# never a stale installed copy.
if os.environ.get("MOE_FUSED_LIBRARY") or importlib.util.find_spec("moe_fused") is None:
    sys.path.insert(0, str(_ROOT / "python"))

import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: slower CPU tests")


@pytest.fixture
def token_windows_by_rule():
    """The CUDA layer's token windows as its size rule takes them, not one window: by default
    an 80 GB GPU takes one window for every test-sized shape (ops.set_one_token_window)."""
    from moe_fused.ops import one_token_window

    with one_token_window(False):
        yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    try:
        import moe_fused
        from moe_fused import _lib

        if _lib.is_available():
            where = _lib.library_path()
            cuda = "with CUDA" if _lib.has_cuda() else "CPU only"
            return f"moe_fused {moe_fused.__version__}: {where} ({cuda}); torch {torch.__version__}"
        return f"moe_fused: native library NOT loadable ({_lib._error})"
    except Exception as exc:  # never break collection on the header
        return f"moe_fused: import failed: {exc!r}"
