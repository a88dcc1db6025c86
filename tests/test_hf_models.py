"""Transformers v5 integration: experts_implementation="moe_fused" against "eager".

Tiny random-initialised models, same weights, CPU always (fp32, tight
tolerance); the same tests run on CUDA when one is present (marked gpu).
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

import moe_fused  # noqa: E402,F401  (registers "moe_fused")
from moe_fused import hf  # noqa: E402

VOCAB = 96

# ---------------------------------------------------------------- configs --

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def _cfg_qwen3_moe():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **_COMMON, head_dim=8, intermediate_size=48, moe_intermediate_size=16,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
    )


def _cfg_qwen2_moe():
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        **_COMMON, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        num_experts=8, num_experts_per_tok=2,
    )


def _cfg_olmoe():
    from transformers import OlmoeConfig

    return OlmoeConfig(**_COMMON, intermediate_size=16, num_experts=8, num_experts_per_tok=2)


def _cfg_mixtral():
    from transformers import MixtralConfig

    return MixtralConfig(**_COMMON, head_dim=8, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)


def _cfg_deepseek_v3():
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        **{**_COMMON, "num_hidden_layers": 3, "num_key_value_heads": 4}, intermediate_size=48, moe_intermediate_size=16,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=4,
        qk_nope_head_dim=8, v_head_dim=8,
    )


def _cfg_qwen3_next():
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(
        **_COMMON, head_dim=8, intermediate_size=48, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
        linear_conv_kernel_dim=2, linear_key_head_dim=8, linear_value_head_dim=8,
        linear_num_key_heads=2, linear_num_value_heads=4,
        layer_types=["linear_attention", "full_attention"],
    )


def _cfg_aria_text():
    # Aria stores its experts transposed ([E,H,2I], [E,I,H]): runs through strided views.
    from transformers import AriaTextConfig

    return AriaTextConfig(
        **_COMMON, head_dim=8, intermediate_size=16, moe_num_experts=8, moe_topk=2, moe_num_shared_experts=1,
    )


def _cfg_gpt_oss():
    from transformers import GptOssConfig

    return GptOssConfig(
        **_COMMON, head_dim=8, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"],
    )


SUPPORTED = {
    "qwen3_moe": _cfg_qwen3_moe,
    "qwen2_moe": _cfg_qwen2_moe,
    "olmoe": _cfg_olmoe,
    "mixtral": _cfg_mixtral,
    "deepseek_v3": _cfg_deepseek_v3,
    "qwen3_next": _cfg_qwen3_next,
    "aria_text": _cfg_aria_text,
    # Biases, interleaved gate/up, clamped SwiGLU: the two-GEMM path (moe_fused_linear).
    "gpt_oss": _cfg_gpt_oss,
}
# Converted to the experts interface only in newer Transformers (Aria: 5.2x, not 5.17).
OPTIONAL = {"aria_text"}
ROUTER_LOSS_MODELS = ["qwen3_moe", "qwen2_moe", "olmoe", "mixtral"]

# ---------------------------------------------------------------- devices --

_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
# "cuda": fp32 where the CUDA op has it (exact SIMT path), compared tightly; "cuda-bf16": the
# real training dtype, judged against HF eager's own bf16 error on an fp32 reference.
DEVICES = ["cpu", pytest.param("cuda", marks=_GPU), pytest.param("cuda-bf16", marks=_GPU)]


def _dev(device: str) -> str:
    return device.split("-")[0]

_fp32_ok: dict[str, bool] = {}


def _dtype(device: str) -> torch.dtype:
    """fp32 where the op supports it (the CPU path); else bf16 (compared against an fp32 reference).

    MOE_FUSED_TEST_DTYPE=bf16 forces the low-precision path (to check the GPU criteria on a CPU).
    """
    if os.environ.get("MOE_FUSED_TEST_DTYPE") == "bf16" or device.endswith("-bf16"):
        return torch.bfloat16
    device = _dev(device)
    if device not in _fp32_ok:
        try:
            x = torch.randn(4, 8, device=device)
            idx = torch.zeros(4, 1, dtype=torch.long, device=device)
            w = torch.ones(4, 1, device=device)
            moe_fused.moe_experts(x, idx, w, torch.randn(1, 8, 8, device=device), torch.randn(1, 8, 4, device=device))
            _fp32_ok[device] = True
        except Exception:  # noqa: BLE001
            _fp32_ok[device] = False
    return torch.float32 if _fp32_ok[device] else torch.bfloat16


def _build(name: str, device: str, dtype=torch.float32, impl="eager", seed=0, **overrides):
    cfg = SUPPORTED[name]()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation=impl)
    if name in OPTIONAL and not hf.find_experts_modules(model):
        pytest.skip(f"in transformers {transformers.__version__}, {name} does not use the experts interface")
    with torch.no_grad():  # routers start at zero in some models: make routing non-trivial
        for n, p in model.named_parameters():
            if n.endswith("gate.weight") or n.endswith("router.weight"):
                p.normal_(0.0, 0.5)
    return model.to(device=_dev(device), dtype=dtype)


def _ids(device, batch=2, seq=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g).to(_dev(device))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _close(got, ref, lowp_ref=None, what=""):
    """fp32: tight. Low precision: relative error at most ~2x HF eager's own error at that precision."""
    if lowp_ref is None and got.dtype == torch.float32 and ref.dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=2e-4, atol=2e-5, msg=lambda m: f"{what}: {m}")
        return
    err = _rel_err(got.float(), ref.float())
    bound = 3e-2 if lowp_ref is None else max(2.0 * _rel_err(lowp_ref.float(), ref.float()), 1e-2)
    assert err <= bound, f"{what}: relative error {err:.3e} > {bound:.3e}"


