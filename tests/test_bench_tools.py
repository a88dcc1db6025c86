"""CPU tests of the benchmark tooling's pure-Python logic (no GPU, no SonicMoE needed):
kernel name -> GEMM attribution of bench/bench_gemms.py (fake profiler events), the six
torch._grouped_mm problems composed into the layer vs moe_fused, the environment handling
of moe_fused-portable in moe_fused.bench, and SonicMoE's call plumbing (against a fake
sonicmoe module that follows SonicMoE's documented layouts)."""

from __future__ import annotations

import argparse
import enum
import importlib.util
import os
import pathlib
import random
import types

import pytest
import torch

from moe_fused import bench

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_bench_gemms():
    spec = importlib.util.spec_from_file_location("bench_gemms", _ROOT / "bench" / "bench_gemms.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bg = _load_bench_gemms()

# ---- kernel names as torch.profiler reports them ------------------------------------------------

P = "void moe::cuda::(anonymous namespace)::grouped_gemm_kernel<__nv_bfloat16, {e}, {b}>(moe::cuda::GroupedGemmArgs)"
S = ("void moe::cuda::sm90::(anonymous namespace)::row_gemm_sm90<__nv_bfloat16, {e}, {b}>(CUtensorMap_st, "
     "moe::cuda::sm90::(anonymous namespace)::RowParams)")
WG_P = "void moe::cuda::(anonymous namespace)::wgrad_kernel<__nv_bfloat16>(moe::cuda::WgradArgs)"
WG_S = ("void moe::cuda::sm90::(anonymous namespace)::wgrad_sm90<__nv_bfloat16>(CUtensorMap_st, CUtensorMap_st, "
        "moe::cuda::sm90::(anonymous namespace)::WgradParams)")
# the current sm90 wgrad: template <T, bool GP (P gathered), bool TR (output transposed: dW1)>
WG_S2 = ("void moe::cuda::sm90::(anonymous namespace)::wgrad_sm90<__nv_bfloat16, {gp}, {tr}>(CUtensorMap_st, "
         "moe::cuda::sm90::(anonymous namespace)::WgParams)")
OLD_GEMM1 = ("void moe::cuda::(anonymous namespace)::gemm1_swiglu_sm90<__nv_bfloat16>(CUtensorMap_st, "
             "moe::cuda::(anonymous namespace)::Params)")
COMBINE = ("void moe::cuda::(anonymous namespace)::combine_kernel<__nv_bfloat16>(__nv_bfloat16 const*, long, "
           "int const*, void const*, int, long, long, long, int, long, __nv_bfloat16*, long, bool)")
PLAN = "void moe::cuda::(anonymous namespace)::plan_hist<long>(long const*, long, long, int, long, int, int*, long)"
WINDOW = ("void moe::cuda::(anonymous namespace)::combine_window_kernel<__nv_bfloat16>(__nv_bfloat16 const*, long, "
          "int const*, long, long, int, int, int, float*, bool, bool, __nv_bfloat16*, long)")


@pytest.mark.parametrize("name, want", [
    (P.format(e=1, b="false"), ("GEMM1", "portable")),
    (P.format(e=0, b="false"), ("GEMM2", "portable")),
    (P.format(e=2, b="true"), ("dA'", "portable")),
    (P.format(e=0, b="true"), ("dX", "portable")),
    (S.format(e=1, b="false"), ("GEMM1", "sm90")),
    (S.format(e=3, b="false"), ("GEMM1", "sm90")),  # the no-grad forward's a-only GEMM1
    (P.format(e=3, b="false"), ("GEMM1", "portable")),
    ("row_gemm_sm90<__half, moe::cuda::EPI_SWIGLU_A, false>(x)", ("GEMM1", "sm90")),
    (S.format(e=0, b="false"), ("GEMM2", "sm90")),
    (S.format(e=2, b="true"), ("dA'", "sm90")),
    (S.format(e=0, b="true"), ("dX", "sm90")),
    (OLD_GEMM1, ("GEMM1", "sm90")),
    (WG_P, ("wgrad", "portable")),
    (WG_S, ("wgrad", "sm90")),
    # spacing, no `void`, a namespace spelled differently, casts of non-type arguments
    ("moe::cuda::sm90::(anonymous namespace)::row_gemm_sm90<__nv_bfloat16,0,true>(RowParams)", ("dX", "sm90")),
    ("void moe::cuda::sm90::(anonymous  namespace)::row_gemm_sm90< __nv_bfloat16 , 2 , true >(p)", ("dA'", "sm90")),
    ("row_gemm_sm90<__half, (moe::cuda::Epilogue)1, (bool)0>(x)", ("GEMM1", "sm90")),
    ("row_gemm_sm90<__nv_bfloat16, moe::cuda::EPI_DSWIGLU, true>(x)", ("dA'", "sm90")),
    # not demangled
    ("_ZN3moe4cuda4sm9012_GLOBAL__N_113row_gemm_sm90I13__nv_bfloat16Li0ELb1EEEv14CUtensorMap_stNS2_9RowParamsE",
     ("dX", "sm90")),
    ("_ZN3moe4cuda12_GLOBAL__N_119grouped_gemm_kernelI13__nv_bfloat16Li1ELb0EEEvNS0_15GroupedGemmArgsE",
     ("GEMM1", "portable")),
    # not GEMMs of the layer
    (COMBINE, (None, None)),
    (PLAN, (None, None)),
    ("Memcpy DtoH (Device -> Pinned)", (None, None)),
    ("void at::cuda::detail::prepare_grouped_gemm_data<cutlass::bfloat16_t>(...)", (None, None)),
    # a GEMM kernel whose template arguments cannot be read: flagged, not dropped
    (S.format(e=7, b="false"), (None, "sm90")),
    ("void moe::cuda::sm90::row_gemm_sm90<__nv_bfloat16, 1", (None, "sm90")),
])
def test_classify_kernel(name, want):
    assert bg.classify_kernel(name) == want


def _step(names_us, shuffle=True, t0=0.0):
    """Fake events of one step: [(name, duration_us)] in launch order -> (name, start, dur), shuffled."""
    evs, t = [], t0
    for name, dur in names_us:
        evs.append((name, t, dur))
        t += dur + 3.0
    if shuffle:
        random.Random(len(evs)).shuffle(evs)
    return evs


SM90_STEP = [
    (PLAN, 5), (S.format(e=1, b="false"), 500), (S.format(e=0, b="false"), 300), (COMBINE, 60),  # forward
    (S.format(e=2, b="true"), 400), ("moe::cuda::(anonymous namespace)::reduce_ds_kernel(float const*)", 3),
    (WG_S, 600), (WG_S, 1100),  # dW2, then dW1
] + [(S.format(e=0, b="true"), 150), (WINDOW, 20)] * 4  # dX in 4 row windows


def test_attribute_step_sm90():
    att = bg.attribute_step(_step(SM90_STEP))
    g = att["gemms"]
    assert set(g) == set(bg.GEMMS)
    assert g["GEMM1"]["ms"] == pytest.approx(0.5) and g["GEMM1"]["paths"] == ["sm90"]
    assert g["GEMM2"]["ms"] == pytest.approx(0.3)
    assert g["dA'"]["ms"] == pytest.approx(0.4)
    assert g["dW2"]["ms"] == pytest.approx(0.6) and g["dW1"]["ms"] == pytest.approx(1.1)
    assert g["dX"]["ms"] == pytest.approx(0.6) and g["dX"]["launches"] == 4
    other = att["other"]
    assert other[bg.normalize_kernel_name(WINDOW)]["launches"] == 4
    assert other[bg.normalize_kernel_name(COMBINE)]["ms"] == pytest.approx(0.06)
    assert bg.normalize_kernel_name(PLAN) in other
    assert att["unattributed"] == {} and att["warnings"] == []


def test_attribute_step_portable_and_mixed():
    step = [(P.format(e=1, b="false"), 800), (P.format(e=0, b="false"), 430), (P.format(e=2, b="true"), 530),
            (WG_P, 600), (WG_P, 1100), (P.format(e=0, b="true"), 800)]
    att = bg.attribute_step(_step(step))
    assert {k: v["paths"] for k, v in att["gemms"].items()} == {k: ["portable"] for k in bg.GEMMS}
    assert att["warnings"] == []
    # sm90 GEMM1 (old name) with portable rest: each GEMM says which path ran
    step[0] = (OLD_GEMM1, 500)
    att = bg.attribute_step(_step(step))
    assert att["gemms"]["GEMM1"]["paths"] == ["sm90"] and att["gemms"]["GEMM2"]["paths"] == ["portable"]


def test_attribute_step_wgrad_order_and_surprises():
    # launch order decides dW2 / dW1, whatever the list order
    evs = [(WG_P, 100.0, 900.0), (WG_P, 10.0, 500.0)]
    att = bg.attribute_step(evs)
    assert att["gemms"]["dW2"]["ms"] == pytest.approx(0.5) and att["gemms"]["dW1"]["ms"] == pytest.approx(0.9)
    # a third wgrad launch is not silently summed; missing GEMMs are reported
    att = bg.attribute_step(_step([(WG_S, 100), (WG_S, 200), (WG_S, 50), ("row_gemm_sm90<bf16, 9, true>(x)", 7)]))
    assert any("3 wgrad launches" in w for w in att["warnings"])
    assert any("no kernel found for GEMM1, GEMM2, dA', dX" in w for w in att["warnings"])
    un = att["unattributed"]
    assert len(un) == 2 and sum(v["launches"] for v in un.values()) == 2
    assert any("wgrad launch #3" in v["why"] for v in un.values())
    # dW2 much slower than dW1: the order assumption is questioned
    att = bg.attribute_step([(WG_P, 0.0, 2000.0), (WG_P, 5000.0, 1000.0)])
    assert any("dW2" in w and "order" in w for w in att["warnings"])


def test_merge_steps_median():
    steps = []
    for i, scale in enumerate((1.0, 3.0, 2.0)):
        s = [(n, d * scale) for n, d in SM90_STEP]
        steps.append(bg.attribute_step(_step(s, t0=1e6 * i)))
    m = bg.merge_steps(steps)
    assert m["windows"] == 3
    assert m["gemms"]["GEMM1"]["ms"] == pytest.approx(1.0)  # median of 0.5, 1.5, 1.0
    assert m["gemms"]["dX"]["launches"] == 4 and m["gemms"]["dX"]["paths"] == ["sm90"]
    assert m["other"][bg.normalize_kernel_name(COMBINE)]["ms"] == pytest.approx(0.12)


def test_kernel_events_fake_profiler():
    from torch.autograd import DeviceType

    def ev(name, dev, start, end):
        return types.SimpleNamespace(name=name, device_type=dev, time_range=types.SimpleNamespace(start=start, end=end))

    prof = types.SimpleNamespace(events=lambda: [ev("cudaLaunchKernel", DeviceType.CPU, 0, 5),
                                                 ev(WG_S, DeviceType.CUDA, 10, 30), ev(COMBINE, DeviceType.CUDA, 40, 41)])
    assert bg.kernel_events(prof) == [(WG_S, 10.0, 20.0), (COMBINE, 40.0, 1.0)]


def test_flop_units_sum_to_the_layer():
    assert sum(bg.FLOP_UNITS.values()) * 2 == 18  # 18*n*H*I for forward+backward


def _grouped_mm_on_cpu():
    try:
        torch._grouped_mm(torch.zeros(8, 8), torch.zeros(2, 8, 8), offs=torch.tensor([4, 8], dtype=torch.int32))
        return True
    except Exception:
        return False


@pytest.mark.skipif(not _grouped_mm_on_cpu(), reason="this torch has no CPU torch._grouped_mm")
def test_torch_problems_compose_the_layer():
    """The six torch._grouped_mm problems (and both operand layouts of the row-grouped ones) are the layer's
    GEMMs: composed into forward+backward they match moe_fused (fp32, tiny shape, empty experts)."""
    lines = []
    errs = bg.check(64, 32, 8, 2, 40, torch.device("cpu"), torch.float32, 3, ["moe_fused"], lines.append)
    assert all(e < 1e-4 for e in errs["moe_fused"].values()), errs
    x, idx, s, w1, w2, dout = bg.make_inputs(64, 32, 8, 2, 40, torch.device("cpu"), torch.float32, 0)
    idx[idx == 5] = 4  # an empty expert
    plan = bg.make_plan(idx, 8)
    _, ops = bg.torch_layer(x, idx, s, w1, w2, dout, plan)
    for gemm in bg.GEMMS:
        variants = list(bg.layout_variants(gemm, *ops[gemm]).values())
        if gemm in ("dW1", "dW2"):  # K-grouped: the autograd layout only (see layout_variants)
            assert len(variants) == 1
            continue
        assert len(variants) == 2
        (a0, b0), (a1, b1) = variants
        assert (a0.stride(), b0.stride()) != (a1.stride(), b1.stride()), gemm  # really the other layout
        for t in (a0, b0, a1, b1):
            assert t.stride(-1) == 1 or t.stride(-2) == 1
        outs = [torch._grouped_mm(a, b, offs=plan[2]) for a, b in variants]
        assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_bench_gemms_cpu_dry_run(tmp_path, capsys):
    if not _grouped_mm_on_cpu():
        pytest.skip("this torch has no CPU torch._grouped_mm")
    from moe_fused import ops

    prev = ops.set_cuda_index_check(True)
    try:
        rc = bg.main(["--device", "cpu", "--shapes", "64x32x8x2", "-T", "40", "--iters", "1", "--warmup", "0",
                      "--out", str(tmp_path), "--name", "g"])
        # the bench turns the CUDA index check off for its runs only (it once left it off for
        # every later test of the process)
        assert ops.set_cuda_index_check(True) is True
    finally:
        ops.set_cuda_index_check(prev)
    assert rc == 0
    out = capsys.readouterr().out
    assert "attribution SKIPPED" in out and "dW1" in out
    import json

    rec = json.loads((tmp_path / "g.json").read_text())["results"][0]
    assert set(rec["gemms"]) == set(bg.GEMMS) and all(e < 1e-4 for e in rec["check"]["moe_fused"].values())
    # the same-work bound of the two fused GEMMs: torch's GEMM + its epilogue's bytes at the copy rate
    assert rec["copy_gbs"] > 0
    for g in bg.GEMMS:
        t = rec["gemms"][g]["torch"]
        if g in ("GEMM1", "dA'"):
            assert t["same_work_ms"] == pytest.approx(t["ms"] + t["epilogue_bytes"] / rec["copy_gbs"] / 1e6)
        else:
            assert "same_work_ms" not in t


def test_epilogue_bytes():
    n, I = 1000, 48
    assert bg.epilogue_bytes("GEMM1", n, I, 2) == n * (2 * I + I) * 2  # read h, write a
    # read dA, h, s; write dh, s*a (bf16) and ds (fp32)
    assert bg.epilogue_bytes("dA'", n, I, 2) == n * ((I + 2 * I + 2 * I + I) * 2 + 2 + 4)
    assert all(bg.epilogue_bytes(g, n, I, 2) == 0 for g in ("GEMM2", "dX", "dW1", "dW2"))


# ---- moe_fused-portable / -nopdl: a library variable set around their calls only ----------------


@pytest.mark.parametrize("before", [None, "0", "1"])
@pytest.mark.parametrize("impl, name, value", [
    ("moe_fused-portable", bench.PORTABLE_ENV, "1"),  # MOE_FUSED_PORTABLE=1 around its calls only
    ("moe_fused-nopdl", bench.PDL_ENV, "0"),  # MOE_FUSED_PDL=0 around its calls only
])
def test_impl_env_variable_set_and_restored(monkeypatch, before, impl, name, value):
    if before is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, before)
    with pytest.raises(RuntimeError):
        with bench.impl_env(impl):
            assert os.environ[name] == value
            raise RuntimeError("boom")
    assert os.environ.get(name) == before
    with bench.impl_env("moe_fused"):
        assert os.environ.get(name) == before


