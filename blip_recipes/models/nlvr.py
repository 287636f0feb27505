"""BLIP for NLVR2: does a sentence hold for a pair of images? (two-image reasoning)

The pretrained ViT encodes both images; the text encoder reads the sentence and, in every
layer, cross-attends each image through its own attention (queries, keys, values and output
projection per image), then merges the two contexts before the shared residual LayerNorm:

- in the lower layers by averaging the two projected contexts;
- from `merge_from` on (the upper half in the reference: layers 6-11 of 12) by a linear layer
  over their concatenation, (2D -> D), newly initialised.

The [ENC] state of the last layer goes through a two-layer MLP head (D -> D -> ReLU -> 2): logit
1 = the sentence is true of the pair. Both image attentions of a layer start as copies of the
pretrained cross-attention (`blip_recipes.interop.nlvr.nlvr_from_pretrained`).

Entry points (no loss inside; `blip_recipes.objectives.nlvr` holds it): `encode_image`,
`classify`.
"""

from __future__ import annotations

import torch
from torch import nn

from blip_recipes.models import inputs
from blip_recipes.models.bert_blocks import BertAttention, BertFeedForward, TextEmbeddings
from blip_recipes.models.bert_blocks import init_bert_modules as _init_bert
from blip_recipes.models.vit import VisionTransformer

NLVR_ENTRY_POINTS = ("encode_image", "classify")
"""Methods that run the NLVR model; registered with FSDP2 after sharding."""


class PairCrossAttention(nn.Module):
    """Cross-attention from the text to two images, one attention per image, merged.

    out = norm(hidden + dropout(mix(out_0(attend_0(hidden, image_0)), out_1(attend_1(...)))))
    with mix = mean, or `merge(cat(., .))` when a merge layer is given.

    Args:
        first: attention to the first image (its `norm` is not used: set to None by the
            builder, the pair shares `norm`).
        second: attention to the second image (likewise).
        norm: the residual LayerNorm shared by both.
        dropout: hidden dropout after the merge.
        merge: (2D -> D) linear over the concatenated contexts; None = average them.
    """

    def __init__(
        self,
        first: BertAttention,
        second: BertAttention,
        norm: nn.LayerNorm,
        dropout: nn.Dropout,
        merge: nn.Linear | None = None,
    ) -> None:
        super().__init__()
        self.first = first
        self.second = second
        self.norm = norm
        self.dropout = dropout
        self.merge = merge

    def forward(
        self, hidden: torch.Tensor, image_0: torch.Tensor, image_1: torch.Tensor
    ) -> torch.Tensor:
        """hidden (B, L, D), image_0 / image_1 (B, N, D_vision) -> (B, L, D)."""
        parts = []
        for attn, image in ((self.first, image_0), (self.second, image_1)):
            context = attn.attend(attn.query(hidden), attn.key_value(image))
            parts.append(attn.out(context))
        if self.merge is None:
            mixed = (parts[0] + parts[1]) / 2
        else:
            mixed = self.merge(torch.cat(parts, dim=-1))
        return self.norm(hidden + self.dropout(mixed))


class PairMEDLayer(nn.Module):
    """Bidirectional self-attention -> pair cross-attention -> FFN (one text-encoder depth)."""

    def __init__(
        self, self_attn: BertAttention, cross_attn: PairCrossAttention, ffn: BertFeedForward
    ) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.cross_attn = cross_attn
        self.ffn = ffn

    def forward(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        image_0: torch.Tensor,
        image_1: torch.Tensor,
    ) -> torch.Tensor:
        """hidden (B, L, D), mask (B, 1, 1, L) bool, images (B, N, D_vision) -> (B, L, D)."""
        hidden = self.self_attn(hidden, mask)
        return self.ffn(self.cross_attn(hidden, image_0, image_1))


class PairMED(nn.Module):
    """Embeddings + `PairMEDLayer`s: the NLVR text encoder."""

    def __init__(self, embeddings: TextEmbeddings, layers: list[PairMEDLayer], width: int) -> None:
        super().__init__()
        self.width = width
        self.embeddings = embeddings
        self.layers = nn.ModuleList(layers)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_0: torch.Tensor,
        image_1: torch.Tensor,
    ) -> torch.Tensor:
        """input_ids / attention_mask (B, L), images (B, N, D_vision) -> hidden (B, L, D)."""
        hidden = self.embeddings(input_ids)
        mask = attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            hidden = layer(hidden, mask, image_0, image_1)
        return hidden


