#!/usr/bin/env python
"""Same as ``blip caption`` (blip_recipes/commands/caption.py)."""

import sys

from blip_recipes.commands.caption import *  # noqa: F403 (helpers stay importable from here)
from blip_recipes.commands.caption import main

if __name__ == "__main__":
    sys.exit(main())
