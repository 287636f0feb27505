"""A training run's data must hold at least one global batch per epoch.

The loader refuses fewer samples than ``data.batch_size`` x world size (one step needs a whole
global batch); this check says so before launch, from the annotation files' record counts and
the shards' sizes (see :func:`blip_recipes.config.advice.dataset_size`; unknown sizes are left
to the loader).
"""

from __future__ import annotations

from collections.abc import Iterable

from blip_recipes.config.advice import dataset_size
from blip_recipes.config.sections import Config
from blip_recipes.config.validation import LaunchContext, register_validator


@register_validator
def _at_least_one_global_batch(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    if not ctx.checkpoints:
        return
    try:
        samples = dataset_size(cfg)
    except Exception:  # noqa: BLE001 - unreadable sources are reported by the file checks
        return
    global_batch = cfg.data.batch_size * ctx.world_size
    if samples and 0 < samples < global_batch:
        fit = max(1, samples // ctx.world_size)
        yield (
            f"'data.sources' hold {samples} samples, fewer than one global batch "
            f"(data.batch_size x world size = {cfg.data.batch_size} x {ctx.world_size} = "
            f"{global_batch}): set data.batch_size={fit} or less, or add data"
        )
