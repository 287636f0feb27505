"""How the model formats its inputs (text ids, image side), and the bounds of its learnable
temperature.

The model and the objectives share these conventions; they live with the model so that the model
imports nothing from the objectives.
"""

from __future__ import annotations

import math

import torch
from torch import nn

TEMP_MIN = 0.001
TEMP_MAX = 0.5
LM_IGNORE_INDEX = -100


def replace_first_token(input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """(B, L) ids -> a copy with column 0 set to `token_id` ([ENC] for ITM, [DEC] for LM)."""
    ids = input_ids.clone()
    ids[:, 0] = token_id
    return ids


def lm_labels(decoder_input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """(B, L) decoder ids -> labels with padding set to -100 (ignored by the LM loss)."""
    return decoder_input_ids.masked_fill(decoder_input_ids == pad_token_id, LM_IGNORE_INDEX)


def model_image_size(model: nn.Module) -> int:
    """The square input side the model's position embeddings were built for."""
    vit = model.visual_encoder
    patch = vit.patch_embed.proj.kernel_size[0]
    return int(round(math.sqrt(vit.num_patches))) * patch
