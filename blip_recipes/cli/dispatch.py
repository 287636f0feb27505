"""The ``blip`` command: run recipes (in process or through torchrun), validate, list, copy.

blip run [torchrun flags] RECIPE --config FILE [overrides...]
blip validate --config FILE [--world-size N] [overrides...]
blip ls
blip cp NAME DEST [--force]
blip checkpoint verify PATH
blip download NAME [--dir pretrained] | --list
blip caption CHECKPOINT IMAGE... | blip convert SOURCE DEST
blip data synthetic|build-shards ... | blip benchmark [data|float8-layers|flops] ...
blip --version
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from blip_recipes.config import (
    ConfigError,
    LaunchContext,
    help_text,
    load_config,
    split_config_arg,
    to_toml,
    validate,
)
from blip_recipes.config.advice import mark_printed
from blip_recipes.config.registry import (
    CONFIGS_DIR,
    RECIPES,
    config_names,
    recipe_trains,
    resolve_config,
    resolve_recipe,
)
from blip_recipes.metrics.console import guard_console
from blip_recipes.metrics.run_logging import quiet_harmless_records
from blip_recipes.runs.stop import STOP_REQUEST_ENV, STOP_SIGNALS

MAIN_HELP = """blip: BLIP vision-language pretraining recipes

commands:
  blip run [torchrun flags] RECIPE --config FILE [overrides...]
        Run a recipe (a path such as recipes/blip_pretrain.py or a name such as
        blip_pretrain) with a config (a path or a built-in name such as debug).
        With any torchrun flag (--nproc-per-node 2, --nnodes, --standalone, ...) it launches
        through torch.distributed.run; without, it runs in this process.
  blip validate --config FILE [--world-size N] [overrides...]
        Print the fully resolved config as TOML (exit 0) or the errors (exit 2).
  blip ls
        List recipes and their configs.
  blip cp NAME DEST [--force]
        Copy a recipe or config out to edit it. DEST is a file name, or a folder (existing,
        or ending with /) that gets NAME.toml / NAME.py; never overwrites without --force.
  blip checkpoint verify PATH
        Check checkpoints against their checksums.json: PATH is one step-N folder, a
        checkpoints folder or a run's output folder (all of its checkpoints). Prints OK or
        what is wrong per checkpoint; exit 0 if all are verified intact, 1 otherwise.
  blip download NAME [NAME ...] [--dir pretrained] | --list
        Fetch pretrained weights (BERT, DeiT / ViT-L inits, released BLIP models) from the
        Hugging Face Hub into pretrained/NAME, where the shipped configs read them.
  blip caption CHECKPOINT IMAGE [IMAGE ...] [--method greedy|beam|nucleus] [--json]
        Caption images with any supported checkpoint (DCP, HF folder, reference .pth, flat).
  blip convert SOURCE DEST [--to dcp|hf|pt|safetensors|reference]
        Convert checkpoints between formats (HF exports get a model card, README.md).
  blip data synthetic --out DIR --num N [--shards K] [--jsonl]
        Write a synthetic image-caption dataset (JSON annotations, optional tar shards).
  blip data build-shards --ann FILE [FILE ...] --image-root DIR --out DIR [--resize S]
        Check BLIP annotations + images and pack them into webdataset tar shards.
  blip data init --ann FILE [FILE ...] --image-root DIR --out DIR [--tokenizer VOCAB]
        Configs of the whole path (pretrain, eval, both fine-tunings, CapFilt, pretrain
        again) for your own images and captions, sized to the data and this machine.
  blip benchmark [step] [--model M] [--variants V] [--json FILE]
        Training-step throughput per variant, against a transformers-composed baseline.
  blip benchmark data | float8-layers | flops [...]
        Data pipeline throughput; float8 vs bf16 per linear layer; FLOPs of one step.
  blip --version
        Print the installed blip-recipes version.

Every command takes --help for its options.

