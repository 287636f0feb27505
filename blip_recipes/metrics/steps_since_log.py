"""The steps since the last log step, summed on the device, and the metrics record they make.

The training loop adds every step's outputs without a host sync; at a log step it reads the
sums once and turns them into one ``metrics.jsonl`` record::

    since_log = StepsSinceLog(device, ("loss", "loss_ita", ...))
    since_log.add(result)                                  # every step: device tensors only
    record = since_log.record(result, lr=..., ...)         # at a log step: one host sync
    since_log = StepsSinceLog(device, keys)                # the next window
"""

from __future__ import annotations

import time
from typing import Any

import torch

from blip_recipes.metrics.mfu import effective_mfu, max_memory_gib, peak_flops

PRETRAIN_KEYS = ("loss", "loss_ita", "loss_itm", "loss_lm", "itm_acc", "itm_pos_prob",
                 "itm_neg_prob")  # fmt: skip
"""The pretraining step's outputs averaged into each record."""


class StepsSinceLog:
    """Device-side sums of the step outputs ``keys`` since the last log step (no host sync
    until read), with the wall time, the number of steps and the time spent waiting for data.

    A step result is anything with ``output`` (an object with the ``keys`` as 0-d tensors),
    ``ok`` (0-d bool: the update was applied) and ``grad_norm`` (0-d tensor); skipped steps
    (``ok`` False) are counted but not summed.
    """

    def __init__(self, device: torch.device, keys: tuple[str, ...] = PRETRAIN_KEYS) -> None:
        self.keys = keys
        self.device = device
        self.start = time.perf_counter()
        self.steps = 0
        self.data_wait = 0.0
        """Seconds the loop waited for the loader in these steps (the recipe adds them)."""
        self.sums = torch.zeros(len(keys), device=device)
        self.applied = torch.zeros((), device=device)

    def add(self, result: Any) -> None:
        """Add one step's outputs (device ops only)."""
        values = torch.stack([getattr(result.output, k).detach().float() for k in self.keys])
        self.sums += torch.where(result.ok, values, torch.zeros_like(values))
        self.applied += result.ok
        self.steps += 1

    def means(self) -> dict[str, float]:
        """Means over the applied steps; NaN when every step of the window was skipped."""
        if int(self.applied) == 0:
            return dict.fromkeys(self.keys, float("nan"))
        return dict(zip(self.keys, (self.sums / self.applied).tolist()))

    def skipped(self) -> int:
        """Steps of the window whose update was skipped (non-finite loss or gradient norm)."""
        return self.steps - int(self.applied)

    def record(
        self,
        result: Any,
        *,
        lr: float,
        samples_per_step: int,
        world_size: int,
        flops_per_sample: float | None,
        bad_samples: int,
        nonfinite_before: int,
        epoch: int,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The metrics record of these steps (the host sync point of the loop).

        Args:
            result: the last step's result (its gradient norm is logged).
            lr: the learning rate of the first parameter group now.
            samples_per_step: samples per optimizer step over all ranks.
            world_size: ranks (MFU is per device).
            flops_per_sample: FLOPs of one training sample (None: MFU logged as null).
            bad_samples: this rank's loader's bad samples so far.
            nonfinite_before: skipped steps before this window (the record counts the run's).
            epoch: 0-based epoch of the step.
            extra: recipe fields logged after ``lr`` (pretraining: alpha, temperature).

        Returns:
            The means of ``keys``, then lr, ``extra``, grad_norm, samples_per_sec, mfu,
            max_memory_gib, data_wait_frac, bad_samples, nonfinite_steps, epoch.
        """
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        record: dict[str, Any] = self.means()
        nonfinite_steps = nonfinite_before + self.skipped()
        elapsed = time.perf_counter() - self.start
        samples_per_sec = samples_per_step * self.steps / elapsed
        record.update(
            lr=lr,
            **(extra or {}),
            grad_norm=result.grad_norm.item(),
            samples_per_sec=samples_per_sec,
            mfu=effective_mfu(
                samples_per_sec / world_size, flops_per_sample, peak_flops(self.device)
            ),  # fmt: skip
            max_memory_gib=max_memory_gib(self.device),
            data_wait_frac=self.data_wait / elapsed,
            bad_samples=bad_samples,
            nonfinite_steps=nonfinite_steps,
            epoch=epoch,
        )
        return record
