"""The momentum encoders: EMA copies of the ViT, the text encoder (text use only) and the two
projections, in one `nn.Module` so the recipe shards them like the online model
(`fully_shard` each `visual_encoder.blocks[i]`, each `text_encoder.layers[i]`, then this root).

Parameter names mirror the online `BlipPretrain` (`visual_encoder.*`, `vision_proj.*`,
`text_proj.*`), except that the online `text.*` is `text_encoder.*` here (as in the reference).
"""

from __future__ import annotations

import torch
from torch import nn

from blip_recipes.models.heads import project_features
from blip_recipes.models.med import MED
from blip_recipes.models.vit import VisionTransformer

ONLINE_PREFIX_OF = {
    "visual_encoder": "visual_encoder",
    "vision_proj": "vision_proj",
    "text_encoder": "text",
    "text_proj": "text_proj",
}
"""Top-level momentum module name -> the online module it follows."""


class MomentumEncoders(nn.Module):
    """Momentum ViT + vision_proj + text-only MED + text_proj; frozen (no grad).

    Args:
        visual_encoder: ViT built like the online one.
        vision_proj: Linear(D_vision -> E).
        text_encoder: text-only MED (bidirectional self-attention + FFN per layer).
        text_proj: Linear(D_text -> E).
    """

    def __init__(
        self,
        visual_encoder: VisionTransformer,
        vision_proj: nn.Linear,
        text_encoder: MED,
        text_proj: nn.Linear,
    ) -> None:
        super().__init__()
        self.visual_encoder = visual_encoder
        self.vision_proj = vision_proj
        self.text_encoder = text_encoder
        self.text_proj = text_proj
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Momentum features of one batch.

        Args:
            images: (B, 3, H, W) normalised.
            input_ids: (B, L) with [CLS] first.
            attention_mask: (B, L).

        Returns:
            image_feat_m, text_feat_m: (B, E) unit-norm fp32.
        """
        image_embeds = self.visual_encoder(images)
        image_feat = project_features(self.vision_proj, image_embeds[:, 0])
        text_hidden = self.text_encoder(input_ids, attention_mask).hidden_states
        text_feat = project_features(self.text_proj, text_hidden[:, 0])
        return image_feat, text_feat
