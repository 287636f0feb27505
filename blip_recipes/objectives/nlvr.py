"""The NLVR2 objective: two-way cross-entropy over the pair classifier's logits, and accuracy.

Label 1 = the sentence is true of the image pair. The reference trains with plain
`cross_entropy` (no smoothing, no class weights) and predicts the arg-max class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nlvr_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (B, 2), labels (B,) int64 in {0, 1} -> 0-d fp32 mean cross-entropy."""
    return F.cross_entropy(logits.float(), labels)


def predictions(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, 2) -> (B,) int64 predicted labels (ties go to 0, as `max(1)`)."""
    return logits.argmax(dim=1)


def correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """0-d int64: how many of the B predictions equal their labels."""
    return (predictions(logits) == labels).sum()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """0-d fp32 fraction of correct predictions (0 for an empty batch)."""
    return correct(logits, labels).float() / max(labels.numel(), 1)
