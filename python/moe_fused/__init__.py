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

# libmoe_fused uses the system libgomp; PyTorch's CPU wheels bundle their own. Two OpenMP
# runtimes whose idle threads spin steal each other's cores: measured 5-50x slower CPU
# training steps on 2 cores (every op, torch's too). Passive waiting fixes it; it only takes
# effect when set before torch is imported (as with the `moe-fused` command). [hf engineer]
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

