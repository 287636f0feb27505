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
