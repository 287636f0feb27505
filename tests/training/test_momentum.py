"""MomentumState: EMA, queues and pointer, 2-rank gloo enqueue, DCP round trip."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

from blip_recipes.training.momentum import check_queue_batch
from tests.models.tiny_blip import (
    TINY,
    enqueue_worker,
    fsdp_step_worker,
    make_model,
    make_text,
    momentum_state,
)

_state = momentum_state


def test_copy_then_ema_formula():
    model = make_model()
    state = _state(decay=0.9)
    state.copy_from(model)
    pairs = dict(state.encoders.named_parameters())
    assert torch.equal(pairs["text_encoder.layers.0.self_attn.query.weight"],
                       model.text.layers[0].self_attn.query.weight)  # fmt: skip
    before = {n: p.clone() for n, p in pairs.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    state.update(model)
    online = dict(model.named_parameters())
    for name, param in pairs.items():
        partner = online[name.replace("text_encoder.", "text.", 1)]
        assert torch.allclose(param, 0.9 * before[name] + 0.1 * partner, atol=1e-6), name
    assert not any("cross_attn" in n or "causal" in n for n in pairs)


def test_queues_are_unit_columns_and_seeded():
    first, second, other = _state(seed=3), _state(seed=3), _state(seed=4)
    assert first.image_queue.shape == (TINY["embed_dim"], 8)
    assert torch.allclose(first.image_queue.norm(dim=0), torch.ones(8))
    assert torch.equal(first.text_queue, second.text_queue)
    assert not torch.equal(first.image_queue, other.image_queue)
    assert first.image_queue.dtype == torch.float32


def test_enqueue_wraps_around_and_advances_pointer():
    state = _state(queue_size=8)
    batches = [torch.full((4, TINY["embed_dim"]), float(i)) for i in range(3)]
    for i, feats in enumerate(batches):
        state.enqueue(feats, -feats)
        assert state.queue_ptr.item() == ((i + 1) * 4) % 8
    assert state.image_queue[:, :4].eq(2.0).all() and state.image_queue[:, 4:].eq(1.0).all()
    assert state.text_queue[:, :4].eq(-2.0).all()


def test_enqueue_from_a_pointer_left_by_another_batch_size_wraps_around():
    """A checkpoint saved with global batch 4 (pointer at 12 of 16) resumed with batch 8: the
    write covers columns 12..15 and 0..3, the oldest entries, instead of running off the end."""
    state = _state(queue_size=16)
    for i in range(3):
        state.enqueue(
            torch.full((4, TINY["embed_dim"]), float(i)), torch.zeros(4, TINY["embed_dim"])
        )
    before = state.image_queue.clone()
    state.enqueue(torch.full((8, TINY["embed_dim"]), 7.0), torch.zeros(8, TINY["embed_dim"]))
    assert state.queue_ptr.item() == 4
    assert state.image_queue[:, 12:].eq(7.0).all() and state.image_queue[:, :4].eq(7.0).all()
    assert torch.equal(state.image_queue[:, 4:12], before[:, 4:12])  # the newest are kept


def test_queue_batch_mismatch_names_both_numbers():
    check_queue_batch(57600, 75, 32)
    with pytest.raises(ValueError, match="57600.*70"):
        check_queue_batch(57600, 35, 2)
    with pytest.raises(ValueError, match="10"):
        _state(queue_size=10).enqueue(
            torch.zeros(4, TINY["embed_dim"]), torch.zeros(4, TINY["embed_dim"])
        )


def test_targets_shapes_and_train_mode_switch():
    model = make_model()
    images = torch.randn(2, 3, 32, 32)
    ids, mask = make_text(2)
    for train_mode in (True, False):
        state = _state(train_mode=train_mode)
        state.copy_from(model)
        targets = state.targets(images, ids, mask)
        assert targets.image_feat_m.shape == (2, TINY["embed_dim"])
        assert targets.text_queue is state.text_queue
        assert state.encoders.training is train_mode
    assert torch.allclose(targets.image_feat_m.norm(dim=-1), torch.ones(2))


def test_dcp_round_trip(tmp_path):
    model = make_model()
    state = _state(seed=1)
    state.copy_from(model)
    state.enqueue(torch.ones(4, TINY["embed_dim"]), torch.ones(4, TINY["embed_dim"]))
    dcp.save({"momentum": state}, checkpoint_id=str(tmp_path))
    restored = _state(seed=2)
    assert not torch.equal(restored.image_queue, state.image_queue)
    dcp.load({"momentum": restored}, checkpoint_id=str(tmp_path))
    assert torch.equal(restored.image_queue, state.image_queue)
    assert torch.equal(restored.text_queue, state.text_queue)
    assert restored.queue_ptr.item() == 4
    for (name, a), b in zip(
        state.encoders.state_dict().items(), restored.encoders.state_dict().values()
    ):
        assert torch.equal(a, b), name


def test_queues_identical_across_two_gloo_ranks(tmp_path):
    mp.start_processes(enqueue_worker, args=(2, str(tmp_path / "init"), str(tmp_path)),
                       nprocs=2, start_method="spawn")  # fmt: skip
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(r0["image"], r1["image"]) and torch.equal(r0["text"], r1["text"])
    assert r0["ptr"].item() == (3 * 4) % 8
    # step 2 wrote columns 0..3 after wrapping: rank 0 rows then rank 1 rows
    assert r0["image"][0, :4].tolist() == [20.0, 20.0, 21.0, 21.0]
    assert r0["image"][0, 4:].tolist() == [10.0, 10.0, 11.0, 11.0]


def test_enqueue_of_a_skipped_step_changes_nothing():
    state = momentum_state()
    batch = state.queue_size // 4
    feats = torch.nn.functional.normalize(torch.randn(batch, state.image_queue.shape[0]), dim=1)
    before = (state.image_queue.clone(), state.text_queue.clone(), state.queue_ptr.clone())
    state.enqueue(feats, feats, valid=torch.tensor(False))
    assert torch.equal(state.image_queue, before[0]) and torch.equal(state.text_queue, before[1])
    assert torch.equal(state.queue_ptr, before[2])
    state.enqueue(feats, feats, valid=torch.tensor(True))
    assert torch.equal(state.image_queue[:, :batch], feats.t())
    assert int(state.queue_ptr) == batch


def test_fsdp2_sharded_update_step_and_dcp_save(tmp_path):
    mp.start_processes(fsdp_step_worker, args=(2, str(tmp_path / "init"), str(tmp_path)),
                       nprocs=2, start_method="spawn")  # fmt: skip
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(r0["image"], r1["image"])
    restored = _state(queue_size=8, seed=5)
    dcp.load({"momentum": restored}, checkpoint_id=str(tmp_path / "ckpt"))
    assert torch.equal(restored.image_queue, r0["image"])
    assert restored.queue_ptr.item() == 4
