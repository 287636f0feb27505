"""Stop signals, restarts and a lost launcher, through the real `blip run` CLI (tiny model).

Every run starts in a session of its own (`start_run`), so a signal to its process group is
what `kill -TERM -- -PGID`, a shell's job control or a Slurm job step deliver; torchrun starts
each rank in a session of its own, so `signal_everything` also signals each rank's group, as
Slurm's cgroup-wide delivery does (loader workers included).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from blip_recipes.checkpoint import is_complete
from tests.recipes.launch import (
    REPO,
    alive,
    child_pids,
    consolidated,
    env,
    free_port,
    run_recipe,
    start_run,
)

#: 16 steps, a checkpoint every 4, a stop check at every step (so a stop lands within a step).
COMMON = ["training.steps=16", "checkpoint.interval=4", "checkpoint.signal_check_every=1"]


def assert_ok(run) -> None:
    assert run.proc.returncode == 0, run.proc.stderr[-4000:]


def assert_clean_stop(run, total: int = 16) -> int:
    """Exit 0, no traceback, and the newest checkpoint is complete at the last step reached."""
    assert_ok(run)
    assert "Traceback" not in run.proc.stderr, run.proc.stderr[-4000:]
    assert "DataLoader worker" not in run.proc.stderr, run.proc.stderr[-4000:]
    reached = max(run.losses())
    assert 1 <= reached < total
    newest = run.checkpoints()[-1]
    assert newest.name == f"step-{reached}" and is_complete(newest)
    return reached


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """`straight(nproc)`: one uninterrupted run of COMMON per world size (shared by the tests)."""
    runs = {}

    def get(nproc: int):
        if nproc not in runs:
            run = run_recipe(tmp_path_factory.mktemp("straight") / "run", *COMMON, nproc=nproc)
            assert_ok(run)
            runs[nproc] = run
        return runs[nproc]

    return get


def signal_everything(started, sig: int) -> None:
    """The launcher's group and every rank's group (ranks and their loader workers)."""
    started.signal_group(sig)
    for pid in started.ranks():
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass


def stop_and_resume(tmp_path, straight, nproc: int, workers: int, sig: int, deliver) -> None:
    out = tmp_path / "run"
    overrides = [*COMMON, f"data.num_workers={workers}"]
    with start_run(out, *overrides, nproc=nproc) as started:
        started.wait_for_step(2)
        deliver(started, sig)
        stopped = started.finish(timeout=300)
    reached = assert_clean_stop(stopped)
    resumed = run_recipe(out, *overrides, nproc=nproc)
    assert_ok(resumed)
    assert f"resumed from {out / 'checkpoints' / f'step-{reached}'}" in resumed.proc.stderr
    assert resumed.losses() == straight(nproc).losses()  # exact, every step


def test_sigterm_to_process_group_with_loader_workers(tmp_path, straight):
    """One rank in process, 2 loader workers, SIGTERM to the whole process group (the workers
    too): saved at the step reached, exit 0, and the resumed run matches a straight one."""
    stop_and_resume(tmp_path, straight, 1, 2, signal.SIGTERM, lambda s, sig: s.signal_group(sig))


@pytest.mark.slow
@pytest.mark.parametrize(
    "nproc, workers, sig, delivery",
    [
        (1, 0, signal.SIGTERM, "group"),
        (1, 2, signal.SIGUSR1, "group"),
        (2, 0, signal.SIGTERM, "group"),
        (2, 2, signal.SIGTERM, "group"),
        (2, 2, signal.SIGTERM, "everything"),
        (2, 2, signal.SIGUSR1, "everything"),
        (2, 2, signal.SIGUSR1, "launcher"),
    ],
)
def test_stop_signal_saves_and_resumes_bitwise(tmp_path, straight, nproc, workers, sig, delivery):
    """`group`: kill -SIG -- -PGID; `everything`: every process, as Slurm signals a job step;
    `launcher`: the launcher alone (Slurm's --signal=B:USR1@120 reaching only `blip run`)."""
    deliver = {
        "group": lambda s, sig: s.signal_group(sig),
        "everything": signal_everything,
        "launcher": lambda s, sig: s.signal_launcher(sig),
    }[delivery]
    stop_and_resume(tmp_path, straight, nproc, workers, sig, deliver)


@pytest.mark.slow
@pytest.mark.parametrize("rendezvous", ["standalone", "static"])
def test_max_restarts_resumes_to_the_same_weights(tmp_path, straight, rendezvous):
    """A rank SIGKILLed after a checkpoint: torchrun restarts the group (--max-restarts 1), it
    resumes from the newest complete checkpoint and ends with the uninterrupted run's weights
    and momentum state, bitwise."""
    launch = ["--standalone"] if rendezvous == "standalone" else ["--master-port", str(free_port())]
    launcher = [*launch, "--nproc-per-node", "2", "--max-restarts", "1"]
    out = tmp_path / "run"
    with start_run(out, *COMMON, "data.num_workers=2", launcher=launcher) as started:
        started.wait_for_step(5)  # step-4 was saved
        victim = started.ranks()[-1]
        os.kill(victim, signal.SIGKILL)
        run = started.finish(timeout=400)
    assert_ok(run)
    assert "resumed from" in run.proc.stderr
    assert run.losses() == straight(2).losses()
    ours = consolidated(run.checkpoints()[-1], tmp_path)
    reference = consolidated(straight(2).checkpoints()[-1], tmp_path)
    assert run.checkpoints()[-1].name == "step-16" and ours.keys() == reference.keys()
    assert any(k.startswith("momentum.") for k in ours)
    for key in reference:
        assert torch.equal(ours[key], reference[key]), key


@pytest.mark.slow
def test_ranks_of_a_killed_launcher_save_and_exit(tmp_path):
    """SIGKILL to `blip run` alone: its ranks notice that their parent is gone at the next stop
    check, save a checkpoint together and exit (loader workers too) instead of running on."""
    out = tmp_path / "run"
    overrides = ["training.steps=400", "checkpoint.interval=1000",
                 "checkpoint.signal_check_every=2", "data.num_workers=2"]  # fmt: skip
    with start_run(out, *overrides, nproc=2) as started:
        started.wait_for_step(3)
        ranks = started.ranks()
        workers = [w for r in ranks for w in child_pids(r)]
        assert len(ranks) == 2 and len(workers) == 4, (ranks, workers)
        os.kill(started.proc.pid, signal.SIGKILL)
        started.proc.wait(timeout=10)
        deadline = time.monotonic() + 120
        while any(alive(p) for p in ranks + workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(p) for p in ranks + workers), started.output()
        last = started.last_step()
    checkpoints = sorted(
        (out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1])
    )
    assert checkpoints and is_complete(checkpoints[-1]), started.output()
    assert 3 <= int(checkpoints[-1].name.split("-")[1]) == last < 400
    assert "launcher (pid" in (out / "logs" / "rank0.log").read_text()


