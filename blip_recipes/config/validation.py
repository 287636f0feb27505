"""Run every pre-launch check and report all problems at once.

The checks are registered in :mod:`blip_recipes.config.checks`: the config's numbers
(:mod:`~blip_recipes.config.ranges`), its folders (:mod:`~blip_recipes.config.paths`), and those
of the packages that know models, data, checkpoints and each recipe's section. Every message is
collected so that a user sees every mistake at once; when none is found, the warnings of
:mod:`blip_recipes.config.advice` are printed.
"""

from __future__ import annotations

from blip_recipes.config import paths, ranges  # noqa: F401 - they register their checks
from blip_recipes.config._schema import ConfigError
from blip_recipes.config.advice import print_advice
from blip_recipes.config.checks import VALIDATORS, LaunchContext, load_check_modules
from blip_recipes.config.sections import Config


def validate(cfg: Config, context: LaunchContext | None = None) -> None:
    """Run every registered validator; when all pass, print the warnings of
    :mod:`blip_recipes.config.advice` (valid settings that will not do what one expects).

    Raises:
        ConfigError: with all problems, one per line.
    """
    context = context or LaunchContext.from_env()
    load_check_modules()
    errors = [msg for fn in VALIDATORS for msg in fn(cfg, context)]
    if errors:
        raise ConfigError("\n".join(errors))
    print_advice(cfg, context.world_size, trains=context.checkpoints, unread=context.unread)


__all__ = ["validate"]
