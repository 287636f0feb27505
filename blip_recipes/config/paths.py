"""Folders and files the config names that need no other package to check: the output folder
can be created and written, and the evaluation set's files exist.

The output folder is checked before launch because a run would otherwise fail only at its first
write; whether its file system has room for one checkpoint is checked beside the model's size
estimate (:mod:`blip_recipes.training.config_checks`), from :func:`writable_output_base`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from blip_recipes.config.checks import LaunchContext, register_validator
from blip_recipes.config.sections import Config


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _not_writable(folder: Path) -> str | None:
    """Why ``folder`` cannot take new files, or None. ``os.access`` first, then a real probe: an
    unnamed temporary file (``O_TMPFILE``, nothing visible is left), which also catches
    read-only mounts, NFS root squashing and pseudo file systems that ``os.access`` misses."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return "is not writable"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return f"refuses new files ({e.strerror or e})"
    return None


def _output_dir_problems(cfg: Config) -> Iterable[str]:
    out = Path(cfg.job.output_dir)
    if out.exists() and not out.is_dir():
        yield f"'job.output_dir' {out} exists and is not a folder: choose a folder path"
        return
    base = _nearest_existing(out)
    if not base.is_dir():
        yield f"'job.output_dir' {out} cannot be created: {base} is a file, not a folder"
        return
    targets = [base] + [p for p in (out, out / "checkpoints") if p.is_dir() and p != base]
    for target in targets:
        problem = _not_writable(target)
        if problem:
            created = "" if out.exists() else " (the folder would be created there)"
            yield (
                f"'job.output_dir' {out} cannot be written: {target} {problem} for this user "
                f"(uid {os.getuid()}){created}; choose a writable folder or fix its permissions"
            )
            return


def writable_output_base(cfg: Config) -> Path | None:
    """The existing folder that is (or will hold) ``job.output_dir`` when the run can write
    there; None when it cannot (:func:`_output_dir` says why)."""
    if next(iter(_output_dir_problems(cfg)), None) is not None:
        return None
    return _nearest_existing(Path(cfg.job.output_dir))


@register_validator
def _output_dir(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    """``job.output_dir`` can be created and written."""
    yield from _output_dir_problems(cfg)


@register_validator
def _evaluation_files(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    """The held-out set of periodic or checkpoint evaluation exists."""
    ev = cfg.eval
    if ev.annotation and (ev.every_steps > 0 or ev.checkpoint):
        if not Path(ev.annotation).is_file():
            yield f"'eval.annotation' {ev.annotation} does not exist (or is not a file)"
        if ev.image_root and not Path(ev.image_root).is_dir():
            yield f"'eval.image_root' {ev.image_root} is not a folder (it does not exist)"


__all__ = ["writable_output_base"]
