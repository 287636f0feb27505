"""Gradient averaging for runs with ``parallel.fsdp = false`` (replicated parameters)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


@torch.no_grad()
def all_reduce_gradients(params: Iterable[torch.nn.Parameter], bucket_mb: float = 64.0) -> None:
    """Average gradients over all ranks in flat buckets (one all-reduce per bucket).

    Why not DDP: DDP wraps the module (``module.`` enters every key) and hooks backward; the
    recipe only needs the average once after backward, and keeping the module unwrapped keeps
    checkpoints identical between FSDP and replicated runs. A no-op for a single rank.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    grads = [p.grad for p in params if p.grad is not None]
    limit = int(bucket_mb * 2**20)
    bucket: list[torch.Tensor] = []
    size = 0
    for grad in [*grads, None]:
        if grad is not None and (not bucket or (grad.dtype == bucket[0].dtype and size < limit)):
            bucket.append(grad)
            size += grad.numel() * grad.element_size()
            continue
        if bucket:
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat)
            flat.div_(world)
            for g, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                g.copy_(synced)
        bucket, size = ([grad], grad.numel() * grad.element_size()) if grad is not None else ([], 0)
