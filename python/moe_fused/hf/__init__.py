"""Hugging Face Transformers (v5) integration of moe-fused.

Importing this module (``import moe_fused`` does it) registers
``experts_implementation="moe_fused"`` with Transformers' experts interface::

    import moe_fused
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="moe_fused")
    # or, on a model already loaded:
    moe_fused.patch(model)      # every MoE experts module now runs on moe-fused
    moe_fused.unpatch(model)    # back to what it used before (or patch(model, False))

Two paths, chosen per experts module (``moe_fused.hf.supported(model)`` tells
which, and why): "fused" runs the whole layer on the fused op
``moe_fused.moe_experts``; "two_gemm" runs the two grouped GEMMs on
``moe_fused.moe_fused_linear`` with the module's own code in between, for
layouts the fused op can't express. Expert-parallel modules are refused with
:class:`UnsupportedExpertsError` naming the model and the reason.
Works without transformers installed: then ``register()`` returns False and
``patch()`` raises ImportError.

Support (decided per module at run time from its attributes, not from a list
of names; with transformers 5.23 every class decorated with
``@use_experts_implementation`` is tested in tests/test_hf_experts.py against
its own eager forward, output and all gradients):

- fused (SiLU-gated, [gate; up] rows, no biases): Qwen3-MoE, Qwen2-MoE
  (shared expert), OLMoE, Mixtral, DeepSeek-V2/V3/V3.2, Qwen3-Next,
  Qwen3.5-MoE, Qwen3-VL-MoE, Qwen3-Omni-MoE, GLM-4-MoE (+Lite, 4V, MoE-DSA),
  Ernie-4.5-MoE, Dots1, HunYuan-MoE, Jamba, Granite-MoE (all variants),
  MiniMax (M2), Phi-MoE, Kimi-Linear, LFM2-MoE, Mistral4 / Large4, Exaone-MoE,
  FlexOlmo, Solar-Open, AfMoE, Bailing-hybrid, MiMo-V2-Flash, Zaya, Beam, ...;
  Aria (transposed [E,H,2I] / [E,I,H] weights) through strided views.
- two_gemm: GPT-OSS and the OpenAI privacy filter (biases, interleaved
  gate/up, clamped SwiGLU), DeepSeek-V4, GLM-5-Next, HY-V4, MiniMax-M3-VL
  (clamped SwiGLU), Inkling2 (soft-capped SwiGLU), Gemma4 and Diffusion-Gemma
  (GELU-tanh gate), Nemotron-H (no gate, ReLU^2); MuseSpark (post-expert norm,
  not instantiated by the test).
- refused: modules running expert-parallel (sentinel expert ids) or with sharded
  (DTensor) expert weights.
"""
from __future__ import annotations

from .experts import (
    UnsupportedExpertsError,
    check_experts_module,
    experts_path,
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
    "experts_path",
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
