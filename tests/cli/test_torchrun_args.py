"""`blip run`'s torchrun flags: split from the recipe, the world size they imply, and the stop
signals taken out of torchrun's list."""

from __future__ import annotations

import signal

import pytest

from blip_recipes.cli.torchrun_args import (
    launch_world_size,
    split_launcher_args,
    stop_signals_for,
)
from blip_recipes.cli.usage import UsageError
from blip_recipes.runs.stop import STOP_SIGNALS


def test_flags_before_the_recipe_are_torchruns_and_the_rest_is_the_recipes():
    launcher, recipe, rest = split_launcher_args(
        ["--nproc-per-node", "2", "--standalone", "--nnodes=1", "blip_pretrain", "--config", "x"]
    )
    assert launcher == ["--nproc-per-node", "2", "--standalone", "--nnodes=1"]
    assert recipe == "blip_pretrain" and rest == ["--config", "x"]
    assert launch_world_size(launcher) == 2
    assert launch_world_size(["--nnodes", "2", "--nproc-per-node=4"]) == 8
    assert launch_world_size(["--nproc-per-node", "gpu"]) is None  # decided by torchrun


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nproc-per-nod", "2", "r.py"], "unknown flag '--nproc-per-nod' before the recipe"),
        (["--nproc-per-node"], "torchrun flag '--nproc-per-node' needs a value"),
        (["--standalone"], "missing RECIPE"),
    ],
)
def test_bad_launcher_flags_are_usage_errors(args, message):
    with pytest.raises(UsageError, match=message):
        split_launcher_args(args)


def test_run_takes_the_stop_signals_from_torchrun(monkeypatch):
    """torchrun keeps SIGHUP/SIGQUIT; a --signals-to-handle the user gives is left as it is."""
    monkeypatch.delenv("PET_SIGNALS_TO_HANDLE", raising=False)
    launcher, ours = stop_signals_for(["--nproc-per-node", "2"])
    assert launcher == ["--nproc-per-node", "2", "--signals-to-handle", "SIGHUP,SIGQUIT"]
    assert ours == STOP_SIGNALS
    launcher, ours = stop_signals_for(["--signals-to-handle=SIGTERM,SIGUSR2"])
    assert launcher == ["--signals-to-handle=SIGTERM,SIGUSR2"]
    assert ours == (signal.SIGINT, signal.SIGUSR1)
