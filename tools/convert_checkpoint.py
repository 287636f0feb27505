#!/usr/bin/env python
"""Same as ``blip convert`` (blip_recipes/commands/convert_checkpoint.py)."""

import sys

from blip_recipes.commands.convert_checkpoint import *  # noqa: F403 (helpers stay importable from here)
from blip_recipes.commands.convert_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