overrides: section.key=value (TorchTune style) or --section.key value (TorchTitan style),
applied in order after the TOML file. `blip run --help` lists every key.
"""

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


class UsageError(Exception):
    """A command-line mistake; printed without a traceback, exit status 2."""


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


def _launch_world_size(launcher: list[str]) -> int | None:
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


def _stop_signals_for(launcher: list[str]) -> tuple[list[str], tuple[signal.Signals, ...]]:
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


def _child_process_groups() -> list[int]:
    """Children of this process that lead their own process group (Linux ``/proc``).

    torchrun starts every rank with ``start_new_session=True``, so a signal to the launcher's
    process group does not reach the ranks; signalling each rank's group also reaches its loader
    workers (as torchrun itself does), which ignore stop signals.
    """
    me, found = os.getpid(), []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()  # state, ppid, pgrp, ...
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[1]) == me and int(fields[2]) == int(entry):
            found.append(int(entry))
    return found


class StopForwarder:
    """Stop signals in `blip run`'s launcher (the torchrun agent's process), while it runs.

    The first one is sent on to every rank (their process groups), which save a checkpoint at
    their next stop check and exit 0; the agent keeps monitoring them as usual and returns
    normally once all have exited 0, so `blip run` exits 0. It also sets ``STOP_REQUEST_ENV``,
    so that a worker group torchrun restarts after this point stops at its first check.

    Later SIGTERM/SIGUSR1 are ignored: under Slurm one stop often arrives twice (slurmstepd
    signals every process of the step and srun forwards the signal it got as well), which must
    not cut the save short. A later SIGINT (a second Ctrl-C) raises torchrun's
    ``SignalException``: the agent sends SIGINT to the ranks and SIGKILLs them after
    ``--shutdown-timeout`` seconds (stop now, without the checkpoint).

    Every forwarded signal is preceded by SIGCONT, so that a stopped rank (SIGSTOP, a debugger,
    a suspended job) runs again and hears it. With ``stop_timeout_s`` (``job.stop_timeout_s``),
    ranks still running that long after the first stop signal are killed (SIGCONT, SIGKILL) with
    one line, and `blip run` exits 1: a stop always ends the job within a bound.
    """

    def __init__(
        self, signals: Sequence[signal.Signals] = STOP_SIGNALS, stop_timeout_s: float | None = None
    ) -> None:
        self.signals = tuple(signals)
        self.stop_timeout_s = stop_timeout_s
        self.received: signal.Signals | None = None
        self.killed = False
        self._previous: dict[signal.Signals, object] = {}
        self._timer: threading.Timer | None = None

    def __enter__(self) -> StopForwarder:
        if threading.current_thread() is threading.main_thread():  # else signal.signal raises
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
        os.environ.pop(STOP_REQUEST_ENV, None)

    def _handle(self, signum: int, _frame: object) -> None:
        sig = signal.Signals(signum)
        if self.received is not None:
            if sig != signal.SIGINT:
                return
            from torch.distributed.elastic.multiprocessing.api import SignalException

            raise SignalException(f"Process {os.getpid()} got signal: {sig} again", sigval=sig)
        self.received = sig
        os.environ[STOP_REQUEST_ENV] = str(int(sig))
        try:
            os.write(  # not print(): a handler may interrupt a write to sys.stderr
                2,
                f"blip run: {sig.name}: every rank saves a checkpoint at its next stop check and "
                f"exits (a second Ctrl-C stops them now, without it)\n".encode(),
            )
        except OSError:  # a dead console (the `| tee` that got the same Ctrl-C) stops nothing
            pass
        _signal_groups(_child_process_groups(), (signal.SIGCONT, sig))
        if self.stop_timeout_s is not None:
            self._timer = threading.Timer(self.stop_timeout_s, self._kill_ranks)
            self._timer.daemon = True
            self._timer.start()

    def _kill_ranks(self) -> None:
        """The stop timeout ran out: kill every rank still running (their groups)."""
        groups = _child_process_groups()
        if not groups:
            return
        self.killed = True
        name = self.received.name if self.received is not None else "the stop signal"
        try:
            os.write(
                2,
                f"blip run: {len(groups)} rank(s) still running {self.stop_timeout_s:g} s after "
                f"{name} (job.stop_timeout_s); killing them (SIGKILL) without their checkpoint\n"
                .encode(),
            )  # fmt: skip
        except OSError:
            pass
        _signal_groups(groups, (signal.SIGCONT, signal.SIGKILL))


def _signal_groups(groups: Sequence[int], signals: Sequence[signal.Signals]) -> None:
    """Send each of ``signals``, in order, to each process group (gone ones are skipped)."""
    for pgid in groups:
        for sig in signals:
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass


_early_stop: list[signal.Signals] = []


def _record_early_stop(signum: int, _frame: object) -> None:
    """A stop signal while `blip run` itself starts (imports, config checks), before the ranks or
    the in-process recipe have handlers: remembered, never fatal."""
    if not _early_stop:
        _early_stop.append(signal.Signals(signum))
        os.environ[STOP_REQUEST_ENV] = str(int(signum))  # an in-process recipe reads it


def _install_early_stop_handlers() -> None:
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, _record_early_stop)


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
    _install_early_stop_handlers()
    launcher, recipe_arg, rest = split_launcher_args(args)
    recipe = resolve_recipe(recipe_arg)
    config_arg, overrides = split_config_arg(rest)
    if "--help" in overrides or "-h" in overrides:
        return run_recipe_in_process(recipe, ["--help"])
    if config_arg is None:
        raise UsageError("missing --config FILE (a path or a built-in name from `blip ls`)")
    config = resolve_config(config_arg)
    cfg = load_config(config, overrides)  # fail fast, before any process starts
    world_size = _launch_world_size(launcher) if launcher else None
    if world_size is not None and world_size < 1:
        raise UsageError(f"--nproc-per-node x --nnodes must be >= 1, got {world_size} ranks")
    context = LaunchContext(world_size=world_size or 1) if launcher else LaunchContext.from_env()
    validate(cfg, replace(context, checkpoints=recipe_trains(recipe)))
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
    launcher, stop_signals = _stop_signals_for(launcher)
    try:
        with StopForwarder(stop_signals, stop_timeout_s) as stop:
            if _early_stop:
                print(
                    f"blip run: {_early_stop[0].name} before the ranks started: stopped before "
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


def cmd_validate(args: list[str]) -> int:
    if "-h" in args or "--help" in args:
        print("usage: blip validate [--config] FILE [--world-size N (default: 1)] [overrides...]")
        return 0
    config_arg, rest = split_config_arg(args)
    if config_arg is None and rest and "=" not in rest[0] and not rest[0].startswith("-"):
        config_arg = rest.pop(0)  # `blip validate CFG`, TorchTune's positional form
    world_size = 1
    if "--world-size" in rest:
        j = rest.index("--world-size")
        try:
            world_size = int(rest[j + 1])
        except (IndexError, ValueError):
            raise UsageError("--world-size needs an integer") from None
        if world_size < 1:
            raise UsageError(f"--world-size must be >= 1, got {world_size}")
        del rest[j : j + 2]
    path = resolve_config(config_arg) if config_arg is not None else None
    cfg = load_config(path, rest)
    trains = all(e.trains for e in RECIPES.values() if path is not None and path.stem in e.configs)
    validate(cfg, LaunchContext(world_size=world_size, checkpoints=trains))
    print(to_toml(cfg))
    return 0


def cmd_ls(args: list[str]) -> int:
    if "-h" in args or "--help" in args:
        print("usage: blip ls\n\nLists the packaged recipes and the configs each ships with "
              "(`blip cp NAME DEST` copies one to edit).")  # fmt: skip
        return 0
    if args:
        raise UsageError(f"blip ls takes no arguments, got {' '.join(args)}")
    width = max(24, 2 + max(len(name) for name in RECIPES))
    print(f"{'RECIPE':<{width}}CONFIGS")
    for entry in RECIPES.values():
        print(f"{entry.name:<{width}}{', '.join(entry.configs)}")
    listed = {c for e in RECIPES.values() for c in e.configs}
    others = [c for c in config_names() if c not in listed]
    if others:
        print(f"{'(other configs)':<{width}}{', '.join(others)}")
    return 0


def cmd_cp(args: list[str]) -> int:
    force = "--force" in args
    positional = [a for a in args if a != "--force"]
    if len(positional) != 2:
        raise UsageError("usage: blip cp NAME DEST [--force]")
    name, dest = positional
    if name.removesuffix(".py") in RECIPES:
        source = RECIPES[name.removesuffix(".py")].path
    elif (CONFIGS_DIR / f"{name.removesuffix('.toml')}.toml").is_file():
        source = CONFIGS_DIR / f"{name.removesuffix('.toml')}.toml"
    else:
        raise UsageError(f"'{name}' is not a recipe or config name (see `blip ls`)")
    target = Path(dest)
    if target.is_dir() or dest.endswith(("/", "\\")):  # a folder, existing or to be made
        target = target / source.name
    if target.exists() and not force:
        raise UsageError(f"{target} exists; pass --force to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    print(f"copied {source.name} to {target}")
    return 0


CHECKPOINT_HELP = """usage: blip checkpoint verify PATH

