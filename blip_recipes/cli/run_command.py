"""`blip run`: check the config, then run the recipe in this process or through torchrun.

Exit status: the recipe's (in process), or the launcher's (`run_through_torchrun`).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import replace
from pathlib import Path

from blip_recipes.cli.stop_forwarding import (
    StopForwarder,
    early_stop,
    install_early_stop_handlers,
    ranks_start_with_stop_signals_blocked,
)
from blip_recipes.cli.torchrun_args import launch_world_size, split_launcher_args, stop_signals_for
from blip_recipes.cli.usage import UsageError
from blip_recipes.config import LaunchContext, help_text, load_config, split_config_arg, validate
from blip_recipes.config.advice import mark_printed
from blip_recipes.config.registry import (
    recipe_trains,
    recipe_unread,
    resolve_config,
    resolve_recipe,
)

RUN_HELP = """usage: blip run [torchrun flags] RECIPE --config FILE [overrides...]

examples:
  blip run blip_pretrain --config debug
  blip run --nproc-per-node 2 recipes/blip_pretrain.py --config configs/debug.toml training.steps=20
  blip run --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint $HEAD:29500 \\
      blip_pretrain --config base data.batch_size=75

torchrun flags: every flag of `python -m torch.distributed.run`, e.g. --nproc-per-node,
--nnodes, --node-rank, --rdzv-backend, --rdzv-endpoint, --rdzv-id, --master-addr,
--master-port, --standalone, --max-restarts.

stopping: SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 (Slurm's --signal=USR1@120 early warning), to
this process or its whole process group, makes every rank save a checkpoint at the next stop
check (checkpoint.signal_check_every steps) and exit; `blip run` then exits 0 and
checkpoint.resume=auto continues from it. Repeats of a stop signal are ignored (Slurm and srun
may deliver one twice), except SIGINT: a second Ctrl-C stops the ranks without waiting for the
checkpoint (torchrun's shutdown: SIGINT, then SIGKILL after --shutdown-timeout seconds). With
--max-restarts N, a failed worker group is restarted from the newest complete checkpoint. Ranks
whose launcher was killed save and exit by themselves. A stopped rank (SIGSTOP) is continued
before a stop signal is forwarded; ranks still running job.stop_timeout_s seconds after the
first stop signal are killed and `blip run` exits 1. A stop before training started exits 0
without a checkpoint. A rank that waits longer than job.collective_timeout_s for a peer ends the
job with exit 1.

Config keys (section.key (type, default) and meaning):
"""


def run_recipe_in_process(recipe: Path, argv: list[str]) -> int:
    """Import a recipe file and call its ``main(argv)``."""
    spec = importlib.util.spec_from_file_location(f"blip_recipe_{recipe.stem}", recipe)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as importlib's recipe does: inspect and pickle find it
    spec.loader.exec_module(module)
    if not hasattr(module, "main"):
        raise UsageError(f"recipe {recipe} has no main(argv) function")
    return int(module.main(argv) or 0)


def cmd_run(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help"):
        print(RUN_HELP + help_text())
        return 0
    install_early_stop_handlers()
    launcher, recipe_arg, rest = split_launcher_args(args)
    recipe = resolve_recipe(recipe_arg)
    config_arg, overrides = split_config_arg(rest)
    if "--help" in overrides or "-h" in overrides:
        return run_recipe_in_process(recipe, ["--help"])
    if config_arg is None:
        raise UsageError("missing --config FILE (a path or a built-in name from `blip ls`)")
    config = resolve_config(config_arg)
    cfg = load_config(config, overrides)  # fail fast, before any process starts
    world_size = launch_world_size(launcher) if launcher else None
    if world_size is not None and world_size < 1:
        raise UsageError(f"--nproc-per-node x --nnodes must be >= 1, got {world_size} ranks")
    context = LaunchContext(world_size=world_size or 1) if launcher else LaunchContext.from_env()
    validate(cfg, replace(context, checkpoints=recipe_trains(recipe), unread=recipe_unread(recipe)))
    recipe_argv = ["--config", str(config), *overrides]
    mark_printed()  # the ranks do not repeat the warnings validate printed
    if not launcher:
        return run_recipe_in_process(recipe, recipe_argv)
    return run_through_torchrun(launcher, recipe, recipe_argv, cfg.job.stop_timeout_s)


#: What torchrun starts in every rank: records stop signals before anything is imported, then
#: runs the recipe file.
RANK_ENTRY = Path(__file__).with_name("rank_entry.py")


def run_through_torchrun(
    launcher: list[str], recipe: Path, recipe_argv: list[str], stop_timeout_s: float | None = None
) -> int:
    """Launch ``recipe`` with torchrun in this process (which becomes torchrun's agent).

    Exit status: 0 when every rank exited 0, including after a stop signal (the ranks saved a
    checkpoint, or stopped before training started); 1 when ranks were still running
    ``stop_timeout_s`` after a stop signal (killed); 2 when a rank exited 2 (it refused the configuration or folder); 128 + N when
    torchrun shut the ranks down on signal N (a second Ctrl-C, or SIGHUP/SIGQUIT); else 1.

    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (unless set): with the c10d rendezvous
    (``--standalone``, ``--rdzv-backend c10d``) each rendezvous round, restarts included, gets a
    fresh TCPStore. The shared store torchrun uses otherwise keeps the previous attempt's keys,
    and restarted gloo ranks can read a dead peer's address from them and fail to connect.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    launcher, stop_signals = stop_signals_for(launcher)
    try:
        with StopForwarder(stop_signals, stop_timeout_s) as stop, \
                ranks_start_with_stop_signals_blocked():  # fmt: skip
            if early_stop:
                print(
                    f"blip run: {early_stop[0].name} before the ranks started: stopped before "
                    "training started, nothing to save",
                    file=sys.stderr,
                )
                return 0
            torchrun_main([*launcher, str(RANK_ENTRY), str(recipe), *recipe_argv])
    except ChildFailedError as e:  # torchrun already printed each failed rank's error
        # A rank that refused the run (exit 2) is the cause; the others then fail after it
        # (torchrun's SIGTERM, or a collective whose peer is gone), so any 2 makes it 2.
        codes = [f.exitcode for f in e.failures.values()]
        return 2 if 2 in codes else 1
    except SignalException as e:
        print(f"blip run: {e.sigval.name}: torchrun stopped the ranks", file=sys.stderr)
        return 128 + int(e.sigval)
    if stop.killed:
        return 1
    if stop.received is not None:
        print(f"blip run: stopped on {stop.received.name}; every rank exited 0", file=sys.stderr)
    return 0
