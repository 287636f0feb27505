#!/usr/bin/env python
"""Same as ``blip benchmark flops`` (blip_recipes/commands/count_flops.py)."""

import sys

from blip_recipes.commands.count_flops import *  # noqa: F403 (helpers stay importable from here)
from blip_recipes.commands.count_flops import main

if __name__ == "__main__":
    sys.exit(main())
