"""Process group, device and device mesh set-up, and the clean shutdown sequence.

Why every run gets a process group, even a single CPU process: FSDP2, DCP and the momentum queue's
all-gather then run through one code path for world size 1 and N, so nothing in the recipe or the
model needs an ``if world_size > 1`` branch.

- Launched by torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the environment): the group is
  initialised from that environment (``env://``), whatever the world size.
- Launched as a plain ``python`` process (no torchrun variables): a one-rank group over an
  in-memory :class:`torch.distributed.HashStore`. No port, no file, nothing to clean up, and no
  collision between several single-process runs on the same host.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

#: Name of the one mesh dimension FSDP shards over (TorchTitan's name for it).
DP_SHARD = "dp_shard"


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    """Global rank."""
    world_size: int
    """Number of processes in the job."""
    local_rank: int
    """Rank on this host (picks the GPU)."""
    device: torch.device
    """Device this rank computes on (``cuda:<local_rank>`` or ``cpu``)."""
    mesh: DeviceMesh
    """1-D mesh over all ranks, dimension name ``dp_shard``; what ``apply_fsdp`` shards over."""

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that writes logs, metrics and config files."""
        return self.rank == 0


def _launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_device_type(device_kind: Literal["auto", "cuda", "cpu"]) -> str:
    """Map the config's device choice to ``"cuda"`` or ``"cpu"``; ``cuda`` without CUDA is an error."""
    if device_kind == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device_kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("parallel.device='cuda' but CUDA is not available; use 'auto' or 'cpu'")
    if device_kind not in ("cuda", "cpu"):
        raise ValueError(f"device must be one of auto, cuda, cpu; got {device_kind!r}")
    return device_kind


def init_distributed(device_kind: Literal["auto", "cuda", "cpu"] = "auto") -> DistInfo:
    """Initialise the default process group, pick the device and build the 1-D device mesh.

    CUDA uses ``cuda:nccl,cpu:gloo`` so that CPU-tensor collectives (DCP's object gathers, async
    checkpoint staging) also work on the default group; CPU uses gloo. Calling it again in a
    process whose group is already initialised reuses that group (tests, notebooks).

    Args:
        device_kind: ``auto`` (CUDA when present, else CPU), ``cuda`` or ``cpu``.

    Returns:
        DistInfo with rank, world size, local rank, device and mesh.
    """
    device_type = resolve_device_type(device_kind)
    if _launched_by_torchrun():
        rank = int(os.environ["RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    elif dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = rank % max(torch.cuda.device_count(), 1) if device_type == "cuda" else 0
    else:
        rank, world_size, local_rank = 0, 1, 0

    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"

    if not dist.is_initialized():
        kwargs = {"device_id": device} if device_type == "cuda" else {}
        if _launched_by_torchrun():
            dist.init_process_group(backend=backend, init_method="env://", **kwargs)
        else:
            dist.init_process_group(
                backend=backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs
            )

    mesh = init_device_mesh(device_type, (world_size,), mesh_dim_names=(DP_SHARD,))
    return DistInfo(rank, world_size, local_rank, device, mesh)


def shutdown_distributed() -> None:
    """Tear the process group down so that gloo never aborts the interpreter at exit.

    FSDP2 on gloo can SIGABRT at interpreter exit ("terminate called without an active
    exception") when a gloo thread wants the GIL during shutdown. What removes it: drop every
    reference to sharded modules and optimizers *before* calling this (the caller's job: ``del``
    them or let the recipe object go), then garbage-collect, synchronise the device, barrier so no
    rank tears down while another still communicates, and destroy the group. Safe to call twice
    or without a group.
    """
    gc.collect()
    if not dist.is_initialized():
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()
    gc.collect()
