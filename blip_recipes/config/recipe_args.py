"""Command-line parsing shared by every recipe: ``--config FILE [overrides...]``."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import replace

from blip_recipes.config._schema import ConfigError
from blip_recipes.config.checks import LaunchContext
from blip_recipes.config.loader import help_text, load_config
from blip_recipes.config.sections import Config
from blip_recipes.config.validation import validate

USAGE = "usage: RECIPE --config FILE [section.key=value | --section.key value ...]"


def split_config_arg(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """Take ``--config FILE`` / ``--config=FILE`` / ``-c FILE`` out of argv (``--job.config_file``,
    TorchTitan's spelling, is accepted too).

    Returns:
        The config argument (None if absent) and the remaining override arguments.
    """
    config = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c", "--job.config_file"):  # the last: TorchTitan's spelling
            if i + 1 >= len(argv):
                raise ConfigError(f"{arg} needs a file or config name")
            config, i = argv[i + 1], i + 2
        elif arg.startswith(("--config=", "--job.config_file=")):
            config, i = arg.split("=", 1)[1], i + 1
        else:
            rest.append(arg)
            i += 1
    return config, rest


def parse_recipe_args(
    argv: Sequence[str] | None = None, description: str = "", saves_checkpoints: bool = True
) -> Config:
    """Resolve and validate a recipe's config from its command line; exit 2 on any error.

    ``--help`` prints the description and every config key with its documentation.
    ``saves_checkpoints=False`` (evaluation) skips the free-space check for a checkpoint.
    """
    from blip_recipes.config.registry import resolve_config

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(f"{description}\n\n{USAGE}\n\nConfig keys:\n{help_text()}")
        raise SystemExit(0)
    try:
        config, overrides = split_config_arg(argv)
        path = resolve_config(config) if config is not None else None
        cfg = load_config(path, overrides)
        context = LaunchContext.from_env()
        validate(cfg, replace(context, checkpoints=saves_checkpoints))
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return cfg
