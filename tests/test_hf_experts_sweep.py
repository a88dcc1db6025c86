"""Every experts module of the installed Transformers, moe_fused against eager.

The experts classes are found in transformers' own modeling files (those that use
`@use_experts_implementation`), so a Transformers release that adds an MoE model is
tested without a change here. Each class is built from its model's config with the sizes
shrunk (hidden 32, expert intermediate 16, 4 experts, top-2). The same module and weights run
with `experts_implementation` "eager" and then "moe_fused": the output and every gradient
(hidden states, routing weights, each expert parameter) must match. A class that the fused
op can't express goes through the two-GEMM path (moe_fused_linear around the module's own
gate / activation / norm code); none may be refused.

test_hf_models.py runs whole tiny models (logits, generate, PEFT, compile, ...) for a few of
these; this file covers the breadth.
"""
from __future__ import annotations

import importlib
import inspect
import pathlib
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import moe_fused  # noqa: E402,F401  (registers "moe_fused")
from moe_fused.hf.experts import experts_path, experts_weights  # noqa: E402
from moe_fused.hf.patch import _set_impl  # noqa: E402

_MODELS = pathlib.Path(transformers.__file__).resolve().parent / "models"

# Config attributes set on every config that has them (also where the default is None, as in
# configs whose MoE block is off by default). Anything else keeps its default.
_HIDDEN = 32
_SIZES = {
    "hidden_size": _HIDDEN,
    "moe_hidden_size": _HIDDEN,
    "intermediate_size": 16,
    "moe_intermediate_size": 16,
    "expert_intermediate_size": 16,
    "ffn_hidden_size": 16,
    "moe_ffn_hidden_size": 16,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "top_k_experts": 2,
    "moe_k": 2,
    "moe_topk": 2,
    "n_group": 1,
    "topk_group": 1,
    "enable_moe_block": True,
}


def _experts_classes(module):
    """Classes defined in `module` whose forward is dispatched by the experts interface."""
    found = []
    for cls in vars(module).values():
        if not (inspect.isclass(cls) and issubclass(cls, nn.Module) and cls.__module__ == module.__name__):
            continue
        fwd = cls.__dict__.get("forward")
        code = getattr(fwd, "__code__", None)
        if getattr(fwd, "__wrapped__", None) is not None and code is not None and (
            "experts_interface" in code.co_freevars or "ALL_EXPERTS_FUNCTIONS" in code.co_names
        ):
            found.append(cls)
    return found


def _discover():
    """[(model_type, experts class name)] of the installed transformers, sorted."""
    cases = []
    for d in sorted(_MODELS.iterdir()):
        src = d / f"modeling_{d.name}.py"
        if not src.is_file() or "use_experts_implementation" not in src.read_text(encoding="utf-8"):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                mod = importlib.import_module(f"transformers.models.{d.name}.modeling_{d.name}")
            except Exception as exc:  # noqa: BLE001 - reported by the test of that model
                cases.append((d.name, f"<import failed: {type(exc).__name__}: {exc}>"))
                continue
        cases.extend((d.name, cls.__name__) for cls in _experts_classes(mod))
    return cases


CASES = _discover()


def _shrink(cfg):
    for name, value in _SIZES.items():
        if not hasattr(cfg, name):
            continue
        old = getattr(cfg, name)
        if isinstance(old, list):  # per-modality sizes (e.g. [text, vision])
            setattr(cfg, name, [value] * len(old))
        elif old is None or (isinstance(old, int) and not isinstance(old, bool)) or isinstance(value, bool):
            setattr(cfg, name, value)
    return cfg


