"""Checkpoint integrity on 2 gloo ranks (FSDP2): every rank's shards in the manifest, one
resume decision for all ranks, and NaN or a full disk on one rank stopping the save on both."""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist

from blip_recipes.checkpoint import (
    MANIFEST_FILE,
    CheckpointManager,
    CheckpointWriteError,
    NonFiniteCheckpointError,
    verify_checkpoint,
)
from blip_recipes.parallel._testing import spawn_ranks
from tests.checkpoint.checkpoint_toy import Setup
from tests.checkpoint.damage import flip_bytes


def _record(folder: str, rank: int, name: str, value) -> None:
    Path(folder, f"{name}.rank{rank}.json").write_text(json.dumps(value))


def _worker(rank: int, world: int, folder: str) -> None:
    ckpt = Path(folder) / "ckpt"
    manager = CheckpointManager(ckpt)
    run = Setup(seed=0, rank=rank, world=world, fsdp=True)
    for step in (1, 2):
        run.step()
        manager.save(step, run.states())

    # rank 0 damages a shard that rank 1 wrote; both ranks pick the same older checkpoint
    if rank == 0:
        flip_bytes(ckpt / "step-2")
    dist.barrier()
    _record(folder, rank, "chosen", str(manager.latest_intact(quarantine=True)))
    dist.barrier()

    # NaN in rank 1's local shard only: no rank writes anything
    weight = run.model.embed.weight
    with torch.no_grad():
        if rank == 1:
            weight.to_local()[0, 0] = math.nan
    try:
        manager.save(3, run.states())
        _record(folder, rank, "nonfinite", "saved")
    except NonFiniteCheckpointError as e:
        _record(folder, rank, "nonfinite", str(e))
    with torch.no_grad():
        weight.to_local().nan_to_num_(0.0)

    # a full disk on rank 1 only: both ranks get the same clear error, the folder is removed
    import torch.distributed.checkpoint.filesystem as fs

    original = fs._write_item

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if rank == 1:
        fs._write_item = full
    try:
        manager.save(3, run.states())
        _record(folder, rank, "enospc", "saved")
    except CheckpointWriteError as e:
        _record(folder, rank, "enospc", str(e))
    finally:
        fs._write_item = original
    dist.barrier()
    _record(folder, rank, "step3_exists", (ckpt / "step-3").exists())

    # async on its own group: the manifest is written once the background save finishes
    async_manager = CheckpointManager(ckpt, async_save=True)
    async_manager.save(4, run.states())
    run.step()  # training (collectives) goes on meanwhile
    async_manager.close()
    _record(folder, rank, "async_ok", verify_checkpoint(ckpt / "step-4").ok)
    del run


def test_two_rank_integrity(tmp_path):
    spawn_ranks(_worker, 2, tmp_path, str(tmp_path))
    ckpt = tmp_path / "ckpt"

    def read(name):
        return [json.loads((tmp_path / f"{name}.rank{r}.json").read_text()) for r in (0, 1)]

    manifest = json.loads((ckpt / "step-1" / MANIFEST_FILE).read_text())["files"]
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(manifest)

    assert read("chosen") == [str(ckpt / "step-1")] * 2
    assert (ckpt / "corrupt-step-2").is_dir()

    nonfinite = read("nonfinite")
    assert all(m.startswith("refusing to save checkpoint step-3: non-finite") for m in nonfinite)
    assert all("on rank(s) 1" in m and str(ckpt / "step-1") in m for m in nonfinite)
    assert "model.embed.weight" in nonfinite[1]  # the rank that has it names the tensor

    enospc = read("enospc")
    assert enospc[0] == enospc[1], enospc
    assert enospc[0].startswith("no space left on device while writing checkpoint step-3")
    assert f"the previous checkpoint {ckpt / 'step-1'} is intact" in enospc[0]
    assert read("step3_exists") == [False, False]

    assert read("async_ok") == [True, True]
    assert verify_checkpoint(ckpt / "step-1").ok
