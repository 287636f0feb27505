"""torch.compile per transformer block."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Union

from torch import nn

logger = logging.getLogger(__name__)


def apply_compile(
    blocks: Sequence[nn.Module],
    backend: Union[str, Callable[..., Any]] = "inductor",
    fullgraph: bool = True,
    dynamic: bool = False,
    fallback_random: bool = False,
) -> None:
    """Compile each block in place with :meth:`nn.Module.compile`; call it *before* ``apply_fsdp``.

    Why per block and before sharding (TorchTitan order): identical blocks share one compiled
    graph (one compile, reused N times), and FSDP2's hooks stay outside the compiled region;
    compiling the whole sharded model instead graph-breaks in the FSDP hooks and compiles next to
    nothing. Why ``Module.compile`` rather than ``torch.compile(module)``: it compiles in place, so
    no ``_orig_mod.`` wrapper enters the parameter names and checkpoints stay compatible between
    compiled and eager runs. Why ``fullgraph=True`` by default: with it, a graph break, or a block
    that keeps recompiling until dynamo's ``recompile_limit``, raises instead of running (part of)
    the block eagerly with only a logged warning. A block is meant to be one graph shared by all
    blocks of its kind, so either is a regression to fix (typically a Python value that differs
    per block and that the forward reads, which dynamo guards on: keep such values in buffers).

    Args:
        blocks: transformer blocks (after activation checkpointing, if any).
        backend: ``torch.compile`` backend; tests pass a cheap one.
        fullgraph: raise on a graph break or on hitting the recompile limit; False lets dynamo
            fall back to eager for the rest of the block (or for the whole block) silently.
        dynamic: allow dynamic shapes; fixed shapes (False) give the fastest kernels.
        fallback_random: make inductor draw dropout / drop-path randomness exactly as eager
            does (``torch._inductor.config.fallback_random``, a process-wide switch; slower).
            Off, compiled and eager runs use different masks, so their losses differ by about
            the dropout noise (~1% on the tiny model) although each is reproducible from the
            seed and resumes exactly; turn it on for compile-vs-eager parity tests.
    """
    if fallback_random:
        import torch._inductor.config as inductor_config

        inductor_config.fallback_random = True
    for block in blocks:
        block.compile(backend=backend, fullgraph=fullgraph, dynamic=dynamic)
    kinds = Counter(type(block).__name__ for block in blocks)
    logger.info(
        "torch.compile: %d blocks (%s) marked; each kind compiles on its first forward and "
        "backward, so the first step is slow (minutes cold, seconds with a warm cache)",
        len(blocks),
        ", ".join(f"{n} x {kind}" for kind, n in kinds.items()),
    )


class FirstCallTimer:
    """Wraps a callable (the training step) and logs when its first call starts and how long
    it took: with ``torch.compile`` that call compiles every block kind, which otherwise is
    minutes of silence. Later calls go straight through; attributes are the wrapped object's.
    """

    def __init__(self, fn: Callable[..., Any], what: str = "first step") -> None:
        self.fn, self.what = fn, what
        self.seconds: float | None = None
        """Duration of the first call, once it returned."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.seconds is not None:
            return self.fn(*args, **kwargs)
        logger.info("%s: started (torch.compile compiles the blocks now)", self.what)
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.seconds = time.perf_counter() - t0
        logger.info("%s: done in %.1f s (compilation included)", self.what, self.seconds)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fn, name)
