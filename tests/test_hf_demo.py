"""`moe-fused demo` and bench/bench_e2e.py: argument errors, and a tiny CPU run of each."""
from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest
import torch

pytest.importorskip("transformers")
from moe_fused import demo  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "--steps must be >= 1"),
        (["--steps", "ten"], "--steps must be an integer"),
        (["--device", "tpu"], "invalid choice: 'tpu'"),
        (["--lr", "-1"], "--lr must be a positive number"),
        (["--compare", "grouped_mm,flash"], "unknown implementation(s) flash"),
        (["--data", "/nonexistent/dir"], "not a directory"),
    ],
)
def test_demo_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_demo_cuda_without_gpu(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--device", "cuda"])
    assert "--device cuda requested, but PyTorch sees no CUDA GPU" in capsys.readouterr().err


def test_demo_tiny_run(tmp_path, capsys):
    rc = demo.main([
        "--steps", "4", "--compare-steps", "2", "--batch-size", "2", "--seq-len", "32", "--layers", "1",
        "--max-bytes", "100000", "--out-dir", str(tmp_path), "--no-progress", "--log-every", "2",
    ])
    assert rc == 0
    out = capsys.readouterr().out
    assert "moe_fused" in out and "grouped_mm" in out and "eager" in out and "tokens/s" in out
    rec = json.loads((tmp_path / "demo_results.json").read_text())
    assert set(rec["results"]) == {"moe_fused", "grouped_mm", "eager"}
    for impl in ("grouped_mm", "eager"):
        r = rec["results"][impl]
        assert "error" not in r, r
        # Same init weights, same batches: the losses agree with moe_fused's.
        assert r["max_abs_loss_diff_vs_moe_fused"] < 1e-3
    assert rec["results"]["moe_fused"]["tokens_per_s"] > 0
    for r in rec["results"].values():
        assert 0 < r["experts_share"] < 1
    pytest.importorskip("matplotlib")
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000


def _bench_e2e():
    spec = importlib.util.spec_from_file_location("bench_e2e", ROOT / "bench" / "bench_e2e.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_e2e_quick(tmp_path):
    out = tmp_path / "e2e.json"
    rc = _bench_e2e().main(["--quick", "--steps", "1", "--warmup", "1", "--eager-steps", "1", "--out", str(out)])
    assert rc == 0
    rec = json.loads(out.read_text())
    for impl in ("moe_fused", "grouped_mm", "eager"):
        r = rec["results"][impl]
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and 0 < r["experts_share"] < 1


def test_bench_e2e_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        _bench_e2e().main(["--quick", "--tokens", "100", "--seq-len", "64"])
    assert "must be a multiple of --seq-len" in capsys.readouterr().err
