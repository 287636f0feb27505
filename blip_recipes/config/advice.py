"""Warnings before work: configs that are valid but will clearly not do what the user expects.

Errors stop a run (``validation.py``); these only warn, one line each, before anything is built:

- a ViT-B / ViT-L model on the CPU, and (registered by :mod:`blip_recipes.training.config_checks`)
  a training-memory estimate above the machine's RAM;
- ``parallel.compile`` on the CPU (the first step compiles for minutes);
- more loader workers than CPU cores;
- (registered by :mod:`blip_recipes.data.config_checks`) ``lr_scheduler.warmup_steps`` longer
  than the run, a momentum queue larger than the data set.

``blip validate`` and ``blip run`` print them (:func:`print_advice`) once per launch: the ranks
that ``blip run`` starts through torchrun do not repeat what it printed.
"""

from __future__ import annotations

import os
import sys

from blip_recipes.config.checks import ADVISORS, LaunchContext, load_check_modules
from blip_recipes.config.sections import Config

ADVISED_ENV = "BLIP_ADVICE_PRINTED"
"""Set by the process that printed the warnings, so the processes it launches stay quiet."""

_printed: set[str] = set()


def cpu_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def physical_memory() -> int | None:
    """Bytes of RAM of this machine (None where unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def resolved_device(cfg: Config) -> str:
    """``cuda`` or ``cpu``: what ``parallel.device`` means on this machine."""
    if cfg.parallel.device != "auto":
        return cfg.parallel.device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def advice(
    cfg: Config, world_size: int = 1, trains: bool = True, unread: frozenset[str] = frozenset()
) -> list[str]:
    """One line per setting that will clearly not do what the user expects (module docstring).

    Args:
        world_size: ranks of the launch (the global batch and the workers per machine).
        trains: the recipe trains (warmup, queue and memory advice apply).
        unread: config keys the recipe does not read (no advice about them).
    """
    out: list[str] = []
    device = resolved_device(cfg)
    name = cfg.model.name
    if device == "cpu" and name != "blip_pretrain_tiny":
        vit = "ViT-L" if name.endswith("large") else "ViT-B"
        out.append(
            f"model.name={name} ({vit}) on the CPU: steps take seconds to minutes each; for a "
            "first run on CPU use blip_pretrain_tiny (configs/debug.toml, or `blip data init`)"
        )
    if cfg.parallel.compile and device == "cpu":
        out.append(
            "parallel.compile=true on the CPU: the first step compiles for minutes (and the "
            "compiled CPU step is rarely faster); set parallel.compile=false"
        )
    cores = cpu_cores()
    local_ranks = max(1, min(world_size, int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    if cfg.data.num_workers * local_ranks > cores:
        out.append(
            f"data.num_workers={cfg.data.num_workers} x {local_ranks} rank(s) is more loader "
            f"workers than this machine's {cores} CPU core(s): they compete with the training "
            f"step; set data.num_workers={max(0, cores // local_ranks - 1)}"
        )
    load_check_modules()
    context = LaunchContext(world_size=world_size, checkpoints=trains, unread=unread)
    out += [line for fn in ADVISORS for line in fn(cfg, context)]
    return out


def print_advice(
    cfg: Config, world_size: int = 1, trains: bool = True, unread: frozenset[str] = frozenset()
) -> list[str]:
    """Print :func:`advice` to stderr as ``warning: ...`` lines, once per launch; returns them.

    Quiet in ranks launched by a process that printed them already (``BLIP_ADVICE_PRINTED``)
    and in ranks other than 0."""
    if os.environ.get(ADVISED_ENV) or os.environ.get("RANK", "0") != "0":
        return []
    try:
        lines = advice(cfg, world_size, trains, unread)
    except Exception:  # noqa: BLE001 - advice must never stop a valid run
        return []
    for line in lines:
        if line not in _printed:
            _printed.add(line)
            print(f"warning: {line}", file=sys.stderr)
    sys.stderr.flush()
    return lines


def mark_printed() -> None:
    """Tell processes launched from here that the warnings were printed."""
    os.environ[ADVISED_ENV] = "1"


__all__ = [
    "advice",
    "cpu_cores",
    "mark_printed",
    "physical_memory",
    "print_advice",
]
