"""A training run's checkpoints: where it resumes from, loading with fallback, saving.

The recipe decides *what* a checkpoint holds (its dict of ``Stateful`` objects); this module
decides *where* and *when it may be used*: ``checkpoint.resume`` (``auto``: the newest intact
checkpoint, damaged newer ones moved aside; ``none``: a fresh start, refused when the folder
already holds one; a path: exactly that checkpoint), loading (``auto`` falls back to the next
older checkpoint when one cannot be read), saving ``step-N`` with the run's ``config.toml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from blip_recipes.checkpoint import (
    LR_SCHEDULER,
    TRAIN_STATE,
    CheckpointCorruptError,
    CheckpointManager,
    PerRankState,
    TrainState,
    is_complete,
)
from blip_recipes.config import Config, to_toml
from blip_recipes.data import TrainLoader


class RunCheckpoints:
    """``<output_dir>/checkpoints`` of one training run, with its resume policy."""

    def __init__(self, output_dir: Path, cfg: Config) -> None:
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.manager = CheckpointManager(
            self.output_dir / "checkpoints",
            keep_latest_k=cfg.checkpoint.keep_latest_k,
            async_save=cfg.checkpoint.async_save,
        )

    def resume_path(self) -> Path | None:
        """The checkpoint this run continues from (None: a fresh start).

        Raises:
            FileExistsError: ``resume=none`` but the folder already holds a checkpoint.
            FileNotFoundError: ``resume=PATH`` is not a complete checkpoint folder.
            CheckpointCorruptError: ``resume=PATH`` fails its checksums.
        """
        resume = self.cfg.checkpoint.resume
        if resume == "auto":  # newest that verifies; damaged newer ones are moved aside
            return self.manager.latest_intact(quarantine=True)
        existing = self.manager.latest_complete()
        if resume == "none":
            if existing is not None:
                raise FileExistsError(
                    f"{self.output_dir} already holds checkpoint {existing.name}; set "
                    "checkpoint.resume=auto to continue it or choose another job.output_dir "
                    "(checkpoints are never overwritten)"
                )
            return None
        path = Path(resume)
        if not is_complete(path):
            raise FileNotFoundError(
                f"checkpoint.resume={resume!r}: not a complete checkpoint folder (no DCP metadata)"
            )
        self.manager.check_intact(path)
        return path

    def load(self, path: Path, states: dict[str, Any]) -> Path:
        """Load ``states`` from ``path`` in place; returns the checkpoint actually loaded (with
        ``resume=auto`` one that cannot be read is moved aside and the next older one used).

        Raises:
            CheckpointCorruptError: its LR scheduler's step count is not its ``train_state.step``.
        """
        if self.cfg.checkpoint.resume == "auto":
            path = self.manager.load_readable(path, states, quarantine=True)
        else:
            self.manager.load(path, states)
        _check_one_step_count(path, states)
        return path

    def save(self, step: int, states: dict[str, Any]) -> None:
        """Save ``states`` into ``checkpoints/step-<step>/`` with the run's ``config.toml``."""
        self.manager.save(step, states, extra_files={"config.toml": to_toml(self.cfg)})

    def latest_complete(self) -> Path | None:
        """The newest complete checkpoint folder (None before the first save)."""
        return self.manager.latest_complete()

    def step_dir(self, step: int) -> Path:
        """The folder of step ``step``'s checkpoint (whether or not it exists)."""
        return self.manager.step_dir(step)

    def close(self) -> None:
        """Finish pending (async) saves."""
        self.manager.close()


def _check_one_step_count(path: Path, states: dict[str, Any]) -> None:
    """The LR scheduler counts the steps the training state does: resuming with two different
    counts would follow the schedule from the wrong step."""
    scheduler, train_state = states.get(LR_SCHEDULER), states.get(TRAIN_STATE)
    if scheduler is None or train_state is None:
        return
    if scheduler.last_epoch != train_state.step:
        raise CheckpointCorruptError(
            f"{path}: lr_scheduler has taken {scheduler.last_epoch} steps but train_state.step "
            f"is {train_state.step}; they must agree to resume"
        )


def loader_state(loader: Any) -> Any:
    """What a checkpoint keeps of the loader: map-style loaders keep a global position,
    identical on every rank (so it also resumes on another world size); streamed shards keep
    per-rank stream states."""
    return loader if isinstance(loader, TrainLoader) else PerRankState(loader)


def train_state_at(
    state: TrainState, step: int, steps_per_epoch: int, samples_per_step: int
) -> TrainState:
    """``state`` with its counters set for a save after ``step`` optimizer steps."""
    state.step = step
    state.epoch = step // steps_per_epoch
    state.samples_seen = step * samples_per_step
    return state


__all__ = ["RunCheckpoints", "loader_state", "train_state_at"]
