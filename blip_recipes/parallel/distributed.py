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

import contextlib
import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

#: Mesh dimension names (TorchTitan's): parameters are sharded over ``dp_shard`` and replicated
#: over ``dp_replicate``; ``dp`` is the two flattened (every data-parallel rank).
DP_SHARD = "dp_shard"
DP_REPLICATE = "dp_replicate"
DP = "dp"

DataParallel = Literal["fsdp", "hsdp", "ddp"]

DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0
"""``job.collective_timeout_s``'s default: how long a collective waits for a peer."""

_timeout = timedelta(seconds=DEFAULT_COLLECTIVE_TIMEOUT_S)


def collective_timeout() -> timedelta:
    """The timeout the default group was created with; give it to every ``dist.new_group`` (a
    new group otherwise gets torch's default of 30 minutes)."""
    return _timeout


@contextlib.contextmanager
def new_groups_wait_at_most(timeout: timedelta) -> Iterator[None]:
    """Groups made inside without a timeout of their own wait at most ``timeout``.

    torch gives such a group its backend's default (30 minutes for gloo, 10 for NCCL), not the
    default group's; ``init_device_mesh`` makes its dimension groups that way (``new_group``, or
    ``split_group`` under NCCL, both with ``timeout=None``) and offers no timeout argument (its
    backend options are per backend, and the group must keep both gloo and NCCL on CUDA). So
    the defaults torch reads are ``timeout`` while the groups are made.
    """
    saved = c10d.default_pg_timeout, c10d.default_pg_nccl_timeout
    c10d.default_pg_timeout = timeout
    if isinstance(saved[1], timedelta):  # None when torch was built without NCCL
        c10d.default_pg_nccl_timeout = timeout
    try:
        yield
    finally:
        c10d.default_pg_timeout, c10d.default_pg_nccl_timeout = saved


class CollectiveTimeoutError(RuntimeError):
    """A collective waited ``job.collective_timeout_s`` for a peer rank that never came."""


_CLOSED_MARKERS = ("Connection closed by peer", "pair closure", "Connection reset by peer")
"""What gloo says when a peer's process ended (it failed, or was killed) while it waited."""


def is_collective_timeout(error: BaseException) -> bool:
    """True for the errors gloo, NCCL and the TCP store raise when a peer does not answer in
    time (a stopped, hung or lost rank); also for a peer that closed its connection."""
    text = str(error)
    return isinstance(error, (CollectiveTimeoutError, dist.DistStoreError)) or any(
        marker in text
        for marker in ("Timed out waiting", "Watchdog caught collective operation timeout",
                       *_CLOSED_MARKERS)  # gloo, NCCL, gloo
    )  # fmt: skip


