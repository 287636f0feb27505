"""One run per output folder: the lock file, its messages, stale locks, several ranks, the CLI."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from blip_recipes.runs.lock import LOCK_FILE, RunLock, RunLockedError, acquire_run_lock

REPO = Path(__file__).resolve().parents[2]

HOLD = textwrap.dedent(
    """
    import sys, time
    from blip_recipes.runs.lock import RunLock
    lock = RunLock.acquire(sys.argv[1])
    print("locked", flush=True)
    time.sleep(600)
    """
)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


@pytest.fixture
def holder(tmp_path):
    """Start a process that takes the lock of a folder; yields (process, folder)."""
    started = []

    def start(folder: Path, **env: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(folder)],
            stdout=subprocess.PIPE, text=True, env=_env(**env),
        )  # fmt: skip
        started.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_lock_records_the_holder_and_is_released(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    folder = tmp_path / "run"
    lock = RunLock.acquire(folder)  # creates the folder
    record = json.loads((folder / LOCK_FILE).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert record["job_id"] == "4711" and record["started"] and lock.stale is None
    with pytest.raises(RunLockedError) as info:  # a second lock, even from this process
        RunLock.acquire(folder)
    assert f"pid {os.getpid()} on host {socket.gethostname()} (job 4711) since" in str(info.value)
    assert info.value.holder["pid"] == os.getpid()
    lock.release()
    lock.release()  # twice is fine
    assert not (folder / LOCK_FILE).exists()
    with RunLock.acquire(folder) as again:  # free again, and nothing stale
        assert again.held and again.stale is None
    assert not again.held


def test_a_removed_or_replaced_lock_or_folder_is_noticed(tmp_path):
    """What the recipe asks at log and save steps: the lock still guards the folder, or why not."""
    folder = tmp_path / "run"
    lock = RunLock.acquire(folder)
    assert lock.problem() is None
    (folder / LOCK_FILE).unlink()  # deleted by hand: a second run could now start
    assert "was removed during the run" in lock.problem()
    with RunLock.acquire(folder) as other:  # ... and one did
        assert f"now belongs to another run (pid {os.getpid()}" in lock.problem()
        lock.release()  # never removes the other run's lock
        assert (folder / LOCK_FILE).exists() and other.problem() is None
    lock = RunLock.acquire(folder)
    (folder / LOCK_FILE).unlink()
    folder.rmdir()
    assert f"job.output_dir {folder} was removed or moved" in lock.problem()
    lock.release()


def test_live_holder_in_another_process_is_named(tmp_path, holder):
    proc = holder(tmp_path, SLURM_JOB_ID="99")
    with pytest.raises(RunLockedError) as info:
        RunLock.acquire(tmp_path)
    text = str(info.value)
    assert f"job.output_dir {tmp_path} is in use by another run: pid {proc.pid} on host" in text
    assert "(job 99) since" in text and "ago" in text and str(tmp_path / LOCK_FILE) in text


def test_stale_lock_of_a_killed_run_is_taken_over(tmp_path, holder, caplog):
    proc = holder(tmp_path)
    proc.send_signal(signal.SIGKILL)  # no cleanup: the file stays, the kernel drops the flock
    proc.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == proc.pid
    with caplog.at_level(logging.WARNING, logger="blip_recipes.runs.lock"):
        lock = RunLock.acquire(tmp_path)
    assert lock.stale["pid"] == proc.pid
    assert f"stale lock {tmp_path / LOCK_FILE} of a run that is gone (pid {proc.pid}" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_lock_file_removed_under_a_waiting_opener_is_not_trusted(tmp_path):
    """The releaser removes the file before unlocking: whoever opened the old file and then
    gets its flock must notice that the path now names another file (or none)."""
    from blip_recipes.runs.lock import _same_file

    lock = RunLock.acquire(tmp_path)
    fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR)
    try:
        assert _same_file(tmp_path / LOCK_FILE, fd)
        lock.release()
        assert not _same_file(tmp_path / LOCK_FILE, fd)
        again = RunLock.acquire(tmp_path)  # a new file, a new lock
        assert not _same_file(tmp_path / LOCK_FILE, fd)
        again.release()
    finally:
        os.close(fd)


def test_file_system_without_flock(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": 1}))
    with pytest.raises(RunLockedError, match="pid 1 on host"):  # a live process on this host
        RunLock.acquire(tmp_path)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with caplog.at_level(logging.WARNING, logger="blip_recipes.runs.lock"):
        lock = RunLock.acquire(tmp_path)
    assert "does not support flock" in caplog.text
    lock.release()


RANKS = textwrap.dedent(
    """
    import os, sys, torch.distributed as dist
    from blip_recipes.runs.lock import RunLockedError, acquire_run_lock
    rank, world, folder = int(sys.argv[1]), 2, sys.argv[2]
    dist.init_process_group("gloo", init_method=f"file://{sys.argv[3]}", rank=rank,
                            world_size=world)
    try:
        lock = acquire_run_lock(folder, rank, world)
        print("locked" if lock else "ok", flush=True)
        dist.barrier()
        if lock:
            lock.release()
    except RunLockedError as e:
        print("refused:", e, flush=True)
    dist.destroy_process_group()
    """
)


def _two_ranks(folder: Path, store: Path) -> list[str]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANKS, str(rank), str(folder), str(store)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    return [o[0].strip() for o in outs]


def test_every_rank_stops_when_rank_zero_is_refused(tmp_path, holder):
    assert _two_ranks(tmp_path / "free", tmp_path / "store1") == ["locked", "ok"]
    proc = holder(tmp_path / "busy")
    out = _two_ranks(tmp_path / "busy", tmp_path / "store2")
    assert out[0].startswith("refused:") and f"pid {proc.pid}" in out[0]
    assert out[1].startswith("refused: rank 0 could not lock job.output_dir")


def test_single_process_needs_no_process_group(tmp_path):
    lock = acquire_run_lock(tmp_path, rank=0, world_size=1)
    assert lock is not None and lock.held
    with pytest.raises(RunLockedError):
        acquire_run_lock(tmp_path, rank=0, world_size=1)
    lock.release()
    assert acquire_run_lock(tmp_path, rank=1, world_size=1) is None  # only rank 0 locks


# ---------------------------------------------------------------- through `blip run`


def _launch(output_dir: Path, *overrides: str, nproc: int = 1) -> list[str]:
    from tests.recipes.launch import launch_args

    return launch_args(output_dir, list(overrides), nproc)


def _wait_for_step(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if metrics.exists():
            steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if x.strip()]
            if steps and max(steps) >= step:
                return
        time.sleep(0.1)
    raise TimeoutError(f"no step {step} in {metrics}")


def _metrics_steps(output_dir: Path) -> list[int]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if line.strip()]


def _start(output_dir: Path, log: Path, *overrides: str, nproc: int = 1) -> subprocess.Popen:
    """A run in the background, its console into ``log`` (a pipe nobody reads would fill up)."""
    with log.open("w") as f:
        return subprocess.Popen(
            _launch(output_dir, *overrides, nproc=nproc),
            cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT,
        )  # fmt: skip


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_blip_run_refuses_a_folder_in_use_and_writes_nothing(tmp_path, holder):
    out = tmp_path / "run"
    proc = holder(out)
    refused = subprocess.run(
        _launch(out, "training.steps=2"), cwd=REPO, env=_env(), capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"blip_pretrain: job.output_dir {out} is in use by another run: pid {proc.pid}" in (
        refused.stderr
    )
    assert "Traceback" not in refused.stderr
    assert [p.name for p in out.iterdir()] == [LOCK_FILE]


@pytest.mark.slow
def test_second_run_refused_then_requeue_after_kill_resumes(tmp_path):
    """A live run holds its folder: a second `blip run` there exits 2 naming it and writes
    nothing. After a `kill -9` of the first, a requeued run takes the stale lock over, resumes
    from the newest checkpoint and leaves each step once in metrics.jsonl."""
    out = tmp_path / "run"
    first = _start(out, tmp_path / "first.log", "training.steps=100000", "checkpoint.interval=10")
    try:
        _wait_for_step(first, out / "metrics.jsonl", 14)
        before = {p for p in out.rglob("*") if "checkpoints" not in p.parts}
        second = subprocess.run(
            _launch(out, "training.steps=30", "checkpoint.interval=10"),
            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"is in use by another run: pid {first.pid} on host" in second.stderr
        assert "Traceback" not in second.stderr
        after = {p for p in out.rglob("*") if "checkpoints" not in p.parts}
        assert after == before  # the refused run created nothing (no backup, no log)
    finally:
        _kill(first)
    killed_at = max(_metrics_steps(out))
    assert (out / LOCK_FILE).exists()  # left behind by the killed run
    requeued = subprocess.run(
        _launch(out, f"training.steps={killed_at + 5}", "checkpoint.interval=10"),
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert f"taking over the stale lock {out / LOCK_FILE}" in requeued.stderr
    resumed_at = int(re.search(r"resumed from \S+ at step (\d+)", requeued.stderr).group(1))
    assert resumed_at >= 10 and resumed_at % 10 == 0
    assert _metrics_steps(out) == list(range(1, killed_at + 6))  # each step once
    if killed_at > resumed_at:  # the dead run's records after the checkpoint are kept aside
        backup = [json.loads(x)["step"] for x in (out / "metrics.jsonl.1").read_text().split("\n")
                  if x.strip()]  # fmt: skip
        assert max(backup) == killed_at
    assert not (out / LOCK_FILE).exists()  # released at the end


@pytest.mark.slow
def test_fresh_restart_keeps_the_dead_runs_metrics_aside(tmp_path):
    """A run killed before its first checkpoint: the next one starts fresh, with a new
    metrics.jsonl and the old records in metrics.jsonl.1."""
    out = tmp_path / "run"
    first = _start(out, tmp_path / "first.log", "training.steps=100000",
                   "checkpoint.interval=100000")  # fmt: skip
    try:
        _wait_for_step(first, out / "metrics.jsonl", 3)
    finally:
        _kill(first)
    old = _metrics_steps(out)
    again = subprocess.run(
        _launch(out, "training.steps=2"), cwd=REPO, env=_env(), capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"taking over the stale lock {out / LOCK_FILE}" in again.stderr
    assert "fresh start" in again.stderr
    assert _metrics_steps(out) == [1, 2]
    backup = [json.loads(x)["step"] for x in (out / "metrics.jsonl.1").read_text().splitlines()]
    assert backup == old


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


@pytest.mark.slow
def test_orphaned_ranks_of_a_killed_launcher_keep_the_folder(tmp_path):
    """torchrun killed with -9 leaves its ranks running; a new two-rank run in the same
    folder exits 2 on every rank instead of writing next to them."""
    out = tmp_path / "run"
    # no stop check for a long while: orphans otherwise notice the lost launcher, save and exit
    launcher = _start(out, tmp_path / "first.log", "training.steps=100000", "data.batch_size=4",
                      "checkpoint.signal_check_every=100000", nproc=2)  # fmt: skip
    ranks: list[int] = []
    try:
        _wait_for_step(launcher, out / "metrics.jsonl", 2)
        ranks = _children(launcher.pid)
        holder = json.loads((out / LOCK_FILE).read_text())["pid"]
        assert holder in ranks
        _kill(launcher)
        time.sleep(1)
        os.kill(holder, 0)  # rank 0 outlived its launcher
        second = subprocess.run(
            _launch(out, "training.steps=3", "data.batch_size=4", nproc=2),
            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"pid {holder} on host" in second.stderr
        assert "rank 0 could not lock job.output_dir" in second.stderr
    finally:
        _kill(launcher)
        for pid in ranks:  # the orphans this test started, by id
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
