"""moe-fused: fused Mixture-of-Experts layers for fast, memory-light MoE training.

    import moe_fused
    out = moe_fused.moe_experts(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj)
    y = moe_fused.moe_fused_linear(input, weight, selected_experts)

Importing the package never fails because of the native library: a missing or mismatched
libmoe_fused.so is reported (with what was tried) at the first call that needs it.
Importing it also registers experts_implementation="moe_fused" with Transformers (when
installed), so `from_pretrained(..., experts_implementation="moe_fused")` works; or
`moe_fused.patch(model)` on a loaded model.
"""

from __future__ import annotations

import os as _os

# OpenMP threads that spin while idle (libgomp's default) starve the working threads when
# the cores are shared with other processes: measured 5-50x slower CPU steps on a busy
# 2-core machine, not seen on an idle one. Passive waiting avoids it. It only takes effect
# if set before the OpenMP runtime starts (before torch is imported, as the `moe-fused`
# command does); otherwise set OMP_WAIT_POLICY=PASSIVE in the environment.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ._lib import LibraryLoadError, has_cuda, is_available, library_path
from .ops import moe_experts, moe_fused_linear

__version__ = "0.1.0"

# Transformers integration: importing it registers experts_implementation="moe_fused"
# (a no-op without transformers installed).
from .hf import patch, unpatch  # noqa: E402

__all__ = [
    "LibraryLoadError",
    "__version__",
    "has_cuda",
    "is_available",
    "library_path",
    "moe_experts",
    "moe_fused_linear",
    "patch",
    "unpatch",
]

