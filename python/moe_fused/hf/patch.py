"""Registration with Transformers' experts interface, and patch()/unpatch() for loaded models."""
from __future__ import annotations

import warnings

from torch import nn

from .experts import check_experts_module, experts_path, is_experts_module, moe_fused_experts_forward

IMPLEMENTATION = "moe_fused"

_registered = False
# id(config) -> (config, experts implementation before patch())
_saved: dict[int, tuple[object, str | None]] = {}


def register() -> bool:
    """Register "moe_fused" with transformers' ExpertsInterface. False if transformers is missing."""
    global _registered
    if _registered:
        return True
    try:
        from transformers.integrations.moe import ExpertsInterface  # noqa: PLC0415
    except ImportError:
        return False
    except Exception as exc:  # a broken transformers install must not break `import moe_fused`
        warnings.warn(f"moe_fused: could not register with transformers ({type(exc).__name__}: {exc})", stacklevel=2)
        return False
    ExpertsInterface.register(IMPLEMENTATION, moe_fused_experts_forward)
    _registered = True
    return True


def _require_transformers():
    if not register():
        raise ImportError(
            "moe_fused.patch needs Hugging Face transformers >= 5 (pip install 'moe-fused[hf]')"
        )


def find_experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every experts module dispatched by the Transformers experts interface."""
    return [(n, m) for n, m in model.named_modules() if is_experts_module(m)]


def supported(model: nn.Module) -> dict[str, tuple[str, list[str]]]:
    """{module name: (path, reasons)} for each experts module: ("fused", []), ("two_gemm", why
    not fused) or ("refused", why)."""
    return {n: experts_path(m) for n, m in find_experts_modules(model)}


def _get_impl(config):
    return getattr(config, "_experts_implementation_internal", getattr(config, "_experts_implementation", None))


def _set_impl(config, value):
    if hasattr(config, "_experts_implementation_internal"):
        # The internal attribute: not propagated to sub-configs, never serialised.
        config._experts_implementation_internal = value
    else:  # pragma: no cover - older transformers
        config._experts_implementation = value


def _configs(model: nn.Module, experts):
    configs = {}
    for _, m in experts:
        configs[id(m.config)] = m.config
    return list(configs.values())


def is_patched(model: nn.Module) -> bool:
    """True if every experts module of the model dispatches to moe-fused."""
    experts = find_experts_modules(model)
    return bool(experts) and all(_get_impl(m.config) == IMPLEMENTATION for _, m in experts)


def patch(model: nn.Module, enable: bool = True) -> nn.Module:
    """Switch every MoE experts module of a loaded model to moe-fused (``enable=False``: back).

    Everything is checked before anything changes: a model with experts that
    moe-fused can't compute exactly raises UnsupportedExpertsError and is left
    as it was. Returns the model.
    """
    if not enable:
        return unpatch(model)
    _require_transformers()
    experts = find_experts_modules(model)
    if not experts:
        raise ValueError(
            f"moe_fused.patch: {type(model).__name__} has no MoE experts module using the Transformers "
            "experts interface (@use_experts_implementation); nothing to patch"
        )
    for _, m in experts:
        check_experts_module(m)
    for cfg in _configs(model, experts):
        prev = _get_impl(cfg)
        if prev != IMPLEMENTATION and id(cfg) not in _saved:
            _saved[id(cfg)] = (cfg, prev)
        _set_impl(cfg, IMPLEMENTATION)
    return model


def unpatch(model: nn.Module, implementation: str | None = None) -> nn.Module:
    """Undo patch(): each experts module goes back to the implementation it had before.

    ``implementation`` forces one (e.g. "eager"); a model loaded with
    experts_implementation="moe_fused" goes back to Transformers' default
    ("grouped_mm", or "eager" where that can't dispatch).
    """
    _require_transformers()
    experts = find_experts_modules(model)
    for cfg in _configs(model, experts):
        saved = _saved.pop(id(cfg), None)
        if implementation is not None:
            value = implementation
        elif saved is not None and saved[0] is cfg and saved[1] not in (None, IMPLEMENTATION):
            value = saved[1]
        else:
            value = _default_implementation(model)
        if _get_impl(cfg) == IMPLEMENTATION or implementation is not None:
            _set_impl(cfg, value)
    return model


def _default_implementation(model: nn.Module) -> str:
    get = getattr(model, "get_correct_experts_implementation", None)
    if get is not None:
        try:
            return get(None)
        except Exception:  # noqa: BLE001
            pass
    return "eager"
