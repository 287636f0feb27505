"""`blip run`'s stop forwarding, end to end: the first stop signal reaches every rank (their
process groups), a second Ctrl-C stops them now, a stopped rank is continued, ranks still running
after job.stop_timeout_s are killed, and a stop while the ranks import is kept for the recipe."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


WAITER = '''"""Test recipe: waits for a stop signal and writes its name; STUBBORN=1 keeps waiting."""
import os
import signal
import sys
import time
from pathlib import Path


def main(argv):
    out = Path(next(a.split("=", 1)[1] for a in argv if a.startswith("job.output_dir=")))
    rank = os.environ.get("RANK", "0")
    got = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, lambda s, _frame: got.append(signal.Signals(s).name))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ready{rank}").write_text(str(os.getpid()))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not got or os.environ.get("STUBBORN")):
        time.sleep(0.02)
    (out / f"got{rank}").write_text(",".join(got))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
'''


def start_waiter(tmp_path: Path, *launcher: str, stubborn: bool = False,
                 overrides: tuple[str, ...] = ()):  # fmt: skip
    """`blip run [launcher] waiter.py` in a session of its own, once every rank is waiting."""
    recipe, out = tmp_path / "waiter.py", tmp_path / "out"
    recipe.write_text(WAITER)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"STUBBORN": "1"} if stubborn else {})}
    args = [sys.executable, "-m", "blip_recipes.cli", "run", *launcher, str(recipe),
            "--config", "debug", f"job.output_dir={out}", *overrides]  # fmt: skip
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 90
    while not all((out / f"ready{r}").exists() for r in (0, 1)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    time.sleep(0.2)  # the handlers are installed before the ready file is written
    return proc, out


def _kill_all(proc, out: Path) -> None:
    """SIGKILL what is left: the launcher's process group and each rank's."""
    groups = [proc.pid]
    for r in (0, 1):
        ready = out / f"ready{r}"
        text = ready.read_text() if ready.exists() else ""
        if text.isdigit() and int(text) > 1:
            groups.append(int(text))
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_run_forwards_a_stop_signal_to_every_rank_and_exits_0(tmp_path, sig):
    """The launcher alone gets the signal (torchrun's ranks run in sessions of their own, so a
    process-group signal or Slurm's --signal=B:... reaches only `blip run`): every rank gets it,
    and their exit 0 is `blip run`'s exit 0 (torchrun alone exits 1, or dies of SIGUSR1)."""
    proc, out = start_waiter(tmp_path, "--standalone", "--nproc-per-node", "2")
    try:
        proc.send_signal(sig)
        if sig != signal.SIGINT:  # a repeat is ignored, not a hard stop
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        _kill_all(proc, out)
    assert proc.returncode == 0, err[-3000:]
    assert [(out / f"got{r}").read_text() for r in (0, 1)] == [sig.name, sig.name]
    assert f"stopped on {sig.name}" in err


def test_run_second_ctrl_c_stops_the_ranks_now(tmp_path):
    """Ranks still busy: a repeated SIGTERM changes nothing (Slurm and srun can deliver one stop
    twice), a later SIGINT hands over to torchrun's shutdown (SIGINT to the ranks, SIGKILL
    after --shutdown-timeout) and `blip run` exits 128 + SIGINT."""
    proc, out = start_waiter(tmp_path, "--standalone", "--nproc-per-node", "2",
                             "--shutdown-timeout", "2", stubborn=True)  # fmt: skip
    try:
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.5)
        assert proc.poll() is None  # still waiting for the ranks
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        _kill_all(proc, out)
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "torchrun stopped the ranks" in err
    assert not any((out / f"got{r}").exists() for r in (0, 1))  # SIGKILLed while waiting


def test_run_kills_ranks_still_running_after_the_stop_timeout(tmp_path):
    """Ranks that do not exit after a stop signal (a hung rank) are killed once
    job.stop_timeout_s has passed, with one line, and `blip run` exits 1: a stop always ends."""
    proc, out = start_waiter(tmp_path, "--standalone", "--nproc-per-node", "2", stubborn=True,
                             overrides=("job.stop_timeout_s=2",))  # fmt: skip
    try:
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - start
    finally:
        _kill_all(proc, out)
    assert proc.returncode == 1, err[-3000:]
    assert "still running 2 s after SIGTERM (job.stop_timeout_s)" in err
    assert 2 <= took < 30
    assert not any((out / f"got{r}").exists() for r in (0, 1))  # killed while waiting


def test_run_continues_a_stopped_rank_so_that_it_hears_the_stop(tmp_path):
    """A rank stopped with SIGSTOP (never continued) would never see a SIGTERM: the launcher
    sends SIGCONT first, and the job stops normally (exit 0)."""
    proc, out = start_waiter(tmp_path, "--standalone", "--nproc-per-node", "2")
    try:
        os.kill(int((out / "ready1").read_text()), signal.SIGSTOP)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        _kill_all(proc, out)
    assert proc.returncode == 0, err[-3000:]
    assert [(out / f"got{r}").read_text() for r in (0, 1)] == ["SIGTERM", "SIGTERM"]


SLOW_START = '''"""Test recipe: slow to import (like torch); reports a stop that came meanwhile."""
import os
import sys
import time
from pathlib import Path

OUT = Path(next(a.split("=", 1)[1] for a in sys.argv if a.startswith("job.output_dir=")))
OUT.mkdir(parents=True, exist_ok=True)
(OUT / f"importing{os.environ['RANK']}").write_text("")
time.sleep(3)


def main(argv):
    (OUT / f"got{os.environ['RANK']}").write_text(os.environ.get("BLIP_STOP_REQUESTED", ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
'''


def test_a_stop_while_the_ranks_import_is_kept_for_the_recipe(tmp_path):
    """SIGTERM to the whole job while the ranks still import: no rank dies of it (the rank
    entry point records it before any import) and the recipe finds it as the stop request."""
    recipe, out = tmp_path / "slow.py", tmp_path / "out"
    recipe.write_text(SLOW_START)
    args = [sys.executable, "-m", "blip_recipes.cli", "run", "--standalone", "--nproc-per-node",
            "2", str(recipe), "--config", "debug", f"job.output_dir={out}"]  # fmt: skip
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not all((out / f"importing{r}").exists() for r in (0, 1)):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)  # the launcher's group: it forwards to the ranks
        _, err = proc.communicate(timeout=60)
    finally:
        _kill_all(proc, out)
    assert proc.returncode == 0, err[-3000:]
    assert [(out / f"got{r}").read_text() for r in (0, 1)] == [str(int(signal.SIGTERM))] * 2
