"""FSDP2: one ``fully_shard`` unit per transformer block, plus the root."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def apply_fsdp(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    mesh: DeviceMesh,
    param_dtype: Optional[torch.dtype] = None,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
    reused_blocks: Sequence[nn.Module] = (),
) -> FSDPModule:
    """Shard ``model`` in place: each block is its own FSDP unit, everything else is in the root.

    Why per block: each unit all-gathers its parameters just before its forward/backward and frees
    them after, so peak memory holds one block's full parameters at a time and the all-gather of
    block i+1 overlaps the compute of block i. Parameters not inside a block (embeddings, heads,
    the tied LM head, the temperature) land in the root unit. Every parameter belongs to exactly
    one unit, so a module shared between two blocks must be a block itself or live in the root.

    Why the last block is never resharded after forward: backward starts with it, so freeing its
    parameters at the end of forward would only force an immediate all-gather of the same data
    (TorchTitan does the same). The root is never resharded after forward either: a model with
    several entry points calls it several times per step, and each call would all-gather it again.

    Why ``reused_blocks`` are never resharded after forward: a block that runs twice in one
    forward (BLIP's MED layers: the text pass, then the multimodal pass) would otherwise be
    gathered twice in forward and twice in backward; kept gathered, it is gathered once in forward
    and once more for the backward of its first use.

    Args:
        model: the module to shard (the root unit). Can live on the meta device.
        blocks: the blocks, in the order forward runs them; the last one is the one that runs
            last in forward. Pass several stacks (ViT blocks, then text layers) concatenated.
        mesh: 1-D device mesh to shard over (``DistInfo.mesh``).
        param_dtype: dtype of the gathered parameters in compute (bf16); None keeps fp32.
        reduce_dtype: dtype of the gradient reduce-scatter; fp32 keeps gradient sums exact enough.
        reshard_after_forward: free gathered parameters after forward (memory) or keep them until
            backward (one all-gather per step less). A momentum/no-grad model should use True.
        reused_blocks: blocks (among ``blocks``) that forward calls more than once per step.

    Returns:
        ``model``, now also an :class:`FSDPModule`.
    """
    # cast_forward_inputs=False: FSDP2 would otherwise cast every floating input of a unit's
    # forward to param_dtype. The model casts what it needs itself (the ViT casts the pixels),
    # and whatever is kept fp32 on purpose stays fp32.
    mp_policy = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False
    )
    last = len(blocks) - 1
    reused = {id(block) for block in reused_blocks}
    for i, block in enumerate(blocks):
        fully_shard(
            block,
            mesh=mesh,
            mp_policy=mp_policy,
            reshard_after_forward=reshard_after_forward and i < last and id(block) not in reused,
        )
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)
    return model  # type: ignore[return-value]


def reshard_all(module: nn.Module) -> None:
    """Free every gathered FSDP2 parameter in ``module`` after forwards without a backward.

    FSDP2 reshards in post-backward; the root and blocks built with reshard_after_forward=False
    keep their parameters gathered after forward. A no-grad use (momentum encoders, evaluation,
    captioning) would otherwise leave plain unsharded tensors where the DTensor parameters
    belong until the next backward. A no-op for unsharded modules.
    """
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


class ReduceOnce:
    """One gradient reduction per optimizer step for FSDP2 units that forward runs several times.

    FSDP2 reduce-scatters a unit's gradients in the post-backward of each forward use, so a unit
    used twice in one step (BLIP's MED layers: text pass and multimodal pass; the root: every
    entry point) sends its full gradient twice. Here such units keep gradient sync off and stay
    gathered for the whole backward (each use's gradient is summed into one unsharded fp32
    buffer, and the later use needs no second all-gather), and a callback queued at the start of
    backward, so that it runs after the last autograd node and before FSDP2's own end-of-backward
    callback (which then waits on the reductions as usual), reduces each of them once.

    Costs: the units' unsharded fp32 gradients and gathered parameters live until the end of
    backward, and their reductions are issued at the end of backward (no overlap with the rest
    of it). Gradients equal the per-use path's up to fp32 summation order.

    Args:
        units: the FSDP2 modules forward calls more than once, in the order to reduce them
            (the same on every rank: collectives must match).
    """

    def __init__(self, units: Sequence[FSDPModule]) -> None:
        self.units = list(units)

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        """``loss.backward()`` reducing each unit once; ``sync=False`` (a micro-batch whose
        gradients are only accumulated) runs the plain backward."""
        if not sync or not self.units:
            loss.backward()
            return
        for unit in self.units:
            unit.set_requires_gradient_sync(False, recurse=False)
            unit.set_reshard_after_backward(False, recurse=False)
        loss.register_hook(self._queue_reduce)
        try:
            loss.backward()
        finally:
            self._restore()

    def _queue_reduce(self, grad: torch.Tensor) -> torch.Tensor:
        # the loss's own gradient: the first thing backward computes, so this callback is queued
        # before the one FSDP2 queues in its first pre-backward hook
        torch.autograd.Variable._execution_engine.queue_callback(self._reduce)
        return grad

    def _reduce(self) -> None:
        for unit in self.units:
            group = unit._get_fsdp_state()._fsdp_param_group
            if group is None:
                continue
            # sync still off: fold every gradient that arrived after the unit's last
            # post-backward into the fp32 accumulator, so all reduce in one dtype
            group.post_backward()
            unit.set_requires_gradient_sync(True, recurse=False)
            unit.set_reshard_after_backward(True, recurse=False)
            group.post_backward()  # reduce the accumulated gradients, then reshard

    def _restore(self) -> None:
        for unit in self.units:
            unit.set_requires_gradient_sync(True, recurse=False)
            unit.set_reshard_after_backward(True, recurse=False)
