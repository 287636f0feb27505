"""float8 training of the eligible linears through torchao."""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

from torch import nn

logger = logging.getLogger(__name__)


def float8_eligible(module: nn.Module, fqn: str, skip_fqns: tuple[str, ...] = ()) -> bool:
    """True for an ``nn.Linear`` whose in/out features are multiples of 16 and whose FQN contains
    none of ``skip_fqns``.

    Why 16: float8 matmuls (``torch._scaled_mm``) need both dims divisible by 16. Why skip by
    substring (TorchTitan's ``filter_fqns`` rule): ``("head", "vision_proj")`` then skips every
    ITM/LM head and projection wherever it sits; heads are small and precision-sensitive (the LM
    projection over 30524 classes, the ITC projections behind logits scaled by 1/temp).
    """
    if not isinstance(module, nn.Linear):
        return False
    if module.in_features % 16 or module.out_features % 16:
        return False
    return not any(skip in fqn for skip in skip_fqns)


def apply_float8(
    model: nn.Module,
    recipe: Literal["tensorwise", "rowwise"] = "tensorwise",
    emulate: bool = False,
    fsdp_all_gather: bool = True,
    skip_fqns: tuple[str, ...] = (),
) -> list[str]:
    """Swap eligible ``nn.Linear`` modules for torchao ``Float8Linear`` in place.

    Apply on the model (meta device is fine) before activation checkpointing, compile and FSDP,
    as TorchTitan does. ``Float8Linear`` keeps ``weight``/``bias`` names, so checkpoints do not
    change. ``fsdp_all_gather`` (all-gather weights already cast to float8, halving all-gather
    bytes) exists only for the tensorwise recipe; with rowwise it is ignored with a log line so
    the config default need not change with the recipe. Call :func:`float8_precompute_scales`
    after each optimizer step when it is on.

    Args:
        model: module to convert.
        recipe: torchao recipe name, ``tensorwise`` or ``rowwise``.
        emulate: run the float8 matmuls in emulation (CPU tests).
        fsdp_all_gather: float8 all-gather under FSDP2 (tensorwise only).
        skip_fqns: substrings of module FQNs to keep in high precision.

    Returns:
        FQNs of the converted linears (for logging and tests).
    """
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    if recipe not in ("tensorwise", "rowwise"):
        raise ValueError(f"float8 recipe must be tensorwise or rowwise, got {recipe!r}")
    if fsdp_all_gather and recipe != "tensorwise":
        logger.info("float8 FSDP all-gather needs the tensorwise recipe; disabled for %s", recipe)
        fsdp_all_gather = False
    config = dataclasses.replace(
        Float8LinearConfig.from_recipe_name(recipe),
        emulate=emulate,
        enable_fsdp_float8_all_gather=fsdp_all_gather,
    )
    converted: list[str] = []

    def module_filter_fn(module: nn.Module, fqn: str) -> bool:
        keep = float8_eligible(module, fqn, skip_fqns)
        if keep:
            converted.append(fqn)
        return keep

    convert_to_float8_training(model, module_filter_fn=module_filter_fn, config=config)
    logger.info("float8 (%s): converted %d linears", recipe, len(converted))
    return converted


def float8_precompute_scales(model: nn.Module) -> bool:
    """Compute the float8 scales of all FSDP-sharded float8 weights with one all-reduce.

    Why: with float8 all-gather each rank would otherwise need the global amax of a weight it
    holds only a shard of; precomputing all of them after ``optimizer.step()`` costs one
    all-reduce per step instead of one per weight. A no-op (returns False) when the model has no
    such weights (float8 off, rowwise, or all-gather off), so the recipe can call it
    unconditionally.
    """
    from torch.distributed.tensor import DTensor
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp
    from torchao.float8.float8_linear import Float8Linear
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    has_float8_weights = any(
        isinstance(m, Float8Linear)
        and isinstance(m.weight, DTensor)
        and isinstance(m.weight._local_tensor, WeightWithDynamicFloat8CastTensor)
        for m in model.modules()
    )
    if not has_float8_weights:
        return False
    precompute_float8_dynamic_scale_for_fsdp(model)
    return True
