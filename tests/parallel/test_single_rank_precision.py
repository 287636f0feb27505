"""One rank with bf16 compute runs FSDP2 at degree 1: activations between matmuls are bf16."""

from __future__ import annotations

import torch
from torch import nn

from blip_recipes.config import Config
from blip_recipes.config.sections import ParallelConfig
from blip_recipes.parallel import init_distributed, parallelize_blip
from blip_recipes.training.build import fsdp_mesh
from blip_recipes.training.momentum import MomentumState
from blip_recipes.training.pretrain import pretrain_losses
from blip_recipes.training.step import StepOptions
from tests.models.tiny_blip import TINY, make_model, make_text


def _block_dtypes(single_rank_fsdp: bool) -> dict[str, set[torch.dtype]]:
    """Output dtypes of the LayerNorms and blocks (the residual stream) of one bf16 forward."""
    info = init_distributed("cpu")
    cfg = Config()
    cfg.parallel = ParallelConfig(single_rank_fsdp=single_rank_fsdp)
    model = make_model().train()
    momentum = MomentumState.build("blip_pretrain_tiny", **TINY)
    momentum.copy_from(model)
    mesh = fsdp_mesh(cfg, info, torch.bfloat16)
    parallelize_blip(model, None, cfg.parallel, mesh, torch.bfloat16)
    autocast = StepOptions.from_config(cfg, model, info, torch.bfloat16).autocast_dtype
    assert (mesh is None) == (autocast == torch.bfloat16)
    seen: dict[str, set[torch.dtype]] = {"norm": set(), "block": set()}

    def record(kind):
        return lambda _m, _a, out: seen[kind].add((out[0] if isinstance(out, tuple) else out).dtype)

    blocks = [model.visual_encoder.blocks[0], model.text.layers[0]]
    for block in blocks:
        block.register_forward_hook(record("block"))
        for sub in block.modules():
            if isinstance(sub, nn.LayerNorm):
                sub.register_forward_hook(record("norm"))
    images = torch.randn(4, 3, 32, 32)
    ids, mask = make_text(4)
    targets = momentum.targets(images, ids, mask)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast is not None):
        out = pretrain_losses(model, images, ids, mask, targets, 0.4)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    return seen


def test_one_bf16_rank_keeps_the_residual_stream_and_layernorms_bf16():
    assert _block_dtypes(True) == {"norm": {torch.bfloat16}, "block": {torch.bfloat16}}


def test_autocast_on_one_rank_keeps_them_fp32():
    """The previous one-rank path (`parallel.single_rank_fsdp=false`): matmuls in bf16, the
    residual stream and every LayerNorm output fp32."""
    assert _block_dtypes(False) == {"norm": {torch.float32}, "block": {torch.float32}}


def test_fp32_and_several_ranks_are_unchanged():
    info = init_distributed("cpu")
    cfg = Config()
    assert fsdp_mesh(cfg, info, None) is None and fsdp_mesh(cfg, info, torch.float32) is None
    cfg.parallel = ParallelConfig(single_rank_fsdp=False)
    assert fsdp_mesh(cfg, info, torch.bfloat16) is None
