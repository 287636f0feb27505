"""`blip run`'s torchrun flags: split from the recipe and its arguments, the world size they
imply, and the stop signals taken out of torchrun's hands (`StopForwarder` handles them).

    blip run [torchrun flags] RECIPE --config FILE [overrides...]
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence

from blip_recipes.cli.usage import UsageError
from blip_recipes.runs.stop import STOP_SIGNALS


def _torchrun_options() -> dict[str, bool]:
    """torchrun's option strings, mapped to whether each takes a value."""
    from torch.distributed.run import get_args_parser

    options = {}
    for action in get_args_parser()._actions:
        for opt in action.option_strings:
            if opt not in ("-h", "--help"):
                options[opt] = action.nargs != 0
    return options


def split_launcher_args(args: Sequence[str]) -> tuple[list[str], str, list[str]]:
    """Split ``[torchrun flags] RECIPE rest...`` into its three parts.

    Raises:
        UsageError: for an unknown flag, a flag missing its value, or a missing recipe.
    """
    options = _torchrun_options()
    launcher: list[str] = []
    i = 0
    while i < len(args) and args[i].startswith("-"):
        flag = args[i].split("=", 1)[0]
        if flag not in options:
            known = ", ".join(sorted(o for o in options if o.startswith("--") and "_" not in o))
            raise UsageError(f"unknown flag '{flag}' before the recipe (torchrun flags: {known})")
        if options[flag] and "=" not in args[i]:
            if i + 1 >= len(args):
                raise UsageError(f"torchrun flag '{flag}' needs a value")
            launcher += [args[i], args[i + 1]]
            i += 2
        else:
            launcher.append(args[i])
            i += 1
    if i >= len(args):
        raise UsageError("missing RECIPE (a .py path or a name from `blip ls`)")
    return launcher, args[i], list(args[i + 1 :])


def launch_world_size(launcher: list[str]) -> int | None:
    """World size implied by --nproc-per-node and --nnodes, when both are plain integers."""
    values = {"nproc": "1", "nnodes": "1"}
    for j, arg in enumerate(launcher):
        key, _, inline = arg.partition("=")
        value = inline or (launcher[j + 1] if j + 1 < len(launcher) else "")
        if key in ("--nproc-per-node", "--nproc_per_node"):
            values["nproc"] = value
        elif key == "--nnodes":
            values["nnodes"] = value
    try:
        return int(values["nproc"]) * int(values["nnodes"])
    except ValueError:
        return None  # "auto", "gpu" or an elastic range: checked again inside the recipe


#: torchrun's own default for --signals-to-handle.
_TORCHRUN_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")


def _flag_value(launcher: list[str], *names: str) -> str | None:
    """The value of the first of ``names`` among the launcher flags (``--flag v`` or
    ``--flag=v``), or None."""
    for j, arg in enumerate(launcher):
        key, eq, inline = arg.partition("=")
        if key in names:
            return inline if eq else (launcher[j + 1] if j + 1 < len(launcher) else None)
    return None


def stop_signals_for(launcher: list[str]) -> tuple[list[str], tuple[signal.Signals, ...]]:
    """The launcher flags to pass to torchrun, and the stop signals `blip run` handles itself.

    torchrun's agent turns every signal in its ``--signals-to-handle`` into a shutdown: it sends
    the signal on to the ranks, SIGKILLs them after ``--shutdown-timeout`` (30 s) and exits 1,
    whether or not they saved; a signal outside the list (SIGUSR1 by default) kills the agent and
    leaves the ranks running. So the stop signals are taken out of torchrun's list and handled
    by :class:`StopForwarder`. A list the user gives (flag or ``PET_SIGNALS_TO_HANDLE``) wins:
    signals named in it stay torchrun's.
    """
    names = ("--signals-to-handle", "--signals_to_handle")
    given = _flag_value(launcher, *names) or os.environ.get("PET_SIGNALS_TO_HANDLE")
    if given is not None:
        theirs = {name.strip().upper() for name in given.split(",")}
        return launcher, tuple(s for s in STOP_SIGNALS if s.name not in theirs)
    stop_names = {s.name for s in STOP_SIGNALS}
    keep = ",".join(name for name in _TORCHRUN_SIGNALS if name not in stop_names)
    return [*launcher, "--signals-to-handle", keep], STOP_SIGNALS