def test_sonic_selected():
    assert bench.sonic_selected(None, "30b-a3b", 4096)
    assert bench.sonic_selected(["all"], "x", 1)
    assert bench.sonic_selected(["30b-a3b"], "30b-a3b", 16384)
    assert bench.sonic_selected(["235b-a22b:4096", "30b-a3b:16384"], "30b-a3b", 16384)
    assert not bench.sonic_selected(["30b-a3b:16384"], "30b-a3b", 4096)
    assert not bench.sonic_selected(["30b-a3b"], "235b-a22b", 4096)


def test_bench_args_defaults_and_sonic_flag():
    a = bench.parse_args([])
    assert a.impls == bench.IMPLS and a.sonic_shapes is None
    a = bench.parse_args(["--device", "cuda"])
    assert a.impls == bench.IMPLS + ["moe_fused-portable", "moe_fused-windows", "moe_fused-ctypes", "moe_fused-nopdl"]
    a = bench.parse_args(["--device", "cuda", "--sonic-shapes", "30b-a3b:16384"])
    assert a.impls[-1] == "sonicmoe"
    a = bench.parse_args(["--impls", "sonicmoe", "moe_fused", "hf-grouped_mm"])
    assert a.impls == ["hf-grouped_mm", "moe_fused", "sonicmoe"]  # HF (the reference) first
    with pytest.raises(SystemExit):
        bench.parse_args(["--sonic-shapes", "30b-a3b:lots"])