def _fwd_bwd(model, ids, **kw):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, **kw)
    loss = out.loss + (out.aux_loss if getattr(out, "aux_loss", None) is not None else 0)
    loss.backward()
    grads = {
        n.removeprefix("_orig_mod."): p.grad.detach().clone()
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    return out, grads


def _patched_copy(model):
    fused = copy.deepcopy(model)
    moe_fused.patch(fused)
    assert fused.config._experts_implementation == "moe_fused"
    return fused


# ----------------------------------------------------------------- parity --


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(SUPPORTED))
def test_logits_and_grads_match_eager(name, device):
    dtype = _dtype(device)
    ref = _build(name, device, torch.float32)
    ids = _ids(device)
    fused = _patched_copy(ref).to(dtype)
    out_f, g_f = _fwd_bwd(fused, ids)
    out_r, g_r = _fwd_bwd(ref, ids)
    lowp = None
    g_l = {}
    if dtype != torch.float32:  # HF eager at the same low precision: the error budget
        lowp_model = copy.deepcopy(ref).to(dtype)
        lowp, g_l = _fwd_bwd(lowp_model, ids)
    _close(out_f.logits, out_r.logits, None if lowp is None else lowp.logits, f"{name} logits")
    assert set(g_f) == set(g_r), "the same parameters get gradients"
    n_experts_grads = 0
    for n in g_r:
        _close(g_f[n], g_r[n], g_l.get(n), f"{name} grad {n}")
        n_experts_grads += ("gate_up_proj" in n) or ("experts.down_proj" in n)
    assert n_experts_grads >= 2, "expert weights got gradients"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ROUTER_LOSS_MODELS)
