import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TOOL = Path(__file__).resolve().parents[2] / "tools" / "benchmark.py"
RESULT_KEYS = {
    "name", "kind", "batch_size", "samples_per_sec", "effective_mfu", "peak_memory_gib",
    "step_ms_mean", "step_ms_std", "ratio_vs_baseline", "losses", "timer",
}  # fmt: skip


def _run(tmp_path, *args):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(TOOL), "--model", "blip_pretrain_tiny", "--threads", "1",
           "--warmup", "1", "--steps", "2", "--json", str(out), *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def test_two_variants_and_baseline_with_profile(tmp_path):
    report, stdout = _run(
        tmp_path, "--device", "cpu", "--variants", "eager-fp32,eager-fp32-nofsdp", "--profile",
        "--profile-steps", "1",
    )  # fmt: skip
    results = report["results"]
    assert [r["name"] for r in results] == ["baseline-hf-fp32", "eager-fp32", "eager-fp32-nofsdp"]
    for r in results:
        assert RESULT_KEYS <= set(r), RESULT_KEYS - set(r)
        assert r["samples_per_sec"] > 0 and r["step_ms_mean"] > 0
        assert r["effective_mfu"] is None and r["timer"] == "perf_counter"
        assert r["host_syncs"] is None  # counted on CUDA only
        assert all(v is not None for v in r["losses"].values())
        assert r["profile"]["per_step_ms"]["vit"] > 0 and r["profile"]["per_step_ms"]["itm"] > 0
    assert results[0]["ratio_vs_baseline"] is None
    for r in results[1:]:
        expected = r["samples_per_sec"] / results[0]["samples_per_sec"]
        assert r["ratio_vs_baseline"] == pytest.approx(expected)
    meta = report["meta"]
    assert (
        meta["model"] == "blip_pretrain_tiny" and meta["environment"]["torch"] == torch.__version__
    )
    assert "| eager-fp32 |" in stdout


def test_real_loader_without_baseline(tmp_path):
    report, _ = _run(
        tmp_path, "--device", "cpu", "--variants", "eager-fp32-nofsdp", "--no-baseline",
        "--data", "loader", "--workers", "0", "--batch-size", "4",
    )  # fmt: skip
    (r,) = report["results"]
    assert r["batch_size"] == 4 and r["samples_per_sec"] > 0
    assert 0 < r["data_wait_frac"] < 1


def test_bad_variant_is_a_usage_error(tmp_path):
    proc = subprocess.run([sys.executable, str(TOOL), "--variants", "eager-fp16"],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and "fp16" in proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_real_float8_compile_and_cuda_events(tmp_path):
    report, _ = _run(
        tmp_path, "--device", "cuda", "--batch-size", "16", "--variants",
        "eager-bf16,compile-bf16,compile-bf16-float8-tensorwise,compile-bf16-float8-rowwise",
        "--profile",
    )  # fmt: skip
    for r in report["results"]:
        assert "error" not in r, r.get("traceback")
        assert r["timer"] == "cuda_event" and r["peak_memory_kind"] == "cuda_max_allocated"
        assert r["profile"]["basis"] == "cuda_kernels"
        assert isinstance(r["host_syncs"]["count"], int)
    (baseline,) = [r for r in report["results"] if r["kind"] == "baseline"]
    assert baseline["host_syncs"]["count"] >= 2 * 16  # the reference's .item() per negative
    float8 = [r for r in report["results"] if "float8" in r["name"]]
    assert all("parallel.float8_emulate=true" not in r["overrides"] for r in float8)
