"""float8 training of the eligible linears through torchao.

Which linears become ``Float8Linear`` is decided per layer by a filter (``module_filter``):

- ``"all"``: every ``nn.Linear`` whose in/out features are multiples of 16 (what
  ``torch._scaled_mm`` needs), minus the FQN substrings to skip (:func:`float8_eligible`).
- ``"auto"``: additionally, only shapes big enough for float8 to pay off, by torchao's shipped
  shape heuristic for the recipe (``torchao.float8._auto_filter_for_recipe``, thresholds from
  H100 measurements); see ``docs/float8.md`` for what it keeps in ViT-B and ViT-L.

``apply_float8`` defaults to ``"all"`` (the behaviour before the filter existed); the recipe
should pass :data:`FLOAT8_FILTER_DEFAULT` (``"auto"``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable
from typing import Literal

from torch import nn

logger = logging.getLogger(__name__)

Float8Recipe = Literal["tensorwise", "rowwise"]
Float8Filter = Literal["auto", "all"]

#: The float8 scaling recipes ``apply_float8`` accepts.
FLOAT8_RECIPES: tuple[str, ...] = ("tensorwise", "rowwise")
#: The per-layer filters ``apply_float8`` accepts.
FLOAT8_FILTERS: tuple[str, ...] = ("auto", "all")
#: Recommended filter for training: torchao's shape heuristic (the small BLIP matmuls lose time
#: to the float8 casts; see ``docs/float8.md``).
FLOAT8_FILTER_DEFAULT: Float8Filter = "auto"
#: FQN substrings kept in high precision: the small, precision-sensitive heads (``lm_head``
#: matches the LM head's ``dense`` transform; its decoder is the tied embedding, not a Linear).
FLOAT8_SKIP_FQNS: tuple[str, ...] = ("vision_proj", "text_proj", "itm_head", "lm_head")

#: Why a module stays in high precision (values of :func:`float8_skip_reason`).
SKIP_NOT_LINEAR = "not an nn.Linear"
SKIP_BY_NAME = "skipped by name"
SKIP_NOT_MULTIPLE_OF_16 = "dims not multiples of 16"
SKIP_BELOW_AUTO_THRESHOLD = "too small for float8 (auto filter)"


def float8_eligible(module: nn.Module, fqn: str, skip_fqns: tuple[str, ...] = ()) -> bool:
    """True for an ``nn.Linear`` whose in/out features are multiples of 16 and whose FQN contains
    none of ``skip_fqns`` (the ``"all"`` filter).

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


def _fallback_auto_filter(
    recipe: Float8Recipe, skip_fqns: tuple[str, ...]
) -> Callable[[nn.Module, str], bool]:
    """The thresholds of torchao 0.16-0.18's ``_auto_filter_for_{tensorwise,rowwise}``, for a
    torchao without ``_auto_filter_for_recipe``. ``N`` = out_features, ``K`` = in_features."""

    def big_enough(module: nn.Module, fqn: str) -> bool:
        if not float8_eligible(module, fqn, skip_fqns):
            return False
        n, k = module.out_features, module.in_features
        if recipe == "tensorwise":
            return not (k <= 4096 and n <= 1024)
        return not (n <= 2048 or k <= 1024 or (n <= 4096 and k <= 2048))

    return big_enough


def _torchao_auto_filter_factory() -> Callable[..., Callable[[nn.Module, str], bool]] | None:
    """``torchao.float8._auto_filter_for_recipe``, or None when this torchao lacks it."""
    try:
        from torchao.float8 import _auto_filter_for_recipe
    except ImportError:
        return None
    return _auto_filter_for_recipe


def torchao_auto_filter(
    recipe: Float8Recipe, skip_fqns: tuple[str, ...] = ()
) -> Callable[[nn.Module, str], bool]:
    """torchao's shape-based filter for ``recipe`` with ``skip_fqns`` as its ``filter_fqns``.

    torchao exports it as the experimental ``torchao.float8._auto_filter_for_recipe`` (0.16 to
    0.18 at least, identical thresholds). A torchao without it gets the same thresholds from
    :func:`_fallback_auto_filter` (logged at debug level; ``apply_float8`` logs it once).
    """
    factory = _torchao_auto_filter_factory()
    if factory is None:
        logger.debug("torchao has no _auto_filter_for_recipe; using the copied thresholds")
        return _fallback_auto_filter(recipe, skip_fqns)
    return factory(recipe, list(skip_fqns))


