"""Every experts class in the installed Transformers that uses the experts interface.

For each class decorated with @use_experts_implementation, a tiny instance is
built from its model's own config class; then either moe_fused matches the
class's own eager forward (output and every gradient: input, routing weights,
expert weights), or moe_fused refuses it with UnsupportedExpertsError naming
the model. Nothing in between: no class computes silently wrong numbers. Classes
on the fused path are also checked on the two-GEMM path (moe_fused_linear).
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
import transformers.models  # noqa: E402

import moe_fused  # noqa: E402,F401
from moe_fused import hf  # noqa: E402
from moe_fused.hf.patch import _get_impl, _set_impl  # noqa: E402

_SIZE = {
    "hidden_size": 32, "hidden_dim": 32, "d_model": 32, "moe_hidden_size": 32,
    "intermediate_size": 16, "moe_intermediate_size": 16, "expert_intermediate_size": 16,
    "ffn_hidden_size": 16, "moe_ffn_hidden_size": 16, "expert_dim": 16,
    "num_experts": 6, "n_routed_experts": 6, "num_local_experts": 6, "moe_num_experts": 6,
    "n_experts": 6, "num_experts_per_tok": 2, "moe_topk": 2, "top_k": 2,
}
# The models this project names first run on the fused op; GPT-OSS on the two-GEMM path.
MUST_FUSE = {"qwen3_moe", "qwen2_moe", "olmoe", "mixtral", "deepseek_v3", "qwen3_next", "aria"}
MUST_TWO_GEMM = {"gpt_oss"}


def _experts_classes():
    found = []
    for info in pkgutil.iter_modules(transformers.models.__path__):
        name = info.name
        spec = importlib.util.find_spec(f"transformers.models.{name}.modeling_{name}")
        if spec is None or spec.origin is None:
            continue
        try:
            src = open(spec.origin, encoding="utf-8").read()
        except OSError:
            continue
        for m in re.finditer(r"@use_experts_implementation(?:\([^)]*\))?\nclass (\w+)\(", src):
            found.append((name, m.group(1)))
    return found


CLASSES = _experts_classes()


def _configs_for(mod, cls):
    """Candidate configs for the experts class: its annotation, then the module's (text) configs."""
    init = inspect.unwrap(cls.__init__)
    ann = inspect.signature(init).parameters.get("config")
    candidates = []
    if ann is not None and ann.annotation is not inspect.Parameter.empty:
        a = ann.annotation
        if isinstance(a, str):
            a = getattr(mod, a, None)
        if isinstance(a, type):
            candidates.append(a)
    pools = [mod]
    try:
        pools.append(importlib.import_module(mod.__name__.replace(".modeling_", ".configuration_")))
    except ImportError:
        pass
    for pool in pools:
        names = [n for n in dir(pool) if n.endswith("Config") and isinstance(getattr(pool, n), type)]
        names.sort(key=lambda n: (0 if "Text" in n else 1, len(n)))
        candidates += [getattr(pool, n) for n in names if not any(s in n for s in ("Vision", "Audio", "Video"))]
    candidates.sort(key=lambda c: "Text" not in c.__name__)  # stable: annotation first among equals
    for c in candidates:
        try:
            cfg = c()
        except Exception:  # noqa: BLE001
            continue
        for key, v in _SIZE.items():
            if not hasattr(cfg, key):
                continue
            old = getattr(cfg, key)
            if isinstance(old, (list, tuple)):  # per-modality sizes (e.g. ERNIE-VL)
                v = type(old)([v] * len(old))
            elif isinstance(old, bool) or not (old is None or isinstance(old, int)):
                continue
            if True:
                try:
                    setattr(cfg, key, v)
                except Exception:  # noqa: BLE001
                    pass
        yield cfg


