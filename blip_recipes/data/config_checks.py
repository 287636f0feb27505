"""Pre-launch checks of the data sources, registered with the config's checks: the files they
name exist (annotations, image roots, shards), the shards' sizes are known where the epoch
needs them, the data hold at least one global batch; and warnings from the data set's size (a
warmup longer than the run, a queue larger than the data set).

The loader refuses fewer samples than ``data.batch_size`` x world size (one step needs a whole
global batch); :func:`samples_per_epoch` says so before launch, from the annotation files'
record counts and the shards' sizes (unknown sizes are left to the loader).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from blip_recipes.config.checks import LaunchContext, register_advice, register_validator
from blip_recipes.config.sections import Config
from blip_recipes.data.remote import is_remote, local_path
from blip_recipes.data.shard_files import dataset_size as shard_total
from blip_recipes.data.shard_files import expand_braces, shard_sizes


def _examples(paths: list[str], limit: int = 3) -> str:
    more = f" (and {len(paths) - limit} more)" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


def _holds_no_records(path: Path, small: int = 1 << 20) -> bool:
    """True for an annotation file that is (cheaply seen to be) empty: a JSON list ``[]`` or
    JSON Lines with no record. Files above ``small`` bytes are assumed to hold some."""
    try:
        if path.stat().st_size > small:
            return False
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return False
    if not text:
        return True
    if path.suffix == ".jsonl":
        return False
    return "".join(text.split()) == "[]"


def _source_files(i: int, src: Any, cfg: Config) -> Iterable[str]:
    key = f"data.sources.{i}"
    if src.kind in ("json", "jsonl"):
        missing = [p for p in src.paths if not Path(p).is_file()]
        if missing:
            yield (
                f"'{key}.paths': {len(missing)} of {len(src.paths)} annotation file(s) not "
                f"found: {_examples(missing)}"
            )
        elif src.paths and all(_holds_no_records(Path(p)) for p in src.paths):
            yield (
                f"'{key}.paths': {_examples(src.paths)} hold(s) no records (an empty annotation "
                "file): there is nothing to train on"
            )
        if src.image_root and not Path(src.image_root).is_dir():
            yield f"'{key}.image_root' {src.image_root} is not a folder (it does not exist)"
    elif src.kind == "shards":
        for pattern in src.paths:
            files = [f for f in expand_braces(pattern) if not is_remote(f)]
            if not files:
                continue  # remote URLs are read (and reported) when streamed
            missing = [f for f in files if not Path(local_path(f)).is_file()]
            if len(missing) == len(files):
                yield f"'{key}.paths': no file matches {pattern}"
            elif missing:
                yield (
                    f"'{key}.paths': {len(missing)} of {len(files)} shard(s) of {pattern} not "
                    f"found: {_examples(missing)}"
                )
        if cfg.training.steps_per_epoch is None:
            yield from _shard_size_problem(key, src.paths)


def _shard_size_problem(key: str, patterns: list[str]) -> Iterable[str]:
    """Without training.steps_per_epoch, every shard's size must be found beside it."""

    shards = [f for p in patterns for f in expand_braces(p)]
    try:
        unknown = shard_sizes(shards)[1]
    except Exception as e:  # noqa: BLE001 - unreadable size files are reported, not raised
        unknown, reason = shards, f" ({e})"
    else:
        reason = ""
    if unknown:
        yield (
            f"'{key}': the number of samples of {len(unknown)} of {len(shards)} shard(s) is "
            f"unknown, e.g. {_examples(unknown)}{reason}: write a sizes.json "
            '({"shard-00000.tar": 1000, ...}) beside the shards, keep img2dataset\'s '
            "NNNNN_stats.json files beside them, or set 'training.steps_per_epoch' "
            "(samples per epoch / global batch)"
        )


@register_validator
def _source_files_exist(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    """Every file a data source reads at start-up exists, and the shards' sizes are known
    where the epoch (or a mix with other sources) needs them."""
    kinds = {s.kind for s in cfg.data.sources}
    if "shards" in kinds and kinds != {"shards"} and cfg.training.steps_per_epoch is not None:
        for i, src in enumerate(cfg.data.sources):  # the mix's share needs the shard sizes
            if src.kind == "shards":
                for problem in _shard_size_problem(f"data.sources.{i}.paths", src.paths):
                    yield f"{problem}; mixing shards with json/jsonl/synthetic sources needs them"
    for i, src in enumerate(cfg.data.sources):
        yield from _source_files(i, src, cfg)


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


def samples_per_epoch(cfg: Config) -> int | None:
    """Training samples of one epoch over ``data.sources`` (None when any size is unknown)."""
    total = 0
    for src in cfg.data.sources:
        if src.kind == "synthetic":
            n = src.num_samples
        elif src.kind == "shards":
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


@register_validator
def _at_least_one_global_batch(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    if not ctx.checkpoints:
        return
    try:
        samples = samples_per_epoch(cfg)
    except Exception:  # noqa: BLE001 - unreadable sources are reported by the file checks
        return
    global_batch = cfg.data.batch_size * ctx.world_size
    if samples and 0 < samples < global_batch:
        fit = max(1, samples // ctx.world_size)
        yield (
            f"'data.sources' hold {samples} samples, fewer than one global batch "
            f"(data.batch_size x world size = {cfg.data.batch_size} x {ctx.world_size} = "
            f"{global_batch}): set data.batch_size={fit} or less, or add data"
        )


@register_advice
def _data_set_size(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    """A warmup not shorter than the run; a queue holding the data set several times over."""
    if not ctx.checkpoints:
        return
    samples = samples_per_epoch(cfg)
    steps = total_steps(cfg, ctx.world_size, samples)
    warmup = cfg.lr_scheduler.warmup_steps
    if steps is not None and warmup >= steps and ctx.reads("lr_scheduler.warmup_steps"):
        yield (
            f"lr_scheduler.warmup_steps={warmup} is not shorter than the run ({steps} steps): the "
            f"learning rate never reaches optimizer.lr={cfg.optimizer.lr}; set "
            f"lr_scheduler.warmup_steps={max(1, steps // 10)}"
        )
    global_batch = cfg.data.batch_size * ctx.world_size
    queue = cfg.momentum.queue_size
    if samples and queue > samples and global_batch > 0 and ctx.reads("momentum.queue_size"):
        fit = max(global_batch, samples // 2 // global_batch * global_batch)
        yield (
            f"momentum.queue_size={queue} is {queue / samples:.0f}x the data set ({samples} "
            "samples): the queue holds every sample's features several times over (stale "
            f"copies as negatives, and a larger checkpoint); set momentum.queue_size={fit} (a "
            f"multiple of the global batch {global_batch})"
        )


__all__ = ["samples_per_epoch", "total_steps"]