def float8_skip_reason(
    module: nn.Module,
    fqn: str,
    recipe: Float8Recipe = "tensorwise",
    skip_fqns: tuple[str, ...] = (),
    module_filter: Float8Filter = "all",
) -> str | None:
    """Why ``module`` at ``fqn`` stays in high precision, or None when it becomes float8.

    Returns one of :data:`SKIP_NOT_LINEAR`, :data:`SKIP_BY_NAME`,
    :data:`SKIP_NOT_MULTIPLE_OF_16`, :data:`SKIP_BELOW_AUTO_THRESHOLD`, or None.
    """
    _check(recipe, module_filter)
    if not isinstance(module, nn.Linear):
        return SKIP_NOT_LINEAR
    if any(skip in fqn for skip in skip_fqns):
        return SKIP_BY_NAME
    if not float8_eligible(module, fqn):
        return SKIP_NOT_MULTIPLE_OF_16
    if module_filter == "auto" and not torchao_auto_filter(recipe, skip_fqns)(module, fqn):
        return SKIP_BELOW_AUTO_THRESHOLD
    return None


def float8_module_filter(
    recipe: Float8Recipe = "tensorwise",
    skip_fqns: tuple[str, ...] = (),
    module_filter: Float8Filter = "all",
) -> Callable[[nn.Module, str], bool]:
    """The ``module_filter_fn`` for ``convert_to_float8_training``: True = convert.

    ``"all"`` is :func:`float8_eligible`; ``"auto"`` is torchao's shape filter for ``recipe``
    (:func:`torchao_auto_filter`), which also applies the multiple-of-16 and name rules.
    """
    _check(recipe, module_filter)
    if module_filter == "auto":
        return torchao_auto_filter(recipe, skip_fqns)
    return lambda module, fqn: float8_eligible(module, fqn, skip_fqns)


def _check(recipe: str, module_filter: str) -> None:
    if recipe not in FLOAT8_RECIPES:
        raise ValueError(f"float8 recipe must be tensorwise or rowwise, got {recipe!r}")
    if module_filter not in FLOAT8_FILTERS:
        raise ValueError(f"float8 module filter must be auto or all, got {module_filter!r}")


def _log_skipped(
    model: nn.Module, recipe: Float8Recipe, skip_fqns: tuple[str, ...], module_filter: Float8Filter
) -> None:
    """One log line with how many linears stayed in high precision, per reason."""
    reasons = Counter(
        float8_skip_reason(m, fqn, recipe, skip_fqns, module_filter)
        for fqn, m in model.named_modules()
        if isinstance(m, nn.Linear)
    )
    reasons.pop(None, None)
    if reasons:
        logger.info(
            "float8 (%s, filter %s): kept in high precision: %s",
            recipe,
            module_filter,
            ", ".join(f"{n} {reason}" for reason, n in reasons.most_common()),
        )


def apply_float8(
    model: nn.Module,
    recipe: Float8Recipe = "tensorwise",
    emulate: bool = False,
    fsdp_all_gather: bool = True,
    skip_fqns: tuple[str, ...] = (),
    module_filter: Float8Filter = "all",
) -> list[str]:
    """Swap the ``nn.Linear`` modules that pass ``module_filter`` for torchao ``Float8Linear``
    in place.

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
        module_filter: ``"all"`` converts every linear with dims multiple of 16 (the default,
            for compatibility); ``"auto"`` only the shapes torchao's heuristic expects to be
            faster in float8 (:data:`FLOAT8_FILTER_DEFAULT`, recommended).

    Returns:
        FQNs of the converted linears (for logging and tests); empty, with a warning, when no
        linear passes the filter (the model then stays entirely in high precision).
    """
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    _check(recipe, module_filter)
    if fsdp_all_gather and recipe != "tensorwise":
        logger.info("float8 FSDP all-gather needs the tensorwise recipe; disabled for %s", recipe)
        fsdp_all_gather = False
    config = dataclasses.replace(
        Float8LinearConfig.from_recipe_name(recipe),
        emulate=emulate,
        enable_fsdp_float8_all_gather=fsdp_all_gather,
    )
    keep = float8_module_filter(recipe, skip_fqns, module_filter)
    if module_filter == "auto" and _torchao_auto_filter_factory() is None:
        logger.info("torchao has no _auto_filter_for_recipe; auto filter uses copied thresholds")
    _log_skipped(model, recipe, skip_fqns, module_filter)
    converted: list[str] = []

    def module_filter_fn(module: nn.Module, fqn: str) -> bool:
        if not keep(module, fqn):
            return False
        converted.append(fqn)
        return True

    convert_to_float8_training(model, module_filter_fn=module_filter_fn, config=config)
    if converted:
        logger.info(
            "float8 (%s, filter %s): converted %d linears", recipe, module_filter, len(converted)
        )
    else:
        logger.warning(
            "float8 (%s, filter %s): no linear passed the filter; the model stays in high "
            "precision",
            recipe,
            module_filter,
        )
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
