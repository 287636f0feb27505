"""Training metrics on rank 0 (metrics.jsonl, TensorBoard, optional W&B, console), effective MFU,
memory."""

from blip_recipes.metrics.backends import (
    WANDB_MISSING,
    JsonlBackend,
    MetricsBackend,
    MetricsWriteError,
    TensorBoardBackend,
    WandbBackend,
    caption_grid,
    require_wandb,
    to_pil,
)
from blip_recipes.metrics.logger import MetricsLogger, format_duration
from blip_recipes.metrics.mfu import (
    A100_BF16_PEAK_FLOPS,
    H100_BF16_PEAK_FLOPS,
    H200_BF16_PEAK_FLOPS,
    VIT_B_FLOPS_PER_SAMPLE,
    VIT_L_FLOPS_PER_SAMPLE,
    effective_mfu,
    flops_per_sample,
    max_memory_gib,
    peak_flops,
)

__all__ = [
    "A100_BF16_PEAK_FLOPS",
    "H100_BF16_PEAK_FLOPS",
    "H200_BF16_PEAK_FLOPS",
    "VIT_B_FLOPS_PER_SAMPLE",
    "VIT_L_FLOPS_PER_SAMPLE",
    "WANDB_MISSING",
    "JsonlBackend",
    "MetricsBackend",
    "MetricsLogger",
    "MetricsWriteError",
    "TensorBoardBackend",
    "WandbBackend",
    "caption_grid",
    "require_wandb",
    "to_pil",
    "effective_mfu",
    "flops_per_sample",
    "format_duration",
    "max_memory_gib",
    "peak_flops",
]
