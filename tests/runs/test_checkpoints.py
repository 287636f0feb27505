"""RunCheckpoints.load: the LR scheduler's step count must be the training state's."""

from __future__ import annotations

import pytest
import torch

from blip_recipes.checkpoint import LR_SCHEDULER, TRAIN_STATE, CheckpointCorruptError, TrainState
from blip_recipes.config import Config
from blip_recipes.runs.checkpoints import RunCheckpoints
from blip_recipes.training.optim import EpochCosineLR


def _states(scheduler_steps: int, train_steps: int) -> dict:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = EpochCosineLR(optimizer, 0.1, 0.0, steps_per_epoch=2, epochs=3)
    for _ in range(scheduler_steps):
        optimizer.step()
        scheduler.step()
    return {LR_SCHEDULER: scheduler, TRAIN_STATE: TrainState(step=train_steps)}


def test_resume_needs_one_step_count(tmp_path):
    cfg = Config()
    cfg.checkpoint.async_save = False
    checkpoints = RunCheckpoints(tmp_path, cfg)
    try:
        checkpoints.save(3, _states(3, 3))
        checkpoints.save(4, _states(3, 4))  # scheduler one step behind
        fresh = _states(0, 0)
        assert checkpoints.load(tmp_path / "checkpoints" / "step-3", fresh).name == "step-3"
        assert fresh[TRAIN_STATE].step == fresh[LR_SCHEDULER].last_epoch == 3
        with pytest.raises(CheckpointCorruptError) as err:
            checkpoints.load(tmp_path / "checkpoints" / "step-4", _states(0, 0))
        assert str(err.value) == (
            f"{tmp_path / 'checkpoints' / 'step-4'}: lr_scheduler has taken 3 steps but "
            "train_state.step is 4; they must agree to resume"
        )
    finally:
        checkpoints.close()
