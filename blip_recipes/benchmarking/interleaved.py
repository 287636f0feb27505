"""Two (or more) step functions timed in alternating rounds in one process, with what each step
cost the process: wall time, CPU time, system time, page faults and involuntary context switches.

On a shared host the wall time of a CPU step mostly measures the other jobs (a step waits for a
core; ``involuntary_switches`` counts how often it was preempted), so the CPU time of the process
(user + system) is the steadier figure, and the system time with the minor page faults is what
fresh memory costs (the kernel zeroes every new page). Rounds alternate the order (A B, B A,
...), and each round's ratio is taken within the round, so drift of the host cancels.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class StepCost:
    """What one call cost this process (seconds, counts)."""

    wall_s: float
    cpu_s: float
    system_s: float
    minor_faults: int
    involuntary_switches: int

    @classmethod
    def of(cls, fn: Callable[[], Any]) -> tuple[StepCost, Any]:
        """Run ``fn()`` once; its cost and its result."""
        before, cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), (
            time.perf_counter())  # fmt: skip
        result = fn()
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        after = resource.getrusage(resource.RUSAGE_SELF)
        return cls(
            wall_s=wall,
            cpu_s=cpu,
            system_s=after.ru_stime - before.ru_stime,
            minor_faults=after.ru_minflt - before.ru_minflt,
            involuntary_switches=after.ru_nivcsw - before.ru_nivcsw,
        ), result


FIELDS = ("wall_s", "cpu_s", "system_s", "minor_faults", "involuntary_switches")


def _median(costs: Sequence[StepCost], name: str) -> float:
    return statistics.median(getattr(c, name) for c in costs)


def interleave(
    steps: dict[str, Callable[[], Any]],
    rounds: int,
    warmup: int,
    timed: int,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Time every function of ``steps`` in ``rounds`` rounds, the order reversed every round.

    Args:
        steps: name -> a function running one step (the first name is the yardstick of the
            ratios, e.g. the original code).
        rounds: rounds; each runs every function ``warmup`` + ``timed`` times in a row.
        warmup: untimed calls per function and round (page-in, allocator warm-up).
        timed: timed calls per function and round.
        log: called with one line per timed call.

    Returns:
        ``{"per_step": {name: [StepCost as dict, ...]}, "median": {name: {field: median}},
        "ratio_rounds": {name: [first's median / name's median, per round]} (wall and CPU),
        "ratio": {name: {"wall_s": median of the round ratios, "cpu_s": ...}}}``; a ratio above
        1 means ``name`` is faster than the first function.
    """
    if rounds < 1 or timed < 1 or warmup < 0:
        raise ValueError(f"rounds and timed must be >= 1, warmup >= 0; got {rounds}, {timed}, "
                         f"{warmup}")  # fmt: skip
    names = list(steps)
    per_step: dict[str, list[StepCost]] = {n: [] for n in names}
    round_medians: list[dict[str, dict[str, float]]] = []
    for index in range(rounds):
        order = names if index % 2 == 0 else names[::-1]
        this_round: dict[str, dict[str, float]] = {}
        for name in order:
            costs = []
            for call in range(warmup + timed):
                cost, _ = StepCost.of(steps[name])
                if call >= warmup:
                    costs.append(cost)
                    log(f"round {index + 1}/{rounds} {name}: " + ", ".join(
                        f"{f} {getattr(cost, f):.3f}" if f.endswith("_s") else
                        f"{f} {getattr(cost, f)}" for f in FIELDS))  # fmt: skip
            per_step[name] += costs
            this_round[name] = {f: _median(costs, f) for f in ("wall_s", "cpu_s")}
        round_medians.append(this_round)
    first = names[0]
    ratio_rounds = {
        n: {f: [r[first][f] / r[n][f] for r in round_medians] for f in ("wall_s", "cpu_s")}
        for n in names
    }
    return {
        "per_step": {n: [asdict(c) for c in per_step[n]] for n in names},
        "median": {n: {f: _median(per_step[n], f) for f in FIELDS} for n in names},
        "ratio_rounds": ratio_rounds,
        "ratio": {
            n: {f: statistics.median(v) for f, v in r.items()} for n, r in ratio_rounds.items()
        },  # fmt: skip
    }


__all__ = ["FIELDS", "StepCost", "interleave"]
