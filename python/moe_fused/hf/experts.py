"""The ``"moe_fused"`` experts implementation for Transformers v5.

Transformers v5 MoE models keep their routed experts in one module per layer,
decorated with ``transformers.integrations.moe.use_experts_implementation``:
``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` parameters and a
``forward(hidden_states [T,H], top_k_index [T,k], top_k_weights [T,k])``
that the decorator dispatches through ``ALL_EXPERTS_FUNCTIONS`` by
``config._experts_implementation``. :func:`moe_fused_experts_forward` is the
function registered there under ``"moe_fused"``; it maps the module onto
``moe_fused.moe_experts``.

Only layouts the op computes exactly are accepted. Anything else (biases,
gate/up interleaved, a custom gating function such as GPT-OSS' clamped
SwiGLU, an activation other than SiLU, experts without a gate, a post-expert
norm, expert-parallel sentinels) raises :class:`UnsupportedExpertsError`,
naming the model and the reason: never silently wrong numbers.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "UnsupportedExpertsError",
    "check_experts_module",
    "experts_weights",
    "is_experts_module",
    "moe_fused_experts_forward",
]


class UnsupportedExpertsError(NotImplementedError):
    """The experts of this model cannot run on moe-fused (the message says why)."""


def _resolve_op():
    # The op is resolved when moe_fused.hf is imported (not per call: that
    # keeps the forward traceable by torch.compile without import side effects).
    try:
        from ..ops import moe_experts  # noqa: PLC0415
    except Exception as exc:  # pragma: no cover - only when the build is broken
        err = exc

        def moe_experts(*args, **kwargs):
            raise RuntimeError(
                "moe_fused: the moe_experts op could not be loaded "
                f"({type(err).__name__}: {err}); is libmoe_fused built? "
                "(pip install . or MOE_FUSED_LIBRARY=/path/to/libmoe_fused.so)"
            ) from err

    return moe_experts


_moe_experts = _resolve_op()

# Classes whose `_apply_gate` differs from the default only in numerics the op
# already matches (fp32 SiLU*up, rounded back to the activation dtype).
_EQUIVALENT_GATES = {"BeamExperts"}


def _is_silu(act) -> bool:
    if act is torch.nn.functional.silu:
        return True
    if isinstance(act, nn.SiLU):
        return True
    # transformers.activations.SiLUActivation (and aliases in older versions)
    return type(act).__name__ in ("SiLUActivation", "SiLU", "SwishActivation")


def is_experts_module(module) -> bool:
    """True for a module whose forward is dispatched by Transformers' experts interface."""
    if not isinstance(module, nn.Module) or not hasattr(module, "config"):
        return False
    fwd = getattr(type(module), "forward", None)
    if fwd is None or getattr(fwd, "__wrapped__", None) is None:
        return False
    code = getattr(fwd, "__code__", None)
    if code is None:
        return False
    return "experts_interface" in code.co_freevars or "ALL_EXPERTS_FUNCTIONS" in code.co_names


def _describe(module) -> str:
    cfg = getattr(module, "config", None)
    model_type = getattr(cfg, "model_type", None) or "?"
    return f"model '{model_type}' ({type(module).__name__})"


