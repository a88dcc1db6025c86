"""moe_fused works without transformers: the hf integration is optional."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import moe_fused

# The same moe_fused this test process imported (installed, or python/ of a checkout).
PKG_PARENT = pathlib.Path(moe_fused.__file__).resolve().parents[1]

CODE = r"""
import sys
sys.modules["transformers"] = None   # `import transformers` now raises ImportError
import torch, moe_fused
x = torch.randn(4, 8)
out = moe_fused.moe_experts(x, torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1),
                            torch.randn(2, 6, 8), torch.randn(2, 8, 3))
assert out.shape == (4, 8)
try:
    moe_fused.patch(torch.nn.Linear(2, 2))
except ImportError as exc:
    assert "transformers" in str(exc), exc
    print("OK")
"""


def test_import_and_op_without_transformers():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PKG_PARENT), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr
