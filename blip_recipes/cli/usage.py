"""The `blip` command's usage errors: printed in one line without a traceback, exit status 2."""


class UsageError(Exception):
    """A command-line mistake; printed without a traceback, exit status 2."""
