"""Checkpoint integrity on one process: the checksum manifest, verification of damaged files,
falling back to an older intact checkpoint, the finite-weights guard and write failures."""

from __future__ import annotations

import errno
import json
import logging
import math
import zlib

import pytest
import torch

import blip_recipes.checkpoint.coordination as coordination
from blip_recipes.checkpoint import (
    MANIFEST_FILE,
    CheckpointCorruptError,
    CheckpointManager,
    CheckpointWriteError,
    NonFiniteCheckpointError,
    read_manifest,
    verify_checkpoint,
)
from tests.checkpoint.checkpoint_toy import Setup
from tests.checkpoint.damage import DAMAGE, truncate_manifest

LOGGER = "blip_recipes.checkpoint"


def _two_checkpoints(folder, **kwargs):
    manager = CheckpointManager(folder, **kwargs)
    run = Setup(seed=0)
    run.step()
    manager.save(1, run.states(), extra_files={"config.toml": "[job]\nseed = 0\n"})
    run.step()
    manager.save(2, run.states(), extra_files={"config.toml": "[job]\nseed = 0\n"})
    return manager, run


def test_manifest_lists_every_file_with_size_and_crc32(tmp_path):
    manager, _ = _two_checkpoints(tmp_path)
    step = tmp_path / "step-2"
    data = json.loads((step / MANIFEST_FILE).read_text())
    assert data["format"] == 1 and data["algorithm"] == "crc32"
    assert set(data["files"]) == {".metadata", "__0_0.distcp", "config.toml"}
    for name, entry in data["files"].items():
        content = (step / name).read_bytes()
        assert entry == {"size": len(content), "crc32": f"{zlib.crc32(content):08x}"}, name
    assert not list(step.glob("*.tmp"))
    report = verify_checkpoint(step)
    assert report.ok and report.usable and report.files == 3
    assert report.summary().startswith("OK (3 files")
    assert read_manifest(step)["config.toml"].size == len("[job]\nseed = 0\n")


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_verification_names_the_damaged_file(tmp_path, damage):
    _two_checkpoints(tmp_path)
    damage_fn, fragments = DAMAGE[damage]
    damage_fn(tmp_path / "step-2")
    report = verify_checkpoint(tmp_path / "step-2")
    assert report.status == "corrupt" and not report.usable
    text = report.summary()
    assert text.startswith("CORRUPT: ")
    for fragment in fragments:
        assert fragment in text, text
    assert verify_checkpoint(tmp_path / "step-1").ok


def test_unreadable_manifest_is_damage(tmp_path):
    _two_checkpoints(tmp_path)
    truncate_manifest(tmp_path / "step-2")
    report = verify_checkpoint(tmp_path / "step-2")
    assert report.status == "corrupt"
    assert "checksums.json: unreadable" in report.summary()


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_falls_back_to_the_older_intact_checkpoint(tmp_path, damage, caplog):
    manager, run = _two_checkpoints(tmp_path)
    damage_fn, fragments = DAMAGE[damage]
    damage_fn(tmp_path / "step-2")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        chosen = manager.latest_intact(quarantine=True)
    assert chosen == tmp_path / "step-1"
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    assert "step-2 is damaged, not resuming from it" in warnings
    assert all(fragment in warnings for fragment in fragments), warnings
    assert "falling back to the older checkpoint" in warnings
    # moved aside (kept for inspection), so step 2 can be saved again
    assert (tmp_path / "corrupt-step-2").is_dir() and not (tmp_path / "step-2").exists()
    resumed = Setup(seed=5)
    manager.load(chosen, resumed.states())
    assert resumed.train_state.step == 1
    manager.save(2, run.states())
    assert verify_checkpoint(tmp_path / "step-2").ok
    assert manager.latest_intact() == tmp_path / "step-2"


def test_without_quarantine_nothing_is_renamed(tmp_path):
    manager, _ = _two_checkpoints(tmp_path)
    DAMAGE["flipped_bytes"][0](tmp_path / "step-2")
    assert manager.latest_intact() == tmp_path / "step-1"
    assert (tmp_path / "step-2").is_dir() and not (tmp_path / "corrupt-step-2").exists()


