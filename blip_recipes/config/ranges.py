"""Checks of the config's numbers alone: counts that must be positive, values within their
ranges, the queue against the global batch, the sources' and parallel plan's settings.

Each message names the key, what it accepts and the value given. Nothing outside the config is
read (files, models and checkpoints are checked by the packages that know them, see
:mod:`blip_recipes.config.checks`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from blip_recipes.config.checks import LaunchContext, register_validator
from blip_recipes.config.sections import Config


def _positive_fields(cfg: Config) -> list[tuple[str, Any]]:
    """Every count and size that must be > 0 (sizes, lengths, batch sizes, intervals,
    timeouts), with its value."""
    ev, cf = cfg.eval, cfg.capfilt
    fields = [
        ("data.batch_size", cfg.data.batch_size),
        ("momentum.queue_size", cfg.momentum.queue_size),
        ("model.image_size", cfg.model.image_size),
        ("model.embed_dim", cfg.model.embed_dim),
        ("checkpoint.interval", cfg.checkpoint.interval),
        ("metrics.log_every", cfg.metrics.log_every),
        ("tokenizer.max_length", cfg.tokenizer.max_length),
        ("training.epochs", cfg.training.epochs),
        ("job.collective_timeout_s", cfg.job.collective_timeout_s),
        ("job.stop_timeout_s", cfg.job.stop_timeout_s),
        ("eval.k_test", ev.k_test),
        ("eval.batch_size", ev.batch_size),
        ("capfilt.unit_size", cf.unit_size),
        ("capfilt.num_captions", cf.num_captions),
        ("capfilt.batch_size", cf.batch_size),
        ("capfilt.max_length", cf.max_length),
        ("capfilt.text_max_length", cf.text_max_length),
        ("caption.max_length", cfg.caption.max_length),
    ]
    for i, src in enumerate(cfg.data.sources):
        if src.kind == "synthetic":
            fields += [
                (f"data.sources.{i}.num_samples", src.num_samples),
                (f"data.sources.{i}.image_size", src.image_size),
            ]
    return fields


@register_validator
def _positive_counts(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    if ctx.world_size < 1:
        yield f"the world size (ranks in the job) must be >= 1, got {ctx.world_size}"
    for key, value in _positive_fields(cfg):
        if _outside(value, 0, low_open=True):
            yield f"'{key}' must be positive, got {value}"
    if cfg.training.steps is not None and cfg.training.steps <= 0:
        yield f"'training.steps' must be positive or none, got {cfg.training.steps}"
    if cfg.data.num_workers < 0:
        yield f"'data.num_workers' must be >= 0, got {cfg.data.num_workers}"
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        yield f"'data.max_bad_fraction' must be in [0, 1], got {cfg.data.max_bad_fraction}"
    if not 0.0 <= cfg.momentum.decay <= 1.0:
        yield f"'momentum.decay' must be in [0, 1], got {cfg.momentum.decay}"
    if len(cfg.optimizer.betas) != 2:
        yield f"'optimizer.betas' must hold two numbers, got {cfg.optimizer.betas}"


def _outside(value: float, low: float, high: float = math.inf, low_open: bool = False) -> bool:
    """True when ``value`` is not in [low, high] ((low, high] with ``low_open``) or not finite."""
    if not isinstance(value, (int, float)) or math.isnan(value):
        return True
    return value < low or (low_open and value == low) or value > high


@register_validator
def _ranges(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    """Numbers that load fine but fail (or silently misbehave) once the run is under way."""
    t, o, s, d = cfg.training, cfg.optimizer, cfg.lr_scheduler, cfg.data
    m = cfg.momentum
    checks: list[tuple[str, Any, str, bool]] = [
        ("training.max_nonfinite_steps", t.max_nonfinite_steps, "an integer >= 1 (consecutive "
         "non-finite steps that stop the run)", t.max_nonfinite_steps < 1),
        ("optimizer.lr", o.lr, "a finite number > 0", _outside(o.lr, 0.0, low_open=True)
         or math.isinf(o.lr)),
        ("optimizer.weight_decay", o.weight_decay, ">= 0", _outside(o.weight_decay, 0.0)
         or math.isinf(o.weight_decay)),
        ("optimizer.eps", o.eps, "> 0", _outside(o.eps, 0.0, low_open=True)),
        ("lr_scheduler.warmup_steps", s.warmup_steps, ">= 0", s.warmup_steps < 0),
        ("lr_scheduler.warmup_lr", s.warmup_lr, ">= 0", _outside(s.warmup_lr, 0.0)),
        ("lr_scheduler.min_lr", s.min_lr, ">= 0", _outside(s.min_lr, 0.0)),
        ("lr_scheduler.decay_rate", s.decay_rate, "in (0, 1]",
         _outside(s.decay_rate, 0.0, 1.0, low_open=True)),
        ("momentum.alpha", m.alpha, "in [0, 1]", _outside(m.alpha, 0.0, 1.0)),
        ("momentum.alpha_ramp_epochs", m.alpha_ramp_epochs, ">= 0", _outside(m.alpha_ramp_epochs, 0.0)),
        ("data.prefetch_factor", d.prefetch_factor, "an integer >= 1 (batches each loader worker "
         "prepares ahead)", d.prefetch_factor < 1),
        ("data.min_image_size", d.min_image_size, "an integer >= 1 (pixels)", d.min_image_size < 1),
        ("data.max_aspect_ratio", d.max_aspect_ratio, ">= 1 (long side / short side)",
         _outside(d.max_aspect_ratio, 1.0)),
        ("data.max_words", d.max_words, "an integer >= 1", d.max_words < 1),
        ("data.min_scale", d.min_scale, "in (0, 1]", _outside(d.min_scale, 0.0, 1.0, low_open=True)),
        ("data.shuffle_buffer", d.shuffle_buffer, "an integer >= 1", d.shuffle_buffer < 1),
        ("data.bad_fraction_min_samples", d.bad_fraction_min_samples, ">= 0",
         d.bad_fraction_min_samples < 0),
        ("data.timeout_s", d.timeout_s, "> 0 (seconds)", _outside(d.timeout_s, 0.0, low_open=True)),
        ("checkpoint.keep_latest_k", cfg.checkpoint.keep_latest_k, ">= 0 (0 keeps all)",
         cfg.checkpoint.keep_latest_k < 0),
    ]  # fmt: skip
    if t.grad_clip is not None:
        checks.append(("training.grad_clip", t.grad_clip, "> 0 or none",
                       _outside(t.grad_clip, 0.0, low_open=True)))  # fmt: skip
    if t.steps_per_epoch is not None:
        checks.append(("training.steps_per_epoch", t.steps_per_epoch, "an integer >= 1 or none",
                       t.steps_per_epoch < 1))  # fmt: skip
    for i, beta in enumerate(o.betas[:2]):
        checks.append((f"optimizer.betas.{i}", beta, "in [0, 1)", _outside(beta, 0.0, 1.0)
                       or beta == 1.0))  # fmt: skip
    for key, value, accepted, bad in checks:
        if bad:
            yield f"'{key}' must be {accepted}, got {value}"
    for i, src in enumerate(d.sources):
        if src.kind == "synthetic" and 0 < src.image_size < d.min_image_size:
            yield (
                f"'data.sources.{i}.image_size' ({src.image_size}) is below "
                f"'data.min_image_size' ({d.min_image_size}): every generated image would be a "
                "bad sample"
            )


@register_validator
def _queue_holds_whole_global_batches(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    if not ctx.checkpoints or not ctx.reads("momentum.queue_size"):
        return
    global_batch = cfg.data.batch_size * ctx.world_size
    if global_batch > 0 and cfg.momentum.queue_size % global_batch != 0:
        yield (
            f"'momentum.queue_size' ({cfg.momentum.queue_size}) must be a multiple of the global batch "
            f"'data.batch_size' x world size = {cfg.data.batch_size} x {ctx.world_size} = "
            f"{global_batch}"
        )


@register_validator
def _data_sources(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    if not cfg.data.sources:
        yield "'data.sources' is empty: add at least one [[data.sources]] table"
    for i, src in enumerate(cfg.data.sources):
        if src.kind != "synthetic" and not src.paths:
            yield f"'data.sources.{i}.paths' is empty for kind '{src.kind}': list its files"
        if src.weight <= 0:
            yield f"'data.sources.{i}.weight' must be positive, got {src.weight}"


@register_validator
def _evaluation(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    if cfg.eval.every_steps < 0:
        yield f"'eval.every_steps' must be >= 0, got {cfg.eval.every_steps}"
    if cfg.eval.every_steps > 0 and not cfg.eval.annotation:
        yield "'eval.every_steps' > 0 needs 'eval.annotation' (a held-out retrieval set)"


@register_validator
def _parallel(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    p = cfg.parallel
    if p.activation_checkpointing == "vit_last_n" and p.ac_vit_layers <= 0:
        yield "'parallel.ac_vit_layers' must be positive with activation_checkpointing='vit_last_n'"
    if p.ac_vit_layers < 0:
        yield f"'parallel.ac_vit_layers' must be >= 0, got {p.ac_vit_layers}"
    if p.dp_replicate < 0:
        yield f"'parallel.dp_replicate' must be >= 0 (0 = one replica per node), got {p.dp_replicate}"
    elif p.data_parallel == "hsdp" and p.dp_replicate and ctx.world_size % p.dp_replicate:
        yield (
            f"'parallel.dp_replicate' ({p.dp_replicate}) must divide the world size "
            f"{ctx.world_size} for data_parallel='hsdp' (shard degree = world / dp_replicate)"
        )
    if cfg.training.grad_accum_steps < 1:
        yield f"'training.grad_accum_steps' must be >= 1, got {cfg.training.grad_accum_steps}"
    if cfg.checkpoint.signal_check_every < 1:
        yield (
            f"'checkpoint.signal_check_every' must be >= 1, got {cfg.checkpoint.signal_check_every}"
        )
