"""Launch the real `blip run` CLI on the tiny model and read what the run wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: The tiny, fast configuration every recipe test starts from (debug.toml + these overrides).
TINY = [
    "model.image_size=32",
    "model.queue_size=32",
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


def launch_args(output_dir: Path, overrides: list[str], nproc: int = 1) -> list[str]:
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
