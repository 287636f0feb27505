"""Rank-0 metrics: the record of a step, handed to the back ends (``metrics.jsonl``, TensorBoard,
W&B), and a console progress line."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

from blip_recipes.metrics.backends import JsonlBackend, MetricsBackend, TensorBoardBackend
from blip_recipes.metrics.mfu import effective_mfu, max_memory_gib, peak_flops

Number = Union[int, float, None]


def _plain(value: Any) -> Any:
    """JSON-safe scalar: tensors to Python numbers, non-finite floats to None (strict JSON)."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_duration(seconds: float) -> str:
    """``1:02:03`` / ``2:03``, for the ETA."""
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def backup_path(path: Path) -> Path:
    """``<path>.K`` with the first free K >= 1 (a higher K is a newer backup)."""
    k = 1
    while path.with_name(f"{path.name}.{k}").exists():
        k += 1
    return path.with_name(f"{path.name}.{k}")


def _has_files(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_file() for p in folder.rglob("*"))


def prepare_jsonl(
    path: Path, resume_step: Optional[int], unique_steps: bool = True
) -> Optional[Path]:
    """Make ``path`` (records with a ``step``) ready to be appended to by a run that starts at
    ``resume_step`` (None: a fresh start); see :class:`MetricsLogger`. ``unique_steps=False``
    keeps every record up to ``resume_step`` (files with several records per step).

    Returns:
        The backup holding the file as it was, when anything had to be left out of it, else None.
    """
    if not path.exists():
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    if resume_step is None:
        if not text.strip():
            return None
        backup = backup_path(path)
        path.rename(backup)
        return backup
    by_step: dict[int, list[str]] = {}
    for line in text.splitlines():
        try:
            step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            continue  # a line cut short by a crash
        if isinstance(step, int) and step <= resume_step:
            if unique_steps:
                by_step[step] = [line]  # a repeated step: the newest record wins
            else:
                by_step.setdefault(step, []).append(line)
    kept = "".join(line + "\n" for _, lines in sorted(by_step.items()) for line in lines)
    if kept == text:
        return None
    backup = backup_path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(kept, encoding="utf-8")
    os.replace(path, backup)
    os.replace(tmp, path)
    return backup


def _now() -> float:
    """UNIX time in seconds, rounded to milliseconds (the ``time`` of every record)."""
    return round(time.time(), 3)


