"""Run a function on N gloo ranks in fresh processes: the multi-process harness of the CPU tests.

Private (tests and benchmarks only), but importable by every test folder so that all
multi-process tests start ranks the same way: ``torch.multiprocessing.spawn`` with a
``file://`` rendezvous in a temporary folder (no ports, so parallel test runs never collide),
and the clean shutdown sequence at the end so no rank aborts at exit.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(
    rank: int, world_size: int, init_file: str, fn: Callable[..., Any], args: tuple
) -> None:
    from blip_recipes.parallel.distributed import shutdown_distributed

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        fn(rank, world_size, *args)
    finally:
        shutdown_distributed()


def spawn_ranks(fn: Callable[..., Any], world_size: int, tmp_dir: Path, *args: Any) -> None:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; raise if any rank fails.

    ``fn`` must be importable from a child process (a module-level function). Results travel
    back through files the function writes (``tmp_dir`` is a natural place).
    """
    init_file = Path(tmp_dir) / f"dist_init_{os.getpid()}_{id(fn)}"
    if init_file.exists():
        init_file.unlink()
    mp.spawn(_worker, args=(world_size, str(init_file), fn, args), nprocs=world_size, join=True)
