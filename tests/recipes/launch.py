"""Launch the real `blip run` CLI on the tiny model and read what the run wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: The tiny, fast configuration every recipe test starts from (debug.toml + these overrides).
TINY = [
    "model.image_size=32",
    "momentum.queue_size=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.sources.0.num_samples=256",
    "metrics.log_every=1",
    "metrics.tensorboard=false",
    "lr_scheduler.warmup_steps=2",
]


class Run:
    """One finished (or signalled) run: its process result and output folder."""

    def __init__(self, proc: subprocess.CompletedProcess, output_dir: Path) -> None:
        self.proc, self.output_dir = proc, output_dir

    @property
    def metrics(self) -> list[dict]:
        path = self.output_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def losses(self) -> dict[int, float]:
        return {m["step"]: m["loss"] for m in self.metrics}

    def checkpoints(self) -> list[Path]:
        folder = self.output_dir / "checkpoints"
        return sorted(folder.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def launch_args(output_dir: Path, overrides: list[str], nproc: int = 1,
                launcher: Sequence[str] | None = None) -> list[str]:  # fmt: skip
    """`blip run` argv: in process for one rank, else torchrun --standalone (or `launcher`)."""
    if launcher is None:
        launcher = ["--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else []
    return [sys.executable, "-m", "blip_recipes.cli", "run", *launcher, "blip_pretrain",
            "--config", "debug", *TINY, f"job.output_dir={output_dir}", *overrides]  # fmt: skip


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run_recipe(output_dir: Path, *overrides: str, nproc: int = 1, timeout: int = 300) -> Run:
    proc = subprocess.run(
        launch_args(output_dir, list(overrides), nproc),
        cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env(),
    )  # fmt: skip
    return Run(proc, output_dir)


def run_and_signal(output_dir: Path, *overrides: str, after_step: int, timeout: int = 300) -> Run:
    """Start a run, send SIGTERM once metrics.jsonl shows `after_step`, wait for it to exit."""
    proc = subprocess.Popen(
        launch_args(output_dir, list(overrides)), cwd=REPO, env=env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    metrics = output_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and any(
            json.loads(line)["step"] >= after_step for line in metrics.read_text().splitlines()
        ):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=timeout)
    return Run(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), output_dir)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a c10d rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_nodes(output_dir: Path, *overrides: str, nproc_per_node: int = 2,
                  timeout: int = 600) -> list[Run]:  # fmt: skip
    """Two torchrun agents on this machine, as two nodes of one job (c10d rendezvous)."""
    endpoint = f"127.0.0.1:{free_port()}"
    procs = []
    for node in range(2):
        launcher = ["--nnodes", "2", "--node-rank", str(node), "--nproc-per-node",
                    str(nproc_per_node), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                    "--rdzv-id", "blip-two-nodes"]  # fmt: skip
        args = [sys.executable, "-m", "blip_recipes.cli", "run", *launcher, "blip_pretrain",
                "--config", "debug", *TINY, f"job.output_dir={output_dir}", *overrides]  # fmt: skip
        procs.append(subprocess.Popen(args, cwd=REPO, env=env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    runs = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        runs.append(Run(subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
                        output_dir))  # fmt: skip
    return runs


def child_pids(pid: int) -> list[int]:
    """Live children of ``pid`` (Linux ``/proc``): torchrun's ranks when ``pid`` is `blip run`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and stat[1] == str(pid) and stat[0] not in ("Z", "X"):
                found.append(int(entry))
    return sorted(found)


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, or a pid no longer there, is not alive)."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


class Started:
    """A `blip run` started in a process group (and session) of its own, as a Slurm job step or
    a shell job is: ``signal_group`` reaches the launcher and everything in its group (the
    in-process recipe and its loader workers; under torchrun only the launcher, because torchrun
    starts each rank in a session of its own). Use as a context manager: on exit, whatever is
    still running (the launcher's group and every rank seen) is SIGKILLed."""

    def __init__(self, args: list[str], output_dir: Path) -> None:
        self.output_dir = output_dir
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        fd, out = tempfile.mkstemp(
            prefix=f"{output_dir.name}-", suffix=".out", dir=output_dir.parent
        )
        os.close(fd)
        self._out, self._err = Path(out), Path(out).with_suffix(".err")
        with open(self._out, "w") as stdout, open(self._err, "w") as stderr:
            self.proc = subprocess.Popen(args, cwd=REPO, env=env(), stdout=stdout, stderr=stderr,
                                         start_new_session=True)  # fmt: skip
        self.seen_ranks: set[int] = set()

    def __enter__(self) -> Started:
        return self

    def __exit__(self, *exc: object) -> None:
        leaders = [
            p for p in self.seen_ranks if alive(p) and (_stat(p) or ["", "", ""])[2] == str(p)
        ]
        for pgid in {self.proc.pid, *leaders}:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=30)

    def ranks(self) -> list[int]:
        """The launcher's children (torchrun's ranks), remembered for the clean-up."""
        pids = child_pids(self.proc.pid)
        self.seen_ranks.update(pids)
        return pids

    def last_step(self) -> int:
        """The newest step in metrics.jsonl (0 before the first)."""
        path, steps = self.output_dir / "metrics.jsonl", [0]
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    steps.append(json.loads(line)["step"])
                except (ValueError, KeyError):
                    pass  # a line being written
        return max(steps)

    def wait_for_step(self, step: int, timeout: float = 300) -> int:
        """Wait until metrics.jsonl shows ``step`` (returns the step seen)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.ranks()
            seen = self.last_step()
            if seen >= step:
                return seen
            if self.proc.poll() is not None:
                raise AssertionError(f"run ended (exit {self.proc.returncode}) before step "
                                     f"{step}:\n{self._err.read_text()[-3000:]}")  # fmt: skip
            time.sleep(0.05)
        raise AssertionError(f"no step {step} within {timeout} s")

    def signal_group(self, sig: int) -> None:
        """``kill -SIG -- -PGID``: the launcher's whole process group."""
        os.killpg(self.proc.pid, sig)

    def signal_launcher(self, sig: int) -> None:
        """The launcher process alone (Slurm's ``--signal=B:...`` reaches the batch shell only)."""
        self.proc.send_signal(sig)

    def finish(self, timeout: float = 300) -> Run:
        """Wait for the launcher to exit; its exit status and output as a `Run`."""
        self.proc.wait(timeout=timeout)
        done = subprocess.CompletedProcess(
            self.proc.args, self.proc.returncode, self._out.read_text(), self._err.read_text()
        )
        return Run(done, self.output_dir)

    def output(self) -> str:
        """stdout and stderr so far (for assertion messages)."""
        return self._out.read_text()[-2000:] + self._err.read_text()[-4000:]


def start_run(output_dir: Path, *overrides: str, nproc: int = 1,
              launcher: Sequence[str] | None = None) -> Started:  # fmt: skip
    """Start `blip run` on the tiny model in a new session; see `Started`."""
    return Started(launch_args(output_dir, list(overrides), nproc, launcher), output_dir)


def consolidated(checkpoint: Path, scratch: Path, keys: Sequence[str] = ("model", "momentum")):
    """The tensors of a DCP checkpoint under ``keys``, in one process (``dcp_to_torch_save``),
    flattened to ``{"model.vision.x": tensor, ...}``."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = scratch / f"{checkpoint.parent.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint, target)
    state = torch.load(target, weights_only=False)
    flat: dict = {}

    def walk(tree, prefix: str) -> None:
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, torch.Tensor):
                flat[f"{prefix}{key}"] = value

    walk({k: state[k] for k in keys}, "")
    return flat
