"""Smoke test of tools/benchmark_data.py's transform comparison (tiny, no loader)."""

import importlib.util
import json
import random
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "benchmark_data.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("benchmark_data", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_reports_both_pipelines_and_ratio(tmp_path):
    out = tmp_path / "r.json"
    args = ["--skip-loader", "--num", "4", "--repeats", "1", "--short-side", "64"]
    assert _load_tool().main([*args, "--image-size", "32", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    for key in ("train_transform_per_core", "plain_pillow_per_core", "speedup_vs_plain"):
        assert results[key] > 0
    ratio = results["train_transform_per_core"] / results["plain_pillow_per_core"]
    assert abs(results["speedup_vs_plain"] - ratio) < 1e-9
    assert results["mean_abs_diff"] < 1.0  # both pipelines compute the same transform


def test_plain_pipeline_is_the_same_transform(tmp_path):
    tool = _load_tool()
    from blip_recipes.data import build_train_transform, open_image

    path = tmp_path / "x.jpg"
    path.write_bytes(tool.photo_like_jpeg(0, (96, 72)))
    ours = build_train_transform(48)
    for fast_paths in (False, True):
        plain = tool.plain_pillow(48, fast_paths=fast_paths)
        means = []
        for seed in range(20):
            a = ours(open_image(str(path)), random.Random(seed)).int()
            b = plain(str(path), random.Random(seed)).int()
            assert a.shape == b.shape == (3, 48, 48)
            means.append((a - b).abs().float().mean().item())
        # Differences are resampling rounding (Pillow runs the vertical pass first on tall
        # crops), which AutoContrast/Equalize can amplify through their lookup tables.
        assert max(means) < 1.0 and sum(means) / len(means) < 0.2


def test_feed_budget_sizes_the_worker_pool():
    budget = _load_tool().feed_budget(per_core=100.0, target=1130.0, max_workers=14)
    assert budget["feed_workers_needed"] == 11.3
    assert abs(budget["feed_supply_over_target"] - 1400 / 1130) < 1e-12
    assert budget["feed_predicted_data_wait_frac"] == 0.0
    short = _load_tool().feed_budget(per_core=50.0, target=1000.0, max_workers=10)
    assert short["feed_predicted_data_wait_frac"] == 0.5  # half the step waits for data
