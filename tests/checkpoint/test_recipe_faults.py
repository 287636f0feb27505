"""Checkpoint faults through the real `blip run` CLI (tiny model): a real full disk while the
run saves, and a stop before the first step."""

from __future__ import annotations

import json
import subprocess

import pytest

from blip_recipes.checkpoint import verify_checkpoint
from tests.recipes.launch import REPO, Run, env, launch_args, run_recipe
from tests.small_fs import small_fs


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [False, True])
def test_a_full_disk_during_a_run_is_one_line(tmp_path, async_save):
    """A tiny-model checkpoint is about 8 MiB: one fits in 12 MiB, the second does not."""
    with small_fs(tmp_path / "fs", 12 * 1024) as fs:
        run = run_recipe(fs / "run", "training.steps=6", "checkpoint.interval=2",
                         "checkpoint.keep_latest_k=0", f"checkpoint.async_save={async_save}")  # fmt: skip
        err = run.proc.stderr
        assert run.proc.returncode == 1, err[-3000:]
        assert "Traceback" not in err and "inline_container" not in err, err[-3000:]
        folder = fs / "run" / "checkpoints"
        line = f"no space left on device while writing checkpoint step-4 to {folder / 'step-4'}"
        assert err.count(line) == 1, err[-3000:]
        assert f"the previous checkpoint {folder / 'step-2'} is intact" in err
        assert [p.name for p in folder.iterdir()] == ["step-2"]
        assert verify_checkpoint(folder / "step-2").ok
        text = (fs / "run" / "metrics.jsonl").read_text()
        assert text.endswith("\n") and all(json.loads(x) for x in text.splitlines())


@pytest.mark.slow
def test_a_stop_before_the_first_step_resumes_bitwise(tmp_path):
    straight = run_recipe(tmp_path / "straight", "training.steps=4")
    assert straight.proc.returncode == 0, straight.proc.stderr[-3000:]
    out = tmp_path / "stopped"
    args = launch_args(out, ["training.steps=4"])
    stopped = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300,
                             env={**env(), "BLIP_STOP_REQUESTED": "15"})  # fmt: skip
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert [p.name for p in Run(stopped, out).checkpoints()] == ["step-0"]
    resumed = run_recipe(out, "training.steps=4")
    assert resumed.proc.returncode == 0, resumed.proc.stderr[-3000:]
    assert "resumed from" in resumed.proc.stderr
    assert resumed.losses() == straight.losses()  # bitwise: the same floats
    assert sorted(resumed.losses()) == [1, 2, 3, 4]
