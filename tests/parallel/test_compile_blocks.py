"""Per-block compile of a deep ViT with stochastic depth: every block runs compiled code.

Each block has its own drop-path rate; the rate must be graph data (a buffer), not a Python
constant that dynamo guards on, or every block recompiles until ``recompile_limit`` and the rest
run eager.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

from blip_recipes.models.builders import vit
from blip_recipes.models.vit import VisionBlock
from blip_recipes.parallel import apply_compile

DEPTH = 12


def _count_eager_blocks(blocks: nn.ModuleList) -> dict[int, int]:
    """Count, per block index, forwards of the block's attention that ran outside compiled code.

    The pre-hook is traced into a compiled graph, where `is_compiling()` is a constant True, so
    only eager executions (a block dynamo gave up on) reach the counter.
    """
    calls: dict[int, int] = {}

    def hook_for(index: int) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            if not torch.compiler.is_compiling():
                calls[index] = calls.get(index, 0) + 1

        return hook

    for index, block in enumerate(blocks):
        block.attn.register_forward_pre_hook(hook_for(index))
    return calls


@pytest.mark.parametrize("fullgraph", [True, False])
def test_deep_vit_with_drop_path_compiles_every_block_once(fullgraph):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = vit(patch_size=16, image_size=32, width=32, depth=DEPTH, heads=2, drop_path_rate=0.1)
    model.train()
    rates = [block.drop_path.p for block in model.blocks]
    assert len(set(rates)) == DEPTH  # every block has its own rate
    graphs: list[torch.fx.GraphModule] = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        graphs.append(gm)
        return gm.forward

    apply_compile(list(model.blocks), backend=counting_backend, fullgraph=fullgraph)
    eager_calls = _count_eager_blocks(model.blocks)
    images = torch.randn(4, 3, 32, 32)

    def train_step() -> None:
        model(images).square().mean().backward()

    train_step()
    with torch.no_grad():  # the momentum encoder's forward: train mode, no grad
        model(images)
    compiled_variants = len(graphs)
    eager_calls.clear()
    train_step()

    assert eager_calls == {}, f"blocks that ran eager: {sorted(eager_calls)}"
    assert len(graphs) == compiled_variants  # nothing recompiled in the second step
    cache = _debug_get_cache_entry_list(VisionBlock.forward.__code__)
    assert 1 <= len(cache) <= 2  # grad and no-grad variants, shared by all blocks
    assert compiled_variants == len(cache)
    assert all(p.grad is not None for p in model.parameters())
