"""Faults a running job meets, drilled through the real `blip run`: a stalled rank, a removed
output folder or lock, a run of non-finite steps between log steps, a changed global batch."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.recipes.launch import REPO, env, launch_args, run_recipe

pytestmark = pytest.mark.slow


def _start(output_dir: Path, *overrides: str, nproc: int = 1) -> subprocess.Popen:
    return subprocess.Popen(
        launch_args(output_dir, list(overrides), nproc), cwd=REPO, env=env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def _wait_for_step(proc: subprocess.Popen, output_dir: Path, step: int, timeout: float = 240):
    metrics, deadline = output_dir / "metrics.jsonl", time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if metrics.exists():
            lines = [line for line in metrics.read_text().splitlines() if line.strip()]
            if any(json.loads(line)["step"] >= step for line in lines):
                return
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[str, float]:
    start = time.monotonic()
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        for pgid in [proc.pid, *_children(proc.pid)]:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    return err, time.monotonic() - start


def test_a_stopped_rank_ends_the_job_after_the_collective_timeout(tmp_path):
    """SIGSTOP of one of two ranks (never continued): the other rank's next collective gives
    up after job.collective_timeout_s with one line naming the wait, and the job exits 1."""
    out = tmp_path / "run"
    proc = _start(out, "training.steps=100000", "job.collective_timeout_s=5", nproc=2)
    _wait_for_step(proc, out, 2)
    ranks = _children(proc.pid)
    assert len(ranks) == 2
    os.kill(max(ranks), signal.SIGSTOP)
    err, took = _finish(proc, timeout=120)
    assert proc.returncode == 1, err[-3000:]
    assert "did not answer within job.collective_timeout_s=5 s" in err
    assert took < 5 + 30 + 30  # timeout, torchrun's shutdown of the stopped rank, start-up


def test_a_killed_loader_worker_of_one_of_two_ranks_ends_the_job_in_seconds(tmp_path):
    """kill -9 of rank 1's loader worker: rank 1 names it in one line and leaves without a
    barrier; rank 0, inside the step's collectives, ends at once with one line (it used to wait
    job.collective_timeout_s in a barrier that could never complete, then print a traceback)."""
    out = tmp_path / "run"
    proc = _start(out, "training.steps=100000", "data.num_workers=1", nproc=2)
    _wait_for_step(proc, out, 2)
    (rank1,) = [pid for pid in _children(proc.pid)
                if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")]  # fmt: skip
    (worker,) = _children(rank1)
    os.kill(worker, signal.SIGKILL)
    err, took = _finish(proc, timeout=120)
    assert proc.returncode == 1, err[-3000:]
    assert f"rank 1: data loader worker 0 (pid {worker}) died with SIGKILL" in err
    assert "a peer rank left the job while this rank waited" in err
    assert "Traceback" not in err and took < 60, err[-3000:]


def test_a_stop_while_the_ranks_start_exits_0_without_a_checkpoint(tmp_path):
    """SIGTERM to `blip run` as soon as its 2 ranks exist (they are still importing torch):
    every rank keeps the request, the recipe refuses to start training and the job exits 0
    with one line (a rank used to die of the signal and the job exited 1)."""
    out = tmp_path / "run"
    proc = _start(out, "training.steps=100000", nproc=2)
    deadline = time.monotonic() + 60
    while len(_children(proc.pid)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    err, _ = _finish(proc, timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped before training started, nothing to save" in err
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    assert "Traceback" not in err


def test_a_removed_output_folder_stops_the_run_with_exit_1(tmp_path):
    out = tmp_path / "run"
    proc = _start(out, "training.steps=100000")
    _wait_for_step(proc, out, 2)
    shutil.rmtree(out)
    err, _ = _finish(proc, timeout=120)
    assert proc.returncode == 1, err[-3000:]
    assert f"job.output_dir {out} was removed or moved during the run" in err
    assert "Traceback" not in err


def test_a_removed_run_lock_stops_the_run_with_exit_1(tmp_path):
    out = tmp_path / "run"
    proc = _start(out, "training.steps=100000", "checkpoint.interval=1")
    _wait_for_step(proc, out, 2)
    (out / ".run.lock").unlink()
    err, _ = _finish(proc, timeout=120)
    assert proc.returncode == 1, err[-3000:]
    assert "was removed during the run" in err and "without saving" in err
    assert "Traceback" not in err


def test_non_finite_steps_stop_at_the_limit_between_log_steps(tmp_path):
    """The consecutive count is checked every step: with log_every=50 the run stops at the
    step that reaches the limit, not at the next log step."""
    run = run_recipe(tmp_path / "run", "training.steps=40", "optimizer.lr=1e30",
                     "lr_scheduler.warmup_steps=0", "training.max_nonfinite_steps=3",
                     "metrics.log_every=50", "checkpoint.interval=1000")  # fmt: skip
    assert run.proc.returncode == 1, run.proc.stderr[-3000:]
    found = re.search(r"(\d+) consecutive steps .* up to step (\d+);", run.proc.stderr)
    assert found and int(found.group(1)) == 3 and int(found.group(2)) < 40
    assert "Traceback" not in run.proc.stderr


def test_a_new_global_batch_resumes_with_the_queue_pointer_wrapping(tmp_path):
    """3 steps at global batch 8 leave the queue pointer at 24 of 32; a resume at batch 16 (it
    divides the queue) used to fail at its first step with an IndexError, every retry."""
    out = tmp_path / "run"
    first = run_recipe(out, "training.steps=3")
    assert first.proc.returncode == 0, first.proc.stderr[-3000:]
    resumed = run_recipe(out, "training.steps=5", "data.batch_size=16")
    assert resumed.proc.returncode == 0, resumed.proc.stderr[-3000:]
    assert [m["step"] for m in resumed.metrics][-2:] == [4, 5]
