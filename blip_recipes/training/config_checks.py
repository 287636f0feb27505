"""Pre-launch checks that need the model's shape and size, registered with the config's checks:
whole patches and captions within the position embeddings (errors), room on the output folder's
file system for one training checkpoint (error), and a training-memory estimate above the
machine's RAM on the CPU (warning)."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from blip_recipes.config import advice as machine
from blip_recipes.config.checks import LaunchContext, register_advice, register_validator
from blip_recipes.config.paths import writable_output_base
from blip_recipes.config.sections import Config
from blip_recipes.models.builders import preset
from blip_recipes.training.sizes import checkpoint_size_estimate, training_memory_estimate


@register_validator
def _model_shape(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    """What the model's shape allows: whole patches, captions within the position embeddings."""
    spec = preset(cfg.model.name)
    if spec is None:
        return
    patch, positions = spec["patch_size"], spec["max_positions"]
    size = cfg.model.image_size
    if size > 0 and size % patch:
        lower, upper = max(patch, size // patch * patch), (size // patch + 1) * patch
        yield (
            f"'model.image_size' must be a multiple of the patch size {patch} of "
            f"{cfg.model.name} (e.g. {lower} or {upper}), got {size}"
        )
    lengths = [("tokenizer.max_length", cfg.tokenizer.max_length)]  # (<= 0: config.ranges)
    if cfg.eval.every_steps > 0:
        lengths.append(("eval.text_max_length", cfg.eval.text_max_length))
    for key, length in lengths:
        if length > positions or (key.startswith("eval.") and length < 1):
            yield (
                f"'{key}' must be in [1, {positions}] for {cfg.model.name} (its text position "
                f"embeddings hold {positions} tokens), got {length}"
            )


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n < 2**40 else f"{n / 2**40:.2f} TiB"


@register_validator
def _room_for_one_checkpoint(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    """The file system of ``job.output_dir`` has room for one training checkpoint."""
    if not ctx.checkpoints:
        return
    base = writable_output_base(cfg)
    if base is None:  # config.paths says why
        return
    try:
        estimate = checkpoint_size_estimate(cfg)
    except Exception:  # noqa: BLE001 - a config another validator rejects (e.g. image size)
        return
    free = shutil.disk_usage(base).free
    if free < estimate["bytes"]:
        yield (
            f"'job.output_dir' {Path(cfg.job.output_dir)}: {_size(free)} free on its file system "
            f"({base}), but one checkpoint of {cfg.model.name} needs about "
            f"{_size(estimate['bytes'])} ({estimate['parameters'] / 1e6:.1f}M parameters x 3 "
            f"(weights + 2 AdamW moments) + {estimate['momentum_parameters'] / 1e6:.1f}M "
            f"momentum parameters + {estimate['queue_values'] / 1e6:.1f}M queue values, 4 bytes "
            "each): free some space or choose another job.output_dir"
        )


@register_advice
def _training_memory(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    """Training on the CPU needs more memory than the machine has."""
    if not ctx.checkpoints or machine.resolved_device(cfg) != "cpu":
        return
    need, have = training_memory_estimate(cfg), machine.physical_memory()
    local = min(ctx.world_size, machine.cpu_cores())
    if need is not None and have is not None and need * local > 0.8 * have:
        yield (
            f"training {cfg.model.name} at {cfg.model.image_size} px with "
            f"data.batch_size={cfg.data.batch_size} needs about {need / 2**30:.1f} GiB per rank "
            f"x {local} rank(s), this machine has {have / 2**30:.1f} GiB of RAM: lower "
            "data.batch_size or model.image_size, or use a smaller model"
        )