@pytest.mark.parametrize("impl, setter, getter, on", [
    ("moe_fused-windows", "set_one_token_window", "_one_window", False),
    ("moe_fused-ctypes", "set_torch_ops", "_torch_ops_wanted", False),
])
def test_bench_impl_env_sets_and_restores_the_setting(impl, setter, getter, on):
    """An implementation's environment holds its setting inside, and restores the previous
    one on the way out, exceptions included."""
    from moe_fused import ops

    previous = getattr(ops, setter)(True)
    try:
        with bench.impl_env(impl):
            assert getattr(ops, getter) is on
        assert getattr(ops, getter) is True
        with pytest.raises(RuntimeError), bench.impl_env(impl):
            raise RuntimeError("a failing call")
        assert getattr(ops, getter) is True
    finally:
        getattr(ops, setter)(previous)


def test_bench_cpu_skips_cuda_only_impls(tmp_path, capsys):
    rc = bench.main(["--shapes", "32x16x4x2", "-T", "8", "--iters", "1", "--warmup", "0", "--impls",
                     "hf-grouped_mm", "moe_fused", "moe_fused-portable", "sonicmoe", "--out", str(tmp_path),
                     "--name", "c", "--no-plot"])
    assert rc == 0
    assert "moe_fused-portable, sonicmoe SKIPPED: CUDA only" in capsys.readouterr().out


