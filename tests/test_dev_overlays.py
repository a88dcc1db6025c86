"""The timing-only diagnostic overlays of dev/sm90/ (bench/device/ab.sh and store_cost.sh
build them on the GPU machine) still find their anchors in today's kernel sources: an edit
to a kernel that moves an anchor fails here, on the CPU, instead of costing a device call."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_DEV = _ROOT / "dev" / "sm90"
_SCRIPTS = ("da_diag_overlays", "rowgemm_store_overlays", "wgrad_diag_overlay")


def _load(name: str):
    sys.path.insert(0, str(_DEV))  # the scripts import dev/sm90/overlays.py
    try:
        spec = importlib.util.spec_from_file_location(name, _DEV / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(_DEV))


@pytest.mark.skipif(not _DEV.is_dir(), reason="needs the source tree's dev/sm90")
@pytest.mark.parametrize("name", _SCRIPTS)
def test_overlay_anchors_match_once(name):
    mod = _load(name)
    text = (_ROOT / mod.SRC).read_text()
    assert mod.EDITS, name
    for edit, anchor, _ in mod.EDITS:
        assert text.count(anchor) == 1, f"{name}: anchor '{edit}' found {text.count(anchor)} times in {mod.SRC}"
