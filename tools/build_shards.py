#!/usr/bin/env python
"""Same as ``blip data build-shards`` (blip_recipes/commands/build_shards.py)."""

import sys

from blip_recipes.commands.build_shards import *  # noqa: F403 (helpers stay importable from here)
from blip_recipes.commands.build_shards import main

if __name__ == "__main__":
    sys.exit(main())
