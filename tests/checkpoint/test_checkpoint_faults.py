"""Faults a cluster run meets, on one process: a real full disk while saving, a checkpoint that
cannot be read (with or without its manifest), a checkpoint whose pickles would run code, and a
checkpoint written before the first optimizer step."""

from __future__ import annotations

import errno
import io
import logging
import os
import pickle
import random

import numpy as np
import pytest
import torch

from blip_recipes.checkpoint import (
    MANIFEST_FILE,
    TRAIN_STATE,
    CheckpointCorruptError,
    CheckpointManager,
    CheckpointWriteError,
    TrainState,
    capture_rng_state,
    load_states,
    verify_checkpoint,
)
from blip_recipes.checkpoint.safe_read import UnsafeCheckpointError, read_metadata
from blip_recipes.checkpoint.states import from_bytes, restore_rng_state, to_bytes
from blip_recipes.checkpoint.write_errors import find_oserror
from tests.checkpoint.checkpoint_toy import Setup, full_params
from tests.checkpoint.damage import flip_bytes
from tests.small_fs import fill, small_fs

LOGGER = "blip_recipes.checkpoint"


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------- full disk
@pytest.mark.parametrize("async_save", [False, True])
def test_a_real_full_disk_is_one_line_and_removes_the_partial_folder(tmp_path, async_save):
    """A toy checkpoint is about 460 KiB: two fit in 1200 KiB, the third does not."""
    with small_fs(tmp_path / "fs", 1200) as fs:
        manager = CheckpointManager(fs / "ckpt", async_save=async_save)
        run = Setup(seed=0)
        saved = []
        with pytest.raises(CheckpointWriteError) as err:
            for step in range(1, 6):
                run.step()
                before = _snapshot(fs / "ckpt") if saved else {}
                manager.save(step, run.states())
                manager.wait()
                saved.append(step)
        manager.close()
        failed = saved[-1] + 1
        msg = str(err.value)
        assert saved == [1, 2] and err.value.errno == errno.ENOSPC
        assert msg.startswith(f"no space left on device while writing checkpoint step-{failed}")
        assert f"the previous checkpoint {fs / 'ckpt' / 'step-2'} is intact" in msg
        assert "\n" not in msg and "inline_container" not in msg
        assert not (fs / "ckpt" / f"step-{failed}").exists()
        assert _snapshot(fs / "ckpt") == before  # earlier checkpoints untouched
        assert verify_checkpoint(fs / "ckpt" / "step-2").ok


def test_torch_writer_failing_on_a_full_disk_counts_as_no_space(tmp_path):
    """torch.save into a file on a full disk raises a RuntimeError from its C++ zip writer
    (``inline_container.cc``) without the OSError; it is reported as ENOSPC."""
    with small_fs(tmp_path / "fs", 256) as fs:
        with pytest.raises(RuntimeError) as raised, open(fs / "big.pt", "wb") as f:
            torch.save(torch.zeros(1 << 17), f)  # 512 KiB
        assert "inline_container" in str(raised.value) or "PytorchStreamWriter" in str(raised.value)
        found = find_oserror(raised.value, fs)
        assert found is not None and found.errno == errno.ENOSPC
        os.unlink(fs / "big.pt")
        found = find_oserror(RuntimeError("[enforce fail at inline_container.cc:672] x"), fs)
        assert found is not None and found.errno == errno.EIO  # space left: another failure
        short = RuntimeError(
            "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
        )
        assert find_oserror(short, fs).errno == errno.ENOSPC  # a short write, whatever is free


def test_disk_filled_by_another_process_between_saves(tmp_path):
    with small_fs(tmp_path / "fs", 2048) as fs:
        manager = CheckpointManager(fs / "ckpt")
        run = Setup(seed=0)
        run.step()
        manager.save(1, run.states())
        fill(fs)
        run.step()
        with pytest.raises(CheckpointWriteError, match=r"^no space left on device .*step-2.*0 B"):
            manager.save(2, run.states())
        assert (
            not (fs / "ckpt" / "step-2").exists() and verify_checkpoint(fs / "ckpt" / "step-1").ok
        )
        os.unlink(fs / "filler")
        manager.save(2, run.states())  # space back: the same step saves normally
        assert verify_checkpoint(fs / "ckpt" / "step-2").ok


# ---------------------------------------------------------------------------- unreadable
def _two_checkpoints(folder):
    manager = CheckpointManager(folder)
    run = Setup(seed=0)
    run.step()
    manager.save(1, run.states())
    params_1 = full_params(run.model)
    run.step()
    manager.save(2, run.states())
    return manager, params_1


def flip_64_bytes(step_dir) -> None:
    """64 inverted bytes in the middle of the shard (16 times the 4 of ``flip_bytes``)."""
    for _ in range(16):
        flip_bytes(step_dir)
        shard = next(step_dir.glob("*.distcp"))
        data = bytearray(shard.read_bytes())
        data = data[4:] + data[:4]  # move on: the next 4 bytes are flipped next time
        shard.write_bytes(bytes(data))


