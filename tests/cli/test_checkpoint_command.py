"""`blip checkpoint verify PATH`: one line per checkpoint, exit 0 only when all are intact,
1 when any is not, 2 on usage errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from blip_recipes.checkpoint import MANIFEST_FILE, CheckpointManager
from blip_recipes.cli.dispatch import main
from tests.checkpoint.checkpoint_toy import Setup
from tests.checkpoint.damage import DAMAGE

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def output_dir(tmp_path) -> Path:
    """A run's output folder with checkpoints at steps 1 and 2."""
    manager = CheckpointManager(tmp_path / "run" / "checkpoints")
    run = Setup(seed=0)
    for step in (1, 2):
        run.step()
        manager.save(step, run.states(), extra_files={"config.toml": "[job]\n"})
    return tmp_path / "run"


def verify(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["checkpoint", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("where", ["", "checkpoints", "checkpoints/step-2"])
def test_intact_checkpoints_exit_0(output_dir, capsys, where):
    code, out, _ = verify(capsys, "verify", str(output_dir / where))
    assert code == 0, out
    lines = out.splitlines()
    if where.endswith("step-2"):
        assert lines == [
            f"{output_dir / where}: OK (3 files, {lines[0].split(', ')[1]}, crc32 verified)"
        ]
    else:
        ckpt = output_dir / "checkpoints"
        assert lines[0].startswith(f"{ckpt / 'step-1'}: OK (3 files, ")
        assert lines[1].startswith(f"{ckpt / 'step-2'}: OK (3 files, ")
        assert lines[2] == "2 of 2 checkpoints verified intact"


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_exits_1_naming_the_file(output_dir, capsys, damage):
    damage_fn, fragments = DAMAGE[damage]
    damage_fn(output_dir / "checkpoints" / "step-2")
    code, out, _ = verify(capsys, "verify", str(output_dir))
    assert code == 1
    step1, step2, total = out.splitlines()
    assert ": OK (" in step1
    assert step2.startswith(f"{output_dir / 'checkpoints' / 'step-2'}: CORRUPT: ")
    assert all(fragment in step2 for fragment in fragments), step2
    assert total == "1 of 2 checkpoints verified intact"


def test_unverifiable_and_incomplete_checkpoints_exit_1(output_dir, capsys):
    ckpt = output_dir / "checkpoints"
    (ckpt / "step-2" / MANIFEST_FILE).unlink()
    (ckpt / "step-3").mkdir()
    (ckpt / "step-3" / "__0_0.distcp").write_bytes(b"partial")
    code, out, _ = verify(capsys, "verify", str(ckpt))
    assert code == 1
    lines = out.splitlines()
    assert ": OK (" in lines[0]
    assert lines[1].startswith(f"{ckpt / 'step-2'}: UNVERIFIED: no checksums.json")
    assert lines[2] == f"{ckpt / 'step-3'}: INCOMPLETE: no .metadata (a save that did not finish)"
    assert lines[3] == "1 of 3 checkpoints verified intact"


def test_folder_without_checkpoints_exits_1(tmp_path, capsys):
    code, out, _ = verify(capsys, "verify", str(tmp_path))
    assert code == 1 and "no checkpoints found" in out


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "missing command"),
        (["check", "x"], "unknown checkpoint command 'check'"),
        (["verify"], "usage: blip checkpoint verify PATH"),
        (["verify", "a", "b"], "one path"),
        (["verify", "/no/such/folder"], "/no/such/folder: no such folder"),
    ],
)
def test_usage_errors_exit_2(capsys, args, message):
    code, _, err = verify(capsys, *args)
    assert code == 2
    assert err.startswith("blip checkpoint: ") and message in err


def test_help(capsys):
    code, out, _ = verify(capsys, "--help")
    assert code == 0 and "usage: blip checkpoint verify PATH" in out and "exit status" in out
    assert main(["--help"]) == 0
    assert "blip checkpoint verify PATH" in capsys.readouterr().out


def test_real_command_exit_status(output_dir):
    """The installed entry point as a user runs it (a subprocess)."""
    DAMAGE["flipped_bytes"][0](output_dir / "checkpoints" / "step-1")
    proc = subprocess.run(
        [sys.executable, "-m", "blip_recipes.cli", "checkpoint", "verify", str(output_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "step-1: CORRUPT: __0_0.distcp: hash mismatch" in proc.stdout
    assert "1 of 2 checkpoints verified intact" in proc.stdout
