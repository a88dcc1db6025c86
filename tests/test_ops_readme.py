"""The README's Python example runs as written."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.skipif(not README.is_file(), reason="needs the source tree's README.md")
def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README.md has no python example"
    env: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), env)
    T, H, I = env["T"], env["H"], env["I"]
    assert env["out"].shape == (T, H)
    assert env["x"].grad is not None and env["gate_up_proj"].grad is not None and env["down_proj"].grad is not None
    assert env["y"].shape == (T, 2 * I)
