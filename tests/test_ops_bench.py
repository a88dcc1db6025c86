"""Smoke tests of the layer benchmark and the `moe-fused` command (tiny shapes, one run)."""

from __future__ import annotations

import json

import pytest

from moe_fused import bench, cli


def test_bench_tiny_cpu(tmp_path, capsys):
    rc = bench.main(["--shapes", "32x16x4x2", "-T", "8", "17", "--iters", "1", "--warmup", "0",
                     "--out", str(tmp_path), "--name", "tiny", "--no-plot"])
    assert rc == 0
    data = json.loads((tmp_path / "tiny.json").read_text())
    recs = data["results"]
    assert {(r["impl"], r["mode"], r["T"]) for r in recs} == {
        (i, m, T) for i in bench.IMPLS for m in ("fwd", "fwd+bwd") for T in (8, 17)
    }
    for r in recs:
        assert "error" not in r, r
        assert r["ms"] > 0 and r["tflops"] > 0
    ours = [r for r in recs if r["impl"] == "moe_fused"]
    for r in ours:
        assert "speedup_vs_hf-eager" in r and "speedup_vs_hf-grouped_mm" in r
        errs = r["max_rel_err"]
        assert errs["vs"] == "hf-eager"
        assert all(errs[n] < 1e-4 for n in ("out", "d_hidden", "d_weights", "d_gate_up", "d_down")), errs
    out = capsys.readouterr().out
    assert "moe_fused speedup vs eager / grouped_mm" in out


def test_bench_steady_state_bursts(tmp_path, capsys, monkeypatch):
    """--burst N: every implementation is also timed in bursts of N back-to-back calls (the
    call count checked by counting the calls), reported beside the main figures with its own
    speedups; off by default on the CPU."""
    calls = []
    real = bench._run_burst
    monkeypatch.setattr(bench, "_run_burst", lambda fn, dev, n: calls.append(n) or real(fn, dev, n))
    rc = bench.main(["--shapes", "32x16x4x2", "-T", "8", "--iters", "1", "--warmup", "0", "--burst", "3",
                     "--burst-rounds", "2", "--out", str(tmp_path), "--name", "burst", "--no-plot"])
    assert rc == 0
    recs = json.loads((tmp_path / "burst.json").read_text())["results"]
    for r in recs:
        assert r["ms_steady"] > 0 and r["steady_calls"] == 3 and r["steady_rounds"] >= 2, r
    ours = [r for r in recs if r["impl"] == "moe_fused"]
    assert all(r["steady_speedup_vs_hf-grouped_mm"] > 0 for r in ours)
    # two modes x three implementations x at least two rounds, each a burst of 3 calls (the
    # idle-start runs are bursts of one)
    assert calls.count(3) >= 2 * len(bench.IMPLS) * 2 and set(calls) == {1, 3}
    out = capsys.readouterr().out
    assert "steady state, ms a call in bursts of 3 back-to-back calls" in out
    assert bench.parse_args(["--shapes", "32x16x4x2"]).burst == 0  # CPU default: off


def test_bench_eager_skip_is_reported(tmp_path, capsys):
    rc = bench.main(["--shapes", "32x16x4x2", "-T", "8", "40", "--iters", "1", "--warmup", "0",
                     "--eager-max-tokens", "16", "--out", str(tmp_path), "--name", "skip", "--no-plot"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "hf-eager at T=40 SKIPPED" in out
    recs = json.loads((tmp_path / "skip.json").read_text())["results"]
    skipped = [r for r in recs if "skipped" in r]
    assert {(r["impl"], r["T"]) for r in skipped} == {("hf-eager", 40)}
    assert all(r["speedup_vs_hf-grouped_mm"] > 0 for r in recs if r["impl"] == "moe_fused")


def test_bench_plot(tmp_path):
    pytest.importorskip("matplotlib")
    assert bench.main(["--shapes", "16x8x3x1", "-T", "4", "--iters", "1", "--warmup", "0",
                       "--impls", "hf-grouped_mm", "moe_fused", "--out", str(tmp_path), "--name", "p"]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_bench_bad_shape():
    with pytest.raises(SystemExit):
        bench.main(["--shapes", "nonsense", "--out", "/tmp/unused-moe-bench"])


def test_cli_dispatch(capsys):
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0
    assert "bench" in capsys.readouterr().out
    assert cli.main(["info"]) == 0
    assert "libmoe_fused:" in capsys.readouterr().out
    assert cli.main(["no-such-command"]) == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 0


@pytest.mark.parametrize("env, avail, cc, want", [
    ("0", True, (9, 0), "off (MOE_FUSED_PDL=0)"),
    (None, False, None, "(none visible)"),
    (None, True, (8, 6), "off (compute capability 8.6"),
    ("1", True, (9, 0), "on (MOE_FUSED_PDL=0 turns it off)"),
])
def test_info_kernel_chaining_status(monkeypatch, env, avail, cc, want):
    """`moe-fused info`'s kernel-chaining line follows the library's rule (pdl.cu)."""
    import types

    if env is None:
        monkeypatch.delenv("MOE_FUSED_PDL", raising=False)
    else:
        monkeypatch.setenv("MOE_FUSED_PDL", env)
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: avail,
                                                            get_device_capability=lambda: cc))
    assert want in cli._pdl_status(fake)


def test_cuda_index_check_block_restores_the_setting():
    # The CUDA bench turns the check off for its timed runs only (a test that ran it used to
    # leave it off for every later test in the process).
    from moe_fused import ops

    prev = ops.set_cuda_index_check(True)
    try:
        with ops.cuda_index_check(False):
            assert ops.set_cuda_index_check(False) is False
        assert ops.set_cuda_index_check(True) is True
        with pytest.raises(RuntimeError):
            with ops.cuda_index_check(False):
                raise RuntimeError("inside")
        assert ops.set_cuda_index_check(True) is True
    finally:
        ops.set_cuda_index_check(prev)


@pytest.mark.gpu
def test_cuda_bench_leaves_the_index_check_on(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from moe_fused import ops

    prev = ops.set_cuda_index_check(True)
    try:
        assert bench.main(["--device", "cuda", "--shapes", "32x16x4x2", "-T", "8", "--iters", "1",
                           "--warmup", "0", "--impls", "moe_fused", "--out", str(tmp_path), "--name", "c",
                           "--no-plot"]) == 0
        assert ops.set_cuda_index_check(True) is True
    finally:
        ops.set_cuda_index_check(prev)


def test_memory_table_shows_the_forward_peak():
    """The memory table prints, per implementation, the fwd+bwd peak without the weight grads,
    the forward's own peak and the bytes saved for the backward (CUDA runs record them)."""
    from moe_fused.bench import _table

    rec = dict(shape="s", T=8, H=4, I=2, E=2, k=1, impl="moe_fused", mode="fwd+bwd", ms=1.0, runs=3,
               tflops=1.0, peak_extra_bytes=5 * 2**20, weight_grad_bytes=2 * 2**20,
               peak_extra_without_weight_grads_bytes=3 * 2**20, forward_peak_extra_bytes=4 * 2**20,
               saved_bytes=1 * 2**20)
    text = _table([rec])
    assert "without weight grads / forward alone / saved for backward" in text
    assert "3.0 /       4.0 /       1.0" in text