def test_no_intact_checkpoint_is_a_clear_error(tmp_path):
    manager, _ = _two_checkpoints(tmp_path)
    DAMAGE["deleted_shard"][0](tmp_path / "step-2")
    DAMAGE["truncated_metadata"][0](tmp_path / "step-1")
    with pytest.raises(CheckpointCorruptError) as err:
        manager.latest_intact(quarantine=True)
    msg = str(err.value)
    assert f"no intact checkpoint to resume from in {tmp_path}" in msg
    assert "step-2: __0_0.distcp: missing" in msg and "step-1: .metadata" in msg
    assert (tmp_path / "step-2").is_dir()  # nothing renamed when nothing is usable
    assert CheckpointManager(tmp_path / "empty").latest_intact() is None


def test_checkpoint_without_manifest_still_loads_unverified(tmp_path, caplog):
    manager, _ = _two_checkpoints(tmp_path)
    (tmp_path / "step-2" / MANIFEST_FILE).unlink()  # as written before checksums existed
    report = verify_checkpoint(tmp_path / "step-2")
    assert report.status == "unverified" and report.usable and not report.ok
    assert report.summary().startswith("UNVERIFIED: no checksums.json")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert manager.latest_intact() == tmp_path / "step-2"
    assert "cannot be verified" in caplog.text
    resumed = Setup(seed=5)
    manager.load(tmp_path / "step-2", resumed.states())
    assert resumed.train_state.step == 2
    # without a manifest, missing or truncated shards are still found from the metadata
    DAMAGE["truncated_shard"][0](tmp_path / "step-2")
    report = verify_checkpoint(tmp_path / "step-2")
    assert report.status == "corrupt" and "size mismatch" in report.summary()
    assert manager.latest_intact() == tmp_path / "step-1"


@pytest.mark.parametrize("damage", ["truncated_metadata", "truncated_shard"])
def test_loading_a_damaged_checkpoint_raises_a_clear_error(tmp_path, damage):
    manager, _ = _two_checkpoints(tmp_path)
    DAMAGE[damage][0](tmp_path / "step-2")
    with pytest.raises(CheckpointCorruptError, match="blip checkpoint verify"):
        manager.load(tmp_path / "step-2", Setup(seed=5).states())


def test_check_intact_of_an_explicit_path(tmp_path):
    manager, _ = _two_checkpoints(tmp_path)
    assert manager.check_intact(tmp_path / "step-2").ok
    DAMAGE["flipped_bytes"][0](tmp_path / "step-2")
    with pytest.raises(CheckpointCorruptError, match="step-2 is damaged: CORRUPT: __0_0"):
        manager.check_intact(tmp_path / "step-2")


@pytest.mark.parametrize("where", ["model", "momentum"])
def test_nonfinite_weights_are_never_saved(tmp_path, caplog, where):
    manager, run = _two_checkpoints(tmp_path)
    with torch.no_grad():
        if where == "model":
            run.model.blocks[1].fc2.weight[3, 4] = math.nan
        else:
            run.momentum["queue"][0, 0] = math.inf
    with (
        caplog.at_level(logging.ERROR, logger=LOGGER),
        pytest.raises(NonFiniteCheckpointError) as err,
    ):
        manager.save(3, run.states())
    msg = str(err.value)
    name = "model.blocks.1.fc2.weight" if where == "model" else "momentum.queue"
    assert msg.startswith("refusing to save checkpoint step-3: non-finite (NaN/Inf) weights")
    assert name in msg
    assert f"the newest intact checkpoint remains {tmp_path / 'step-2'}" in msg
    assert msg in caplog.text
    assert not (tmp_path / "step-3").exists()
    assert manager.complete_steps() == [1, 2]
    # the check can be switched off (a caller that checks by itself)
    CheckpointManager(tmp_path, finite_keys=()).save(3, run.states())
    assert (tmp_path / "step-3" / MANIFEST_FILE).is_file()


def test_nonfinite_before_any_checkpoint(tmp_path):
    run = Setup(seed=0)
    with torch.no_grad():
        run.model.temp.fill_(math.nan)
    with pytest.raises(NonFiniteCheckpointError, match="no intact checkpoint exists yet"):
        CheckpointManager(tmp_path).save(1, run.states())


