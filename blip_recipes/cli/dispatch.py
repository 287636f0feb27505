"""The ``blip`` command: one function per subcommand, and ``main`` that picks one.

blip run [torchrun flags] RECIPE --config FILE [overrides...]   (run_command.py)
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

import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from blip_recipes.cli.run_command import cmd_run
from blip_recipes.cli.usage import UsageError
from blip_recipes.config import (
    ConfigError,
    LaunchContext,
    load_config,
    split_config_arg,
    to_toml,
    validate,
)
from blip_recipes.config.registry import CONFIGS_DIR, RECIPES, config_names, resolve_config
from blip_recipes.metrics.console import guard_console
from blip_recipes.metrics.run_logging import quiet_harmless_records

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
  blip benchmark data | float8-layers | flops | vs-reference [...]
        Data pipeline throughput; float8 vs bf16 per linear layer; FLOPs of one step; the
        step against a local checkout of the original BLIP code (CPU, one process).
  blip --version
        Print the installed blip-recipes version.

Every command takes --help for its options.

overrides: section.key=value (TorchTune style) or --section.key value (TorchTitan style),
applied in order after the TOML file. `blip run --help` lists every key.
"""


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
    entries = [e for e in RECIPES.values() if path is not None and path.stem in e.configs]
    trains = all(e.trains for e in entries)
    unread = (
        frozenset.intersection(*(frozenset(e.unread) for e in entries)) if entries else frozenset()
    )
    validate(cfg, LaunchContext(world_size=world_size, checkpoints=trains, unread=unread))
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
    "vs-reference": "benchmark_vs_reference",
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
