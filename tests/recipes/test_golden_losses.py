"""Golden losses: the tiny model's first 20 fp32 CPU losses through the real CLI.

A change that moves these numbers changes the training math (model, objective, data order,
initialisation or the optimizer) and must say why in its commit; then replace the list with the
new run's losses (`metrics.jsonl` of the same command).
"""

from __future__ import annotations

import pytest

from tests.recipes.launch import run_recipe

GOLDEN = [
    9.951828, 11.124987, 9.184719, 9.292061, 9.353731, 9.143203, 9.328325, 9.238311, 8.84831,
    8.866079, 8.727397, 8.515318, 8.522741, 8.390377, 8.221157, 8.122295, 7.948081, 8.139113,
    7.941824, 8.000755,
]  # fmt: skip


def test_first_twenty_losses_are_golden(tmp_path):
    run = run_recipe(tmp_path / "run", "training.steps=20", "checkpoint.interval=1000")
    assert run.proc.returncode == 0, run.proc.stderr[-4000:]
    losses = [loss for _, loss in sorted(run.losses().items())]
    assert losses == pytest.approx(GOLDEN, rel=1e-4)
