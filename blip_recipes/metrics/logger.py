"""Rank-0 metrics: TensorBoard scalars, ``metrics.jsonl`` and a console progress line."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

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


class MetricsLogger:
    """Writes one record per logged step; a no-op on ranks other than 0.

    - ``<output_dir>/metrics.jsonl``: one JSON object per call, ``step`` first, non-finite
      values as ``null``; appended to, so a resumed run continues the same file (records after
      ``resume_step`` left by the interrupted run are dropped first, so each step appears once).
    - ``<output_dir>/tensorboard``: every numeric value as a scalar tagged ``train/<name>``.
    - the console: one line with the step, chosen fields and the ETA.

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
        resume_step: the step a resumed run starts from (drops later records of a previous run).
        print_fn: where console lines go.
        device: device for peak FLOPs and memory; None: the current CUDA device, else CPU.
        world_size: ranks sharing ``samples_per_sec``; None: from the process group (or 1).
    """

    CONSOLE_FIELDS = (
        "loss",
        "loss_ita",
        "loss_itm",
        "loss_lm",
        "itm_acc",
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
        self._writer = None
        self._file = None
        self._t0: Optional[float] = None
        self._step0: Optional[int] = None
        if not self.enabled:
            return
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.output_dir / "metrics.jsonl"
        if resume_step is not None and self.jsonl_path.exists():
            self._truncate_after(resume_step)
        self._file = self.jsonl_path.open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        kept = []
        for line in self.jsonl_path.read_text().splitlines():
            try:
                if json.loads(line).get("step", -1) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the crash
        self.jsonl_path.write_text("".join(k + "\n" for k in kept))

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
        record: dict[str, Any] = {"step": step}
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
        assert self._file is not None
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._writer.add_scalar(f"train/{k}", v, step)
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
            elif k == "itm_acc":
                parts.append(f"itm acc {100 * v:.0f}%")
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
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with (self.output_dir / "eval.jsonl").open("a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        if self._writer is not None:
            for k, v in values.items():
                self._writer.add_scalar(f"eval/{k}", float(v), step)
        shown = " | ".join(f"{k} {float(v):.2f}" for k, v in values.items() if k.endswith("r_mean"))
        self.print_fn(f"eval at step {step} | {shown}")

    def log_text(self, tag: str, text: str, step: int) -> None:
        """A text entry in TensorBoard (e.g. sample captions); rank 0 only."""
        if self.enabled and self._writer is not None:
            self._writer.add_text(tag, text, step)

    def close(self) -> None:
        """Flush and close the files (safe to call twice)."""
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
        if self._file is not None:
            self._file.close()
            self._file = None
