"""MED: BLIP's multimodal mixture of encoder-decoder (BERT with cross-attention).

One `MEDLayer` holds everything the text encoder and the text decoder share at that depth (the
cross-attention and the FFN) plus both self-attentions (bidirectional for the encoder, causal for
the decoder), so the sharing is structural: a parameter lives in exactly one module, which is the
unit FSDP2 shards. What a pass computes is data, not a mode string:

- no images: bidirectional self-attention -> FFN (the unimodal text encoder, ITC);
- images and a `RowLayout`: each row runs its self-attention (bidirectional for encoder rows,
  causal for decoder rows), cross-attends its image, then the FFN. Encoder and decoder rows of
  the same images share one pass, and all rows of an image attend its keys/values together.

A text-only MED (the momentum text encoder) is built with `causal_self_attn=None` and
`cross_attn=None`; it only runs without images. A MED may also have one self-attention only
(VQA's question encoder: bidirectional; its answer decoder: causal, `self_attn=None`).

Cross-attention sources without padding (image tokens) need no mask; a padded source (VQA's
question states, attended by the answer decoder) passes `cross_mask`, one row per source.

Post-LN BERT arithmetic throughout (LayerNorm eps 1e-12 in the reference); attention through
`F.scaled_dot_product_attention` with boolean masks (True = attend), which equals the reference's
additive `-10000` masks for every row that has at least one visible key (always true here: the
first token is never padding).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from blip_recipes.models.bert_blocks import (
    BertAttention,
    BertFeedForward,
    CrossKV,
    TextEmbeddings,
    init_bert_modules,
)
from blip_recipes.models.row_layout import ENCODER_ROWS, RowLayout, cat_if_many


class SelfAttentionMasks(NamedTuple):
    """Boolean self-attention masks of one pass, prepared once for every layer.

    encoder: (R_e, 1, 1, L) padding mask of the bidirectional rows (None when there are none).
    decoder: (R_d, 1, L, L) padding & causal mask of the decoder rows, or None for the causal
        fast path (`is_causal=True`, no mask tensor).
    """

    encoder: torch.Tensor | None
    decoder: torch.Tensor | None


class MEDLayer(nn.Module):
    """One MED depth: both self-attentions, the shared cross-attention and the shared FFN.

    Args:
        self_attn: bidirectional self-attention (encoder); None for a decoder-only MED.
        ffn: feed-forward sublayer (shared).
        causal_self_attn: causal self-attention (decoder); None for a text-only encoder.
        cross_attn: cross-attention to image tokens (shared); None for a text-only encoder.
    """

    def __init__(
        self,
        self_attn: BertAttention | None,
        ffn: BertFeedForward,
        causal_self_attn: BertAttention | None = None,
        cross_attn: BertAttention | None = None,
    ) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.causal_self_attn = causal_self_attn
        self.cross_attn = cross_attn
        self.ffn = ffn

    def forward(
        self,
        hidden: torch.Tensor,
        masks: SelfAttentionMasks,
        layout: RowLayout = ENCODER_ROWS,
        image_embeds: torch.Tensor | None = None,
        cross_kv: CrossKV | None = None,
        image_rows: torch.Tensor | None = None,
        return_kv: bool = False,
        image_select: torch.Tensor | None = None,
        cross_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, CrossKV | None]:
        """Self-attention (per row kind) -> cross-attention (when images are given) -> FFN.

        Args:
            hidden: (R, L, D) text rows in `layout` order.
            masks: self-attention masks of the encoder and decoder rows.
            layout: row layout; text-only passes use `ENCODER_ROWS` and no images.
            image_embeds: (G * M, N, D_vision) image tokens, the layout's groups concatenated;
                None (and no `cross_kv`) skips cross-attention (the unimodal text encoder).
            cross_kv: keys/values of those image tokens from an earlier call of this layer
                (decoding step by step); skips recomputing them.
            image_rows: inference only, with a one-row-per-image layout: (R,) image of each row
                (keys/values gathered per row instead of one image per row).
            return_kv: also return this layer's image keys/values (contiguous, for reuse).
            image_select: (S,) int64: the layout's later groups are images `image_select` of
                the M images given (`image_embeds` then holds only those M): their keys/values
                are selected from the M images' keys/values, not projected again (see
                `select_kv`).
            cross_mask: (G * M, S) bool, True = a source token to attend (a padded source);
                None attends every source token.

        Returns:
            hidden (R, L, D) and the image keys/values (None unless `return_kv`).
        """
        hidden = self._self_attention(hidden, masks, layout)
        if image_embeds is not None or cross_kv is not None:
            if self.cross_attn is None:
                raise ValueError("this MED layer has no cross-attention (text-only build)")
            if cross_kv is None:
                cross_kv = self.cross_attn.key_value(image_embeds)
            if image_select is not None:
                cross_kv = select_kv(cross_kv, image_select)
            hidden = self._cross_attention(hidden, layout, cross_kv, image_rows, cross_mask)
        if return_kv and cross_kv is not None:
            return self.ffn(hidden), (cross_kv[0].contiguous(), cross_kv[1].contiguous())
        return self.ffn(hidden), None

    def _self_attention(
        self, hidden: torch.Tensor, masks: SelfAttentionMasks, layout: RowLayout
    ) -> torch.Tensor:
        if layout.encoder_only:
            if self.self_attn is None:
                raise ValueError("this MED layer has no bidirectional self-attention (decoder)")
            return self.self_attn(hidden, masks.encoder)
        if self.causal_self_attn is None:
            raise ValueError("this MED layer has no causal self-attention (text-only build)")
        causal = masks.decoder is None
        if layout.decoder_only:
            return self.causal_self_attn(hidden, masks.decoder, is_causal=causal)
        images = hidden.shape[0] // layout.rows_per_image()
        encoder, decoder = layout.split(hidden, images)
        assert self.self_attn is not None
        encoder = self.self_attn(encoder, masks.encoder)
        decoder = self.causal_self_attn(decoder, masks.decoder, is_causal=causal)
        return layout.merge(encoder, decoder, images)

    def _cross_attention(
        self,
        hidden: torch.Tensor,
        layout: RowLayout,
        cross_kv: CrossKV,
        image_rows: torch.Tensor | None,
        cross_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        attn = self.cross_attn
        assert attn is not None
        queries = attn.query(hidden)  # (R, L, D): one projection for every row
        keys, values = cross_kv
        source_mask = None if cross_mask is None else cross_mask[:, None, None, :]
        if image_rows is not None:
            keys, values = keys.index_select(0, image_rows), values.index_select(0, image_rows)
            if source_mask is not None:
                source_mask = source_mask.index_select(0, image_rows)
            return attn.residual(hidden, attn.attend(queries, (keys, values), source_mask))
        rows, length, width = queries.shape
        images = rows // layout.rows_per_image()
        contexts, row_at = [], 0
        for index, group in enumerate(layout.groups):
            size = images * group.rows
            packed = queries[row_at : row_at + size].reshape(images, group.rows * length, width)
            kv = (keys[index * images : (index + 1) * images],
                  values[index * images : (index + 1) * images])  # fmt: skip
            mask = None
            if source_mask is not None:
                mask = source_mask[index * images : (index + 1) * images]
            contexts.append(attn.attend(packed, kv, mask).reshape(size, length, width))
            row_at += size
        return attn.residual(hidden, cat_if_many(contexts))


def select_kv(cross_kv: CrossKV, image_select: torch.Tensor) -> CrossKV:
    """Keys/values of M images -> those of the M images followed by images `image_select`.

    The selection is a one-hot matrix product, so its backward is a matmul too (one dense
    kernel, no atomics), not the scatter-add of an index gather's backward. Exact in any dtype:
    each output is one input times 1 plus zeros.

    Args:
        cross_kv: keys, values, each (M, heads, N, head_dim).
        image_select: (S,) int64 indices into the M images.

    Returns:
        keys, values, each (M + S, heads, N, head_dim).
    """
    keys, values = cross_kv
    images = keys.shape[0]
    columns = torch.arange(images, device=image_select.device)
    one_hot = (image_select[:, None] == columns[None, :]).to(keys.dtype)  # (S, M)
    both = torch.stack([keys, values]).flatten(2)  # (2, M, heads * N * head_dim)
    picked = torch.matmul(one_hot, both).unflatten(2, keys.shape[1:])  # (2, S, heads, N, hd)
    return torch.cat([keys, picked[0]]), torch.cat([values, picked[1]])


class MEDOutput(NamedTuple):
    """hidden_states: (R, L, D); cross_kv: per-layer image keys/values (when asked for)."""

    hidden_states: torch.Tensor
    cross_kv: list[CrossKV] | None


class MED(nn.Module):
    """Embeddings + a stack of `MEDLayer`s.

    Args:
        embeddings: token + position embeddings.
        layers: the MED layers, in order.
        width: hidden width D.
    """

    def __init__(self, embeddings: TextEmbeddings, layers: list[MEDLayer], width: int) -> None:
        super().__init__()
        self.width = width
        self.embeddings = embeddings
        self.layers = nn.ModuleList(layers)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        layout: RowLayout = ENCODER_ROWS,
        cross_kv: list[CrossKV] | None = None,
        image_rows: torch.Tensor | None = None,
        causal_fast_path: bool = False,
        return_cross_kv: bool = False,
        image_select: torch.Tensor | None = None,
        cross_mask: torch.Tensor | None = None,
    ) -> MEDOutput:
        """Encode and/or decode a batch of token ids in one pass.

        Without images this is the unimodal text encoder (bidirectional, no cross-attention).
        With images every row cross-attends its image as `layout` says; decoder rows use the
        causal self-attention.

        Args:
            input_ids: (R, L) int64 text rows in `layout` order.
            attention_mask: (R, L), 1 = token, 0 = padding.
            image_embeds: (G * M, N, D_vision) image tokens of the layout's G groups.
            layout: how rows map to images and which rows decode (see `RowLayout`).
            cross_kv: per-layer image keys/values returned by an earlier call on the same images
                (the cross-attention is shared, so they are identical); replaces `image_embeds`.
            image_rows: inference only: (R,) image index per row with a one-row-per-image
                layout, for scoring many texts against few images without copying them.
            causal_fast_path: decoder rows use causal attention without a padding mask. Exact for
                every non-padding position when padding is trailing (as the tokenizers pad); the
                hidden states at padding positions then differ (they are never read by the
                LM loss or by generation).
            return_cross_kv: also return every layer's image keys/values (step-by-step decoding).
            image_select: (S,) int64: the layout's later groups attend images `image_select` of
                the M images in `image_embeds`, whose keys/values each layer selects instead of
                projecting them again (pretraining's hard-negative images).
            cross_mask: (G * M, S), 1 = a source token to attend, for a padded cross-attention
                source (VQA's question states); None attends every token (image tokens).

        Returns:
            `MEDOutput(hidden_states (R, L, D), cross_kv)`, `cross_kv` None unless asked for.
        """
        rows = input_ids.shape[0]
        if rows % layout.rows_per_image():
            raise ValueError(f"{rows} text rows do not fit layout {layout}")
        hidden = self.embeddings(input_ids)
        masks = self._masks(attention_mask, layout, causal_fast_path)
        if cross_mask is not None:
            cross_mask = cross_mask.bool()
        new_kv: list[CrossKV] = []
        for index, layer in enumerate(self.layers):
            layer_kv = None if cross_kv is None else cross_kv[index]
            hidden, layer_kv = layer(hidden, masks, layout, image_embeds, layer_kv, image_rows,
                                     return_cross_kv, image_select, cross_mask)  # fmt: skip
            if layer_kv is not None:
                new_kv.append(layer_kv)
        return MEDOutput(hidden, new_kv if return_cross_kv else None)

    @staticmethod
    def _masks(
        attention_mask: torch.Tensor, layout: RowLayout, causal_fast_path: bool
    ) -> SelfAttentionMasks:
        images = attention_mask.shape[0] // layout.rows_per_image()
        encoder, decoder = layout.split(attention_mask.bool(), images)
        encoder_mask = encoder[:, None, None, :] if encoder.shape[0] else None
        decoder_mask = None
        if decoder.shape[0] and not causal_fast_path:
            length = attention_mask.shape[1]
            causal = torch.ones(length, length, dtype=torch.bool, device=decoder.device).tril()
            decoder_mask = decoder[:, None, None, :] & causal
        return SelfAttentionMasks(encoder_mask, decoder_mask)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Reference (BERT) init: normal(0.02) for linears and embeddings, zero biases, LN 1/0."""
        init_bert_modules(self)