def test_router_logits_and_aux_loss_unchanged(name, device):
    dtype = _dtype(device)
    ref = _build(name, device, torch.float32, output_router_logits=True)
    fused = _patched_copy(ref).to(dtype)
    lowp = copy.deepcopy(ref).to(dtype) if dtype != torch.float32 else None
    ids = _ids(device)
    with torch.no_grad():
        out_f, out_r = fused(ids, labels=ids), ref(ids, labels=ids)
        out_l = lowp(ids, labels=ids) if lowp is not None else None
    assert out_r.aux_loss is not None and len(out_r.router_logits) == len(out_f.router_logits)
    if out_l is not None:
        # The first router runs before any experts: identical to HF's at the same precision.
        torch.testing.assert_close(out_f.router_logits[0], out_l.router_logits[0], rtol=0, atol=0)
    else:
        torch.testing.assert_close(out_f.router_logits[0], out_r.router_logits[0], rtol=0, atol=0)
    for i, (a, b) in enumerate(zip(out_f.router_logits[1:], out_r.router_logits[1:])):
        _close(a, b, None if out_l is None else out_l.router_logits[i + 1], f"{name} router logits")
    _close(out_f.aux_loss, out_r.aux_loss, None if out_l is None else out_l.aux_loss, f"{name} aux loss")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_greedy_generate_same_tokens(name, device):
    dtype = _dtype(device)
    ref = _build(name, device, torch.float32).eval()
    fused = _patched_copy(ref).to(dtype).eval()
    prompt = _ids(device, batch=2, seq=5, seed=3)
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    toks_r = ref.generate(prompt, **kw)
    toks_f = fused.generate(prompt, **kw)
    if dtype == torch.float32:
        assert torch.equal(toks_f, toks_r)
        return
    # Low precision: a bf16 KV cache alone moves these tiny random models' logits by more than
    # their top-2 margins (HF eager too), so only the first new token (the prefill, no cache)
    # is compared with HF eager at that precision, and the whole generation must run.
    lowp = copy.deepcopy(ref).to(dtype).eval()
    toks_l = lowp.generate(prompt, **kw)
    assert toks_f.shape == toks_l.shape and torch.equal(toks_f[:, :5], prompt)
    with torch.no_grad():
        last = lowp(prompt).logits[:, -1].float()
    for b in range(prompt.size(0)):
        if toks_f[b, 5] != toks_l[b, 5]:
            margin = (last[b, toks_l[b, 5]] - last[b, toks_f[b, 5]]).item()
            assert margin < 1e-2, f"{name}: first generated token differs (eager margin {margin:.3g})"


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_checkpointing(device):
    dtype = _dtype(device)
    ref = _build("qwen3_moe", device, torch.float32)
    fused = _patched_copy(ref).to(dtype)
    fused.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert fused.is_gradient_checkpointing
    fused.train()
    ref.train()
    ids = _ids(device)
    out_f, g_f = _fwd_bwd(fused, ids)
    out_r, g_r = _fwd_bwd(ref, ids)
    out_l, g_l = (None, {})
    if dtype != torch.float32:  # the error budget: HF eager at that precision, no checkpointing
        out_l, g_l = _fwd_bwd(copy.deepcopy(ref).to(dtype), ids)
    _close(out_f.loss, out_r.loss, None if out_l is None else out_l.loss, "loss")
    assert g_f.keys() == g_r.keys()
    for n in g_r:
        _close(g_f[n], g_r[n], g_l.get(n), f"grad {n}")


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile(device):
    dtype = _dtype(device)
    ref = _build("qwen3_moe", device, dtype, num_hidden_layers=1)
    fused = _patched_copy(ref)
    torch._dynamo.reset()
    # fullgraph: the experts forward and the op trace without graph breaks.
    compiled = torch.compile(
        fused, fullgraph=True, backend=os.environ.get("MOE_FUSED_TEST_COMPILE_BACKEND", "inductor")
    )
    ids = _ids(device)
    out_c, g_c = _fwd_bwd(compiled, ids)
    out_r, g_r = _fwd_bwd(ref, ids)
    if dtype == torch.float32:
        _close(out_c.logits, out_r.logits, what="compiled logits")
        for n in g_r:
            _close(g_c[n], g_r[n], what=f"compiled grad {n}")
    else:
        assert _rel_err(out_c.logits, out_r.logits) < 3e-2
    torch._dynamo.reset()


# ------------------------------------------------- registration and patch --


def test_registered_with_transformers():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert "moe_fused" in ALL_EXPERTS_FUNCTIONS
    assert ALL_EXPERTS_FUNCTIONS["moe_fused"] is hf.moe_fused_experts_forward


@pytest.mark.parametrize("device", DEVICES)
def test_from_config_uses_moe_fused(device, monkeypatch):
    model = _build("qwen3_moe", device, _dtype(device), impl="moe_fused")
    assert model.config._experts_implementation == "moe_fused"
    assert hf.is_patched(model)
    calls = []
    real = hf.experts._moe_experts
    monkeypatch.setattr(hf.experts, "_moe_experts", lambda *a: calls.append(1) or real(*a))
    model(_ids(device))
    assert len(calls) == model.config.num_hidden_layers


def test_patch_unpatch_round_trip():
    ref = _build("qwen2_moe", "cpu", torch.float32, impl="grouped_mm")
    model = copy.deepcopy(ref)
    ids = _ids("cpu")
    with torch.no_grad():
        base = model(ids).logits
        assert moe_fused.patch(model) is model
        assert hf.is_patched(model) and model.config._experts_implementation == "moe_fused"
        torch.testing.assert_close(model(ids).logits, base, rtol=2e-4, atol=2e-5)
        moe_fused.patch(model)  # idempotent
        moe_fused.unpatch(model)
        assert model.config._experts_implementation == "grouped_mm" and not hf.is_patched(model)
        moe_fused.patch(model)
        moe_fused.patch(model, False)
        assert model.config._experts_implementation == "grouped_mm"
        torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)
    # Loaded as moe_fused: unpatch goes to Transformers' default.
    loaded = _build("qwen2_moe", "cpu", torch.float32, impl="moe_fused")
    moe_fused.unpatch(loaded)
    assert loaded.config._experts_implementation in ("grouped_mm", "eager")
    moe_fused.unpatch(loaded, implementation="eager")
    assert loaded.config._experts_implementation == "eager"
    assert list(hf.supported(loaded).values()) == [("fused", [])] * 2


