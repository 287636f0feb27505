"""What a run records about itself: ``run_info.json``, CPU threads, the end-of-run summary.

- :func:`collect_run_info` / :func:`write_run_info`: versions, git commit, every rank's host,
  world size and data-parallel layout, seed, CPU threads, the resolved config and the start
  time, as ``<output_dir>/run_info.json`` (an earlier launch's file is kept as
  ``run_info.json.K``, K = 1, 2, ..., a higher K newer).
- :func:`configure_cpu_threads`: torch's intra-op threads for CPU runs (``job.cpu_threads``).
- :func:`run_summary` / :func:`summary_lines`: what the run did, for the log and
  ``run_info.json``'s ``summary``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

PACKAGES = ("torch", "torchao", "torchdata", "transformers", "tiktoken", "tensorboard", "wandb")
"""Distributions whose versions ``run_info.json`` records (absent ones as null)."""

RUN_INFO = "run_info.json"


# ---------------------------------------------------------------------------- CPU threads
def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask: what taskset/cgroups allow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def cpu_threads_for(
    device_type: str,
    configured: int = 0,
    local_world_size: int = 1,
    environ: Optional[Mapping[str, str]] = None,
    cores: Optional[int] = None,
    load: Optional[float] = None,
) -> tuple[Optional[int], str]:
    """The intra-op thread count a process should use, and why (None: leave torch's as is).

    In order: ``configured`` > 0 wins; ``OMP_NUM_THREADS`` set in the environment is respected
    (torch already follows it); a CUDA run keeps torch's default (its CPU work is light); a CPU
    run shares the cores it may use among the ranks of its host, less the cores other
    processes already keep busy (the 1-minute load average):
    ``max(1, min(cores, cores - load) // local_world_size)``. Why the load: torch's threads
    wait for each other at every op, so one thread descheduled by a neighbour stalls them all;
    on a shared 2-core box with a load of 5-8 the debug run went 4-10x faster with 1 thread
    than with torch's default of 2 (idle, 2 threads were 15% faster than 1).
    """
    environ = os.environ if environ is None else environ
    if configured > 0:
        return configured, "job.cpu_threads"
    if environ.get("OMP_NUM_THREADS"):
        return None, "OMP_NUM_THREADS"
    if device_type != "cpu":
        return None, "torch default"
    cores = available_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    free = min(cores, int(cores - load))
    threads = max(1, free // max(local_world_size, 1))
    why = f"{cores} cores, load {load:.1f}, {local_world_size} rank(s) on this host"
    return threads, why


def configure_cpu_threads(
    device_type: str, configured: int = 0, local_world_size: Optional[int] = None
) -> int:
    """Apply :func:`cpu_threads_for` (``torch.set_num_threads``) and return the thread count in
    use. ``local_world_size`` defaults to ``LOCAL_WORLD_SIZE`` (1 outside torchrun)."""
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads, why = cpu_threads_for(device_type, configured, local_world_size)
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    logger.info("CPU threads per process: %d (%s)", torch.get_num_threads(), why)
    return torch.get_num_threads()


# ---------------------------------------------------------------------------- run_info.json
def package_versions(packages: Sequence[str] = PACKAGES) -> dict[str, Optional[str]]:
    """``python`` and each installed distribution's version (None when not installed)."""
    versions: dict[str, Optional[str]] = {"python": sys.version.split()[0]}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    if torch.version.cuda:
        versions["cuda"] = torch.version.cuda
    return versions


def git_commit(path: Union[str, Path, None] = None, timeout: float = 5.0) -> Optional[str]:
    """``git rev-parse HEAD`` of the checkout holding ``path`` (default: this package), with
    ``-dirty`` appended when tracked files differ from it; None without git or a checkout."""
    folder = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=timeout, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    if not head:
        return None
    try:
        changed = subprocess.run(
            ["git", "-C", str(folder), "diff", "--quiet", "HEAD", "--"],
            capture_output=True, timeout=timeout,
        ).returncode  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return head
    return f"{head}-dirty" if changed == 1 else head


def gather_hostnames() -> list[str]:
    """Every rank's hostname, in rank order (collective when a process group is up)."""
    name = socket.gethostname()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [name]
    names: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(names, name)
    return [str(n) for n in names]


def _now_iso(unix: float) -> str:
    return _dt.datetime.fromtimestamp(unix, tz=_dt.timezone.utc).isoformat(timespec="seconds")


def flat_config(cfg: Any) -> dict[str, Any]:
    """``section.key`` -> value for the scalar settings (str, int, float, bool; lists and None
    left out), e.g. for TensorBoard hparams and the W&B config."""
    out: dict[str, Any] = {}

    def walk(value: Any, prefix: str) -> None:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                walk(getattr(value, f.name), f"{prefix}{f.name}.")
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(value, (str, int, float, bool)):
            out[prefix[:-1]] = value

    walk(cfg, "")
    return out


def collect_run_info(
    cfg: Any,
    dist_info: Any = None,
    start_time: Optional[float] = None,
    hosts: Optional[Sequence[str]] = None,
    **extra: Any,
) -> dict[str, Any]:
    """The record of a launch (collective when a process group is up: the hostnames).

    Args:
        cfg: the resolved config (a dataclass).
        dist_info: the recipe's :class:`~blip_recipes.parallel.DistInfo` (None: one process).
        start_time: UNIX start time (default now).
        hosts: every rank's hostname (:func:`gather_hostnames`, a collective); None gathers
            them here, so every rank must call.
        extra: more top-level entries (``cpu_threads``, ``resumed_from``...).
    """
    import time

    start_time = time.time() if start_time is None else start_time
    hosts = list(gather_hostnames() if hosts is None else hosts)
    world = dist_info.world_size if dist_info is not None else 1
    layout: dict[str, Any] = {"kind": "none", "mesh": {}}
    if dist_info is not None:
        mesh = dist_info.mesh
        names = mesh.mesh_dim_names or tuple(f"dim{i}" for i in range(mesh.ndim))
        layout = {"kind": dist_info.data_parallel, "mesh": dict(zip(names, mesh.shape))}
    layout["local_world_size"] = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    layout["nodes"] = len(set(hosts))
    info: dict[str, Any] = {
        "start_time": _now_iso(start_time),
        "start_time_unix": round(start_time, 3),
        "command": list(sys.argv),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "hosts": hosts,
        "world_size": world,
        "data_parallel": layout,
        "device": str(dist_info.device) if dist_info is not None else "cpu",
        "seed": getattr(getattr(cfg, "job", None), "seed", None),
        **extra,
        "config": dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg),
    }
    return info


def write_run_info(output_dir: Union[str, Path], info: Mapping[str, Any]) -> Path:
    """Write ``run_info.json`` (rank 0's job); a previous launch's file becomes
    ``run_info.json.K``. Returns the path written."""
    from blip_recipes.metrics.logger import backup_path

    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RUN_INFO
    if path.exists():
        path.rename(backup_path(path))
    _write_json(path, info)
    return path


def update_run_info(output_dir: Union[str, Path], **entries: Any) -> Optional[Path]:
    """Add or replace top-level ``entries`` (e.g. ``summary``) in ``run_info.json``."""
    path = Path(output_dir) / RUN_INFO
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    info.update(entries)
    _write_json(path, info)
    return path


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- summary
LOSS_KEYS = ("loss", "loss_ita", "loss_itm", "loss_lm", "itm_acc")


def run_summary(
    *,
    start_step: int,
    end_step: int,
    wall_seconds: float,
    samples_per_step: int,
    last_record: Optional[Mapping[str, Any]] = None,
    first_record: Optional[Mapping[str, Any]] = None,
    eval_records: Sequence[Mapping[str, Any]] = (),
    best_key: str = "r_mean",
    outputs: Optional[Mapping[str, Any]] = None,
    stopped_by: Optional[str] = None,
) -> dict[str, Any]:
    """The end-of-run figures: steps run, wall time, samples/s over the whole run (set-up
    excluded), the first and the last logged losses of this run, the best evaluation (highest ``best_key``) and where
    the outputs are."""
    steps = max(end_step - start_step, 0)
    summary: dict[str, Any] = {
        "steps": steps,
        "start_step": start_step,
        "end_step": end_step,
        "wall_seconds": round(wall_seconds, 3),
        "samples": steps * samples_per_step,
        "samples_per_sec": steps * samples_per_step / wall_seconds if wall_seconds > 0 else None,
        "last": {k: last_record.get(k) for k in LOSS_KEYS if k in last_record}
        if last_record
        else {},
        "first": {k: first_record.get(k) for k in LOSS_KEYS if k in first_record}
        if first_record and first_record is not last_record
        else {},
        "best_eval": None,
        "outputs": {k: str(v) for k, v in (outputs or {}).items() if v is not None},
    }
    if stopped_by:
        summary["stopped_by"] = stopped_by
    scored = [r for r in eval_records if isinstance(r.get(best_key), (int, float))]
    if scored:
        best = max(scored, key=lambda r: r[best_key])
        summary["best_eval"] = {k: v for k, v in best.items() if k != "time"}
    return summary


ITM_PRIOR = 2 / 3
"""ITM accuracy of a head that always says "no match" (one positive per two negatives)."""


def learning_line(first: Mapping[str, Any], last: Mapping[str, Any]) -> str | None:
    """``  learning: loss_ita fell 4.88 -> 3.88, ...; ITM accuracy 54% -> 66%, at its prior``:
    which losses fell over the run, and whether ITM got past always answering "no match"."""
    keys = [k for k in LOSS_KEYS if k != "itm_acc" and isinstance(first.get(k), (int, float))
            and isinstance(last.get(k), (int, float))]  # fmt: skip
    if not keys:
        return None
    fell = [f"{k} {first[k]:.2f} -> {last[k]:.2f}" for k in keys if last[k] < first[k]]
    rose = [f"{k} {first[k]:.2f} -> {last[k]:.2f}" for k in keys if last[k] >= first[k]]
    parts = [("fell: " + ", ".join(fell)) if fell else "no loss fell"]
    if rose:
        parts.append("did not fall: " + ", ".join(rose))
    acc0, acc = first.get("itm_acc"), last.get("itm_acc")
    if isinstance(acc0, (int, float)) and isinstance(acc, (int, float)):
        verdict = ("above its 67% \"no match\" prior" if acc > ITM_PRIOR + 0.02
                   else "not yet above its 67% \"no match\" prior (ITM has not learnt)")  # fmt: skip
        parts.append(f"ITM accuracy {100 * acc0:.0f}% -> {100 * acc:.0f}%, {verdict}")
    return "  learning: " + "; ".join(parts)


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """The summary as a few human lines for the log."""
    from blip_recipes.metrics.logger import format_duration

    sps = summary.get("samples_per_sec")
    head = (
        f"run summary: {summary['steps']} steps ({summary['start_step']} -> "
        f"{summary['end_step']}) in {format_duration(summary['wall_seconds'])}"
        + (f", {sps:.1f} samples/s" if sps else "")
        + (f", stopped by {summary['stopped_by']}" if summary.get("stopped_by") else "")
    )
    lines = [head]
    last = {k: v for k, v in summary.get("last", {}).items() if isinstance(v, (int, float))}
    if last:
        lines.append("  last: " + ", ".join(f"{k} {v:.4f}" for k, v in last.items()))
    trend = learning_line(summary.get("first", {}), last)
    if trend:
        lines.append(trend)
    best = summary.get("best_eval")
    if best:
        shown = ", ".join(
            f"{k} {v:.2f}" for k, v in best.items() if k != "step" and isinstance(v, float)
        )
        lines.append(f"  best eval (step {best.get('step')}): {shown}")
    for name, path in summary.get("outputs", {}).items():
        lines.append(f"  {name}: {path}")
    return lines