def _fake_sonicmoe():
    """A stand-in for sonicmoe that computes what SonicMoE documents, in plain torch, and
    asserts its input contract: token_indices int32 ascending; w1 (2I, H, E) and w2 (H, I, E)
    with stride order (2, 0, 1); concat_layout=True = gate rows 0..I-1, then up rows."""

    class ActivationType(enum.Enum):
        SWIGLU = "swiglu"

    calls = []

    def moe_general_routing_inputs(x, router_scores, token_indices, expert_indices, w1, b1, w2, b2, E, stream_id,
                                   activation_type, is_inference_mode_enabled=False, concat_layout=False):
        calls.append(dict(inference=is_inference_mode_enabled, grad=torch.is_grad_enabled()))
        assert token_indices.dtype == torch.int32 and expert_indices.dtype == torch.int32
        assert bool((token_indices[1:] >= token_indices[:-1]).all())
        assert router_scores.dim() == 1 and router_scores.numel() == token_indices.numel() == expert_indices.numel()
        assert b1 is None and b2 is None and activation_type is ActivationType.SWIGLU and concat_layout
        two_i, H, E_ = w1.shape
        assert E_ == E and w2.shape == (H, two_i // 2, E)
        for w in (w1, w2):
            assert w.stride(1) == 1 and w.stride(2) == max(w.stride()), w.stride()
        I = two_i // 2
        W1 = w1.permute(2, 0, 1)[expert_indices.long()]  # [P, 2I, H]
        W2 = w2.permute(2, 0, 1)[expert_indices.long()]  # [P, H, I]
        xs = x[token_indices.long()]
        h = torch.einsum("pnh,ph->pn", W1, xs)
        a = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
        y = torch.einsum("phi,pi->ph", W2, a) * router_scores.float()[:, None].to(x.dtype)
        out = torch.zeros_like(x).index_add(0, token_indices.long(), y)
        return out, torch.bincount(expert_indices.long(), minlength=E)

    mod = types.ModuleType("sonicmoe")
    mod.enums = types.SimpleNamespace(ActivationType=ActivationType)
    mod.moe_general_routing_inputs = moe_general_routing_inputs
    mod.__version__ = "fake"
    return mod, calls


def _bench_args(**kw):
    a = dict(impls=["hf-grouped_mm", "moe_fused", "moe_fused-portable", "sonicmoe"], eager_max_tokens=0,
             sonic_shapes=None, seed=0, warmup=0, iters=2, max_seconds=5.0, burst=0, burst_rounds=1)
    a.update(kw)
    return argparse.Namespace(**a)


def test_bench_portable_env_and_sonic_plumbing(monkeypatch):
    """run_shape on the CPU with every implementation: moe_fused-portable's forward AND
    backward see MOE_FUSED_PORTABLE=1, moe_fused's never, the variable is restored after;
    the SonicMoE call (fake module) matches HF and moe_fused, so its flattening, token
    indices, weight permutes and gate/up layout are right."""
    import moe_fused

    monkeypatch.delenv(bench.PORTABLE_ENV, raising=False)
    real = moe_fused.moe_experts
    seen = []  # per moe_experts call: {"fwd": env at forward, "bwd": env when its backward ran}

    def spy(*args, **kw):
        rec = {"fwd": os.environ.get(bench.PORTABLE_ENV)}
        seen.append(rec)
        out = real(*args, **kw)
        if out.requires_grad:
            out.register_hook(lambda g: rec.__setitem__("bwd", os.environ.get(bench.PORTABLE_ENV)))
        return out

    monkeypatch.setattr(moe_fused, "moe_experts", spy)
    sonic, calls = _fake_sonicmoe()
    log = []
    res = bench.run_shape("32x16x4x2", [8, 24], _bench_args(), torch.device("cpu"), torch.float32, log.append, sonic)
    assert os.environ.get(bench.PORTABLE_ENV) is None
    assert {r["fwd"] for r in seen} == {None, "1"}
    with_bwd = [r for r in seen if "bwd" in r]
    assert with_bwd and all(r["bwd"] == r["fwd"] for r in with_bwd), with_bwd
    assert sum(r["fwd"] == "1" and r.get("bwd") == "1" for r in seen) >= 3
    assert {(r["impl"], r["mode"]) for r in res if "ms" in r} == {
        (i, m) for i in ("hf-grouped_mm", "moe_fused", "moe_fused-portable", "sonicmoe") for m in ("fwd", "fwd+bwd")}
    for r in res:
        if r["impl"] != "hf-grouped_mm":
            assert all(v < 1e-4 for k, v in r["max_rel_err"].items() if k != "vs"), r
            assert r["speedup_vs_hf-grouped_mm"] > 0
    son = [r for r in res if r["impl"] == "sonicmoe"]
    assert all(r["max_rel_err_vs_moe_fused"]["out"] < 1e-4 for r in son)
    assert all(r["first_call_ms"] > 0 for r in son)  # fwd: the first no-grad call; fwd+bwd: the first one
    assert {c["inference"] for c in calls} == {True, False}
    assert all(c["inference"] == (not c["grad"]) for c in calls)
    fused = [r for r in res if r["impl"] == "moe_fused"]
    assert all("speedup_vs_sonicmoe" in r and "speedup_vs_moe_fused-portable" in r for r in fused)
    table = bench._table(res)
    assert "moe_fused-portable ms" in table and "sonicmoe vs grouped_mm" in table and "moe_fused vs sonicmoe" in table
    assert any("sonicmoe first call" in s for s in log)


def test_bench_sonic_shapes_skip(monkeypatch):
    sonic, calls = _fake_sonicmoe()
    log = []
    res = bench.run_shape("32x16x4x2", [8, 24], _bench_args(impls=["hf-grouped_mm", "moe_fused", "sonicmoe"],
                                                            sonic_shapes=["32x16x4x2:24"]),
                          torch.device("cpu"), torch.float32, log.append, sonic)
    son = {(r["T"], r["mode"]): r for r in res if r["impl"] == "sonicmoe"}
    assert "skipped" in son[(8, "fwd")] and "ms" in son[(24, "fwd+bwd")]
    assert any("sonicmoe at 32x16x4x2 T=8 SKIPPED" in s for s in log)


def test_fill_ours_and_table_with_fake_attribution():
    """The CUDA-only half of bench_gemms.run_point (our per-GEMM numbers into the record and
    the printed table), fed with fake profiler windows of both paths."""
    H, I, n = 2048, 768, 32768
    rec = dict(shape="30b-a3b", T=4096, n=n, gemms={}, paths={})
    for g in bg.GEMMS:
        flop = bg.FLOP_UNITS[g] * 2 * n * H * I
        t = dict(ms=0.5, tflops=flop / 0.5 / 1e9, layout="x", layouts={"x": 0.5}, kernel_ms=0.49)
        if g == "dW2":
            t = dict(error="boom")
        if g == "GEMM1":
            t.update(epilogue_bytes=bg.epilogue_bytes(g, n, I, 2), same_work_ms=0.7)
        rec["gemms"][g] = dict(problem=bg.problem_str(g, H, I), gflop=flop / 1e9, torch=t)
    rec["copy_gbs"] = 2900.0
    sm90 = bg.merge_steps([bg.attribute_step(_step(SM90_STEP, t0=1e6 * i)) for i in range(3)])
    p = dict(fwd_bwd_ms=4.0, fwd_bwd_tflops=100.0)
    lines = bg.fill_ours(rec, "moe_fused", p, sm90, expect_sm90=True)
    assert lines == []
    # the portable path, but one sm90 kernel slipped in: flagged
    port_step = [(P.format(e=1, b="false"), 800), (S.format(e=0, b="false"), 430), (P.format(e=2, b="true"), 530),
                 (WG_P, 600), (WG_P, 1100), (P.format(e=0, b="true"), 800), (COMBINE, 50)]
    port = bg.merge_steps([bg.attribute_step(_step(port_step))])
    p2 = dict(fwd_bwd_ms=5.0, fwd_bwd_tflops=90.0)
    lines = bg.fill_ours(rec, "moe_fused-portable", p2, port)
    assert any("GEMM2 ran a non-portable kernel" in s for s in lines)
    g1 = rec["gemms"]["GEMM1"]
    assert g1["moe_fused"]["ms"] == pytest.approx(0.5) and g1["moe_fused"]["speedup"] == pytest.approx(1.0)
    assert g1["moe_fused-portable"]["speedup"] == pytest.approx(0.5 / 0.8)
    assert g1["moe_fused"]["speedup_kernel"] == pytest.approx(0.49 / 0.5)
    assert g1["moe_fused"]["speedup_same_work"] == pytest.approx(0.7 / 0.5)
    assert "speedup_same_work" not in rec["gemms"]["dX"]["moe_fused"]
    assert "speedup" not in rec["gemms"]["dW2"]["moe_fused"]  # torch failed there
    assert rec["paths"]["moe_fused"]["gemm_ms_sum"] == pytest.approx(0.5 + 0.3 + 0.4 + 0.6 + 1.1 + 0.6)
    table = bg._table_point(rec, list(bg.PATHS))
    assert "failed" in table and "sm90 x4" in table and "portable <" in table
    assert " 0.98x sm90" in table  # GEMM1's like-for-like ratio beside the path
    assert "same work, GEMM1: torch 0.500 ms + its unfused epilogue's 151 MB at the copy rate (2900 GB/s) " \
           "= 0.700 ms (a lower bound); moe_fused 1.40x; moe_fused-portable 0.87x" in table
    assert bg.normalize_kernel_name(COMBINE)[:60] in table
    # portable GEMMs on an H100 run of the default path are noted
    rec2 = dict(rec, paths={}, gemms={k: dict(v) for k, v in rec["gemms"].items()})
    lines = bg.fill_ours(rec2, "moe_fused", dict(p2), port, expect_sm90=True)
    assert any("portable kernel ran for GEMM1, dA', dX, dW1, dW2" in s for s in lines)


def test_wgrad_template_args_cross_check_launch_order():
    dw2, dw1 = WG_S2.format(gp="true", tr="false"), WG_S2.format(gp="true", tr="true")
    assert bg.classify_kernel(dw1) == ("wgrad", "sm90")
    assert bg.wgrad_hint(dw1) == "dW1" and bg.wgrad_hint(dw2) == "dW2"
    assert bg.wgrad_hint(WG_S) is None and bg.wgrad_hint(WG_P) is None
    assert bg.wgrad_hint("_ZN3moe4cuda4sm9012_GLOBAL__N_110wgrad_sm90I13__nv_bfloat16Lb1ELb1EEEv14CUtensorMap_stNS2_8WgParamsE") == "dW1"
    att = bg.attribute_step([(dw2, 0.0, 600.0), (dw1, 1000.0, 1100.0)])
    assert att["warnings"] == [] or all("no kernel found" in w for w in att["warnings"])
    assert att["gemms"]["dW2"]["ms"] == pytest.approx(0.6)
    att = bg.attribute_step([(dw1, 0.0, 1100.0), (dw2, 2000.0, 600.0)])  # launched the other way round
    assert sum("by launch order, but its template arguments say" in w for w in att["warnings"]) == 2


def _ab_log(rounds):
    """profile_kernels.py's output for rounds of {T: {label: ms}} (labels '' = unlabeled)."""
    out = []
    for r in rounds:
        for T, ks in r.items():
            out.append(f"== 30b-a3b T={T}: fwd 1.000 ms (300 TF/s)  fwd+bwd {sum(ks.values()):.3f} ms "
                       f"(300 TF/s); kernels sum {sum(ks.values()):.3f} ms/step")
            for (label, name), ms in ks.items():
                out.append(f"  {ms:8.3f} ms {10.0:5.1f}%  x1  {label:16s} {name}")
    return "\n".join(out) + "\n"


def test_ab_summary_reads_rounds_and_normalizes_by_the_reference(tmp_path):
    spec = importlib.util.spec_from_file_location("ab_summary", _ROOT / "bench" / "device" / "ab_summary.py")
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    g1 = ("GEMM1/sm90", "void moe::cuda::sm90::row_gemm_sm90<bf16, 1, false>(...)")
    dx = ("dX/sm90", "void moe::cuda::sm90::row_gemm_sm90<bf16, 0, true>(...)")
    wa = ("dW2+dW1/sm90", "void moe::cuda::sm90::wgrad_sm90<bf16, true, true, 64>(...)")
    wb = ("dW2+dW1/sm90", "void moe::cuda::sm90::wgrad_sm90<bf16, true, false, 64>(...)")
    cb = ("", "void moe::cuda::(anonymous namespace)::combine_kernel<__nv_bfloat16>(...)")
    base = [{4096: {g1: 9.0, dx: 9.0, wa: 9.0, wb: 9.0, cb: 9.0}},  # warm-up round: left out
            {4096: {g1: 1.0, dx: 1.0, wa: 0.5, wb: 0.25, cb: 0.1}}]
    # the variant's round ran 10% slower clocks: every kernel x1.1, and dX also 0.8x its own
    var = [{4096: {g1: 9.0, dx: 9.0, wa: 9.0, wb: 9.0, cb: 9.0}},
           {4096: {g1: 1.1, dx: 0.88, wa: 0.55, wb: 0.275, cb: 0.11}}]
    (tmp_path / "ab_base.log").write_text(_ab_log(base))
    (tmp_path / "ab_v.log").write_text(_ab_log(var))
    runs = ab.parse(tmp_path / "ab_base.log")
    r1 = runs[("30b-a3b", 4096)][1]
    assert len(runs[("30b-a3b", 4096)]) == 2
    assert r1["dW2+dW1/sm90"] == 0.5 and r1["dW2+dW1/sm90'"] == 0.25
    assert r1["combine_kernel"] == 0.1
    text = ab.summarize(tmp_path, ["base", "v"], "GEMM1/sm90")
    assert text.startswith("30b-a3b T=4096")
    rows = {line.split()[0]: line.split() for line in text.splitlines()[2:]}
    assert rows["dX/sm90"][1:] == ["1.000", "0.880", "0.880", "0.800"]  # base, v, ratio, vs ref
    assert rows["dW2+dW1/sm90'"][1:] == ["0.250", "0.275", "1.100", "1.000"]
    assert rows["combine_kernel"][-1] == "1.000" and rows["GEMM1/sm90"][-1] == "1.000"
    # every round read (the warm-up left out), kernels of at least min_ms only
    rounds = ab.rounds_table(tmp_path, ["base", "v"], min_ms=0.2).splitlines()
    assert rounds[0] == "30b-a3b T=4096: every round read, ms"
    table = {(line.split()[0], line.split()[1]): line.split()[2:] for line in rounds[1:]}
    assert table[("dX/sm90", "v")] == ["0.880"] and table[("GEMM1/sm90", "base")] == ["1.000"]
    assert ("dW2+dW1/sm90'", "base") in table and ("combine_kernel", "base") not in table


def test_time_interleaved_varies_the_order():
    # Each implementation runs right after each other one in some round, and each gets its
    # runs: a fixed order would always time one of them right after the same neighbour.
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("hf", "ours", "other")}
    timed = bench._time_interleaved(fns, torch.device("cpu"), warmup=0, iters=10, max_seconds=60)
    assert {name: n for name, (_, n) in timed.items()} == {"hf": 10, "ours": 10, "other": 10}
    rounds = [calls[i : i + 3] for i in range(0, len(calls), 3)]
    assert all(sorted(r) == sorted(fns) for r in rounds)
    after = {(a, b) for r in rounds for a, b in zip(r, r[1:])}
    assert after == {(a, b) for a in fns for b in fns if a != b}


def test_dense_bound_cpu_smoke(capsys):
    """bench/device/dense_bound.py runs end to end (a tiny CPU shape) and states each target
    against the dense sum: above it when HF's time / target is larger, BELOW when smaller."""
    spec = importlib.util.spec_from_file_location("dense_bound", _ROOT / "bench" / "device" / "dense_bound.py")
    db = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(db)
    flops = sum(2.0 * m * k * n for _, (m, k), (_, n) in db.problems(2048, 768, 131072))
    assert flops == pytest.approx(18 * 131072 * 2048 * 768)  # the layer's fwd+bwd FLOPs
    db.main(["--device", "cpu", "--shapes", "30b-a3b-cpu", "-T", "2", "--iters", "3",
             "--hf-ms", "30b-a3b-cpu=1e6", "--targets", "3", "1e12"])
    out = capsys.readouterr().out
    assert "six" in out and "3.0x HF grouped_mm" in out
    assert "above the dense bound" in out and "BELOW the dense bound" in out