def _build(model_name, cls_name):
    mod = importlib.import_module(f"transformers.models.{model_name}.modeling_{model_name}")
    cls = getattr(mod, cls_name)
    why = "no default-constructible config"
    for cfg in _configs_for(mod, cls):
        try:
            torch.manual_seed(0)
            # some take their size from the parent block (e.g. ERNIE-VL's, one per modality)
            sized = "intermediate_size" in inspect.signature(inspect.unwrap(cls.__init__)).parameters
            module = cls(cfg, intermediate_size=_SIZE["intermediate_size"]) if sized else cls(cfg)
        except Exception as exc:  # noqa: BLE001
            why = f"{cls_name}({type(cfg).__name__}) failed: {type(exc).__name__}: {exc}"
            continue
        numel = sum(p.numel() for p in module.parameters())
        if numel > 400_000:
            why = f"could not shrink {cls_name} ({numel} parameters)"
            continue
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0.0, 0.2)
        return module.float()
    pytest.skip(f"{model_name}: {why}")


def _run(module, impl, x, idx, w):
    _set_impl(module.config, impl)
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    assert _get_impl(module.config) == impl and module.config._experts_implementation == impl
    out = module(x, idx, w)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.device)
    (out * g).sum().backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, w.grad, grads


# CUDA: fp32, where the op runs its exact SIMT kernels, against eager's fp32 cuBLAS GEMMs.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("model_name", "cls_name"), CLASSES, ids=[f"{m}-{c}" for m, c in CLASSES])
def test_experts_match_eager_or_refuse(model_name, cls_name, device, monkeypatch):
    module = _build(model_name, cls_name).to(device)
    assert hf.is_experts_module(module)
    path, why = hf.experts_path(module)
    if model_name in MUST_FUSE:
        assert path == "fused", f"{model_name}: {path} {why}"
    if model_name in MUST_TWO_GEMM:
        assert path == "two_gemm", f"{model_name}: {path} {why}"
    if path == "refused":
        with pytest.raises(hf.UnsupportedExpertsError, match=re.escape(f"'{module.config.model_type}'")):
            hf.check_experts_module(module)
        _set_impl(module.config, "moe_fused")
        with pytest.raises(hf.UnsupportedExpertsError):
            module(torch.randn(3, 32), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))
        return
    E = module.down_proj.size(0)
    # from the weights: the experts' width may differ from the model's (Muse Spark projects
    # into and out of them)
    H = hf.experts_weights(module)[1].size(1) if hasattr(module, "gate_up_proj") else module.config.hidden_size
    T, k = 10, min(2, E)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, H, generator=g).to(device)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(device)
    w = torch.softmax(torch.randn(T, k, generator=g), -1).to(device)
    calls = []
    for op in ("_moe_experts", "_moe_fused_linear"):
        real = getattr(hf.experts, op)
        monkeypatch.setattr(hf.experts, op, lambda *a, real=real, op=op: calls.append(op) or real(*a))
    ref = _run(module, "eager", x, idx, w)
    assert not calls
    got = _run(module, "moe_fused", x, idx, w)
    assert calls and set(calls) == {"_moe_experts" if path == "fused" else "_moe_fused_linear"}
    _assert_same(model_name, got, ref)
    if path == "fused":  # the two-GEMM path on the same module gives the same numbers
        monkeypatch.setattr(hf.experts, "_problems", lambda m: ["forced"])
        _assert_same(f"{model_name} (two-GEMM)", _run(module, "moe_fused", x, idx, w), ref)


def _assert_same(what, got, ref):
    tol = dict(rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(got[0], ref[0], **tol, msg=lambda m: f"{what} output: {m}")
    torch.testing.assert_close(got[1], ref[1], **tol, msg=lambda m: f"{what} grad x: {m}")
    torch.testing.assert_close(got[2], ref[2], **tol, msg=lambda m: f"{what} grad weights: {m}")
    assert got[3].keys() == ref[3].keys()
    for n in ref[3]:
        torch.testing.assert_close(got[3][n], ref[3][n], **tol, msg=lambda m, n=n: f"{what} grad {n}: {m}")


def test_named_models_are_covered():
    names = {m for m, _ in CLASSES}
    # Aria uses the experts interface only in newer Transformers (not 5.17).
    assert (MUST_FUSE - {"aria"}) | MUST_TWO_GEMM <= names
