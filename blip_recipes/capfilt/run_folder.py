"""The output folder of a CapFilt run: its layout, its identity file, and the guard that refuses
a folder holding anything else than an earlier run of the same inputs and settings.

Layout under ``job.output_dir``::

    capfilt_run.json      identity of the run (inputs, models, settings): a restart must match
    config.toml           the resolved config
    units/unit-NNNNN.stats.json   a unit's statistics: written last, it marks the unit done
    units/unit-NNNNN.jsonl        a unit's records (JSON/JSONL inputs)
    shards/capfilt-NNNNN.tar      a unit's shard (shard inputs), plus shards/sizes.json
    capfilt.jsonl         every unit's records in unit order (JSON/JSONL inputs)
    stats.json            merged statistics
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from blip_recipes.capfilt.units import WorkUnit

IDENTITY_FILE = "capfilt_run.json"
IDENTITY_VERSION = 1


class OutputFolderError(ValueError):
    """The output folder holds something a CapFilt run must not overwrite or mix with."""


class RunFolder:
    """Paths of a run's files under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.units = self.root / "units"
        self.shards = self.root / "shards"
        self.identity = self.root / IDENTITY_FILE
        self.merged = self.root / "capfilt.jsonl"
        self.stats = self.root / "stats.json"

    def unit_stats(self, unit: WorkUnit) -> Path:
        return self.units / f"{unit.name}.stats.json"

    def unit_output(self, unit: WorkUnit) -> Path:
        if unit.kind == "shards":
            return self.shards / f"capfilt-{unit.index:05d}.tar"
        return self.units / f"{unit.name}.jsonl"

    def is_done(self, unit: WorkUnit) -> bool:
        """The unit's statistics (written after its output) exist."""
        return self.unit_stats(unit).is_file() and self.unit_output(unit).is_file()


def run_identity(capfilt: Any, inputs: list[str], seed: int, max_words: int) -> dict:
    """What makes two runs produce the same output: the expanded inputs (and the sizes of local
    ones), both models, every sampling and filtering setting, the seed and the batch size."""
    sizes = {p: os.path.getsize(p) for p in inputs if os.path.isfile(p)}
    settings = {k: v for k, v in vars(capfilt).items() if k != "inputs"}
    return {
        "version": IDENTITY_VERSION,
        "inputs": list(inputs),
        "input_bytes": sizes,
        "settings": settings,
        "seed": seed,
        "max_words": max_words,
    }


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key != "input_bytes":
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {json.dumps(a)} -> {json.dumps(b)}")
    return out


def claim(folder: RunFolder, identity: dict) -> bool:
    """Make ``folder`` this run's: create it with the identity file, or accept it when it holds a
    run of the same identity (a restart).

    Returns:
        True when an earlier run of the same identity is continued.

    Raises:
        OutputFolderError: the folder holds another run's output (naming what differs), or files
            that are not a CapFilt run's.
    """
    root = folder.root
    if root.exists() and not root.is_dir():
        raise OutputFolderError(f"job.output_dir {root} is a file, not a folder")
    if folder.identity.is_file():
        old = json.loads(folder.identity.read_text())
        if old == identity:
            return True
        diff = _differences(old, identity)
        raise OutputFolderError(
            f"job.output_dir {root} holds another CapFilt run ({'; '.join(diff[:8])}): continue "
            "it with the same inputs and capfilt settings, or choose another job.output_dir"
        )
    if root.is_dir() and any(root.iterdir()):
        names = sorted(p.name for p in root.iterdir())
        raise OutputFolderError(
            f"job.output_dir {root} is not empty and holds no CapFilt run ({', '.join(names[:5])}"
            f"{', ...' if len(names) > 5 else ''}): choose an empty or new folder"
        )
    folder.units.mkdir(parents=True, exist_ok=True)
    from blip_recipes.capfilt.outputs import write_atomic

    write_atomic(folder.identity, (json.dumps(identity, indent=2) + "\n").encode())
    return False


__all__ = ["IDENTITY_FILE", "OutputFolderError", "RunFolder", "claim", "run_identity"]
