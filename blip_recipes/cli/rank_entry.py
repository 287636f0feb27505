"""The first code every rank runs under ``blip run`` (torchrun's entry point): it records stop
signals from the very first moment, then runs the recipe file as ``__main__``.

    python -u rank_entry.py RECIPE.py [recipe args...]

A rank spends its first seconds importing torch and the library; a SIGTERM then would kill it
with the default action (exit -15, and the job fails) before the recipe has installed its own
handlers. Here the stop signals only set ``BLIP_STOP_REQUESTED`` (the variable the recipe
already reads when it installs its handlers, so the stop is taken at its first check: before
training started, it exits 0 with nothing to save). `blip run` starts each rank with the stop
signals blocked, so one that comes before this file runs waits until the handlers are in place.

Run as a file, this module imports nothing of the library (and no torch) before the handlers
are in place; ``sys.path[0]`` is then set to the recipe's folder, as ``python RECIPE.py`` would.
"""

import os
import runpy
import signal
import sys

#: ``blip_recipes.runs.stop.STOP_REQUEST_ENV`` (not imported: that would import the library first).
STOP_REQUEST_ENV = "BLIP_STOP_REQUESTED"

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def _record_stop(signum: int, _frame: object) -> None:
    os.environ.setdefault(STOP_REQUEST_ENV, str(signum))


def main() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record_stop)
    # `blip run` starts ranks with the stop signals blocked (a stop that arrived since is
    # pending): from here on they are recorded.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if len(sys.argv) < 2:
        sys.exit("usage: rank_entry.py RECIPE.py [args...]")
    recipe = os.path.abspath(sys.argv[1])
    sys.argv = [recipe, *sys.argv[2:]]
    sys.path[0] = os.path.dirname(recipe)
    runpy.run_path(recipe, run_name="__main__")


if __name__ == "__main__":
    main()
