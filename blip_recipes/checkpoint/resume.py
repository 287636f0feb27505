"""Finding the checkpoint to resume from in a folder of ``step-N`` checkpoints: each one verified
against its checksum manifest, newest first, falling back to an older intact one when the newest
is damaged or cannot be read, damaged ones optionally quarantined (``corrupt-step-N``); and the
collective load, where all ranks agree on the outcome.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Optional, Union

from blip_recipes.checkpoint.coordination import Coordinator, no_dist, rank
from blip_recipes.checkpoint.integrity import (
    MANIFEST_FILE,
    CheckpointCorruptError,
    CheckpointReport,
    _Verification,
    step_dirs,
    verify_checkpoint,
)
from blip_recipes.checkpoint.loading import StateLike, is_complete, load_states

logger = logging.getLogger(__name__)


class CheckpointFolder:
    """The ``step-N`` checkpoints of ``folder``: which are complete, which verify, which to resume
    from, and the collective load. Every rank calls the collective methods in the same order;
    ``coordinator`` carries their decisions (rank 0 decides, every rank gets the result)."""

    def __init__(self, folder: Union[str, Path], coordinator: Coordinator) -> None:
        self.folder = Path(folder)
        self._coord = coordinator

    def step_dir(self, step: int) -> Path:
        """Folder of the checkpoint of ``step``."""
        return self.folder / f"step-{step}"

    def _step_dirs(self) -> list[tuple[int, Path]]:
        return step_dirs(self.folder)

    def complete_steps(self) -> list[int]:
        """Steps with a complete checkpoint, ascending."""
        return [s for s, p in self._step_dirs() if is_complete(p)]

    def latest_complete(self) -> Optional[Path]:
        """The newest complete checkpoint, or None (not verified: see :meth:`latest_intact`)."""
        steps = self.complete_steps()
        return self.step_dir(steps[-1]) if steps else None

    def wait(self) -> None:
        """Nothing is pending here (a :class:`~blip_recipes.checkpoint.CheckpointManager` waits
        for its async save before reading the folder)."""

    def verify(self, path: Union[str, Path]) -> CheckpointReport:
        """Verify one checkpoint (collective): files are hashed by all ranks, rank 0 compares
        them with the manifest and every rank gets its report."""
        if no_dist():
            return verify_checkpoint(path)
        check: dict[str, _Verification] = {}

        def plan() -> list[str]:
            check["v"] = _Verification(path)
            return check["v"].names

        names = self._coord.rank0(plan)
        sums = self._coord.checksums(Path(path), names)
        return self._coord.rank0(lambda: check["v"].finish(sums))

    def _select_intact(
        self, skip: Collection[Path] = ()
    ) -> tuple[Optional[Path], list[CheckpointReport]]:
        """Newest usable checkpoint and the reports of the damaged newer ones (collective);
        ``skip``: folders already found unreadable."""
        candidates = self._coord.rank0(
            lambda: [p for _, p in reversed(self._step_dirs())
                     if (is_complete(p) or (p / MANIFEST_FILE).is_file())  # finished once
                     and p not in skip]
        )  # fmt: skip
        damaged: list[CheckpointReport] = []
        for path in candidates:
            report = self.verify(path)
            if report.usable:
                return path, damaged
            damaged.append(report)
        return None, damaged

    @staticmethod
    def _quarantine(path: Path) -> Path:
        """Rename a damaged checkpoint to ``corrupt-step-N`` (kept for inspection; no longer
        named like a checkpoint, so the step can be saved again)."""
        target = path.with_name(f"corrupt-{path.name}")
        n = 1
        while target.exists():
            target = path.with_name(f"corrupt-{path.name}-{n}")
            n += 1
        path.rename(target)
        logger.warning("moved damaged checkpoint %s to %s", path, target.name)
        return target

    def latest_intact(
        self, quarantine: bool = False, skip: Collection[Path] = ()
    ) -> Optional[Path]:
        """The newest checkpoint that verifies (collective): what ``resume = "auto"`` uses.

        Newest first, each complete checkpoint is checked against its ``checksums.json``; a
        damaged one is reported with a warning naming the file and what is wrong, and the next
        older one is tried. A checkpoint without a manifest (older code) is used after a
        structural check, with a log line that it cannot be verified. With ``quarantine`` the
        damaged checkpoints newer than the one chosen are renamed ``corrupt-step-N``. ``skip``:
        folders not to consider (found unreadable by :meth:`load_readable`).

        Returns:
            The chosen folder, or None when there is no complete checkpoint at all.

        Raises:
            CheckpointCorruptError: checkpoints exist but none is usable.
        """
        self.wait()
        chosen, damaged = self._select_intact(skip)
        if rank() == 0:
            for report in damaged:
                logger.warning(
                    "checkpoint %s is damaged, not resuming from it: %s",
                    report.path,
                    "; ".join(report.problems),
                )
        if chosen is None and damaged:
            lines = [f"no intact checkpoint to resume from in {self.folder}:"]
            lines += [f"  {r.path.name}: {'; '.join(r.problems)}" for r in damaged]
            lines.append(
                "  (`blip checkpoint verify` lists them; move them away or choose another "
                "job.output_dir to start fresh)"
            )
            raise CheckpointCorruptError("\n".join(lines))
        if chosen is not None and rank() == 0:
            if damaged:
                logger.warning(
                    "falling back to the older checkpoint %s (newer damaged: %s)",
                    chosen,
                    ", ".join(r.path.name for r in damaged),
                )
            if not (chosen / MANIFEST_FILE).is_file():
                logger.warning(
                    "checkpoint %s has no %s and cannot be verified (written before checksums "
                    "existed, or the save stopped before them); its files are all present",
                    chosen,
                    MANIFEST_FILE,
                )
        if chosen is not None and damaged and quarantine:
            self._coord.rank0(lambda: [self._quarantine(r.path) for r in damaged])
        return chosen

    def check_intact(self, path: Union[str, Path]) -> CheckpointReport:
        """Verify one checkpoint (collective) and raise :class:`CheckpointCorruptError` naming
        what is wrong unless it is usable (what an explicit ``resume`` path goes through)."""
        report = self.verify(path)
        if not report.usable:
            raise CheckpointCorruptError(f"checkpoint {path} is damaged: {report.summary()}")
        if report.status == "unverified" and rank() == 0:
            logger.warning("checkpoint %s cannot be verified: no %s", path, MANIFEST_FILE)
        return report

    def load(
        self, path: Union[str, Path], states: Mapping[str, StateLike], strict: bool = True
    ) -> None:
        """Load ``states`` from ``path`` in place (see :func:`load_states`; collective).

        When some rank fails, every rank raises: the failing ranks their own error, the others
        a :class:`CheckpointCorruptError` when every failure was one (the checkpoint cannot be
        read), else a RuntimeError naming the ranks, so all ranks take the same next step.
        """
        self.wait()
        error: Optional[Exception] = None
        try:
            load_states(path, states, strict=strict)
        except Exception as e:
            error = e
        failed = self._coord.any_rank(error is not None)
        if not failed:
            return
        other = self._coord.any_rank(
            error is not None and not isinstance(error, CheckpointCorruptError)
        )
        if error is not None:
            raise error
        ranks = ", ".join(map(str, failed))
        if other:
            raise RuntimeError(f"loading checkpoint {path} failed on rank(s) {ranks}")
        raise CheckpointCorruptError(f"checkpoint {path} could not be read on rank(s) {ranks}")

    def load_readable(
        self, path: Path, states: Mapping[str, StateLike], quarantine: bool = False
    ) -> Path:
        """Load ``path`` (what :meth:`latest_intact` chose) into ``states``, falling back to
        older checkpoints while one cannot be read (collective); returns the one loaded.

        Checksums cannot catch everything: a checkpoint without a manifest passes with a
        structural check, and a verified one may still hold a value that is refused
        (:class:`~blip_recipes.checkpoint.safe_read.UnsafeCheckpointError`). Such a checkpoint
        is treated like a damaged one: one warning naming it and why, then the next older
        intact checkpoint (``quarantine``: the unreadable ones are renamed ``corrupt-step-N``
        once one loads). A mismatch (another model or config) is not damage and is raised.

        Raises:
            CheckpointCorruptError: no checkpoint in the folder can be read.
        """
        unreadable: list[tuple[Path, str]] = []
        current: Optional[Path] = path
        while current is not None:
            try:
                self.load(current, states)
                break
            except CheckpointCorruptError as e:
                why = str(e).splitlines()[0]
                unreadable.append((current, why))
                if rank() == 0:
                    logger.warning("%s; not resuming from %s", why, current.name)
            current = self.latest_intact(quarantine, skip=[p for p, _ in unreadable])
        if current is None:
            lines = [f"no readable checkpoint to resume from in {self.folder}:"]
            lines += [f"  {p.name}: {why}" for p, why in unreadable]
            raise CheckpointCorruptError("\n".join(lines))
        if unreadable:
            if rank() == 0:
                logger.warning("resuming from the older checkpoint %s (newer unreadable: %s)",
                               current, ", ".join(p.name for p, _ in unreadable))  # fmt: skip
            if quarantine:
                self._coord.rank0(lambda: [self._quarantine(p) for p, _ in unreadable])
        return current


__all__ = ["CheckpointFolder"]
