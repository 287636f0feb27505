#!/usr/bin/env python
"""Same as ``blip benchmark vs-reference`` (blip_recipes/commands/benchmark_vs_reference.py)."""

import sys

from blip_recipes.commands.benchmark_vs_reference import main

if __name__ == "__main__":
    sys.exit(main())
