"""Alternating rounds: the order reverses every round, warm-up calls are not timed, each round's
ratio is taken within the round."""

from __future__ import annotations

import pytest

from blip_recipes.benchmarking.interleaved import FIELDS, StepCost, interleave


def test_rounds_alternate_and_ratios_are_per_round():
    calls: list[str] = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    out = interleave(steps, rounds=3, warmup=1, timed=2)
    assert calls == ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3 + ["a"] * 3 + ["b"] * 3
    assert {n: len(v) for n, v in out["per_step"].items()} == {"a": 6, "b": 6}
    assert set(out["per_step"]["a"][0]) == set(FIELDS) == set(out["median"]["b"])
    assert len(out["ratio_rounds"]["b"]["cpu_s"]) == 3
    assert out["ratio"]["a"] == {"wall_s": 1.0, "cpu_s": 1.0}


def test_step_cost_counts_fresh_pages():
    cost, result = StepCost.of(lambda: bytearray(64 * 2**20)[::4096].count(0))
    assert result == 16384 and cost.wall_s > 0 and cost.minor_faults > 1000


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="rounds"):
        interleave({"a": lambda: None}, rounds=0, warmup=0, timed=1)
