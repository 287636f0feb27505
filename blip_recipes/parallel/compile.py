"""torch.compile per transformer block."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Union

from torch import nn


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
