"""MomentumState's optional image-id queue: enqueue, skipped steps, checkpoints with and
without it, and pretraining states unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp

from blip_recipes.checkpoint import load_states
from blip_recipes.training.momentum import UNKNOWN_ID
from tests.models.tiny_blip import TINY, momentum_state

DIM = TINY["embed_dim"]


def test_without_track_ids_nothing_changes():
    state = momentum_state(queue_size=8)
    assert state.id_queue is None
    assert set(state.state_dict()) == {"encoders", "image_queue", "text_queue", "queue_ptr"}
    assert state.optional_keys() == []
    with pytest.raises(ValueError, match="track_ids"):
        state.enqueue(torch.zeros(4, DIM), torch.zeros(4, DIM), ids=torch.arange(4))


def test_ids_enqueue_with_the_features_and_wrap_around():
    state = momentum_state(queue_size=8, track_ids=True)
    assert torch.equal(state.id_queue, torch.full((8,), UNKNOWN_ID))
    with pytest.raises(ValueError, match="ids"):
        state.enqueue(torch.zeros(4, DIM), torch.zeros(4, DIM))
    for step in range(3):
        feats = torch.full((4, DIM), float(step))
        state.enqueue(feats, feats, ids=torch.arange(4) + 10 * step)
    assert state.id_queue.tolist() == [20, 21, 22, 23, 10, 11, 12, 13]
    assert state.image_queue[0].tolist() == [2.0] * 4 + [1.0] * 4


def test_skipped_step_keeps_ids_and_pointer():
    state = momentum_state(queue_size=8, track_ids=True)
    state.enqueue(torch.ones(4, DIM), torch.ones(4, DIM), ids=torch.arange(4))
    before = state.id_queue.clone()
    state.enqueue(torch.ones(4, DIM), torch.ones(4, DIM), valid=torch.tensor(False),
                  ids=torch.arange(4) + 50)  # fmt: skip
    assert torch.equal(state.id_queue, before) and state.queue_ptr.item() == 4
    state.enqueue(torch.ones(4, DIM), torch.ones(4, DIM), valid=torch.tensor(True),
                  ids=torch.arange(4) + 50)  # fmt: skip
    assert state.id_queue.tolist() == [0, 1, 2, 3, 50, 51, 52, 53]


def test_checkpoint_round_trip_with_ids(tmp_path):
    saved = momentum_state(queue_size=8, track_ids=True)
    saved.enqueue(torch.ones(4, DIM), torch.ones(4, DIM), ids=torch.tensor([5, 5, 6, 7]))
    dcp.save({"momentum": saved}, checkpoint_id=str(tmp_path / "ckpt"))
    loaded = momentum_state(queue_size=8, seed=1, track_ids=True)
    load_states(tmp_path / "ckpt", {"momentum": loaded})
    assert torch.equal(loaded.id_queue, saved.id_queue)
    assert torch.equal(loaded.image_queue, saved.image_queue)
    assert loaded.queue_ptr.item() == 4


def test_checkpoint_without_ids_loads_into_an_id_tracking_state(tmp_path):
    """A pretraining checkpoint (no id queue) still loads; queued pairs then carry no id."""
    pretraining = momentum_state(queue_size=8)
    pretraining.enqueue(torch.ones(4, DIM), torch.ones(4, DIM))
    dcp.save({"momentum": pretraining}, checkpoint_id=str(tmp_path / "old"))
    finetuning = momentum_state(queue_size=8, seed=1, track_ids=True)
    load_states(tmp_path / "old", {"momentum": finetuning})
    assert torch.equal(finetuning.image_queue, pretraining.image_queue)
    assert finetuning.queue_ptr.item() == 4
    assert torch.equal(finetuning.id_queue, torch.full((8,), UNKNOWN_ID))
    # and the other way: an id-tracking checkpoint into a pretraining state is a clear mismatch
    dcp.save({"momentum": finetuning}, checkpoint_id=str(tmp_path / "new"))
    with pytest.raises(ValueError, match="id_queue"):
        load_states(tmp_path / "new", {"momentum": momentum_state(queue_size=8)})
