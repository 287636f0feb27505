#!/usr/bin/env python
"""Same as ``blip data synthetic`` (blip_recipes/commands/make_synthetic_dataset.py)."""

import sys

from blip_recipes.commands.make_synthetic_dataset import *  # noqa: F403 (helpers stay importable from here)
from blip_recipes.commands.make_synthetic_dataset import main

if __name__ == "__main__":
    sys.exit(main())