def _build(model_type: str, class_name: str):
    """The experts module, built from the first config class of the model that takes it."""
    mod = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    cmod = importlib.import_module(f"transformers.models.{model_type}.configuration_{model_type}")
    cls = getattr(mod, class_name)
    configs = [
        c for c in vars(cmod).values()
        if inspect.isclass(c) and issubclass(c, transformers.PretrainedConfig) and c.__module__ == cmod.__name__
    ]
    errors = []
    for cfg_cls in configs:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cfg = _shrink(cfg_cls())
                torch.manual_seed(0)
                # some take their size from the parent block (e.g. one per modality)
                sized = "intermediate_size" in inspect.signature(cls.__init__).parameters
                module = cls(cfg, intermediate_size=_SIZES["intermediate_size"]) if sized else cls(cfg)
        except Exception as exc:  # noqa: BLE001 - try the model's next config class
            errors.append(f"{cfg_cls.__name__}: {type(exc).__name__}: {exc}")
            continue
        n = sum(p.numel() for p in module.parameters())
        if n > 1_000_000:
            errors.append(f"{cfg_cls.__name__}: {n} parameters after shrinking (a size it does not know)")
            continue
        return module
    return errors


def _hidden_and_experts(module):
    """(H, E) from the module's own weights (its hidden size may differ from the model's)."""
    down = module.down_proj
    transposed = bool(getattr(module, "is_transposed", getattr(module, "experts_are_transposed", False)))
    return (down.shape[2] if transposed else down.shape[1]), down.shape[0]


def _run(module, impl, x, index, weights, device):
    _set_impl(module.config, impl)
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    w = weights.clone().requires_grad_()
    out = module(x, index, w)
    # a fixed, non-uniform output gradient: every output element matters
    (out * torch.linspace(-1.0, 1.0, out.numel(), device=device).view_as(out)).sum().backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, w.grad, grads


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
]


def test_discovery_finds_the_moe_models():
    """The sweep is only worth something if it finds them: transformers 5.x has dozens."""
    names = {c[0] for c in CASES}
    assert len(CASES) >= 8, CASES
    assert {"qwen3_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss"} <= names, sorted(names)


def test_most_experts_modules_build():
    """Shrinking generic config sizes must keep working for nearly every model; a few with
    unusual configs may fail to build (their tests then skip, with the reason)."""
    built = [c for c in CASES if not isinstance(_build(*c), list)]
    assert len(built) >= 0.9 * len(CASES), f"{len(built)} of {len(CASES)} built"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_type,class_name", CASES, ids=[f"{m}.{c}" for m, c in CASES])
def test_experts_match_eager(model_type, class_name, device):
    if class_name.startswith("<import failed"):
        pytest.fail(f"transformers.models.{model_type}: {class_name}")
    module = _build(model_type, class_name)
    if isinstance(module, list):
        pytest.skip(f"{class_name} not built from a shrunk config: " + " | ".join(module)[:400])
    path, why = experts_path(module)
    assert path in ("fused", "two_gemm"), f"{class_name} refused: {why}"
    if path == "fused":
        gate_up, down = experts_weights(module)
        assert gate_up.dim() == 3 and down.dim() == 3
    module = module.to(device)
    with torch.no_grad():  # empty() weights: give them values
        for p in module.parameters():
            p.normal_(0.0, 0.2)
    H, E = _hidden_and_experts(module)
    g = torch.Generator().manual_seed(1)
    T, k = 9, 2
    x = torch.randn(T, H, generator=g).to(device)
    index = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(device)
    weights = torch.softmax(torch.randn(T, k, generator=g), -1).to(device)
    ref = _run(module, "eager", x, index, weights, device)
    got = _run(module, "moe_fused", x, index, weights, device)
    for what, a, b in zip(("output", "grad hidden_states", "grad top_k_weights"), got[:3], ref[:3]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, w=what: f"{class_name} ({path}) {w}: {m}")
    assert set(got[3]) == set(ref[3]), f"{class_name}: gradients for {sorted(got[3])} vs eager's {sorted(ref[3])}"
    for name in ref[3]:
        torch.testing.assert_close(
            got[3][name], ref[3][name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{class_name} ({path}) grad {n}: {m}"
        )
