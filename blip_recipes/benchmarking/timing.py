"""Step timers: CUDA events on GPU (no host sync inside the timed loop), perf_counter on CPU.

    timer = StepTimer(device)
    for batch in batches:
        timer.start()
        train_step(batch)
        timer.stop()
    stats = timer.summary(samples_per_step=B)   # syncs once, here

On CUDA each ``start``/``stop`` records an event on the current stream, so a sync-free step stays
sync-free while timed; the elapsed times are read after one ``torch.cuda.synchronize()`` at the end.
Throughput is measured over the whole window (first start to last stop), which also counts any gap
between steps (data loading, Python overhead); per-step times give the mean and spread.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass
class TimingSummary:
    """Timed-window statistics. Times in milliseconds, throughput in samples per second."""

    steps: int
    step_ms_mean: float
    step_ms_std: float
    step_ms_min: float
    step_ms_max: float
    window_s: float
    samples_per_sec: float
    timer: str

    def as_dict(self) -> dict:
        return asdict(self)


class StepTimer:
    """Per-step timer; see the module docstring.

    Args:
        device: where the steps run; CUDA uses events, anything else ``time.perf_counter``.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._starts: list = []
        self._stops: list = []

    @property
    def kind(self) -> str:
        return "cuda_event" if self.cuda else "perf_counter"

    def start(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._starts.append(event)
        else:
            self._starts.append(time.perf_counter())

    def stop(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._stops.append(event)
        else:
            self._stops.append(time.perf_counter())

    def step_times_ms(self) -> list[float]:
        """Per-step durations in ms (synchronises the device once on CUDA)."""
        if len(self._starts) != len(self._stops):
            raise RuntimeError("StepTimer: start() and stop() calls do not pair up")
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self._starts, self._stops)]
        return [(b - a) * 1e3 for a, b in zip(self._starts, self._stops)]

    def window_s(self) -> float:
        """Seconds from the first start to the last stop."""
        if not self._starts:
            return 0.0
        if self.cuda:
            torch.cuda.synchronize()
            return self._starts[0].elapsed_time(self._stops[-1]) / 1e3
        return self._stops[-1] - self._starts[0]

    def summary(self, samples_per_step: int) -> TimingSummary:
        """Statistics over the recorded steps; throughput = samples / window."""
        times = self.step_times_ms()
        if not times:
            raise RuntimeError("StepTimer: no steps were timed")
        window = self.window_s()
        mean = sum(times) / len(times)
        std = math.sqrt(sum((t - mean) ** 2 for t in times) / max(len(times) - 1, 1))
        return TimingSummary(
            steps=len(times),
            step_ms_mean=mean,
            step_ms_std=std if len(times) > 1 else 0.0,
            step_ms_min=min(times),
            step_ms_max=max(times),
            window_s=window,
            samples_per_sec=samples_per_step * len(times) / window if window > 0 else 0.0,
            timer=self.kind,
        )


def reset_peak_memory(device: torch.device) -> None:
    """Reset the CUDA allocator's peak counter (CPU peak RSS cannot be reset: it is per process)."""
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def count_host_syncs(step: Callable[[], Any], device: torch.device) -> dict[str, Any] | None:
    """Run ``step()`` once under ``torch.cuda.set_sync_debug_mode("warn")`` and count the
    synchronising CUDA calls it makes (``.item()``, blocking copies, ``nonzero``...), with the
    Python call sites. None on CPU, where there is nothing to wait for.

    Returns:
        ``{"count": n, "sites": {"file.py:123": k, ...}}``.
    """
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    sites = Counter(f"{os.path.basename(w.filename)}:{w.lineno}" for w in syncs)
    return {"count": len(syncs), "sites": dict(sites.most_common(20))}
