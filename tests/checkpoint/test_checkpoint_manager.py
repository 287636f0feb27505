"""CheckpointManager with DCP: bitwise resume on 2 gloo ranks, 2 -> 1 ranks, completeness,
keep_latest_k, async save, mismatch errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from blip_recipes.checkpoint import (
    METADATA_FILE,
    MODEL,
    CheckpointManager,
    CheckpointMismatchError,
    ModelWrapper,
    is_complete,
    load_model_weights,
)
from blip_recipes.parallel._testing import spawn_ranks
from tests.checkpoint.checkpoint_toy import Setup, Toy, full_exp_avg, full_params


def _resume_worker(rank: int, world: int, folder: str, async_save: bool) -> None:
    manager = CheckpointManager(folder, keep_latest_k=2, async_save=async_save)
    run = Setup(seed=0, rank=rank, world=world, fsdp=True)
    for _ in range(3):
        run.step()
    manager.save(3, run.states(), extra_files={"config.toml": "[job]\nseed = 0\n"})
    at_save = {"params": full_params(run.model), "exp_avg": full_exp_avg(run.model, run.opt)}
    at_save["queue"] = run.momentum["queue"].clone()
    if rank == 0:
        torch.save(at_save, Path(folder) / "at_save.pt")
    straight = [run.step() for _ in range(3)]  # training (collectives) goes on during async save
    params = full_params(run.model)
    manager.save(6, run.states())
    manager.close()

    resumed = Setup(seed=123, rank=rank, world=world, fsdp=True)  # different init and RNG
    manager.load(manager.step_dir(3), resumed.states())
    assert resumed.train_state.step == 3 and resumed.train_state.samples_seen == 24
    assert resumed.train_state.rng_restored
    assert resumed.loader.position == 3 * 8 // world
    again = [resumed.step() for _ in range(3)]
    resumed_params = full_params(resumed.model)
    if rank == 0:
        assert again == straight, (again, straight)  # bitwise
        for n, p in params.items():
            assert torch.equal(p, resumed_params[n]), n
        assert resumed.momentum["ptr"] == run.momentum["ptr"]
        assert torch.equal(resumed.momentum["queue"], run.momentum["queue"])
    dist.barrier()
    del run, resumed


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_two_rank_bitwise_resume_then_load_on_one_rank(tmp_path, async_save):
    folder = tmp_path / "ckpt"
    spawn_ranks(_resume_worker, 2, tmp_path, str(folder), async_save)
    manager = CheckpointManager(folder)
    assert manager.complete_steps() == [3, 6]
    assert (folder / "step-3" / "config.toml").read_text().startswith("[job]")

    # the 2-rank checkpoint on 1 process (no process group): weights, optimizer, schedule,
    # momentum and counters load; rank 1's per-rank entries are ignored
    at_save = torch.load(folder / "at_save.pt")
    one = Setup(seed=7)
    states = one.states()
    manager.load(folder / "step-3", states)
    assert one.train_state.step == 3 and one.train_state.samples_seen == 24
    assert one.train_state.rng_restored  # rank 0's entry
    assert not states["loader"].restored  # written under world size 2: reposition instead
    assert one.sched.last_epoch == 3 and one.momentum["ptr"] == 3
    assert torch.equal(one.momentum["queue"], at_save["queue"])
    for name, value in full_params(one.model).items():
        assert torch.equal(value, at_save["params"][name]), name
    for name, value in full_exp_avg(one.model, one.opt).items():
        assert torch.equal(value, at_save["exp_avg"][name]), name
    losses = [one.step() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_single_process_round_trip_is_bitwise(tmp_path):
    run = Setup(seed=0)
    for _ in range(2):
        run.step()
    manager = CheckpointManager(tmp_path)
    manager.save(2, run.states())
    straight = [run.step() for _ in range(2)]
    resumed = Setup(seed=1)
    manager.load(manager.latest_complete(), resumed.states())
    assert resumed.loader.position == 16
    assert [resumed.step() for _ in range(2)] == straight
    assert all(
        torch.equal(a, b) for a, b in zip(run.model.parameters(), resumed.model.parameters())
    )


def test_incomplete_checkpoint_is_ignored_and_replaced(tmp_path):
    manager = CheckpointManager(tmp_path)
    run = Setup(seed=0)
    manager.save(1, run.states())
    (tmp_path / "step-5").mkdir()
    (tmp_path / "step-5" / "__0_0.distcp").write_bytes(b"partial")  # crashed mid-save
    (tmp_path / "step-x").mkdir()  # not a step folder
    assert manager.latest_complete() == tmp_path / "step-1"
    assert not is_complete(tmp_path / "step-5")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        manager.load(tmp_path / "step-5", run.states())
    manager.save(5, run.states())
    assert manager.latest_complete() == tmp_path / "step-5"
    assert not (tmp_path / "step-5" / "__0_0.distcp").read_bytes() == b"partial"


def test_never_overwrites_a_complete_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path)
    run = Setup(seed=0)
    manager.save(1, run.states())
    before = (tmp_path / "step-1" / METADATA_FILE).stat().st_mtime_ns
    run.step()
    manager.save(1, run.states())
    assert (tmp_path / "step-1" / METADATA_FILE).stat().st_mtime_ns == before


def test_keep_latest_k(tmp_path):
    manager = CheckpointManager(tmp_path, keep_latest_k=2)
    run = Setup(seed=0)
    (tmp_path / "step-0").mkdir(parents=True)  # incomplete leftover, older: pruned
    for step in (1, 2, 3, 4):
        manager.save(step, run.states())
    assert manager.complete_steps() == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-3", "step-4"]
    CheckpointManager(tmp_path, keep_latest_k=1).save(2, run.states())  # an older step
    assert manager.complete_steps() == [2, 4]  # the one just written is kept


def test_async_save_single_process_stages_a_copy(tmp_path):
    run = Setup(seed=0)
    manager = CheckpointManager(tmp_path, async_save=True, keep_latest_k=1)
    manager.save(1, run.states())
    saved = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    with torch.no_grad():
        for p in run.model.parameters():
            p.add_(1.0)  # training goes on while the save is written
    manager.save(2, run.states())  # waits for step 1 first
    manager.close()
    assert manager.complete_steps() == [2]
    fresh = Toy()
    load_model_weights(tmp_path / "step-2", fresh)
    for n, p in fresh.named_parameters():
        assert torch.equal(p, saved[n] + 1.0), n


def test_mismatch_error_names_keys(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(1, {MODEL: ModelWrapper(Toy(dim=32))})
    with pytest.raises(CheckpointMismatchError) as err:
        load_model_weights(tmp_path / "step-1", Toy(dim=16))
    msg = str(err.value)
    assert (
        "shape mismatch" in msg
        and "model.blocks.0.fc1.weight checkpoint (64, 32) vs ours (32, 16)" in msg
    )
    assert "and" in msg  # more than 5 mismatches: the rest are counted

    class Bigger(Toy):
        def __init__(self) -> None:
            super().__init__()
            self.extra = torch.nn.Linear(2, 2)

    with pytest.raises(
        CheckpointMismatchError, match="missing from the checkpoint: model.extra.weight"
    ):
        load_model_weights(tmp_path / "step-1", Bigger())
    manager.save(2, {MODEL: ModelWrapper(Bigger())})
    with pytest.raises(
        CheckpointMismatchError, match="in the checkpoint but not here: model.extra"
    ):
        load_model_weights(tmp_path / "step-2", Toy())


def test_load_model_weights_only(tmp_path):
    run = Setup(seed=0)
    run.step()
    CheckpointManager(tmp_path).save(1, run.states())
    fresh = Toy()
    load_model_weights(tmp_path / "step-1", fresh)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), run.model.parameters()))


def test_top_level_keys(tmp_path):
    from blip_recipes.checkpoint import top_level_keys

    run = Setup(seed=0)
    path = CheckpointManager(tmp_path).save(1, run.states())
    assert top_level_keys(path) == set(run.states())
