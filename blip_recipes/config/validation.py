"""Cross-field checks run before anything is built; components register their own.

A validator receives the whole config and the launch context and yields one message per problem.
All messages are collected so that a user sees every mistake at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from blip_recipes.config._schema import ConfigError
from blip_recipes.config.sections import Config


@dataclass(frozen=True)
class LaunchContext:
    """What validators may need to know beyond the config."""

    world_size: int = 1

    @classmethod
    def from_env(cls) -> LaunchContext:
        """World size from torchrun's environment (1 when not launched by it)."""
        return cls(world_size=int(os.environ.get("WORLD_SIZE", "1")))


Validator = Callable[[Config, LaunchContext], Iterable[str]]
_VALIDATORS: list[Validator] = []


def register_validator(fn: Validator) -> Validator:
    """Add a cross-field check (usable as a decorator)."""
    if fn not in _VALIDATORS:
        _VALIDATORS.append(fn)
    return fn


def validate(cfg: Config, context: LaunchContext | None = None) -> None:
    """Run every registered validator.

    Raises:
        ConfigError: with all problems, one per line.
    """
    context = context or LaunchContext.from_env()
    errors = [msg for fn in _VALIDATORS for msg in fn(cfg, context)]
    if errors:
        raise ConfigError("\n".join(errors))


@register_validator
def _positive_counts(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    for key, value in [
        ("data.batch_size", cfg.data.batch_size),
        ("model.queue_size", cfg.model.queue_size),
        ("model.image_size", cfg.model.image_size),
        ("checkpoint.interval", cfg.checkpoint.interval),
        ("metrics.log_every", cfg.metrics.log_every),
        ("tokenizer.max_length", cfg.tokenizer.max_length),
        ("training.epochs", cfg.training.epochs),
    ]:
        if value <= 0:
            yield f"'{key}' must be positive, got {value}"
    if cfg.training.steps is not None and cfg.training.steps <= 0:
        yield f"'training.steps' must be positive or none, got {cfg.training.steps}"
    if cfg.data.num_workers < 0:
        yield f"'data.num_workers' must be >= 0, got {cfg.data.num_workers}"
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        yield f"'data.max_bad_fraction' must be in [0, 1], got {cfg.data.max_bad_fraction}"
    if not 0.0 <= cfg.model.momentum <= 1.0:
        yield f"'model.momentum' must be in [0, 1], got {cfg.model.momentum}"
    if len(cfg.optimizer.betas) != 2:
        yield f"'optimizer.betas' must hold two numbers, got {cfg.optimizer.betas}"


@register_validator
def _queue_holds_whole_global_batches(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    global_batch = cfg.data.batch_size * ctx.world_size
    if global_batch > 0 and cfg.model.queue_size % global_batch != 0:
        yield (
            f"'model.queue_size' ({cfg.model.queue_size}) must be a multiple of the global batch "
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
    if cfg.tokenizer.kind != "synthetic" and not cfg.tokenizer.path:
        yield (
            f"'tokenizer.path' is required for tokenizer.kind='{cfg.tokenizer.kind}' "
            "(a local vocab.txt / tokenizer folder or .tiktoken file; nothing is downloaded)"
        )


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


__all__ = ["ConfigError", "LaunchContext", "register_validator", "validate"]
