"""The ``"moe_fused"`` experts implementation for Transformers v5.

Transformers v5 MoE models keep their routed experts in one module per layer,
decorated with ``transformers.integrations.moe.use_experts_implementation``:
``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` parameters and a
``forward(hidden_states [T,H], top_k_index [T,k], top_k_weights [T,k])``
that the decorator dispatches through ``ALL_EXPERTS_FUNCTIONS`` by
``config._experts_implementation``. :func:`moe_fused_experts_forward` is the
function registered there under ``"moe_fused"``. Two paths, chosen per module:

- "fused": SiLU-gated experts with [gate; up] rows and no biases (Qwen3-MoE,
  Qwen2-MoE, OLMoE, Mixtral, DeepSeek-V3, Qwen3-Next, ...; transposed storage
  such as Aria's as strided views) run on the single fused op
  ``moe_fused.moe_experts`` (saves only x, the plan and h).
- "two_gemm": everything else the Transformers experts interface expresses
  (biases, interleaved gate/up, a module's own ``_apply_gate`` such as GPT-OSS'
  clamped SwiGLU, another activation, no gate, a post-expert norm) runs its
  two grouped GEMMs on ``moe_fused.moe_fused_linear`` and the module's own
  code in between, exactly as Transformers' grouped_mm does: the same
  numbers, less fusion.

Expert-parallel modules (sentinel expert ids) and layouts neither path can
express raise :class:`UnsupportedExpertsError`, naming the model and the
reason: never silently wrong numbers. ``experts_path(module)`` tells which.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "UnsupportedExpertsError",
    "check_experts_module",
    "experts_path",
    "experts_weights",
    "is_experts_module",
    "moe_fused_experts_forward",
]


class UnsupportedExpertsError(NotImplementedError):
    """The experts of this model cannot run on moe-fused (the message says why)."""


def _resolve_op(name):
    # The ops are resolved when moe_fused.hf is imported (not per call: that
    # keeps the forward traceable by torch.compile without import side effects).
    try:
        from .. import ops  # noqa: PLC0415

        return getattr(ops, name)
    except Exception as exc:  # pragma: no cover - only when the build is broken
        err = exc

        def missing(*args, **kwargs):
            raise RuntimeError(
                f"moe_fused: the {name} op could not be loaded "
                f"({type(err).__name__}: {err}); is libmoe_fused built? "
                "(pip install . or MOE_FUSED_LIBRARY=/path/to/libmoe_fused.so)"
            ) from err

        return missing


_moe_experts = _resolve_op("moe_experts")
_moe_fused_linear = _resolve_op("moe_fused_linear")

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


def _bias(module, name):
    b = getattr(module, name, None)
    return b if isinstance(b, torch.Tensor) else None


def _has_gate(module) -> bool:
    return bool(getattr(module, "has_gate", True)) and isinstance(getattr(module, "gate_up_proj", None), torch.Tensor)


def _transposed(module) -> bool:
    return bool(getattr(module, "is_transposed", getattr(module, "experts_are_transposed", False)))


def _custom_gate(module) -> bool:
    gate_fn = getattr(type(module), "_apply_gate", None)
    return gate_fn is not None and getattr(gate_fn, "__name__", "") != "_default_apply_gate"


try:
    from torch.distributed.tensor import DTensor as _DTensor
except Exception:  # noqa: BLE001 - builds without torch.distributed
    _DTensor = None


def _refusals(module) -> list[str]:
    """Reasons neither path can compute this experts module exactly ([] = it can run)."""
    problems = []
    if getattr(module, "_is_expert_parallel", False):
        problems.append("it runs expert-parallel (sentinel expert ids >= num_experts)")
    elif _DTensor is not None and any(isinstance(p, _DTensor) for p in module.parameters(recurse=False)):
        problems.append("its expert weights are sharded DTensors (tensor / expert parallel)")
    up = getattr(module, "gate_up_proj", None) if _has_gate(module) else getattr(module, "up_proj", None)
    down = getattr(module, "down_proj", None)
    if not isinstance(up, torch.Tensor) or not isinstance(down, torch.Tensor):
        problems.append("it has no [E, ...] gate_up_proj / up_proj and down_proj parameters")
    elif up.dim() != 3 or down.dim() != 3 or up.size(0) != down.size(0):
        problems.append(f"unexpected expert weight shapes {tuple(up.shape)} and {tuple(down.shape)}")
    if _has_gate(module) and not getattr(module, "is_concatenated", True) and not _custom_gate(module):
        problems.append("gate and up rows are interleaved but it has no gating function that splits them")
    return problems


def _problems(module) -> list[str]:
    """Reasons the single fused op (moe_experts) can't compute this module ([] = fused path)."""
    problems = _refusals(module)
    if problems:
        return problems
    if not _has_gate(module):
        problems.append("its experts have no gate (up_proj and an activation)")
    if any(_bias(module, n) is not None for n in ("gate_up_proj_bias", "up_proj_bias", "down_proj_bias")) or (
        getattr(module, "has_bias", False)
    ):
        problems.append("its expert projections have biases")
    if not getattr(module, "is_concatenated", True):
        problems.append("gate and up rows are interleaved (gate0, up0, gate1, ...): no strided view of [gate; up]")
    if getattr(module, "has_post_expert_norm", False):
        problems.append("it applies a norm after each expert")
    if _custom_gate(module) and type(module).__name__ not in _EQUIVALENT_GATES:
        problems.append(f"it has its own gating function {type(module).__name__}._apply_gate (e.g. a clamped SwiGLU)")
    act = getattr(module, "act_fn", None)
    if act is not None and not _is_silu(act):
        problems.append(f"its activation is {type(act).__name__}, not SiLU")
    if not problems:
        gu, dn = experts_weights(module)
        E, I2, H = gu.shape
        if I2 % 2 or tuple(dn.shape) != (E, H, I2 // 2):
            problems.append(
                f"gate_up_proj {tuple(gu.shape)} and down_proj {tuple(dn.shape)} are not [E, 2I, H] and [E, H, I]"
            )
    return problems


def experts_path(module) -> tuple[str, list[str]]:
    """("fused", []) | ("two_gemm", why not fused) | ("refused", why). See the module docstring."""
    refusals = _refusals(module)
    if refusals:
        return "refused", refusals
    problems = _problems(module)
    return ("two_gemm", problems) if problems else ("fused", [])


def check_experts_module(module) -> None:
    """Raise UnsupportedExpertsError if moe-fused can't compute this experts module exactly."""
    refusals = _refusals(module)
    if refusals:
        raise UnsupportedExpertsError(
            f"moe_fused cannot run the experts of {_describe(module)}: "
            + "; ".join(refusals)
            + ". Use experts_implementation='grouped_mm' (or 'eager') for this model."
        )


def experts_weights(module):
    """(gate_up [E,2I,H], down [E,H,I]) of an experts module, as views (no copies).

    Transposed storage (e.g. Aria's [E,H,2I] / [E,I,H]) becomes a strided view.
    """
    gate_up, down = module.gate_up_proj, module.down_proj
    if _transposed(module):
        gate_up = gate_up.transpose(-2, -1)
        down = down.transpose(-2, -1)
    return gate_up, down


def _op_weight(w: torch.Tensor) -> torch.Tensor:
    """The CUDA kernels need a unit stride on a weight's last dim (the CPU core takes any
    strides): there, a transposed view (Aria, GPT-OSS) becomes a copy, per call."""
    if w.device.type != "cpu" and w.stride(-1) != 1:
        return w.contiguous()
    return w


def _two_gemm_forward(self, x, index, weights, out_dtype):
    """Experts that the fused op can't express (biases, interleaved gate/up, a custom gate,
    another activation, no gate, a post-expert norm): the two grouped GEMMs run on
    moe_fused_linear, and everything between them is the module's own code
    (``_apply_gate`` / ``act_fn`` / ``post_expert_norm``), as Transformers' grouped_mm does."""
    T, k = index.shape
    sel = index.reshape(-1)
    x_rep = x.repeat_interleave(k, dim=0)  # (T*k, H): pair p = t*k + j
    if _has_gate(self):
        w1, b1 = self.gate_up_proj, _bias(self, "gate_up_proj_bias")
    else:
        w1, b1 = self.up_proj, _bias(self, "up_proj_bias")
    w2, b2 = self.down_proj, _bias(self, "down_proj_bias")
    if _transposed(self):
        w1, w2 = _op_weight(w1.transpose(-2, -1)), _op_weight(w2.transpose(-2, -1))
    h = _moe_fused_linear(x_rep, w1, sel)
    if b1 is not None:
        h = h + b1[sel]
    a = self._apply_gate(h) if _has_gate(self) else self.act_fn(h)
    if a.dtype != w2.dtype:
        a = a.to(w2.dtype)
    y = _moe_fused_linear(a, w2, sel)
    if b2 is not None:
        y = y + b2[sel]
    if getattr(self, "has_post_expert_norm", False):
        y = self.post_expert_norm(y)
    y = y * weights.reshape(-1, 1)
    return y.view(T, k, -1).sum(dim=1).to(out_dtype)


def moe_fused_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Drop-in for the experts forward of a Transformers v5 MoE model (see module docstring)."""
    check_experts_module(self)
    hidden_dim = hidden_states.size(-1)
    x = hidden_states.reshape(-1, hidden_dim)
    index = top_k_index.reshape(x.size(0), -1)
    weights = top_k_weights
    num_experts = self.down_proj.size(0)
    if weights.dim() == 2 and weights.shape != index.shape and weights.shape == (x.size(0), num_experts):
        # Older DeepSeek-V2 style: dense [T, E] routing weights.
        weights = weights.gather(1, index)
    weights = weights.reshape(index.shape)
    if _problems(self):
        w1 = self.gate_up_proj if _has_gate(self) else self.up_proj
        out = _two_gemm_forward(self, x.to(w1.dtype), index, weights, hidden_states.dtype)
        return out.reshape(hidden_states.shape)
    gate_up, down = experts_weights(self)
    # Like HF's grouped_mm: activations follow the weights' dtype (e.g. fp32
    # norms under autocast with bf16 experts); the result goes back.
    if x.dtype != gate_up.dtype:
        x = x.to(gate_up.dtype)
    if weights.dtype not in (x.dtype, torch.float32):
        weights = weights.to(x.dtype)
    out = _moe_experts(x, index, weights, _op_weight(gate_up), _op_weight(down))
    return out.to(hidden_states.dtype).reshape(hidden_states.shape)
