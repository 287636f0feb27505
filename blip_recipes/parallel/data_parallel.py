"""Plain data parallelism (``parallel.fsdp = false``): average gradients over ranks by hand."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Optional

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def all_reduce_gradients(
    params: Iterable[torch.nn.Parameter], group: Optional[dist.ProcessGroup] = None
) -> None:
    """Average the ``.grad`` of replicated parameters across ranks, in place, after backward.

    Why not DDP: DDP wraps the module (renaming every parameter ``module.*``) and hooks
    ``forward``/``backward`` in ways BLIP's several passes per step do not fit; an explicit
    all-reduce after ``backward`` is exact, keeps names, and costs one collective per
    (device, dtype) bucket because gradients are flattened into one buffer first. SUM then
    divide, since gloo lacks ``ReduceOp.AVG`` in some versions. A no-op without a process group
    or with one rank. Parameters without a gradient are skipped, so every rank must have
    gradients for the same parameters (true when every rank runs the same model code).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size(group)
    if world == 1:
        return
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for p in params:
        if p.grad is not None:
            buckets[(p.grad.device, p.grad.dtype)].append(p.grad)
    for grads in buckets.values():
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(world)
        for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(reduced)