class BlipNLVR(nn.Module):
    """ViT + pair text encoder + classification head (module docstring).

    Args:
        visual_encoder: the ViT.
        text: the `PairMED`.
        cls_head: (D -> 2) head over the [ENC] state.
        enc_token_id: the first token of every sentence ([ENC]).
    """

    def __init__(
        self,
        visual_encoder: VisionTransformer,
        text: PairMED,
        cls_head: nn.Module,
        enc_token_id: int,
    ) -> None:
        super().__init__()
        self.visual_encoder = visual_encoder
        self.text = text
        self.cls_head = cls_head
        self.enc_token_id = enc_token_id

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) normalised -> image tokens (B, 1 + N, D_vision)."""
        return self.visual_encoder(images)

    def classify(
        self,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Logits (B, 2) fp32 of the sentences about their image pairs.

        Args:
            image_embeds: (2B, 1 + N, D_vision): the B first images, then the B second images
                (one `encode_image` call over both, as the reference batches them).
            input_ids: (B, L); the first token is replaced by [ENC].
            attention_mask: (B, L).
        """
        batch = input_ids.shape[0]
        image_0, image_1 = image_embeds[:batch], image_embeds[batch:]
        ids = inputs.replace_first_token(input_ids, self.enc_token_id)
        hidden = self.text(ids, attention_mask, image_0, image_1)
        return self.cls_head(hidden[:, 0]).float()

    @torch.no_grad()
    def init_weights(self) -> None:
        """As the reference: ViT init for the image encoder, BERT init (normal 0.02, merge
        layers included) for the text encoder, PyTorch's default Linear init for the head."""
        self.visual_encoder.init_weights()
        _init_bert(self.text)
        for module in self.cls_head.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()


# ---------------------------------------------------------------------- builders
def pair_med(
    vocab_size: int = 30524,
    width: int = 768,
    depth: int = 12,
    heads: int = 12,
    ffn_dim: int = 3072,
    vision_width: int = 768,
    max_positions: int = 512,
    dropout: float = 0.1,
    norm_eps: float = 1e-12,
    pad_token_id: int = 0,
    merge_from: int | None = None,
) -> PairMED:
    """Build the NLVR text encoder (BERT layers with a pair cross-attention each).

    Args:
        merge_from: first layer whose two image contexts are merged by a linear layer (the
            layers below average them); None = `depth // 2` (6 of 12, as the reference).
        others: as `blip_recipes.models.builders.med`.

    Returns:
        `PairMED` with BERT-initialised weights.
    """
    merge_from = depth // 2 if merge_from is None else merge_from
    if not 0 <= merge_from <= depth:
        raise ValueError(f"merge_from {merge_from} is outside 0..{depth} (the text depth)")

    def attention(kv_width: int) -> BertAttention:
        return BertAttention(width, heads, kv_width, dropout, dropout, norm_eps)

    def image_attention() -> BertAttention:
        attn = attention(vision_width)
        attn.norm = None  # the pair shares one residual LayerNorm
        return attn

    layers = [
        PairMEDLayer(
            self_attn=attention(width),
            cross_attn=PairCrossAttention(
                first=image_attention(),
                second=image_attention(),
                norm=nn.LayerNorm(width, eps=norm_eps),
                dropout=nn.Dropout(dropout),
                merge=nn.Linear(2 * width, width) if index >= merge_from else None,
            ),
            ffn=BertFeedForward(width, ffn_dim, dropout, norm_eps),
        )
        for index in range(depth)
    ]
    embeddings = TextEmbeddings(vocab_size, width, max_positions, pad_token_id, dropout, norm_eps)
    model = PairMED(embeddings, layers, width)
    _init_bert(model)
    return model


def classifier_head(width: int, classes: int = 2) -> nn.Sequential:
    """The reference's NLVR head: Linear(D, D) -> ReLU -> Linear(D, classes)."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes))


def build_nlvr_model(name: str, merge_from: int | None = None, **overrides) -> BlipNLVR:
    """The NLVR model with the shapes of pretraining preset `name` (its ViT and text widths,
    depths and heads) and the builder overrides `build_model` takes (`image_size`,
    `vocab_size`, `enc_token_id`, ...; the pretraining-only ones are ignored).

    The ViT gets the reference's fine-tuning drop-path 0.1 unless `drop_path_rate` is given.
    """
    from blip_recipes.models.builders import _spec, _vision

    overrides.setdefault("drop_path_rate", 0.1)
    spec = _spec(name, overrides)
    text = pair_med(
        vocab_size=spec["vocab_size"],
        width=spec["text_width"],
        depth=spec["text_depth"],
        heads=spec["text_heads"],
        ffn_dim=spec["text_ffn_dim"],
        vision_width=spec["vision_width"],
        max_positions=spec["max_positions"],
        dropout=spec["text_dropout"],
        norm_eps=spec["text_norm_eps"],
        pad_token_id=spec["pad_token_id"],
        merge_from=merge_from,
    )
    model = BlipNLVR(
        visual_encoder=_vision(spec),
        text=text,
        cls_head=classifier_head(spec["text_width"]),
        enc_token_id=int(spec.get("enc_token_id", 30523)),
    )
    model.init_weights()
    return model