def _problems(module) -> list[str]:
    """Every reason this experts module can't be computed by moe_experts ([] = supported)."""
    problems = []
    has_gate = getattr(module, "has_gate", True)
    if not has_gate or not isinstance(getattr(module, "gate_up_proj", None), torch.Tensor):
        problems.append(
            "its experts have no gate (up_proj followed by an activation, no gate_up_proj); "
            "moe-fused computes gated SwiGLU experts"
        )
    if not isinstance(getattr(module, "down_proj", None), torch.Tensor):
        problems.append("it has no down_proj parameter")
    has_bias = bool(getattr(module, "has_bias", False))
    for name in ("gate_up_proj_bias", "up_proj_bias", "down_proj_bias"):
        if getattr(module, name, None) is not None:
            has_bias = True
    if has_bias:
        problems.append("its expert projections have biases (moe-fused experts have none)")
    if not getattr(module, "is_concatenated", True):
        problems.append(
            "gate and up rows are interleaved (gate0, up0, gate1, ...), which is no strided view of "
            "the [gate; up] layout"
        )
    if getattr(module, "has_post_expert_norm", False):
        problems.append("it applies a norm after each expert")
    gate_fn = getattr(type(module), "_apply_gate", None)
    if gate_fn is not None and getattr(gate_fn, "__name__", "") != "_default_apply_gate":
        if type(module).__name__ not in _EQUIVALENT_GATES:
            problems.append(
                f"it uses its own gating function {type(module).__name__}._apply_gate "
                "(e.g. a clamped or scaled SwiGLU); moe-fused computes silu(gate) * up"
            )
    act = getattr(module, "act_fn", None)
    if act is not None and not _is_silu(act):
        problems.append(f"its activation is {type(act).__name__}, not SiLU (moe-fused computes silu(gate) * up)")
    if getattr(module, "_is_expert_parallel", False):
        problems.append("it runs expert-parallel (sentinel expert ids >= num_experts)")
    if not problems:
        gu, dn = experts_weights(module, _checked=True)
        if gu.dim() != 3 or dn.dim() != 3:
            problems.append(f"unexpected weight ranks gate_up {tuple(gu.shape)}, down {tuple(dn.shape)}")
        else:
            E, I2, H = gu.shape
            if I2 % 2 or tuple(dn.shape) != (E, H, I2 // 2):
                problems.append(
                    f"gate_up_proj {tuple(gu.shape)} and down_proj {tuple(dn.shape)} are not "
                    "[E, 2I, H] and [E, H, I]"
                )
    return problems


def check_experts_module(module) -> None:
    """Raise UnsupportedExpertsError if moe-fused can't compute this experts module exactly."""
    problems = _problems(module)
    if problems:
        raise UnsupportedExpertsError(
            f"moe_fused cannot run the experts of {_describe(module)}: "
            + "; ".join(problems)
            + ". Use experts_implementation='grouped_mm' (or 'eager') for this model."
        )


def experts_weights(module, _checked: bool = False):
    """(gate_up [E,2I,H], down [E,H,I]) of an experts module, as views (no copies).

    Transposed storage (e.g. Aria's [E,H,2I] / [E,I,H]) becomes a strided view.
    """
    if not _checked:
        check_experts_module(module)
    gate_up, down = module.gate_up_proj, module.down_proj
    if getattr(module, "is_transposed", getattr(module, "experts_are_transposed", False)):
        gate_up = gate_up.transpose(-2, -1)
        down = down.transpose(-2, -1)
    return gate_up, down


def moe_fused_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Drop-in for the experts forward of a Transformers v5 MoE model (see module docstring)."""
    check_experts_module(self)
    gate_up, down = experts_weights(self, _checked=True)
    hidden_dim = hidden_states.size(-1)
    x = hidden_states.reshape(-1, hidden_dim)
    index = top_k_index.reshape(x.size(0), -1)
    weights = top_k_weights
    num_experts = gate_up.size(0)
    if weights.dim() == 2 and weights.shape != index.shape and weights.shape == (x.size(0), num_experts):
        # Older DeepSeek-V2 style: dense [T, E] routing weights.
        weights = weights.gather(1, index)
    weights = weights.reshape(index.shape)
    # Like HF's grouped_mm: activations follow the weights' dtype (e.g. fp32
    # norms under autocast with bf16 experts); the result goes back.
    if x.dtype != gate_up.dtype:
        x = x.to(gate_up.dtype)
    if weights.dtype not in (x.dtype, torch.float32):
        weights = weights.to(x.dtype)
    out = _moe_experts(x, index, weights, gate_up, down)
    return out.to(hidden_states.dtype).reshape(hidden_states.shape)
