"""Small head helpers shared by the online model and the momentum encoders."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def project_features(proj: nn.Module, cls_hidden: torch.Tensor) -> torch.Tensor:
    """(B, D) cls hidden state -> (B, E) unit-norm fp32 contrastive feature through `proj`."""
    projected = proj(cls_hidden)
    with torch.autocast(device_type=projected.device.type, enabled=False):
        return F.normalize(projected.float(), dim=-1)
