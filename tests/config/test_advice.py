"""Warnings before work: one line per valid setting that will not do what the user expects."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from blip_recipes.config import load_config
from blip_recipes.config.advice import advice
from blip_recipes.data.config_checks import samples_per_epoch, total_steps
from blip_recipes.training.sizes import training_memory_estimate

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "recipes" / "configs"


def _cfg(name: str, *overrides: str):
    return load_config(CONFIGS / f"{name}.toml", list(overrides))


def test_the_demo_config_draws_no_warning():
    assert advice(_cfg("debug"), world_size=1) == []


def test_base_config_on_a_small_cpu_data_set_warns_about_each_mismatch(monkeypatch):
    import blip_recipes.config.advice as mod

    monkeypatch.setattr(mod, "cpu_cores", lambda: 2)
    monkeypatch.setattr(mod, "physical_memory", lambda: 16 * 2**30)
    cfg = _cfg("base", "parallel.device=cpu", "data.sources.0.kind=synthetic",
               "data.sources.0.num_samples=200")  # fmt: skip
    lines = advice(cfg, world_size=1)
    assert len(lines) == 6, lines
    joined = "\n".join(lines)
    assert "(ViT-B) on the CPU" in lines[0]
    assert "needs about 20.9 GiB per rank" in joined and "16.0 GiB of RAM" in joined
    assert "parallel.compile=true on the CPU" in joined
    assert "data.num_workers=10 x 1 rank(s)" in joined and "set data.num_workers=1" in joined
    assert "warmup_steps=3000 is not shorter than the run (40 steps)" in joined
    assert "momentum.queue_size=57600 is 288x the data set (200 samples)" in joined
    assert "set momentum.queue_size=75" in joined


def test_inference_recipes_get_no_training_advice():
    cfg = _cfg("debug", "lr_scheduler.warmup_steps=10000", "momentum.queue_size=65536")
    assert advice(cfg, trains=False) == []
    assert len(advice(cfg, trains=True)) == 2


def test_advice_and_checks_skip_the_keys_a_recipe_does_not_read():
    from blip_recipes.config import ConfigError, LaunchContext, validate
    from blip_recipes.config.registry import RECIPES, recipe_unread

    cfg = _cfg("debug", "lr_scheduler.warmup_steps=10000", "momentum.queue_size=65536")
    caption = recipe_unread(RECIPES["blip_finetune_caption"].path)
    retrieval = recipe_unread(RECIPES["blip_finetune_retrieval"].path)
    assert advice(cfg, unread=caption) == []  # per-epoch schedule, no queue
    (queue_line,) = advice(cfg, unread=retrieval)  # per-epoch schedule, but a queue
    assert "momentum.queue_size=65536" in queue_line
    assert recipe_unread(RECIPES["blip_pretrain"].path) == frozenset()
    odd_batch = _cfg("debug", "data.batch_size=7")  # 7 divides no queue size of the config
    validate(odd_batch, LaunchContext(unread=caption))  # caption fine-tuning has no queue
    with pytest.raises(ConfigError, match="momentum.queue_size"):  # pretraining has one
        validate(odd_batch, LaunchContext())


def test_steps_and_sizes_from_the_annotations(tmp_path):
    ann = tmp_path / "a.jsonl"
    ann.write_text("".join(json.dumps({"image": f"{i}.jpg", "caption": "x"}) + "\n"
                           for i in range(50)))  # fmt: skip
    cfg = _cfg("debug", "data.sources.0.kind=jsonl", f'data.sources.0.paths=["{ann}"]',
               "training.steps=none", "training.epochs=3")  # fmt: skip
    assert samples_per_epoch(cfg) == 50
    assert total_steps(cfg, world_size=2, samples=50) == 3  # 50 // (16 x 2) = 1 step per epoch
    assert training_memory_estimate(_cfg("debug")) < 2**30


def test_blip_validate_prints_warnings_on_stderr_and_still_succeeds(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "blip_recipes.cli", "validate", "--config",
                           "debug", "lr_scheduler.warmup_steps=1000",
                           f"job.output_dir={tmp_path}"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "warmup_steps=1000 is not shorter than the run" in warnings[0]
    assert "[job]" in proc.stdout
