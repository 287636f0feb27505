"""`python -m blip_recipes.cli` = `blip`."""

import sys

from blip_recipes.cli.dispatch import main

sys.exit(main())
