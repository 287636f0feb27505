"""The composed BLIP pretraining model: ViT + MED + heads, used through named entry points.

`BlipPretrain` has no mode string and no loss inside. Its entry points are what every caller
runs (training, momentum distillation, evaluation, captioning), and each is registered with
FSDP2 so that it is a proper sharded forward of the root unit:

- `encode_image(images)` -> image tokens and the unit-norm ITC feature;
- `encode_text(ids, mask)` -> text hidden states and the unit-norm ITC feature;
- `temperature()` -> the clamped ITC temperature;
- `multimodal(image_embeds, ids, mask, neg_image, neg_text)` -> ITM logits of the positive and
  both hard-negative pairs and the captioning logits, in ONE pass over the MED;
- `itm_logits(...)` and `next_token_logits(...)` for evaluation and generation.

The loss maths lives in `blip_recipes.objectives.pretrain` (pure functions) and is composed with these
entry points by `blip_recipes.training.pretrain`; the fp32 queues never enter the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from blip_recipes.models import inputs
from blip_recipes.models.bert_blocks import CrossKV, LMHead, init_bert_modules
from blip_recipes.models.heads import project_features
from blip_recipes.models.med import MED
from blip_recipes.models.row_layout import DECODER_ROWS, ENCODER_ROWS, RowLayout
from blip_recipes.models.vit import VisionTransformer

PRETRAIN_LAYOUT = RowLayout.of((2, 1), (1, 0))
"""Rows of the pretraining multimodal pass over B images: per image (ITM positive, ITM
negative text, decoder) against the batch's images, then (ITM negative image) against the B
hard-negative images."""

ENTRY_POINTS = (
    "encode_image",
    "encode_text",
    "temperature",
    "multimodal",
    "itm_logits",
    "next_token_logits",
)
"""Methods that run the model; `parallelize_blip` registers each with FSDP2."""


@dataclass
class MomentumTargets:
    """What the momentum encoders and the queues contribute to one step (no grad).

    Attributes:
        image_feat_m: (B, E) unit-norm momentum image features of the local batch, fp32.
        text_feat_m: (B, E) unit-norm momentum text features of the local batch, fp32.
        image_queue: (E, Q) fp32 queue of earlier momentum image features.
        text_queue: (E, Q) fp32 queue of earlier momentum text features.
    """

    image_feat_m: torch.Tensor
    text_feat_m: torch.Tensor
    image_queue: torch.Tensor
    text_queue: torch.Tensor


@dataclass
class BlipOutput:
    """Losses and diagnostics of one step; every field is a 0-d tensor (no host sync).

    `loss = loss_ita + loss_itm + loss_lm` is the one to backpropagate. `image_feat` and
    `text_feat` are (B, E) online features (fp32) for logging or evaluation.
    """

    loss: torch.Tensor
    loss_ita: torch.Tensor
    loss_itm: torch.Tensor
    loss_lm: torch.Tensor
    itm_acc: torch.Tensor
    itm_pos_prob: torch.Tensor
    itm_neg_prob: torch.Tensor
    temp: torch.Tensor
    image_feat: torch.Tensor
    text_feat: torch.Tensor


class ImageEncoding(NamedTuple):
    """embeds: (B, 1 + N, D_vision) image tokens; feat: (B, E) unit-norm fp32 ITC feature."""

    embeds: torch.Tensor
    feat: torch.Tensor


class TextEncoding(NamedTuple):
    """hidden: (B, L, D) unimodal text states; feat: (B, E) unit-norm fp32 ITC feature."""

    hidden: torch.Tensor
    feat: torch.Tensor


class MultimodalOutput(NamedTuple):
    """itm_logits: (3B, 2), rows = B positives, B (text, negative image), B (negative text,
    image); lm_logits: (B * (L - 1), V) fp32, row b * (L - 1) + t predicts token t + 1 of
    caption b (flat, so that the big logits tensor leaves the FSDP forward without a view), or
    None when the pass computed `loss_lm` itself (0-d, a chunked loss; else None)."""

    itm_logits: torch.Tensor
    lm_logits: torch.Tensor | None
    loss_lm: torch.Tensor | None = None


class BlipPretrain(nn.Module):
    """BLIP pretraining model (online side), run through its entry points (module docstring).

    Args:
        visual_encoder: ViT returning (B, 1 + N, D_vision).
        text: MED with causal self-attention and cross-attention in every layer.
        vision_proj: Linear(D_vision -> E).
        text_proj: Linear(D_text -> E).
        itm_head: Linear(D_text -> 2).
        lm_head: `LMHead` (its projection weight is `text.embeddings.word_embeddings.weight`).
        enc_token_id: id put first for ITM ([ENC], 30523 in the reference tokenizer).
        dec_token_id: id put first for LM ([DEC], 30522).
        temp_init: initial temperature (0.07).

    The padding id is the word embeddings' padding row (`pad_token_id`, set by the builder); the
    LM loss's settings (label smoothing) belong to the objective, the queue size to the momentum
    state.

    The temperature is a (1,)-shaped parameter (FSDP2 refuses 0-d parameters). Call
    `clamp_temperature_()` at the start of each step (outside the entry points), as the reference
    does; `temperature()` also applies the clamp to the value it returns (straight-through).
    """

    def __init__(
        self,
        visual_encoder: VisionTransformer,
        text: MED,
        vision_proj: nn.Linear,
        text_proj: nn.Linear,
        itm_head: nn.Linear,
        lm_head: LMHead,
        enc_token_id: int = 30523,
        dec_token_id: int = 30522,
        temp_init: float = 0.07,
    ) -> None:
        super().__init__()
        self.visual_encoder = visual_encoder
        self.text = text
        self.vision_proj = vision_proj
        self.text_proj = text_proj
        self.itm_head = itm_head
        self.lm_head = lm_head
        self.temp = nn.Parameter(torch.full((1,), temp_init))
        self.temp_init = temp_init
        self.enc_token_id = enc_token_id
        self.dec_token_id = dec_token_id

    @property
    def pad_token_id(self) -> int:
        """The padding id: the word embeddings' padding row ([PAD], 0), ignored by the LM loss."""
        padding = self.text.embeddings.word_embeddings.padding_idx
        return 0 if padding is None else int(padding)

    @property
    def embed_dim(self) -> int:
        """E, the width of the contrastive features."""
        return self.vision_proj.out_features

    @torch.no_grad()
    def clamp_temperature_(self) -> None:
        """Clamp `temp` in place to [0.001, 0.5] (works on FSDP2-sharded DTensors)."""
        self.temp.clamp_(inputs.TEMP_MIN, inputs.TEMP_MAX)

    def forward(self, *args, **kwargs):
        """Not an entry point: BLIP has several (module docstring)."""
        raise TypeError(
            "BlipPretrain has no single forward: call encode_image, encode_text, temperature, "
            "multimodal, itm_logits or next_token_logits (a training step's losses: "
            "blip_recipes.training.pretrain.pretrain_losses)"
        )

    def encode_image(self, images: torch.Tensor) -> ImageEncoding:
        """images: (B, 3, H, W) normalised -> `ImageEncoding` (tokens and ITC feature)."""
        embeds = self.visual_encoder(images)
        return ImageEncoding(embeds, project_features(self.vision_proj, embeds[:, 0]))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextEncoding:
        """input_ids, attention_mask: (B, L), `[CLS]` first -> `TextEncoding`."""
        hidden = self.text(input_ids, attention_mask).hidden_states
        return TextEncoding(hidden, project_features(self.text_proj, hidden[:, 0]))

    def temperature(self) -> torch.Tensor:
        """(1,) ITC temperature clamped to [0.001, 0.5], gradient passed straight through."""
        clamped = self.temp.clamp(inputs.TEMP_MIN, inputs.TEMP_MAX)
        return self.temp + (clamped - self.temp).detach()

    def multimodal(
        self,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        neg_image: torch.Tensor,
        neg_text: torch.Tensor,
        negative_kv: str = "select",
        lm_loss: Callable[..., torch.Tensor] | None = None,
    ) -> MultimodalOutput:
        """ITM (positive + both hard negatives) and captioning in one pass over the MED.

        Every MED layer runs once for 4B rows: per image b, the ITM positive (`[ENC]` text b),
        the ITM negative text (`[ENC]` text `neg_text[b]`) and the decoder row (`[DEC]` text b)
        attend image b's keys/values together; the ITM negative-image rows (text b) attend
        image `neg_image[b]`, whose keys/values each layer selects from the batch's own (projected
        once per image).

        Args:
            image_embeds: (B, 1 + N, D_vision) from `encode_image`.
            input_ids: (B, L) `[CLS] ... [SEP] [PAD]...` (padding trailing).
            attention_mask: (B, L).
            neg_image: (B,) int64 hard-negative image of each text.
            neg_text: (B,) int64 hard-negative text of each image.
            negative_kv: how the hard-negative images get their keys/values in each layer:
                `select`ed from the batch's own (a one-hot matmul, projected once per image) or
                `recompute`d from their gathered tokens (2B images projected per layer).
            lm_loss: `objectives.pretrain.ChunkedLMLoss` (or alike): the LM loss is computed here, inside
                the entry point, on the parameters as FSDP2 gathered them (compute dtype), and
                no logits are returned; None returns the fp32 logits instead.

        Returns:
            `MultimodalOutput(itm_logits (3B, 2), lm_logits (B * (L - 1), V) fp32)`.
        """
        batch = input_ids.shape[0]
        encoder_ids = inputs.replace_first_token(input_ids, self.enc_token_id)
        decoder_ids = inputs.replace_first_token(input_ids, self.dec_token_id)
        own_image_ids = torch.stack([encoder_ids, encoder_ids[neg_text], decoder_ids], 1)
        own_image_mask = torch.stack([attention_mask, attention_mask[neg_text], attention_mask], 1)
        ids = torch.cat([own_image_ids.flatten(0, 1), encoder_ids])
        mask = torch.cat([own_image_mask.flatten(0, 1), attention_mask])
        if negative_kv == "select":
            images, select = image_embeds, neg_image
        elif negative_kv == "recompute":
            images, select = torch.cat([image_embeds, image_embeds[neg_image]]), None
        else:
            raise ValueError(f"negative_kv must be 'select' or 'recompute', got {negative_kv!r}")
        hidden = self.text(ids, mask, images, PRETRAIN_LAYOUT, causal_fast_path=True,
                           image_select=select).hidden_states  # fmt: skip
        own = hidden[: 3 * batch].unflatten(0, (batch, 3))  # (B, 3, L, D)
        cls = torch.cat([own[:, 0, 0], hidden[3 * batch :, 0], own[:, 1, 0]])
        word_embeddings = self.text.embeddings.word_embeddings.weight
        decoder_hidden = own[:, 2, :-1].flatten(0, 1)
        if lm_loss is not None:
            targets = inputs.lm_labels(decoder_ids, self.pad_token_id)[:, 1:].flatten()
            loss_lm = lm_loss(self.lm_head.transform(decoder_hidden), word_embeddings,
                              self.lm_head.bias, targets)  # fmt: skip
            return MultimodalOutput(self.itm_head(cls), None, loss_lm)
        lm_logits = self.lm_head(decoder_hidden, word_embeddings)
        return MultimodalOutput(self.itm_head(cls), lm_logits)

    def itm_logits(
        self,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ITM logits of text rows against images (evaluation's rerank).

        Args:
            image_embeds: (M, 1 + N, D_vision).
            input_ids: (R, L) with `[CLS]` first (replaced by `[ENC]` here).
            attention_mask: (R, L).
            image_rows: (R,) image of each text row; None = row i with image i (R == M).

        Returns:
            (R, 2) logits; column 1 is "match".
        """
        ids = inputs.replace_first_token(input_ids, self.enc_token_id)
        hidden = self.text(
            ids, attention_mask, image_embeds, ENCODER_ROWS, image_rows=image_rows
        ).hidden_states
        return self.itm_head(hidden[:, 0])

    def next_token_logits(
        self,
        prefixes: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        cross_kv: list[CrossKV] | None = None,
        rows_per_image: int = 1,
    ) -> tuple[torch.Tensor, list[CrossKV]]:
        """Decoder logits of the token after each prefix (captioning, step by step).

        Args:
            prefixes: (M * k, T) `[DEC] ...` without padding; image m owns rows m*k .. m*k+k-1.
            image_embeds: (M, 1 + N, D_vision) at the first step.
            cross_kv: the per-layer image keys/values returned by the previous step (then
                `image_embeds` is not needed).
            rows_per_image: k (beams per image).

        Returns:
            (M * k, V) fp32 logits and the per-layer cross keys/values to pass back next step.
        """
        layout = DECODER_ROWS if rows_per_image == 1 else RowLayout.of((0, rows_per_image))
        out = self.text(prefixes, torch.ones_like(prefixes), image_embeds, layout, cross_kv,
                        causal_fast_path=True, return_cross_kv=True)  # fmt: skip
        word_embeddings = self.text.embeddings.word_embeddings.weight
        logits = self.lm_head(out.hidden_states[:, -1:], word_embeddings)[:, -1].float()
        assert out.cross_kv is not None
        return logits, out.cross_kv

    @torch.no_grad()
    def init_weights(self) -> None:
        """Reference initialisation (also after `to_empty` from the meta device).

        ViT: trunc-normal(0.02); MED and the LM head: normal(0.02) (BERT); LN 1/0; zero biases;
        vision_proj / text_proj / itm_head: PyTorch's default Linear init (the reference never
        re-initialises them); temp = temp_init.
        """
        self.visual_encoder.init_weights()
        self.text.init_weights()
        init_bert_modules(self.lm_head)
        nn.init.zeros_(self.lm_head.bias)
        for head in (self.vision_proj, self.text_proj, self.itm_head):
            head.reset_parameters()
        self.temp.fill_(self.temp_init)
