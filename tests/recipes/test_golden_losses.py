"""Golden losses: the tiny model's first 20 fp32 CPU losses through the real CLI.

A change that moves these numbers changes the training math (model, objective, data order,
initialisation or the optimizer) and must say why in its commit; then replace the list with the
new run's losses (`metrics.jsonl` of the same command).
"""

from __future__ import annotations

import pytest

from tests.recipes.launch import run_recipe

GOLDEN = [
    9.892458, 10.94814, 9.24662, 9.040787, 9.185918, 9.372423, 9.472448, 9.147429, 8.67873,
    8.844907, 8.83915, 8.598917, 8.44068, 8.235396, 8.300148, 8.312012, 8.098428, 8.13513,
    7.878519, 7.940394,
]  # fmt: skip


def test_first_twenty_losses_are_golden(tmp_path):
    run = run_recipe(tmp_path / "run", "training.steps=20", "checkpoint.interval=1000")
    assert run.proc.returncode == 0, run.proc.stderr[-4000:]
    losses = [loss for _, loss in sorted(run.losses().items())]
    assert losses == pytest.approx(GOLDEN, rel=1e-4)
