"""The ``--help`` layout of every ``blip`` command: docstrings as written, defaults shown."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description/epilog line breaks and appends "(default: X)" to every option
    with a help text and a default (None and False defaults, meaning "off", are not shown)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)
