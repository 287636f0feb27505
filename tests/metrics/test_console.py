"""A dead console (a `| tee` whose reader got the same Ctrl-C) stops console output, not the run."""

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blip_recipes.metrics.console import BestEffortStream

REPO = Path(__file__).resolve().parents[2]


class _DeadPipe(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_failed_write_is_dropped_and_said_once_in_the_log(caplog):
    stream = BestEffortStream(_DeadPipe(), "stdout")
    with caplog.at_level(logging.WARNING, logger="blip_recipes.metrics.console"):
        assert stream.write("step 10 | loss 1.0\n") == len("step 10 | loss 1.0\n")
        stream.write("step 20\n")
        stream.flush()
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith("console: stdout is closed (BrokenPipeError")
    assert stream.failed


def _closed_pipe() -> int:
    """The write end of a pipe whose reader is gone (what `| tee` leaves after Ctrl-C)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    return write_end


PRINTER = """
import sys
from blip_recipes.metrics.run_logging import configure_logging
configure_logging()
for i in range(3):
    print("progress line", i)
    sys.stdout.flush()
print("buffered at exit")
"""


def test_a_closed_stdout_leaves_exit_status_0():
    """Without the guard the first flush raises BrokenPipeError (exit 1), and Python's own
    flush of a dead stdout at exit turns exit 0 into 120."""
    dead = _closed_pipe()
    try:
        proc = subprocess.run([sys.executable, "-c", PRINTER], stdout=dead, stderr=subprocess.PIPE,
                              cwd=REPO, timeout=60, text=True)  # fmt: skip
    finally:
        os.close(dead)
    assert proc.returncode == 0, proc.stderr
    assert "console: stdout is closed (BrokenPipeError" in proc.stderr  # stderr still works


def test_blip_ls_into_a_closed_pipe_exits_0():
    dead = _closed_pipe()
    try:
        proc = subprocess.run([sys.executable, "-m", "blip_recipes.cli", "ls"], stdout=dead,
                              stderr=subprocess.PIPE, cwd=REPO, timeout=60, text=True)  # fmt: skip
    finally:
        os.close(dead)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_under_a_dead_pipe_still_saves_and_exits_0(tmp_path, sig):
    """`blip run ... 2>&1 | tee log`, then Ctrl-C (tee dies of it too) before the first
    checkpoint: the run saves at its next stop check and exits 0 (the clean stop); the rank
    log says the console went away."""
    out = tmp_path / "out"
    dead = _closed_pipe()
    args = [sys.executable, "-m", "blip_recipes.cli", "run", "blip_pretrain", "--config", "debug",
            "training.steps=2000", "checkpoint.interval=1000", "metrics.log_every=2",
            f"job.output_dir={out}"]  # fmt: skip
    try:
        proc = subprocess.Popen(args, stdout=dead, stderr=dead, cwd=REPO, start_new_session=True)
    finally:
        os.close(dead)
    try:
        deadline = time.monotonic() + 120
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert proc.poll() is None, f"exited {proc.returncode} before training"
            assert time.monotonic() < deadline, "no metrics record after 120 s"
            time.sleep(0.2)
        os.killpg(proc.pid, sig)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    steps = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    assert steps and 4 <= steps[-1] < 1000, steps
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert steps[-1] >= last  # saved at the stop, after the last logged step
    log = (out / "logs" / "rank0.log").read_text()
    assert "console: stderr is closed (BrokenPipeError" in log
    assert f"{sig.name}: saving a checkpoint at step {steps[-1]}" in log
