"""Small collective helpers for evaluation: shards, uneven all-gathers, FSDP2-safe forwards."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from blip_recipes.data.watchdog import watched_batches

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_range(total: int, rank: int, world: int) -> range:
    """Contiguous, balanced share of `range(total)` for `rank` (sizes differ by at most one)."""
    return range(total * rank // world, total * (rank + 1) // world)


def all_gather_rows(local: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenate every rank's `local` rows in rank order (shards from :func:`shard_range`).

    Ranks may hold different row counts; rows are padded to the largest share for the
    collective and trimmed afterwards. Without a process group `local` is returned.
    """
    rank, world = rank_and_world()
    if world == 1:
        return local
    counts = [len(shard_range(total, r, world)) for r in range(world)]
    if local.shape[0] != counts[rank]:
        raise ValueError(f"rank {rank} holds {local.shape[0]} rows, expected {counts[rank]}")
    padded = local.new_zeros((max(counts), *local.shape[1:]))
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[:n] for g, n in zip(gathered, counts)])


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (no-op without a process group)."""
    if rank_and_world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def is_sharded(model: nn.Module) -> bool:
    """True when any submodule is an FSDP2 module (forwards are then collectives)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def run_balanced(
    items: Iterable[T], length: int, fn: Callable[[T], Any], dummy: T, balanced: bool
) -> Iterator[tuple[T, Any]]:
    """Call `fn` on each of `length` items; with `balanced`, every rank makes the same number
    of calls.

    FSDP2-sharded forwards are collectives: a rank with fewer batches runs `fn(dummy)` (results
    discarded) until all ranks have made as many calls as the busiest one. A `DataLoader`'s
    batches come through `watched_batches`: every wait for one is bounded by `data.timeout_s`.

    Yields:
        `(item, fn(item))` for this rank's real items only.
    """
    calls = length
    if balanced and rank_and_world()[1] > 1:
        count = torch.tensor([length], dtype=torch.long)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        calls = int(count.item())
    iterator = watched_batches(items) if isinstance(items, DataLoader) else iter(items)
    for index in range(calls):
        if index < length:
            item = next(iterator)
            yield item, fn(item)
        else:
            fn(dummy)
