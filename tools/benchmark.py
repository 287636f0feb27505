#!/usr/bin/env python
"""Same as ``blip benchmark`` (blip_recipes/commands/benchmark.py)."""

import sys

from blip_recipes.commands.benchmark import *  # noqa: F403 (helpers stay importable from here)
from blip_recipes.commands.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
