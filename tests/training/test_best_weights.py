"""BestWeights: strictly-better selection, weights kept in best/step-N (previous pruned), state
through a DCP checkpoint, stale folders of an earlier run cleared, kept weights loaded back."""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp

from blip_recipes.checkpoint import load_states
from blip_recipes.training.best_weights import BestWeights
from tests.models.tiny_blip import make_model


def test_best_is_strictly_better_keeps_its_weights_and_survives_a_checkpoint(tmp_path):
    model = make_model()
    best = BestWeights(tmp_path, key="r_mean", config_toml="[job]\n")
    assert best.path is None and best.load_into(model) is None
    assert best.offer(10, 0, {"r_mean": 50.0, "txt_r1": 20.0}, model)
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.itm_head.weight.add_(1.0)
    assert not best.offer(20, 1, {"r_mean": 50.0}, model)  # a tie keeps the earlier epoch
    assert best.path == tmp_path / "best" / "step-10"
    assert (best.path / "config.toml").read_text() == "[job]\n"
    assert best.load_into(model) == best.path
    assert all(torch.equal(model.state_dict()[k], v) for k, v in kept.items())

    with torch.no_grad():
        model.itm_head.weight.add_(1.0)
    assert best.offer(30, 2, {"r_mean": 51.5, "txt_r1": 25.0}, model)
    assert sorted(p.name for p in (tmp_path / "best").iterdir() if p.is_dir()) == ["step-30"]
    dcp.save({"best": best}, checkpoint_id=str(tmp_path / "ckpt"))
    loaded = BestWeights(tmp_path, key="r_mean", config_toml="")
    load_states(tmp_path / "ckpt", {"best": loaded})
    assert (loaded.step, loaded.epoch) == (30, 2)
    assert loaded.metrics == {"r_mean": 51.5, "txt_r1": 25.0} and loaded.path == best.path
    best.close()
    loaded.close()


def test_a_fresh_start_clears_what_an_earlier_run_kept(tmp_path):
    model = make_model()
    earlier = BestWeights(tmp_path, key="score", config_toml="")
    earlier.offer(5, 0, {"score": 1.0}, model)
    earlier.close()
    fresh = BestWeights(tmp_path, key="score", config_toml="")
    fresh.clear_stale(is_main=True)
    assert list((tmp_path / "best").iterdir()) == []
    with torch.no_grad():
        model.itm_head.weight.add_(1.0)
    assert fresh.offer(5, 0, {"score": 0.5}, model)  # same step number: saved anew, not skipped
    restored = make_model(seed=3)
    fresh.load_into(restored)
    assert torch.equal(restored.itm_head.weight, model.itm_head.weight)
    fresh.close()