@pytest.mark.parametrize("manifest", [True, False])
def test_a_checkpoint_that_cannot_be_read_falls_back_like_a_damaged_one(tmp_path, manifest, caplog):
    manager, params_1 = _two_checkpoints(tmp_path)
    newest = tmp_path / "step-2"
    flip_64_bytes(newest)
    if not manifest:  # no checksums: verification cannot see the flipped bytes
        (newest / MANIFEST_FILE).unlink()
        assert verify_checkpoint(newest).status == "unverified"
    chosen = manager.latest_intact(quarantine=True)
    fresh = Setup(seed=1)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        if manifest:  # found damaged by its checksums before any load
            assert chosen == tmp_path / "step-1"
        else:
            assert chosen == newest
        loaded = manager.load_readable(chosen, fresh.states(), quarantine=True)
    assert loaded == tmp_path / "step-1" and fresh.train_state.step == 1
    assert all(torch.equal(full_params(fresh.model)[k], v) for k, v in params_1.items())
    assert "step-2" in caplog.text and "\n" not in caplog.records[0].getMessage()
    assert (tmp_path / "corrupt-step-2").is_dir() and not newest.exists()


def test_no_readable_checkpoint_is_one_clear_error(tmp_path):
    manager, _ = _two_checkpoints(tmp_path)
    for step in (1, 2):
        flip_64_bytes(tmp_path / f"step-{step}")
        (tmp_path / f"step-{step}" / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointCorruptError, match="no readable checkpoint to resume from"):
        manager.load_readable(manager.latest_intact(), Setup(seed=1).states(), quarantine=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1", "step-2"]  # kept as they are


# ---------------------------------------------------------------------------- pickles
class RunsCode:
    """Unpickling this calls ``os.mkdir(marker)``: what a crafted checkpoint would do."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _planted(tmp_path, where: str):
    """A checkpoint at step 1 whose ``where`` holds a pickle that would create ``marker``."""
    marker = tmp_path / "marker"
    manager = CheckpointManager(tmp_path / "ckpt")
    run = Setup(seed=0)
    run.step()
    states = run.states()
    if where == "rng":  # a per-rank blob
        buffer = io.BytesIO()
        torch.save({"python": random.getstate(), "evil": RunsCode(marker)}, buffer)
        train = TrainState(step=1)
        state = {**train.state_dict(), "rng": {"rank0": buffer.getvalue()}}
        states[TRAIN_STATE] = state
    elif where == "value":  # a non-tensor DCP value
        states["extra"] = {"evil": RunsCode(marker)}
    manager.save(1, states)
    path = tmp_path / "ckpt" / "step-1"
    if where == "metadata":
        metadata = pickle.loads((path / ".metadata").read_bytes())
        metadata.planner_data = RunsCode(marker)
        (path / ".metadata").write_bytes(pickle.dumps(metadata))
    return manager, path, marker


@pytest.mark.parametrize("where", ["rng", "value", "metadata"])
def test_a_planted_pickle_is_refused_and_nothing_runs(tmp_path, where):
    manager, path, marker = _planted(tmp_path, where)
    fresh = Setup(seed=1)
    states = fresh.states()
    if where == "value":
        states["extra"] = {"evil": None}
    with pytest.raises(UnsafeCheckpointError) as err:
        if where == "metadata":
            read_metadata(path)
        else:
            manager.load(path, states, strict=False)
    msg = str(err.value)
    assert "refusing to load" in msg and "could run code" in msg and "\n" not in msg
    assert "mkdir" in msg  # names what the pickle asked for
    assert not marker.exists()
    if where == "metadata":  # verification and a load refuse it too
        assert verify_checkpoint(path).status == "corrupt" and not marker.exists()
        with pytest.raises(CheckpointCorruptError):
            load_states(path, Setup(seed=1).states())
        assert not marker.exists()


def test_a_planted_pickle_in_the_newest_falls_back(tmp_path, caplog):
    manager, path, marker = _planted(tmp_path, "rng")
    run = Setup(seed=0)
    run.step()
    run.step()
    manager.save(0, run.states())  # an intact, older step than the planted one
    fresh = Setup(seed=1)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        loaded = manager.load_readable(path, fresh.states())
    assert loaded.name == "step-0" and not marker.exists()
    assert "refusing to load the RNG state of rank 0" in caplog.text


def test_rng_state_written_by_earlier_code_still_loads():
    """Earlier checkpoints pickled NumPy's state as an ndarray: read through the allow-list."""
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    old = {"python": random.getstate(), "torch": torch.get_rng_state(),
           "numpy": np.random.get_state()}  # fmt: skip
    blob = to_bytes(old)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    restore_rng_state(from_bytes(blob))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    new = capture_rng_state()  # now: tensors and plain values only
    assert isinstance(new["numpy"][1], torch.Tensor)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    restore_rng_state(torch.load(io.BytesIO(to_bytes(new)), weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


# ---------------------------------------------------------------------------- step 0
def test_a_checkpoint_before_the_first_step_resumes_bitwise(tmp_path):
    """Saving a fresh optimizer initialises its state with a zero-LR step; that step must not
    count, or AdamW's bias correction runs one step ahead after the resume."""
    straight = Setup(seed=0)
    expected = [straight.step() for _ in range(4)]
    stopped = Setup(seed=0)
    manager = CheckpointManager(tmp_path)
    manager.save(0, stopped.states())
    assert all(int(s["step"]) == 0 for s in stopped.opt.state.values())
    assert [stopped.step() for _ in range(4)] == expected  # the saving process goes on alike
    resumed = Setup(seed=5)
    manager.load(tmp_path / "step-0", resumed.states())
    assert [resumed.step() for _ in range(4)] == expected
