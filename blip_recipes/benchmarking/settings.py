"""What one benchmark run measures (the tool's command line, parsed), the device it runs on, and
the recipe config of each measurement: the preset, synthetic data, no checkpoints or TensorBoard
during the window, then the variant's overrides, then the user's ``--set``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from blip_recipes.benchmarking.inputs import TEXT_LENGTH
from blip_recipes.benchmarking.variants import Variant

DATA_MODES = ("synthetic-device", "loader")
MODEL_IMAGE_SIZE = {"blip_pretrain_tiny": 32, "blip_pretrain_base": 224, "blip_pretrain_large": 224}
MODEL_LR = {"blip_pretrain_tiny": 1e-3, "blip_pretrain_base": 3e-4, "blip_pretrain_large": 2e-4}


@dataclass
class BenchmarkSettings:
    """What one benchmark run measures (the tool's command line, parsed)."""

    model: str = "blip_pretrain_tiny"
    image_size: int | None = None
    batch_sizes: list[int] = field(default_factory=lambda: [8])
    variants: list[Variant] = field(default_factory=list)
    warmup: int = 1
    steps: int = 2
    data: str = "synthetic-device"
    baseline: bool = True
    baseline_precision: str = "auto"
    profile: bool = False
    profile_steps: int = 2
    trace_dir: str | None = None
    device: str = "auto"
    workers: int = 4
    queue_size: int | None = None
    overrides: list[str] = field(default_factory=list)
    seed: int = 0
    repeats: int = 1

    def resolved_image_size(self) -> int:
        return self.image_size or MODEL_IMAGE_SIZE.get(self.model, 224)


def resolve_device(kind: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without CUDA is an error."""
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but CUDA is not available")
    return (
        torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else torch.device(kind)
    )


def queue_size_for(settings: BenchmarkSettings, batch_size: int) -> int:
    """The preset's queue size (or ``--queue-size``), rounded down to a multiple of the batch."""
    from blip_recipes.models.builders import preset_queue_size

    queue = settings.queue_size or preset_queue_size(settings.model)
    if queue % batch_size:
        queue = max(batch_size, queue // batch_size * batch_size)
    return queue


def benchmark_config(
    settings: BenchmarkSettings,
    variant_overrides: tuple[str, ...],
    batch_size: int,
    output_dir: str,
    vocab_path: Path | None,
    device: torch.device,
):
    """The recipe config of one measurement: the preset, synthetic data, no checkpoints or
    TensorBoard during the window, then the variant's overrides, then the user's ``--set``."""
    from blip_recipes.config import load_config, validate

    image_size = settings.resolved_image_size()
    total = settings.warmup + settings.steps + (settings.profile_steps if settings.profile else 0)
    tokenizer = (
        ["tokenizer.kind=synthetic"]
        if vocab_path is None
        else ["tokenizer.kind=wordpiece", f"tokenizer.path={vocab_path}"]
    )
    overrides = [
        f"job.output_dir={output_dir}",
        f"job.seed={settings.seed}",
        "job.name=benchmark",
        f"model.name={settings.model}",
        f"model.image_size={image_size}",
        f"momentum.queue_size={queue_size_for(settings, batch_size)}",
        *tokenizer,
        f"tokenizer.max_length={TEXT_LENGTH}",
        f"data.batch_size={batch_size}",
        f"data.num_workers={settings.workers}",
        f"data.sources.0.num_samples={max(4096, batch_size * (total + 2))}",
        f"training.steps={total + 1}",
        "checkpoint.resume=none",
        f"checkpoint.interval={10**9}",
        "metrics.tensorboard=false",
        f"metrics.log_every={10**9}",
        f"optimizer.lr={MODEL_LR.get(settings.model, 3e-4)}",
        f"parallel.device={device.type}",
        *variant_overrides,
        *settings.overrides,
    ]
    cfg = load_config(None, overrides)
    validate(cfg)
    return cfg


__all__ = [
    "DATA_MODES",
    "BenchmarkSettings",
    "benchmark_config",
    "queue_size_for",
    "resolve_device",
]
