"""Build-and-parallelize BLIP: the one place that knows the model's parallel plan.

`parallelize_blip` applies, in TorchTitan's order, float8 -> activation checkpointing ->
compile -> FSDP2 to the online model and (compile, FSDP2 only) to the momentum encoders:

- **blocks**: every ViT block and every MED layer is a unit of compile, AC and FSDP2; the
  embeddings, heads, the tied LM head and the temperature live in the root unit;
- **float8**: linears chosen by shape (`parallel.float8_filter`), the small heads never;
- **activation checkpointing**: none, every block, or the last N ViT blocks (reference);
- **compile**: per block, `fullgraph=True`, before sharding;
- **FSDP2**: one unit per block plus the root, `MixedPrecisionPolicy(param_dtype, fp32
  reduce, cast_forward_inputs=False)`; MED layers (run twice per step) and the root stay
  gathered between their forward uses; the model's entry points are registered as FSDP
  forwards, so `encode_image`, `encode_text`, `multimodal`, ... each gather the root unit like
  `forward` does. The fp32 queues and momentum features never enter a sharded forward.

The momentum encoders are sharded exactly like the online model (the EMA then pairs local
shards, no communication) and always reshard after forward (they have no backward).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

from blip_recipes.config.sections import ParallelConfig
from blip_recipes.models.blip import ENTRY_POINTS, BlipPretrain
from blip_recipes.models.momentum_encoders import MomentumEncoders
from blip_recipes.parallel.activation_checkpointing import apply_activation_checkpointing
from blip_recipes.parallel.compile import apply_compile
from blip_recipes.parallel.float8 import FLOAT8_SKIP_FQNS, apply_float8
from blip_recipes.parallel.fsdp import apply_fsdp

logger = logging.getLogger(__name__)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """ViT blocks then MED layers, in forward order (online model or momentum encoders)."""
    text = model.text_encoder if isinstance(model, MomentumEncoders) else model.text
    return list(model.visual_encoder.blocks) + list(text.layers)


@dataclass
class ParallelPlan:
    """What `parallelize_blip` did, for logs and tests."""

    fsdp: bool
    float8_linears: list[str]
    compiled_blocks: int
    checkpointed_blocks: int


def parallelize_blip(
    model: BlipPretrain,
    momentum_encoders: MomentumEncoders | None,
    cfg: ParallelConfig,
    mesh: DeviceMesh | None,
    param_dtype: torch.dtype | None = None,
    compile_backend: str | Callable = "inductor",
    entry_points: tuple[str, ...] = ENTRY_POINTS,
) -> ParallelPlan:
    """Apply the parallel plan in place (modules may live on the meta device).

    Args:
        model: the online model.
        momentum_encoders: its momentum encoders, or None (evaluation builds no momentum).
        cfg: the `[parallel]` section.
        mesh: data-parallel mesh to shard over; None = no FSDP2 (one process, or replicated).
        param_dtype: compute dtype of the gathered parameters under FSDP2 (bf16); None = fp32.
        compile_backend: `torch.compile` backend (tests pass a cheap one).
        entry_points: the model's methods to register as FSDP2 forwards (another model than
            `BlipPretrain` with the same `visual_encoder` / `text.layers` parts names its own).

    Returns:
        `ParallelPlan` summary.
    """
    use_fsdp = mesh is not None
    float8_linears: list[str] = []
    if cfg.float8:
        float8_linears = apply_float8(
            model,
            recipe=cfg.float8_recipe,
            emulate=cfg.float8_emulate,
            fsdp_all_gather=cfg.float8_fsdp_all_gather and use_fsdp,
            skip_fqns=FLOAT8_SKIP_FQNS,
            module_filter=cfg.float8_filter,
        )
    blocks = transformer_blocks(model)
    ac_blocks = _checkpointed_blocks(model, cfg)
    apply_activation_checkpointing(ac_blocks)
    momentum_blocks = transformer_blocks(momentum_encoders) if momentum_encoders else []
    if cfg.compile:
        apply_compile(blocks + momentum_blocks, backend=compile_backend)
    if use_fsdp:
        apply_fsdp(model, blocks, mesh, param_dtype=param_dtype,
                   reshard_after_forward=cfg.reshard_after_forward,
                   reused_blocks=list(model.text.layers))  # fmt: skip
        for name in entry_points:
            register_fsdp_forward_method(model, name)
        if momentum_encoders is not None:
            apply_fsdp(momentum_encoders, momentum_blocks, mesh, param_dtype=param_dtype,
                       reshard_after_forward=True)  # fmt: skip
    plan = ParallelPlan(use_fsdp, float8_linears,
                        len(blocks) + len(momentum_blocks) if cfg.compile else 0,
                        len(ac_blocks))  # fmt: skip
    logger.info(
        "parallel plan: fsdp=%s, float8 linears=%d, compiled blocks=%d, AC blocks=%d",
        plan.fsdp,
        len(plan.float8_linears),
        plan.compiled_blocks,
        plan.checkpointed_blocks,
    )
    return plan


def reused_units(model: nn.Module) -> list[FSDPModule]:
    """The FSDP2 units of the online model that forward runs more than once per step, in
    backward order: the MED layers (text pass, multimodal pass), last first, then the root
    (every entry point). Empty when the model is not sharded (`ReduceOnce` reduces these)."""
    if not isinstance(model, FSDPModule):
        return []
    return [*reversed(list(model.text.layers)), model]  # type: ignore[list-item]


def materialize(module: nn.Module, device: torch.device) -> None:
    """Allocate a meta-device module on `device` and refill its non-persistent buffers.

    `to_empty` leaves every tensor uninitialised; parameters and persistent buffers are then
    loaded from a state dict, but non-persistent buffers (the ViT's drop-path rates) are not in
    any state dict, so they are recomputed here.
    """
    module.to_empty(device=device)
    for sub in module.modules():
        if callable(getattr(sub, "init_buffers", None)):
            sub.init_buffers()


def _checkpointed_blocks(model: BlipPretrain, cfg: ParallelConfig) -> list[nn.Module]:
    """The blocks `parallel.activation_checkpointing` selects."""
    if cfg.activation_checkpointing == "full":
        return transformer_blocks(model)
    if cfg.activation_checkpointing == "vit_last_n" and cfg.ac_vit_layers > 0:
        return list(model.visual_encoder.blocks)[-cfg.ac_vit_layers :]
    return []
