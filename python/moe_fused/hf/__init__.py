"""Hugging Face Transformers (v5) integration of moe-fused.

Importing this module (``import moe_fused`` does it) registers
``experts_implementation="moe_fused"`` with Transformers' experts interface::

    import moe_fused
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="moe_fused")
    # or, on a model already loaded:
    moe_fused.patch(model)      # every MoE experts module now runs on moe-fused
    moe_fused.unpatch(model)    # back to what it used before (or patch(model, False))

Models whose experts moe-fused cannot compute exactly (biases, interleaved
gate/up, custom gating, another activation) raise
:class:`UnsupportedExpertsError` naming the model and the reason.
Works without transformers installed: then ``register()`` returns False and
``patch()`` raises ImportError.
"""
from __future__ import annotations

from .experts import (
    UnsupportedExpertsError,
    check_experts_module,
    experts_weights,
    is_experts_module,
    moe_fused_experts_forward,
)
from .patch import (
    IMPLEMENTATION,
    find_experts_modules,
    is_patched,
    patch,
    register,
    supported,
    unpatch,
)

__all__ = [
    "IMPLEMENTATION",
    "UnsupportedExpertsError",
    "check_experts_module",
    "experts_weights",
    "find_experts_modules",
    "is_experts_module",
    "is_patched",
    "moe_fused_experts_forward",
    "patch",
    "register",
    "supported",
    "unpatch",
]

register()