PATH: one checkpoint (a step-N folder), a checkpoints folder or a run's output folder (then
every step-N folder in it). Each checkpoint's files are checked against its checksums.json
(size and CRC-32) and its DCP metadata. One line per checkpoint:
  OK          every file matches
  CORRUPT     which file, and what: missing, size mismatch, hash mismatch, unreadable metadata
  UNVERIFIED  no checksums.json (written before checksums existed, or the save stopped
              before them); its shard files are present but their contents cannot be checked
  INCOMPLETE  no .metadata: a save that did not finish (never resumed from)
exit status: 0 if every checkpoint is verified intact (OK), 1 otherwise, 2 on usage errors.
"""


def cmd_checkpoint(args: list[str]) -> int:
    if "-h" in args or "--help" in args:
        print(CHECKPOINT_HELP)
        return 0
    if not args or args[0] != "verify":
        what = f"unknown checkpoint command '{args[0]}'" if args else "missing command"
        raise UsageError(f"{what}: usage: blip checkpoint verify PATH")
    if len(args) != 2:
        raise UsageError("usage: blip checkpoint verify PATH (one path)")
    path = Path(args[1])
    if not path.is_dir():
        raise UsageError(f"{path}: no such folder")
    from blip_recipes.checkpoint import step_folders, verify_checkpoint

    folders = step_folders(path)
    if not folders:
        print(f"{path}: no checkpoints found (no step-N folders, no checkpoints/ folder)")
        return 1
    failed = 0
    for folder in folders:
        report = verify_checkpoint(folder)
        failed += not report.ok
        print(f"{folder}: {report.summary()}")
    if len(folders) > 1:
        print(f"{len(folders) - failed} of {len(folders)} checkpoints verified intact")
    return 1 if failed else 0


def cmd_download(args: list[str]) -> int:
    from blip_recipes.interop.download import main as download_main

    return download_main(args)


def _subcommand(module: str, args: list[str], prog: str) -> int:
    """Run ``blip_recipes.commands.<module>.main(args)`` (imported only when used)."""
    import importlib

    main_fn = importlib.import_module(f"blip_recipes.commands.{module}").main
    try:
        return int(main_fn(args, prog=prog) or 0)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)


def _dispatch(group: str, table: dict[str, str], args: list[str], default: str | None) -> int:
    """``blip GROUP SUB [args]``: SUB picks a module of ``table``; without one, ``default``."""
    if args and args[0] in table:
        return _subcommand(table[args[0]], args[1:], f"blip {group} {args[0]}")
    if default is not None and (not args or args[0].startswith("-") or args[0] == "step"):
        rest = args[1:] if args and args[0] == "step" else args
        if rest[:1] in (["-h"], ["--help"]):
            subs = ", ".join(f"`blip {group} {sub} --help`" for sub in table)
            print(f"subcommands: step (the default, below), {', '.join(table)}; see {subs}\n")
        return _subcommand(default, rest, f"blip {group}")
    if not args or args[0] in ("-h", "--help"):
        print(f"usage: blip {group} {{{','.join(table)}}} [options] (each takes --help)")
        return 0
    raise UsageError(f"unknown {group} command '{args[0]}' (one of: {', '.join(table)})")


def cmd_caption(args: list[str]) -> int:
    return _subcommand("caption", args, "blip caption")


def cmd_convert(args: list[str]) -> int:
    return _subcommand("convert_checkpoint", args, "blip convert")


DATA_COMMANDS = {
    "synthetic": "make_synthetic_dataset",
    "init": "data_init",
    "build-shards": "build_shards",
    "img2dataset-input": "img2dataset_input",
}
BENCHMARK_COMMANDS = {
    "data": "benchmark_data",
    "float8-layers": "benchmark_float8_layers",
    "flops": "count_flops",
}


def cmd_data(args: list[str]) -> int:
    return _dispatch("data", DATA_COMMANDS, args, None)


def cmd_benchmark(args: list[str]) -> int:
    return _dispatch("benchmark", BENCHMARK_COMMANDS, args, "benchmark")


def package_version() -> str:
    """The installed blip-recipes version (``blip_recipes.__version__``)."""
    import blip_recipes

    return blip_recipes.__version__


COMMANDS = {
    "run": cmd_run,
    "validate": cmd_validate,
    "ls": cmd_ls,
    "cp": cmd_cp,
    "checkpoint": cmd_checkpoint,
    "download": cmd_download,
    "caption": cmd_caption,
    "convert": cmd_convert,
    "data": cmd_data,
    "benchmark": cmd_benchmark,
}


def main(argv: Sequence[str] | None = None) -> int:
    guard_console()  # a closed stdout/stderr (`blip ... | head`, a dead `| tee`) stops no command
    quiet_harmless_records()  # library noise on import (see metrics/run_logging.py)
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(MAIN_HELP)
        return 0
    if args[0] in ("-V", "--version"):
        print(f"blip-recipes {package_version()}")
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"blip: unknown command '{command}' (one of: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    try:
        return COMMANDS[command](rest)
    except (UsageError, ConfigError, FileNotFoundError) as e:
        print(f"blip {command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
