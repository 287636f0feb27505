#!/usr/bin/env python
"""Same as ``blip benchmark float8-layers`` (blip_recipes/commands/benchmark_float8_layers.py)."""

import sys

from blip_recipes.commands.benchmark_float8_layers import *  # noqa: F403 (helpers stay importable from here)
from blip_recipes.commands.benchmark_float8_layers import main

if __name__ == "__main__":
    sys.exit(main())
