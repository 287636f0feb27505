"""Effective MFU and memory figures (definitions and the FLOP counts in docs/performance.md).

Effective MFU counts a *fixed* amount of model work per sample (the reference BLIP step: fwd+bwd
of the online model with three MED passes, plus the momentum forwards), not the FLOPs actually
executed, so algorithmic savings (the packed multimodal pass) show up as higher MFU and
activation-checkpoint recompute does not inflate it.
"""

from __future__ import annotations

import resource
import sys
from typing import Optional

import torch

VIT_B_FLOPS_PER_SAMPLE = 306.8e9
"""Model FLOPs of one BLIP ViT-B/16 pretraining sample (224 px, 30 tokens), fwd+bwd."""
VIT_L_FLOPS_PER_SAMPLE = 681.0e9
"""Model FLOPs of one BLIP ViT-L/16 pretraining sample."""
H100_BF16_PEAK_FLOPS = 989e12
"""H100 SXM dense bf16 peak (FLOP/s)."""
H200_BF16_PEAK_FLOPS = 989e12
"""H200 dense bf16 peak (FLOP/s); same chip as H100, more and faster memory."""
A100_BF16_PEAK_FLOPS = 312e12
"""A100 dense bf16 peak (FLOP/s)."""

_PEAKS = (
    ("H200", H200_BF16_PEAK_FLOPS),
    ("H100", H100_BF16_PEAK_FLOPS),
    ("A100", A100_BF16_PEAK_FLOPS),
)


def flops_per_sample(model_name: str) -> Optional[float]:
    """Fixed per-sample FLOPs for a model builder name; None when not tabulated (tiny model)."""
    if "large" in model_name:
        return VIT_L_FLOPS_PER_SAMPLE
    if "base" in model_name:
        return VIT_B_FLOPS_PER_SAMPLE
    return None


def peak_flops(device: torch.device) -> Optional[float]:
    """Dense bf16 peak FLOP/s of ``device``; None on CPU or an unknown GPU (MFU is then null)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for tag, peak in _PEAKS:
        if tag in name:
            return peak
    return None


def effective_mfu(
    samples_per_sec: float, flops_per_sample: Optional[float], peak_flops: Optional[float]
) -> Optional[float]:
    """Effective MFU as a fraction (0.35 = 35%) for one device; None if either figure is unknown.

    ``samples_per_sec`` is per device (global throughput / world size).
    """
    if not flops_per_sample or not peak_flops:
        return None
    return samples_per_sec * flops_per_sample / peak_flops


def max_memory_gib(device: torch.device) -> float:
    """Peak memory in GiB: CUDA allocator peak on GPU, process peak RSS on CPU."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)
