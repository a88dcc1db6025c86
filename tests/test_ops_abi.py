"""The ctypes mirrors in moe_fused/_lib.py match csrc/include/moe_fused.h (layout, enums)."""

from __future__ import annotations

import ctypes
import pathlib
import re
import shutil
import subprocess

import pytest

from moe_fused import _lib

HEADER = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "include" / "moe_fused.h"


@pytest.mark.skipif(not HEADER.is_file(), reason="needs the source tree's csrc/include/moe_fused.h")
def test_struct_layout_matches_header(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    fields = {
        "moe_tensor_t": (_lib.MoeTensor, ["data", "dtype", "ndim", "shape", "strides", "name"]),
        "moe_context_t": (_lib.MoeContext, ["device_type", "device_index", "stream", "workspace", "workspace_bytes", "flags"]),
        "moe_plan_t": (_lib.MoePlan, ["expert_offsets", "sorted_pairs", "pair_rows"]),
    }
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "moe_fused.h"', "int main(void) {"]
    for ctype, (_, names) in fields.items():
        lines.append(f'  printf("%zu\\n", sizeof({ctype}));')
        lines += [f'  printf("%zu\\n", offsetof({ctype}, {n}));' for n in names]
    lines += ["  return 0;", "}"]
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "layout"
    subprocess.run([cc, f"-I{HEADER.parent}", str(src), "-o", str(exe)], check=True)
    got = [int(v) for v in subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split()]
    expected = []
    for _, (struct, names) in fields.items():
        expected.append(ctypes.sizeof(struct))
        expected += [getattr(struct, n).offset for n in names]
    assert got == expected


@pytest.mark.skipif(not HEADER.is_file(), reason="needs the source tree's csrc/include/moe_fused.h")
def test_enums_and_functions_match_header():
    text = HEADER.read_text()
    for name, value in re.findall(r"\b(MOE_(?:ERR_\w+|OK|DTYPE_\w+|DEVICE_\w+))\s*=\s*(\d+)", text):
        assert getattr(_lib, name) == int(value), name
    bits = re.findall(r"#define\s+(MOE_(?:FLAG|GRAD)_\w+)\s+\(1u?l?l?\s*<<\s*(\d+)\)", text)
    assert len(bits) >= 9, bits  # every context flag and gradient bit the header defines
    for name, shift in bits:
        assert getattr(_lib, name) == 1 << int(shift), name
    assert f"#define MOE_ABI_VERSION {_lib.ABI_VERSION}" in text
    declared = set(re.findall(r"MOE_API\s+[\w\s\*]+?\b(moe_\w+)\s*\(", text))
    assert declared == set(_lib._SIGNATURES), declared ^ set(_lib._SIGNATURES)
