"""What a checkpoint holds (state-dict keys and shapes of the model, the momentum state, the
train state and the LR scheduler) is what checkpoints written before held: old runs resume."""

from __future__ import annotations

import hashlib
import json

import torch

from blip_recipes.checkpoint import TrainState
from blip_recipes.config.sections import LRSchedulerConfig
from blip_recipes.training.optim import build_lr_scheduler
from tests.models.tiny_blip import make_model, momentum_state

LAYOUT_SHA256 = "a2a8f7e17e1cab0b5f954732feb0bb6ad6765af41aacea0b73f28fe9f9edb5ae"
"""Digest of the layout below as checkpoints of earlier versions wrote it (tiny model, Q = 8)."""


def _flat(state: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = (
                tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            )
    return out


def test_checkpointed_state_keys_and_shapes_are_unchanged():
    model = make_model()
    momentum = momentum_state(queue_size=8)
    optimizer = torch.optim.AdamW(model.parameters())
    schedule = build_lr_scheduler(optimizer, LRSchedulerConfig(), 1e-4, 10, 100)
    layout = {
        "model": _flat(model.state_dict()),
        "momentum": _flat(momentum.state_dict()),
        "train_state": sorted(TrainState().state_dict()),
        "lr_scheduler": _flat(schedule.state_dict()),
    }
    assert len(layout["model"]) == 118 and len(layout["momentum"]) == 73
    assert layout["train_state"] == ["epoch", "rng", "samples_seen", "step"]
    text = json.dumps(layout, sort_keys=True, default=list)
    assert hashlib.sha256(text.encode()).hexdigest() == LAYOUT_SHA256
