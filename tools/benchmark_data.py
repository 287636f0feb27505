#!/usr/bin/env python
"""Same as ``blip benchmark data`` (blip_recipes/commands/benchmark_data.py)."""

import sys

from blip_recipes.commands.benchmark_data import *  # noqa: F403 (helpers stay importable from here)
from blip_recipes.commands.benchmark_data import main

if __name__ == "__main__":
    sys.exit(main())
