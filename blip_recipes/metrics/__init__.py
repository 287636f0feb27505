"""Training metrics: TensorBoard + metrics.jsonl + console on rank 0, effective MFU, memory."""

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
    "MetricsLogger",
    "effective_mfu",
    "flops_per_sample",
    "format_duration",
    "max_memory_gib",
    "peak_flops",
]
