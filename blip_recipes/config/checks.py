"""The registry of pre-launch checks: the launch context, validators and advisors.

A validator receives the whole config and the launch context and yields one error message per
problem; an advisor yields warnings (valid settings that will not do what one expects). Each
package registers the checks that need its own knowledge (a model's shape, a checkpoint's
layout, a shard's size) with :func:`register_validator` / :func:`register_advice`, so this
package imports none of them: :data:`CHECK_MODULES` names the modules, which are imported by
name when checks run.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from blip_recipes.config.sections import Config


@dataclass(frozen=True)
class LaunchContext:
    """What validators may need to know beyond the config."""

    world_size: int = 1
    checkpoints: bool = True
    """The recipe trains and saves training checkpoints: enables the free-disk-space check and
    the training-only checks (queue size against the global batch). Inference recipes
    (evaluation, CapFilt) set it False."""
    unread: frozenset[str] = frozenset()
    """Config keys the recipe does not read (e.g. ``momentum.queue_size`` for caption
    fine-tuning): the checks and warnings about them are skipped."""

    def reads(self, key: str) -> bool:
        """Whether the recipe reads ``key`` (a ``section.field`` name)."""
        return key not in self.unread

    @classmethod
    def from_env(cls) -> LaunchContext:
        """World size from torchrun's environment (1 when not launched by it)."""
        return cls(world_size=int(os.environ.get("WORLD_SIZE", "1")))


Validator = Callable[[Config, LaunchContext], Iterable[str]]
"""A check of ``(config, launch context)``: one message per problem (or warning)."""

VALIDATORS: list[Validator] = []
ADVISORS: list[Validator] = []


def register_validator(fn: Validator) -> Validator:
    """Add a cross-field check whose messages stop the launch (usable as a decorator)."""
    if fn not in VALIDATORS:
        VALIDATORS.append(fn)
    return fn


def register_advice(fn: Validator) -> Validator:
    """Add a check whose messages are printed as warnings (usable as a decorator)."""
    if fn not in ADVISORS:
        ADVISORS.append(fn)
    return fn


CHECK_MODULES = (
    "blip_recipes.training.config_checks",
    "blip_recipes.training.retrieval_setup",
    "blip_recipes.training.caption",
    "blip_recipes.training.nlvr",
    "blip_recipes.training.vqa",
    "blip_recipes.evaluation.zeroshot",
    "blip_recipes.data.config_checks",
    "blip_recipes.interop.config_checks",
    "blip_recipes.interop.checkpoint_match",
    "blip_recipes.evaluation.config_checks",
)
"""Modules of other packages that register checks: the model's shape and checkpoint size,
each recipe's own section ([retrieval], [caption]), the data sources' files and sizes, the
tokenizer, init weights and checkpoints the run reads."""


def load_check_modules() -> None:
    """Import :data:`CHECK_MODULES`, so `blip validate` and `blip run` (before any process
    starts) check what the recipe itself would."""
    for name in CHECK_MODULES:
        importlib.import_module(name)


__all__ = [
    "ADVISORS",
    "CHECK_MODULES",
    "LaunchContext",
    "VALIDATORS",
    "Validator",
    "load_check_modules",
    "register_advice",
    "register_validator",
]