def _raise(code):
    def fail(*args, **kwargs):
        raise OSError(code, "No space left on device" if code == errno.ENOSPC else "I/O error")

    return fail


def _snapshot(folder):
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.read_bytes())
            for p in folder.rglob("*") if p.is_file()}  # fmt: skip


def test_disk_full_while_writing_shards(tmp_path, monkeypatch, caplog):
    manager, run = _two_checkpoints(tmp_path)
    before = _snapshot(tmp_path)
    monkeypatch.setattr("torch.distributed.checkpoint.filesystem._write_item", _raise(errno.ENOSPC))
    with caplog.at_level(logging.ERROR, logger=LOGGER), pytest.raises(CheckpointWriteError) as err:
        manager.save(3, run.states())
    msg = str(err.value)
    assert err.value.errno == errno.ENOSPC
    assert msg.startswith(
        f"no space left on device while writing checkpoint step-3 to {tmp_path / 'step-3'}: "
    )
    assert " free; the previous checkpoint " + str(tmp_path / "step-2") + " is intact" in msg
    assert "\n" not in msg and "Traceback" not in msg
    assert msg not in caplog.text  # raised, and said once by the caller
    assert not (tmp_path / "step-3").exists()  # the partial folder is gone
    assert _snapshot(tmp_path) == before  # nothing saved before was touched
    assert verify_checkpoint(tmp_path / "step-2").ok
    monkeypatch.undo()
    manager.save(3, run.states())  # space freed: the same step saves normally
    assert verify_checkpoint(tmp_path / "step-3").ok


def test_write_errors_in_the_manifest_or_extra_files(tmp_path, monkeypatch):
    manager, run = _two_checkpoints(tmp_path)
    monkeypatch.setattr(coordination, "write_manifest", _raise(errno.ENOSPC))
    with pytest.raises(CheckpointWriteError, match="no space left on device"):
        manager.save(3, run.states())
    assert not (tmp_path / "step-3").exists()
    monkeypatch.undo()
    with pytest.raises(CheckpointWriteError, match="could not write checkpoint step-3.*step-2 is"):
        manager.save(3, run.states(), extra_files={"a/b.txt": "x"})  # rank 0's OSError
    assert not (tmp_path / "step-3").exists()


def test_other_write_errors_and_no_previous_checkpoint(tmp_path, monkeypatch):
    run = Setup(seed=0)
    monkeypatch.setattr("torch.distributed.checkpoint.filesystem._write_item", _raise(errno.EIO))
    with pytest.raises(CheckpointWriteError) as err:
        CheckpointManager(tmp_path).save(1, run.states())
    assert str(err.value).startswith(f"could not write checkpoint step-1 to {tmp_path / 'step-1'}")
    assert "I/O error" in str(err.value) and "there is no previous checkpoint" in str(err.value)
    assert not (tmp_path / "step-1").exists()


def test_async_save_writes_its_manifest_and_reports_disk_full(tmp_path, monkeypatch):
    run = Setup(seed=0)
    manager = CheckpointManager(tmp_path, async_save=True)
    manager.save(1, run.states())
    manager.close()
    assert verify_checkpoint(tmp_path / "step-1").ok
    monkeypatch.setattr("torch.distributed.checkpoint.filesystem._write_item", _raise(errno.ENOSPC))
    manager = CheckpointManager(tmp_path, async_save=True)
    manager.save(2, run.states())  # returns once staged; the failure shows when awaited
    with pytest.raises(CheckpointWriteError, match="step-2 .*the previous checkpoint .*step-1"):
        manager.close()
    assert not (tmp_path / "step-2").exists()
    assert verify_checkpoint(tmp_path / "step-1").ok


def test_lost_metadata_of_a_finished_checkpoint_is_damage(tmp_path, caplog):
    manager, _ = _two_checkpoints(tmp_path)
    (tmp_path / "step-2" / ".metadata").unlink()  # the manifest says the save had finished
    report = verify_checkpoint(tmp_path / "step-2")
    assert report.status == "corrupt"
    assert report.summary() == "CORRUPT: .metadata: missing (listed in checksums.json)"
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert manager.latest_intact(quarantine=True) == tmp_path / "step-1"
    assert "step-2 is damaged" in caplog.text and (tmp_path / "corrupt-step-2").is_dir()
