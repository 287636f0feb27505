"""Activation checkpointing: recompute a block's forward in backward instead of storing it."""

from __future__ import annotations

import functools
from collections.abc import Sequence

from torch import nn
from torch.utils.checkpoint import checkpoint

_AC_FLAG = "_blip_activation_checkpointed"


def apply_activation_checkpointing(
    blocks: Sequence[nn.Module], preserve_rng_state: bool = True
) -> None:
    """Wrap each block's ``forward`` in non-reentrant :func:`torch.utils.checkpoint.checkpoint`.

    Why replace ``forward`` rather than wrap the module (``checkpoint_wrapper``): the module tree
    and therefore every parameter name stay exactly as they are, so checkpoints, interop
    converters and optimizer state keys are the same with and without AC. FSDP2's hooks run
    around ``__call__``, i.e. outside the checkpointed region, so recompute in backward happens
    while the block's parameters are gathered, as with ``checkpoint_wrapper``.

    Why non-reentrant: it works with keyword arguments, with inputs that do not require grad
    (the momentum path, frozen parts) and with torch.compile. ``preserve_rng_state`` replays the
    same dropout / drop-path masks in recompute, so gradients equal those without AC.

    Apply before ``apply_compile`` and ``apply_fsdp``. Choosing *which* blocks (all of them, or
    the last N ViT blocks as the reference) is the caller's slice. Applying twice is a no-op.
    """
    for block in blocks:
        if getattr(block, _AC_FLAG, False):
            continue
        original_forward = block.forward

        @functools.wraps(original_forward)
        def checkpointed_forward(*args, _fwd=original_forward, **kwargs):
            return checkpoint(
                _fwd, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state, **kwargs
            )

        block.forward = checkpointed_forward  # instance attribute: not a submodule, no new keys
        setattr(block, _AC_FLAG, True)