RESTART_RECIPE = '''
"""Attempt 0: both ranks form a gloo group, then rank 1 dies. Attempt 1: both must connect."""
import os, sys, time
from pathlib import Path

import torch
import torch.distributed as dist

from blip_recipes.config import parse_recipe_args
from blip_recipes.parallel import init_distributed, shutdown_distributed


def main(argv=None):
    cfg = parse_recipe_args(argv, description="restart probe")
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    info = init_distributed("cpu")
    total = torch.tensor([info.rank + 1])
    dist.all_reduce(total)
    if attempt == 0:
        if info.rank == 1:
            os._exit(3)
        time.sleep(120)  # until torchrun stops this rank to restart the group
    out = Path(cfg.job.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"attempt{attempt}-rank{info.rank}").write_text(str(int(total)))
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


@pytest.mark.parametrize(
    "rendezvous",
    ["standalone", pytest.param("static", marks=pytest.mark.slow)],  # ~50 s each on 2 cores
)
def test_restarted_worker_group_connects(tmp_path, rendezvous):
    """The restarted group must not read the previous attempt's gloo addresses from a store that
    outlived it (a fresh c10d store per round; a per-attempt key prefix on torchrun's reused
    static store)."""
    recipe = tmp_path / "restart_probe.py"
    recipe.write_text(textwrap.dedent(RESTART_RECIPE))
    launch = ["--standalone"] if rendezvous == "standalone" else ["--master-port", str(free_port())]
    out = tmp_path / "out"
    args = [sys.executable, "-m", "blip_recipes.cli", "run", *launch, "--nproc-per-node", "2",
            "--max-restarts", "1", "--shutdown-timeout", "5", "--monitor-interval", "0.2",
            str(recipe), "--config", "debug", f"job.output_dir={out}"]  # fmt: skip
    done = subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    assert [(out / f"attempt1-rank{r}").read_text() for r in (0, 1)] == ["3", "3"]
