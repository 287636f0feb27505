"""The `blip` command line: dispatch (`main`) and the torchrun launcher."""

from blip_recipes.cli.dispatch import main

__all__ = ["main"]
