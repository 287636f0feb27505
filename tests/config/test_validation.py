"""Settings that load fine but would fail once a run is under way are rejected up front."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from blip_recipes.config import ConfigError, LaunchContext, load_config, paths, validate
from blip_recipes.training import config_checks
from blip_recipes.training.sizes import checkpoint_size_estimate

REPO = Path(__file__).resolve().parents[2]
DEBUG = REPO / "recipes" / "configs" / "debug.toml"


def _debug(tmp_path, *overrides):
    return load_config(DEBUG, [f"job.output_dir={tmp_path / 'run'}", *overrides])


def _errors(cfg, **ctx) -> str:
    with pytest.raises(ConfigError) as info:
        validate(cfg, LaunchContext(**ctx))
    return str(info.value)


def test_debug_config_is_valid(tmp_path):
    validate(_debug(tmp_path), LaunchContext())
    assert not (tmp_path / "run").exists()  # validation writes nothing


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.max_nonfinite_steps=0", "'training.max_nonfinite_steps' must be an integer >= 1"),
        ("tokenizer.max_length=10000",
         "'tokenizer.max_length' must be in [1, 64] for blip_pretrain_tiny"),
        ("optimizer.lr=-1", "'optimizer.lr' must be a finite number > 0, got -1.0"),
        ("optimizer.lr=0", "'optimizer.lr' must be a finite number > 0, got 0.0"),
        ("optimizer.lr=nan", "'optimizer.lr' must be a finite number > 0, got nan"),
        ("data.prefetch_factor=0", "'data.prefetch_factor' must be an integer >= 1"),
        ("model.image_size=50",
         "'model.image_size' must be a multiple of the patch size 16 of blip_pretrain_tiny "
         "(e.g. 48 or 64), got 50"),
        ("data.min_image_size=0", "'data.min_image_size' must be an integer >= 1"),
        ("data.max_aspect_ratio=0.5", "'data.max_aspect_ratio' must be >= 1"),
        ("optimizer.betas=[0.9, 1.0]", "'optimizer.betas.1' must be in [0, 1)"),
        ("lr_scheduler.decay_rate=0", "'lr_scheduler.decay_rate' must be in (0, 1]"),
        ("training.grad_clip=0", "'training.grad_clip' must be > 0 or none"),
        ("checkpoint.keep_latest_k=-1", "'checkpoint.keep_latest_k' must be >= 0"),
        ("data.sources.0.image_size=4", "'data.sources.0.image_size' (4) is below "
         "'data.min_image_size' (8)"),
    ],
)  # fmt: skip
def test_setting_outside_its_range_is_named(tmp_path, override, message):
    assert message in _errors(_debug(tmp_path, override))


@pytest.mark.parametrize(
    "override",
    ["model.embed_dim=0", "model.embed_dim=-4", "data.sources.0.num_samples=-1",
     "data.sources.0.num_samples=0", "data.sources.0.image_size=0", "eval.k_test=0",
     "job.collective_timeout_s=0", "job.stop_timeout_s=-1", "capfilt.batch_size=0"],
)  # fmt: skip
def test_every_count_that_must_be_positive_is_checked(tmp_path, override):
    key, value = override.split("=")
    assert f"'{key}' must be positive, got {value}" in _errors(_debug(tmp_path, override))


def test_a_world_of_zero_ranks_is_refused(tmp_path):
    assert "world size (ranks in the job) must be >= 1, got 0" in _errors(
        _debug(tmp_path), world_size=0
    )


def test_base_model_allows_512_positions_and_eval_lengths_are_checked(tmp_path):
    cfg = _debug(tmp_path, "model.name=blip_pretrain_base", "tokenizer.max_length=512")
    validate(cfg, LaunchContext(checkpoints=False))
    cfg.tokenizer.max_length = 513
    assert "must be in [1, 512] for blip_pretrain_base" in _errors(cfg, checkpoints=False)
    cfg = _debug(tmp_path, "eval.text_max_length=100")
    validate(cfg, LaunchContext())  # no periodic evaluation: not used
    cfg.eval.every_steps, cfg.eval.annotation = 10, "ann.json"
    assert "'eval.text_max_length' must be in [1, 64]" in _errors(cfg)


def test_output_dir_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    cfg = load_config(DEBUG, [f"job.output_dir={tmp_path / 'file' / 'run'}"])
    assert "is a file, not a folder" in _errors(cfg)
    cfg = load_config(DEBUG, [f"job.output_dir={tmp_path / 'file'}"])
    assert "exists and is not a folder" in _errors(cfg)


def test_output_dir_not_writable(tmp_path, monkeypatch):
    cfg = _debug(tmp_path)
    real_access = os.access
    monkeypatch.setattr(
        paths.os,
        "access",
        lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode),
    )
    text = _errors(cfg)
    assert (
        f"'job.output_dir' {tmp_path / 'run'} cannot be written: {tmp_path} is not writable" in text
    )
    assert "the folder would be created there" in text


def test_output_dir_on_a_read_only_file_system(tmp_path, monkeypatch):
    """os.access can say yes (root, NFS root squash): the probe file decides."""
    (tmp_path / "run").mkdir()

    def refuse(dir=None, **kw):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(paths.tempfile, "TemporaryFile", refuse)
    assert "refuses new files (Read-only file system)" in _errors(_debug(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_dir_without_write_permission(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        cfg = load_config(DEBUG, [f"job.output_dir={locked / 'run'}"])
        assert "is not writable" in _errors(cfg)
    finally:
        locked.chmod(0o755)


def test_free_disk_space_below_one_checkpoint(tmp_path, monkeypatch):
    cfg = _debug(tmp_path)
    need = checkpoint_size_estimate(cfg)["bytes"]
    usage = SimpleNamespace(total=10 * need, used=0, free=need - 1)
    monkeypatch.setattr(config_checks.shutil, "disk_usage", lambda path: usage)
    text = _errors(cfg)
    assert f"'job.output_dir' {tmp_path / 'run'}: 0.00 GiB free on its file system" in text
    assert "one checkpoint of blip_pretrain_tiny needs about" in text
    assert "M parameters x 3 (weights + 2 AdamW moments)" in text
    validate(cfg, LaunchContext(checkpoints=False))  # a recipe that saves no checkpoints
    usage.free = need
    validate(cfg, LaunchContext())


def test_checkpoint_estimate_counts_the_real_model():
    import torch

    from blip_recipes.data import build_tokenizer
    from blip_recipes.models.builders import build_model, build_momentum_encoders
    from blip_recipes.training.build import model_kwargs

    cfg = load_config(DEBUG, [])
    tokenizer = build_tokenizer(cfg.tokenizer)
    with torch.device("meta"):
        model = build_model(cfg.model.name, **model_kwargs(cfg, tokenizer))
        encoders = build_momentum_encoders(cfg.model.name, **model_kwargs(cfg, tokenizer))
    params = sum(p.numel() for p in model.parameters())
    momentum = sum(p.numel() for p in encoders.parameters())
    estimate = checkpoint_size_estimate(cfg)
    assert (estimate["parameters"], estimate["momentum_parameters"]) == (params, momentum)
    queues = 2 * cfg.model.embed_dim * cfg.momentum.queue_size
    assert estimate["bytes"] == 4 * (3 * params + momentum + queues)


def test_blip_validate_names_every_problem_and_exits_2(tmp_path):
    (tmp_path / "file").write_text("x")
    out = subprocess.run(
        [sys.executable, "-m", "blip_recipes.cli", "validate", "--config", "debug",
         "training.max_nonfinite_steps=0", "tokenizer.max_length=10000", "optimizer.lr=-1",
         "data.prefetch_factor=0", "model.image_size=50",
         f"job.output_dir={tmp_path / 'file' / 'run'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    for key in ("training.max_nonfinite_steps", "tokenizer.max_length", "optimizer.lr",
                "data.prefetch_factor", "model.image_size", "job.output_dir"):  # fmt: skip
        assert f"'{key}'" in out.stderr, key
