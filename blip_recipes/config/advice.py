"""Warnings before work: configs that are valid but will clearly not do what the user expects.

Errors stop a run (``validation.py``); these only warn, one line each, before anything is built:

- a ViT-B / ViT-L model on the CPU, and a training-memory estimate above the machine's RAM;
- ``lr_scheduler.warmup_steps`` longer than the run;
- a momentum queue larger than the data set (every sample's features several times over);
- more loader workers than CPU cores;
- ``parallel.compile`` on the CPU (the first step compiles for minutes).

``blip validate`` and ``blip run`` print them (:func:`print_advice`) once per launch: the ranks
that ``blip run`` starts through torchrun do not repeat what it printed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from blip_recipes.config.sections import Config

ADVISED_ENV = "BLIP_ADVICE_PRINTED"
"""Set by the process that printed the warnings, so the processes it launches stay quiet."""

_printed: set[str] = set()


def cpu_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def physical_memory() -> int | None:
    """Bytes of RAM of this machine (None where unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def resolved_device(cfg: Config) -> str:
    """``cuda`` or ``cpu``: what ``parallel.device`` means on this machine."""
    if cfg.parallel.device != "auto":
        return cfg.parallel.device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def _count_records(path: Path, limit: int = 64 << 20) -> int | None:
    """Records of a JSON list / JSON Lines file below ``limit`` bytes (None: unknown)."""
    try:
        if path.stat().st_size > limit:
            return None
        if path.suffix == ".jsonl":
            with path.open("rb") as f:
                return sum(1 for line in f if line.strip())
        data = json.loads(path.read_text(encoding="utf-8"))
        return len(data) if isinstance(data, list) else None
    except (OSError, ValueError):
        return None


def dataset_size(cfg: Config) -> int | None:
    """Training samples of one epoch over ``data.sources`` (None when any size is unknown)."""
    total = 0
    for src in cfg.data.sources:
        if src.kind == "synthetic":
            n = src.num_samples
        elif src.kind == "shards":
            from blip_recipes.data.shards import dataset_size as shard_total
            from blip_recipes.data.shards import expand_braces

            try:
                n = shard_total([f for p in src.paths for f in expand_braces(p)])
            except Exception:  # noqa: BLE001 - unreadable sizes: validation reports them
                n = None
        else:
            counts = [_count_records(Path(p)) for p in src.paths]
            n = None if None in counts else sum(counts)  # type: ignore[arg-type]
        if n is None:
            return None
        total += n
    return total


def total_steps(cfg: Config, world_size: int, samples: int | None) -> int | None:
    """Optimizer steps of the run: ``training.steps``, else epochs x steps per epoch."""
    if cfg.training.steps is not None:
        return cfg.training.steps
    per_epoch = cfg.training.steps_per_epoch
    global_batch = cfg.data.batch_size * world_size * cfg.training.grad_accum_steps
    if per_epoch is None and samples is not None and global_batch > 0:
        per_epoch = max(1, samples // global_batch)
    return None if per_epoch is None else per_epoch * cfg.training.epochs


def training_memory_estimate(cfg: Config) -> int | None:
    """Bytes one rank needs to train ``cfg``'s model at ``data.batch_size`` (fp32, no
    activation checkpointing), roughly: weights, gradients and two AdamW moments (4 copies), the
    momentum encoders and queues, and the activations kept for backward: per ViT layer and image
    token about 16 x width + heads x tokens values; per text layer and token of each of the four
    text passes (ITC, ITM positive, ITM negative, captioning) about 18 x width + heads x (text +
    image tokens). A rough estimate, for telling a run that fits from one that cannot: for the
    base model at 224 px and batch 75 it gives 20.9 GiB (bert-base-uncased vocabulary), where such a CPU run was killed by the
    out-of-memory killer at about 21 GiB."""
    from blip_recipes.config.sizes import checkpoint_size_estimate, model_preset

    preset = model_preset(cfg.model.name)
    if preset is None:
        return None
    try:
        sizes = checkpoint_size_estimate(cfg)
    except Exception:  # noqa: BLE001 - a config validation rejects
        return None
    state = 4 * (4 * sizes["parameters"] + sizes["momentum_parameters"] + sizes["queue_values"])
    image_tokens = (cfg.model.image_size // preset["patch_size"]) ** 2 + 1
    text_tokens = cfg.tokenizer.max_length
    vision = (
        preset["vision_depth"]
        * image_tokens
        * (16 * preset["vision_width"] + preset["vision_heads"] * image_tokens)
    )
    text = (
        preset["text_depth"]
        * 4
        * text_tokens
        * (18 * preset["text_width"] + preset["text_heads"] * (text_tokens + image_tokens))
    )
    return state + 4 * cfg.data.batch_size * (vision + text)


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def advice(cfg: Config, world_size: int = 1, trains: bool = True) -> list[str]:
    """One line per setting that will clearly not do what the user expects (module docstring).

    Args:
        world_size: ranks of the launch (the global batch and the workers per machine).
        trains: the recipe trains (warmup, queue and memory advice apply).
    """
    out: list[str] = []
    device = resolved_device(cfg)
    name, size = cfg.model.name, cfg.model.image_size
    if device == "cpu" and name != "blip_pretrain_tiny":
        vit = "ViT-L" if name.endswith("large") else "ViT-B"
        out.append(
            f"model.name={name} ({vit}) on the CPU: steps take seconds to minutes each; for a "
            "first run on CPU use blip_pretrain_tiny (configs/debug.toml, or `blip data init`)"
        )
    if trains and device == "cpu":
        need, have = training_memory_estimate(cfg), physical_memory()
        local = min(world_size, cpu_cores())
        if need is not None and have is not None and need * local > 0.8 * have:
            out.append(
                f"training {name} at {size} px with data.batch_size={cfg.data.batch_size} needs "
                f"about {_gib(need)} per rank x {local} rank(s), this machine has {_gib(have)} "
                "of RAM: lower data.batch_size or model.image_size, or use a smaller model"
            )
    if cfg.parallel.compile and device == "cpu":
        out.append(
            "parallel.compile=true on the CPU: the first step compiles for minutes (and the "
            "compiled CPU step is rarely faster); set parallel.compile=false"
        )
    cores = cpu_cores()
    local_ranks = max(1, min(world_size, int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    if cfg.data.num_workers * local_ranks > cores:
        out.append(
            f"data.num_workers={cfg.data.num_workers} x {local_ranks} rank(s) is more loader "
            f"workers than this machine's {cores} CPU core(s): they compete with the training "
            f"step; set data.num_workers={max(0, cores // local_ranks - 1)}"
        )
    if not trains:
        return out
    samples = dataset_size(cfg)
    steps = total_steps(cfg, world_size, samples)
    warmup = cfg.lr_scheduler.warmup_steps
    if steps is not None and warmup >= steps:
        out.append(
            f"lr_scheduler.warmup_steps={warmup} is not shorter than the run ({steps} steps): the "
            f"learning rate never reaches optimizer.lr={cfg.optimizer.lr}; set "
            f"lr_scheduler.warmup_steps={max(1, steps // 10)}"
        )
    global_batch = cfg.data.batch_size * world_size
    queue = cfg.model.queue_size
    if samples and queue > samples and global_batch > 0:
        fit = max(global_batch, samples // 2 // global_batch * global_batch)
        out.append(
            f"model.queue_size={queue} is {queue / samples:.0f}x the data set ({samples} "
            "samples): the queue holds every sample's features several times over (stale "
            f"copies as negatives, and a larger checkpoint); set model.queue_size={fit} (a "
            f"multiple of the global batch {global_batch})"
        )
    return out


def print_advice(cfg: Config, world_size: int = 1, trains: bool = True) -> list[str]:
    """Print :func:`advice` to stderr as ``warning: ...`` lines, once per launch; returns them.

    Quiet in ranks launched by a process that printed them already (``BLIP_ADVICE_PRINTED``)
    and in ranks other than 0."""
    if os.environ.get(ADVISED_ENV) or os.environ.get("RANK", "0") != "0":
        return []
    try:
        lines = advice(cfg, world_size, trains)
    except Exception:  # noqa: BLE001 - advice must never stop a valid run
        return []
    for line in lines:
        if line not in _printed:
            _printed.add(line)
            print(f"warning: {line}", file=sys.stderr)
    sys.stderr.flush()
    return lines


def mark_printed() -> None:
    """Tell processes launched from here that the warnings were printed."""
    os.environ[ADVISED_ENV] = "1"


__all__ = [
    "advice",
    "cpu_cores",
    "dataset_size",
    "mark_printed",
    "physical_memory",
    "print_advice",
    "total_steps",
    "training_memory_estimate",
]