def test_save_pretrained_is_plain_hf(tmp_path):
    ref = _build("qwen3_moe", "cpu", torch.float32)
    fused = _patched_copy(ref)
    fused.save_pretrained(tmp_path)
    cfg_text = (tmp_path / "config.json").read_text()
    assert "moe_fused" not in cfg_text
    assert json.loads(cfg_text)["model_type"] == "qwen3_moe"
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)  # Transformers' own loader and default experts
    assert plain.config._experts_implementation != "moe_fused"
    sd_f, sd_p = fused.state_dict(), plain.state_dict()
    assert sd_f.keys() == sd_p.keys()
    for k in sd_f:
        assert torch.equal(sd_f[k], sd_p[k]), k
    again = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="moe_fused")
    assert again.config._experts_implementation == "moe_fused"
    ids = _ids("cpu")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ref(ids).logits, rtol=2e-4, atol=2e-5)


# --------------------------------------------------------------- refusals --


def test_paths_reported():
    assert list(hf.supported(_build("qwen3_moe", "cpu")).values()) == [("fused", [])] * 2
    aria = hf.supported(_build("aria_text", "cpu"))
    assert {p for p, _ in aria.values()} == {"fused"}  # transposed weights: strided views
    paths = hf.supported(_build("gpt_oss", "cpu"))
    assert len(paths) == 2
    for path, why in paths.values():
        text = "; ".join(why)
        assert path == "two_gemm" and "biases" in text and "interleaved" in text and "_apply_gate" in text


def test_gpt_oss_runs_the_linear_op(monkeypatch):
    model = _build("gpt_oss", "cpu", impl="moe_fused")
    calls = []
    real = hf.experts._moe_fused_linear
    monkeypatch.setattr(hf.experts, "_moe_fused_linear", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(hf.experts, "_moe_experts", lambda *a: pytest.fail("the fused op can't run GPT-OSS"))
    model(_ids("cpu"))
    assert len(calls) == 2 * model.config.num_hidden_layers


def test_expert_parallel_is_refused_clearly():
    model = _build("qwen3_moe", "cpu", impl="grouped_mm")
    model.model.layers[1].mlp.experts._is_expert_parallel = True
    with pytest.raises(hf.UnsupportedExpertsError) as info:
        moe_fused.patch(model)
    msg = str(info.value)
    assert "qwen3_moe" in msg and "Qwen3MoeExperts" in msg and "expert-parallel" in msg
    assert isinstance(info.value, NotImplementedError)
    assert model.config._experts_implementation == "grouped_mm", "a refused patch changes nothing"
    # Requested at load time: the first forward refuses, never computes.
    moe_fused.patch(model, False)
    model.config._experts_implementation_internal = "moe_fused"
    with pytest.raises(hf.UnsupportedExpertsError, match="qwen3_moe"):
        model(_ids("cpu"))


def test_patch_without_moe_is_an_error():
    from transformers import LlamaConfig

    model = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2)
    )
    with pytest.raises(ValueError, match="no MoE experts"):
        moe_fused.patch(model)


# ------------------------------------------------------------------- PEFT --


def test_peft_lora_on_experts_matches_eager():
    """PEFT LoRA on the expert parameters (target_parameters) and attention: same loss and adapter grads."""
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
        target_modules=["q_proj", "v_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    torch.manual_seed(0)
    ref = peft.get_peft_model(_build("qwen3_moe", "cpu", torch.float32), cfg)
    fused = copy.deepcopy(ref)
    moe_fused.patch(fused)
    assert fused.base_model.model.config._experts_implementation == "moe_fused"
    ids = _ids("cpu")
    out_f, g_f = _fwd_bwd(fused, ids)
    out_r, g_r = _fwd_bwd(ref, ids)
    _close(out_f.logits, out_r.logits, what="peft logits")
    assert g_f.keys() == g_r.keys() and any("experts" in n and "lora_A" in n for n in g_r)
    for n in g_r:
        _close(g_f[n], g_r[n], what=f"peft grad {n}")


def test_transformers_own_switch_api():
    """model.set_experts_implementation("moe_fused") (Transformers' API) works too, where it exists."""
    model = _build("olmoe", "cpu", torch.float32)
    if not hasattr(model, "set_experts_implementation"):
        pytest.skip("this transformers has no set_experts_implementation")
    ids = _ids("cpu")
    with torch.no_grad():
        base = model(ids).logits
        model.set_experts_implementation("moe_fused")
        assert hf.is_patched(model)
        torch.testing.assert_close(model(ids).logits, base, rtol=2e-4, atol=2e-5)