class MetricsLogger:
    """Builds one record per logged step and hands it to the metrics back ends; a no-op on ranks
    other than 0.

    Back ends (:mod:`blip_recipes.metrics.backends`), all behind one interface:

    - ``<output_dir>/metrics.jsonl`` (always): one JSON object per call, ``step`` and ``time``
      (UNIX seconds) first, non-finite values as ``null``. ``eval.jsonl`` (:meth:`log_eval`)
      follows the same rules.
    - ``<output_dir>/tensorboard`` (``tensorboard=True``): every numeric value as a scalar tagged
      ``train/<name>``, evaluation results as ``eval/<name>``, caption image grids and the
      hparams table.
    - any further back end passed in ``backends`` (e.g. :class:`WandbBackend`).
    - the console: one line with the step, chosen fields and the ETA.

    What happens to records of an earlier run in the same folder, so that each step appears
    once and nothing is silently deleted:

    - **Resume** (``resume_step=N``): the file is continued. Records after step N (the
      interrupted run got past its last checkpoint; those steps run again), lines cut short by
      a crash and repeated steps (the newest record of a step wins) are dropped. When anything
      is dropped, the file as it was is first kept as ``metrics.jsonl.K`` (K = 1, 2, ...: the
      first free number, so a higher K is newer). TensorBoard hides its events after step N
      (``purge_step``).
    - **Fresh start** (``resume_step=None``) in a folder whose ``metrics.jsonl`` has records
      (a run that died before its first checkpoint): the old file is renamed to
      ``metrics.jsonl.K`` and a new one is started; an old ``tensorboard`` folder is renamed to
      ``tensorboard.K`` the same way.

    Values may be 0-d tensors: converting them syncs with the device, which is why the recipe
    calls :meth:`log` only every ``metrics.log_every`` steps.

    Each record also gets ``mfu`` (effective, per device, from the record's *global*
    ``samples_per_sec`` / world size and the ``flops_per_sample`` given to :meth:`log`; null on
    CPU, on unknown GPUs and for models without a tabulated FLOP count) and ``max_memory_gib``
    (rank 0's peak), unless the caller already put them in.

    Args:
        output_dir: the run's output folder.
        rank: global rank; only rank 0 writes.
        tensorboard: also write TensorBoard events.
        total_steps: steps of the whole run, for the ETA (None: no ETA).
        resume_step: the step a resumed run starts from; None for a fresh start (see above).
        print_fn: where console lines go.
        device: device for peak FLOPs and memory; None: the current CUDA device, else CPU.
        world_size: ranks sharing ``samples_per_sec``; None: from the process group (or 1).
        backends: further back ends (rank 0's; closed by :meth:`close`).
    """

    CONSOLE_FIELDS = (
        "loss",
        "loss_ita",
        "loss_itm",
        "loss_lm",
        "itm_acc",
        "acc",
        "lr",
        "samples_per_sec",
        "mfu",
        "max_memory_gib",
        "data_wait_frac",
    )

    def __init__(
        self,
        output_dir: Union[str, Path],
        rank: int = 0,
        tensorboard: bool = True,
        total_steps: Optional[int] = None,
        resume_step: Optional[int] = None,
        print_fn: Callable[[str], None] = print,
        device: Optional[torch.device] = None,
        world_size: Optional[int] = None,
        backends: Sequence[MetricsBackend] = (),
    ) -> None:
        self.enabled = rank == 0
        if device is None:
            cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
            device = (
                torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
            )
        if world_size is None:
            world_size = (
                dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            )
        self.device = device
        self.world_size = world_size
        self.total_steps = total_steps
        self.print_fn = print_fn
        self.backends: list[MetricsBackend] = []
        self._t0: Optional[float] = None
        self._step0: Optional[int] = None
        self.last_record: Optional[dict[str, Any]] = None
        self.first_record: Optional[dict[str, Any]] = None
        """The first logged record of this process (the run summary compares it with the last)."""
        """The newest training record (rank 0), for the end-of-run summary."""
        self.eval_records: list[dict[str, Any]] = []
        """Evaluation records logged by this process (rank 0)."""
        self.backups: list[Path] = []
        """Backups made of an earlier run's files (see above)."""
        if not self.enabled:
            return
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.output_dir / "metrics.jsonl"
        self.eval_path = self.output_dir / "eval.jsonl"
        for path in (self.jsonl_path, self.eval_path):
            backup = prepare_jsonl(path, resume_step)
            if backup is not None:
                self.backups.append(backup)
        self.backends.append(JsonlBackend(self.output_dir))
        if tensorboard:
            tb_dir = self.output_dir / "tensorboard"
            if resume_step is None and _has_files(tb_dir):
                backup = backup_path(tb_dir)
                tb_dir.rename(backup)
                self.backups.append(backup)
            purge = resume_step + 1 if resume_step is not None else None
            self.backends.append(TensorBoardBackend(tb_dir, purge_step=purge))
        self.backends.extend(backends)
        for backup in self.backups:
            print_fn(f"metrics: kept the previous run's records as {backup}")

    @property
    def _writer(self) -> Any:
        """The TensorBoard ``SummaryWriter`` (None without TensorBoard or after close)."""
        for b in self.backends:
            if isinstance(b, TensorBoardBackend):
                return b._writer
        return None

    def log(
        self,
        step: int,
        metrics: Mapping[str, Any],
        flops_per_sample: Optional[float] = None,
        total_steps: Optional[int] = None,
    ) -> Optional[dict[str, Any]]:
        """Record ``metrics`` for ``step`` (the number of completed optimizer steps).

        Args:
            step: completed optimizer steps.
            metrics: name -> number, 0-d tensor or None.
            flops_per_sample: fixed model FLOPs per sample for the effective MFU (None: null).
            total_steps: updates the run length used for the ETA.

        Returns the record written (rank 0) or None.
        """
        if not self.enabled:
            return None
        if total_steps is not None:
            self.total_steps = total_steps
        now = time.perf_counter()
        record: dict[str, Any] = {"step": step, "time": _now()}
        record.update({k: _plain(v) for k, v in metrics.items()})
        if "mfu" not in record:
            sps = record.get("samples_per_sec")
            per_device = sps / self.world_size if isinstance(sps, (int, float)) else None
            record["mfu"] = (
                effective_mfu(per_device, flops_per_sample, peak_flops(self.device))
                if per_device is not None
                else None
            )
        if "max_memory_gib" not in record:
            record["max_memory_gib"] = max_memory_gib(self.device)
        for backend in self.backends:
            backend.log_scalars(step, record, "train")
        if self.first_record is None:
            self.first_record = record
        self.last_record = record
        self.print_fn(self._console_line(step, record, now))
        return record

    def _eta(self, step: int, now: float) -> Optional[float]:
        if self._t0 is None or self._step0 is None:
            self._t0, self._step0 = now, step
            return None
        if self.total_steps is None or step <= self._step0:
            return None
        per_step = (now - self._t0) / (step - self._step0)
        return per_step * max(self.total_steps - step, 0)

    def _console_line(self, step: int, record: Mapping[str, Any], now: float) -> str:
        total = f"/{self.total_steps}" if self.total_steps else ""
        parts = [f"step {step}{total}"]
        for k in self.CONSOLE_FIELDS:
            v = record.get(k)
            if v is None:
                continue
            if k == "lr":
                parts.append(f"lr {v:.3e}")
            elif k == "mfu":
                parts.append(f"mfu {100 * v:.1f}%")
            elif k == "samples_per_sec":
                parts.append(f"{v:.1f} samples/s")
            elif k == "max_memory_gib":
                parts.append(f"mem {v:.2f} GiB")
            elif k == "data_wait_frac":
                parts.append(f"data wait {100 * v:.0f}%")
            elif k.startswith("loss_"):
                parts.append(f"{k[5:]} {v:.3f}")
            elif k in ("itm_acc", "acc"):
                parts.append(f"{k.replace('_', ' ')} {100 * v:.0f}%")
            else:
                parts.append(f"{k} {v:.4f}")
        eta = self._eta(step, now)
        if eta is not None:
            parts.append(f"eta {format_duration(eta)}")
        return " | ".join(parts)

    def log_eval(self, step: int, values: Mapping[str, float]) -> None:
        """Evaluation results: one JSON line in ``eval.jsonl``, TensorBoard ``eval/<name>``
        scalars and a console line (rank 0 only); kept apart from the training records."""
        if not self.enabled:
            return
        record = {"step": step, "time": _now(), **{k: _plain(v) for k, v in values.items()}}
        for backend in self.backends:
            backend.log_scalars(step, record, "eval")
        self.eval_records.append(record)
        headline = [f"{k} {float(v):.2f}" for k, v in values.items()
                    if k.endswith(("r_mean", "_acc", "accuracy"))]  # fmt: skip
        # other evaluations (captioning's BLEU / CIDEr) show all their values
        shown = " | ".join(headline or [f"{k} {float(v):.4g}" for k, v in values.items()])
        self.print_fn(f"eval at step {step} | {shown}")

    def log_text(self, tag: str, text: str, step: int) -> None:
        """A text entry in TensorBoard / W&B (e.g. sample captions); rank 0 only."""
        if self.enabled:
            for backend in self.backends:
                backend.log_text(step, tag, text)

    def log_images(
        self, step: int, tag: str, images: Sequence[Any], captions: Sequence[str]
    ) -> None:
        """Images with their captions (TensorBoard: one grid with the captions drawn in, plus
        the captions as text; W&B: captioned images); rank 0 only."""
        if self.enabled:
            for backend in self.backends:
                backend.log_images(step, tag, images, captions)

    def log_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, Any]) -> None:
        """The run's settings (flat ``section.key`` -> scalar) with its final metrics
        (TensorBoard HPARAMS tab, W&B config and summary); rank 0 only."""
        if self.enabled:
            plain = {k: _plain(v) for k, v in metrics.items()}
            for backend in self.backends:
                backend.log_hparams(hparams, plain)

    def close(self) -> None:
        """Flush and close every back end (safe to call twice)."""
        backends, self.backends = self.backends, []
        for backend in backends:
            backend.close()