def describe_collective_timeout(error: BaseException) -> str:
    """One line for a stalled or failed peer: what was waited for, and for how long."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if any(marker in first for marker in _CLOSED_MARKERS):
        return (
            "a peer rank left the job while this rank waited for it in a collective (it failed "
            f"or was killed; its own line or log says why): "
            f"{first.split('. This is typically')[0][:300]}"
        )
    return (
        f"a peer rank did not answer within job.collective_timeout_s="
        f"{_timeout.total_seconds():g} s (a stopped, hung or lost rank; its log may say why); "
        f"waiting for: {first[:300]}"
    )


@dataclass
class DistInfo:
    """Where this process sits in the job, and the data-parallel mesh it trains on."""

    rank: int
    """Global rank."""
    world_size: int
    """Number of processes in the job."""
    local_rank: int
    """Rank on this host (picks the GPU)."""
    device: torch.device
    """Device this rank computes on (``cuda:<local_rank>`` or ``cpu``)."""
    mesh: DeviceMesh
    """What ``fully_shard`` shards over: 1-D ``(dp_shard,)`` for fsdp, 2-D ``(dp_replicate,
    dp_shard)`` for hsdp (replicas x shard size) and ddp (world x 1)."""
    dp_group: dist.ProcessGroup
    """Every data-parallel rank (replicate x shard, in global rank order): the queue all-gather,
    the per-step agreement and the stop check run on it."""
    data_parallel: DataParallel = "fsdp"
    """The layout ``mesh`` implements."""

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that writes logs, metrics and config files."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """True when the model is wrapped with FSDP2 (more than one rank, any layout)."""
        return self.world_size > 1


def _launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def restart_scoped_store() -> dist.Store | None:
    """The ``env://`` store under a per-attempt prefix, when torchrun reuses one store across
    restarts of the worker group; else None (plain ``env://`` initialisation is right).

    torchrun's workers share its agent's TCPStore when ``TORCHELASTIC_USE_AGENT_STORE=True``:
    always with the static rendezvous (``--master-addr/--master-port``, the default without
    ``--rdzv-backend``/``--standalone``), and with the c10d rendezvous unless
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``. That store outlives a restart (``--max-restarts``),
    so the restarted ranks find the previous attempt's keys, gloo's peer addresses among them,
    and connect to ports of dead processes ("Gloo connectFullMesh failed ... Connection
    refused"), or not, depending on who writes first. Prefixing every key with
    ``TORCHELASTIC_RESTART_COUNT`` gives each attempt its own names. The count is per agent: it
    agrees across nodes when every node's group fails and restarts together (static
    rendezvous); ``blip run`` sets ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` so that the c10d
    rendezvous hands out a fresh store each round instead, and this function is not used there.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store, _, _ = next(dist.rendezvous("env://", timeout=_timeout))
    store.set_timeout(_timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"restart-{attempt}/default_pg", store)


def resolve_device_type(device_kind: Literal["auto", "cuda", "cpu"]) -> str:
    """Map the config's device choice to ``"cuda"`` or ``"cpu"``; ``cuda`` without CUDA is an error."""
    if device_kind == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device_kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("parallel.device='cuda' but CUDA is not available; use 'auto' or 'cpu'")
    if device_kind not in ("cuda", "cpu"):
        raise ValueError(f"device must be one of auto, cuda, cpu; got {device_kind!r}")
    return device_kind


def init_distributed(
    device_kind: Literal["auto", "cuda", "cpu"] = "auto",
    data_parallel: DataParallel = "fsdp",
    dp_replicate: int = 0,
    timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
) -> DistInfo:
    """Initialise the default process group, pick the device and build the data-parallel mesh.

    CUDA uses ``cuda:nccl,cpu:gloo`` so that CPU-tensor collectives (DCP's object gathers, async
    checkpoint staging, the stop check) also work; CPU uses gloo. Calling it again in a process
    whose group is already initialised reuses that group (tests, notebooks).

    Args:
        device_kind: ``auto`` (CUDA when present, else CPU), ``cuda`` or ``cpu``.
        data_parallel: ``fsdp``, ``hsdp`` or ``ddp`` (see :func:`build_data_parallel_mesh`).
        dp_replicate: hsdp replicas; 0 = one per node (``WORLD_SIZE / LOCAL_WORLD_SIZE``).
        timeout_s: ``job.collective_timeout_s``: how long the rendezvous and every collective of
            the default group (and of groups made with :func:`collective_timeout`) wait for a
            peer before raising.

    Returns:
        DistInfo with rank, world size, local rank, device, mesh and data-parallel group.
    """
    global _timeout
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
        _timeout = timedelta(seconds=timeout_s)
        kwargs: dict = {"timeout": _timeout}
        if device_type == "cuda":
            kwargs["device_id"] = device
        if _launched_by_torchrun():
            store = restart_scoped_store()
            if store is None:
                dist.init_process_group(backend=backend, init_method="env://", **kwargs)
            else:
                dist.init_process_group(
                    backend=backend, store=store, rank=rank, world_size=world_size, **kwargs
                )
        else:
            dist.init_process_group(
                backend=backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs
            )

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    mesh, dp_group = build_data_parallel_mesh(
        device_type, world_size, data_parallel, dp_replicate, local_world
    )
    return DistInfo(rank, world_size, local_rank, device, mesh, dp_group, data_parallel)


def hsdp_replicas(world_size: int, dp_replicate: int, ranks_per_node: int) -> int:
    """The hsdp replica count: ``dp_replicate``, or one per node when it is 0.

    Raises:
        ValueError: when the replicas do not divide the world size.
    """
    replicas = dp_replicate or max(world_size // max(ranks_per_node, 1), 1)
    if replicas <= 0 or world_size % replicas:
        raise ValueError(
            f"parallel.dp_replicate={replicas} must divide the world size {world_size} "
            "(hsdp shards over world size / dp_replicate ranks)"
        )
    return replicas


def build_data_parallel_mesh(
    device_type: str,
    world_size: int,
    data_parallel: DataParallel,
    dp_replicate: int = 0,
    ranks_per_node: int = 1,
) -> tuple[DeviceMesh, dist.ProcessGroup]:
    """The mesh ``fully_shard`` uses and the group spanning every data-parallel rank.

    - ``fsdp``: 1-D ``(dp_shard=W,)``: parameters, gradients and optimizer state sharded over all
      ranks (all-gather in forward/backward, reduce-scatter of gradients).
    - ``hsdp``: 2-D ``(dp_replicate=R, dp_shard=W/R)``, as TorchTitan builds it: sharded within a
      group of W/R ranks (a node: fast links), replicated across the R groups (gradients
      all-reduced across them after the reduce-scatter within).
    - ``ddp``: 2-D ``(dp_replicate=W, dp_shard=1)``: FSDP2 with a shard degree of one is data
      parallelism: no all-gather, gradients all-reduced per block during backward (bucketed and
      overlapped like DDP's reducer), parameter names unchanged.

    The group of every data-parallel rank is the mesh flattened (``dp``); its rank order is the
    global rank order for every layout, so gathered queues are identical across layouts.

    Every group of the mesh waits at most ``job.collective_timeout_s`` (:func:`collective_timeout`)
    for a peer, as the default group does (:func:`new_groups_wait_at_most`).
    """
    if data_parallel not in ("fsdp", "hsdp", "ddp"):
        raise ValueError(f"data_parallel must be fsdp, hsdp or ddp, got {data_parallel!r}")
    with new_groups_wait_at_most(_timeout):
        if data_parallel == "fsdp" or world_size == 1:
            mesh = init_device_mesh(device_type, (world_size,), mesh_dim_names=(DP_SHARD,))
            return mesh, mesh.get_group()
        replicas = world_size if data_parallel == "ddp" else hsdp_replicas(
            world_size, dp_replicate, ranks_per_node)  # fmt: skip
        mesh = init_device_mesh(
            device_type, (replicas, world_size // replicas),
            mesh_dim_names=(DP_REPLICATE, DP_SHARD),
        )  # fmt: skip
        return mesh, mesh._flatten(DP).get_group()


def shutdown_distributed(barrier: bool = True) -> None:
    """Tear the process group down so that gloo never aborts the interpreter at exit.

    FSDP2 on gloo can SIGABRT at interpreter exit ("terminate called without an active
    exception") when a gloo thread wants the GIL during shutdown. What removes it: drop every
    reference to sharded modules and optimizers *before* calling this (the caller's job: ``del``
    them or let the recipe object go), then garbage-collect, synchronise the device, barrier so no
    rank tears down while another still communicates, and destroy the group. Safe to call twice
    or without a group. ``barrier=False`` after a failure (a peer that stopped answering, or
    one still waiting in a collective this rank left, would make the barrier wait a whole
    ``collective_timeout_s``).
    """
    gc.collect()
    if not dist.is_initialized():
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    try:
        if barrier:
            dist.barrier()
    finally:
        dist.destroy_process_group()
    gc.collect()
