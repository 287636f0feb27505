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

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

CrossKV = tuple[torch.Tensor, torch.Tensor]
"""Cross-attention keys and values of the image tokens, each (B_img, heads, N_img, head_dim)."""


class TextEmbeddings(nn.Module):
    """Word + absolute position embeddings, LayerNorm, dropout (no token types).

    Args:
        vocab_size: rows of the word-embedding matrix (30524 with [DEC] and [ENC]).
        width: hidden width D.
        max_positions: rows of the position-embedding matrix.
        pad_token_id: padding row of the word embeddings (gets no gradient).
        dropout: dropout after the LayerNorm.
        eps: LayerNorm eps.
    """

    def __init__(
        self,
        vocab_size: int,
        width: int,
        max_positions: int,
        pad_token_id: int = 0,
        dropout: float = 0.1,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, width, padding_idx=pad_token_id)
        self.position_embeddings = nn.Embedding(max_positions, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: (B, L) -> (B, L, D)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.dropout(self.norm(x))


class BertAttention(nn.Module):
    """Post-LN attention sublayer: norm(x + dropout(out(attention(query(x), key(s), value(s))))).

    Used as self-attention (source = x) and as cross-attention (source = image tokens, whose
    width `kv_width` is the vision width). The pieces (`queries`, `key_value`, `attend`,
    `residual`) are public so that a packed multimodal pass can attend several groups of
    query rows against their own keys/values between one query and one output projection.

    Args:
        width: hidden width D of the queries and the output.
        heads: number of heads.
        kv_width: width of the key/value source (D for self-attention).
        dropout: hidden dropout after the output projection.
        attention_dropout: dropout on attention probabilities.
        eps: LayerNorm eps.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        kv_width: int,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.attention_dropout = attention_dropout
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(kv_width, width)
        self.value = nn.Linear(kv_width, width)
        self.out = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, heads, T, D / heads)."""
        batch, tokens, width = x.shape
        return x.view(batch, tokens, self.heads, width // self.heads).transpose(1, 2)

    @staticmethod
    def merge_heads(x: torch.Tensor) -> torch.Tensor:
        """(B, heads, T, D / heads) -> (B, T, D)."""
        batch, heads, tokens, head_dim = x.shape
        return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)

    def key_value(self, source: torch.Tensor) -> CrossKV:
        """source: (B, S, kv_width) -> keys, values, each (B, heads, S, D / heads)."""
        return self.split_heads(self.key(source)), self.split_heads(self.value(source))

    def attend(
        self,
        queries: torch.Tensor,
        key_value: CrossKV,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """Scaled dot-product attention, (B, T, D) projected queries -> (B, T, D) context.

        Args:
            queries: (B, T, D), the output of `self.query`.
            key_value: keys and values, each (B, heads, S, D / heads).
            mask: boolean, broadcastable to (B, heads, T, S); True = attend. None = all.
            is_causal: causal attention without a mask tensor (the fast kernels' path).
        """
        keys, values = key_value
        query = self.split_heads(queries)
        dropout = self.attention_dropout if self.training else 0.0
        context = F.scaled_dot_product_attention(
            query,
            keys.to(query.dtype),
            values.to(query.dtype),
            attn_mask=mask,
            dropout_p=dropout,
            is_causal=is_causal,
        )
        return self.merge_heads(context)

    def residual(self, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """norm(hidden + dropout(out(context))), both (B, T, D)."""
        return self.norm(hidden + self.dropout(self.out(context)))

    def forward(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None = None,
        key_value: CrossKV | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """Attend from `hidden` to itself, or to precomputed `key_value`.

        Args:
            hidden: (B, L, D) queries (and keys/values when `key_value` is None).
            mask: boolean, broadcastable to (B, heads, L, S); True = attend. None = all.
            key_value: keys/values (B, heads, S, D / heads) for cross-attention.
            is_causal: causal self-attention without a mask (exact when padding is trailing
                and only non-padding positions are read).

        Returns:
            (B, L, D).
        """
        key_value = self.key_value(hidden) if key_value is None else key_value
        return self.residual(hidden, self.attend(self.query(hidden), key_value, mask, is_causal))


class BertFeedForward(nn.Module):
    """Post-LN FFN sublayer: norm(x + dropout(fc2(GELU(fc1(x))))).

    Args:
        width: hidden width D.
        ffn_dim: intermediate width (3072 for BERT-base).
        dropout: hidden dropout.
        eps: LayerNorm eps.
    """

    def __init__(self, width: int, ffn_dim: int, dropout: float = 0.1, eps: float = 1e-12) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, ffn_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(ffn_dim, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (B, L, D) -> (B, L, D)."""
        return self.norm(hidden + self.dropout(self.fc2(self.act(self.fc1(hidden)))))


class RowGroup(NamedTuple):
    """Text rows per image in one image group: `encoder` bidirectional rows, then `decoder`
    causal rows."""

    encoder: int
    decoder: int

    @property
    def rows(self) -> int:
        return self.encoder + self.decoder


@dataclass(frozen=True)
class RowLayout:
    """Which text rows of a multimodal pass attend which image, and which are decoder rows.

    The images come in `len(groups)` groups of M images each, concatenated group by group
    ((G * M, N, D_vision)). The text rows come group by group too; inside group g they are
    image-major: image m of the group owns rows `m * k_g ... m * k_g + k_g - 1` (k_g =
    `groups[g].rows`), its encoder rows first. Because cross-attention queries do not interact,
    all k_g rows of an image attend its keys/values as one (k_g * L)-token query sequence: the
    image tokens are projected to keys/values once per image, and no row is gathered.

    The pretraining step packs ITM and captioning into one pass with two groups over B images:
    `((2, 1), (1, 0))` = per image (ITM positive, ITM negative text, decoder) against the batch's
    images, then (ITM negative image) against the hard-negative images (their keys/values
    selected from the batch's, `select_kv`).
    """

    groups: tuple[RowGroup, ...]

    @classmethod
    def of(cls, *groups: tuple[int, int]) -> RowLayout:
        """`RowLayout.of((encoder_rows, decoder_rows), ...)` per image group."""
        return cls(tuple(RowGroup(*g) for g in groups))

    @property
    def encoder_only(self) -> bool:
        return all(g.decoder == 0 for g in self.groups)

    @property
    def decoder_only(self) -> bool:
        return all(g.encoder == 0 for g in self.groups)

    def rows_per_image(self) -> int:
        """Text rows per image summed over groups (rows = M * this)."""
        return sum(g.rows for g in self.groups)

    def split(self, x: torch.Tensor, images: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows in layout order (R, ...) -> (encoder rows (R_e, ...), decoder rows (R_d, ...)).

        Views (no copy) when the layout has one kind of row only.
        """
        if self.encoder_only:
            return x, x[:0]
        if self.decoder_only:
            return x[:0], x
        encoder, decoder, offset = [], [], 0
        for group in self.groups:
            block = x[offset : offset + images * group.rows].unflatten(0, (images, group.rows))
            offset += images * group.rows
            if group.encoder:
                encoder.append(block[:, : group.encoder].flatten(0, 1))
            if group.decoder:
                decoder.append(block[:, group.encoder :].flatten(0, 1))
        return _cat(encoder), _cat(decoder)

    def merge(self, encoder: torch.Tensor, decoder: torch.Tensor, images: int) -> torch.Tensor:
        """Inverse of `split`: encoder and decoder rows -> rows in layout order."""
        if self.encoder_only:
            return encoder
        if self.decoder_only:
            return decoder
        parts, enc_at, dec_at = [], 0, 0
        for group in self.groups:
            pieces = []
            if group.encoder:
                size = images * group.encoder
                pieces.append(encoder[enc_at : enc_at + size].unflatten(0, (images, -1)))
                enc_at += size
            if group.decoder:
                size = images * group.decoder
                pieces.append(decoder[dec_at : dec_at + size].unflatten(0, (images, -1)))
                dec_at += size
            parts.append(_cat(pieces, dim=1).flatten(0, 1))
        return _cat(parts)


ENCODER_ROWS = RowLayout.of((1, 0))
"""One bidirectional row per image (ITM scoring, the transformers `multimodal` pass)."""
DECODER_ROWS = RowLayout.of((0, 1))
"""One causal row per image (captioning)."""


def _cat(tensors: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


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
        return attn.residual(hidden, _cat(contexts))


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


class LMHead(nn.Module):
    """BERT prediction head: dense -> GELU -> LayerNorm, then the vocab projection whose weight
    is the word-embedding matrix (passed in at call time, so the tie survives `to_empty`,
    FSDP2 and state-dict round trips) plus this head's own bias.

    Args:
        width: hidden width D.
        vocab_size: vocabulary size V.
        eps: LayerNorm eps.
    """

    def __init__(self, width: int, vocab_size: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(width, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., D) -> the states the vocab projection reads (..., D), compute dtype."""
        return self.norm(self.act(self.dense(hidden)))

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """hidden (B, L, D), word_embeddings (V, D) -> logits (B, L, V) in fp32.

        The vocab projection runs in fp32 with autocast off (the LM cross-entropy over ~30k
        classes is kept in fp32).
        """
        transformed = self.transform(hidden)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return F.linear(transformed.float(), word_embeddings.float(), self.bias.float())

    @torch.no_grad()
    def init_weights(self) -> None:
        """BERT init for the transform, zero bias."""
        init_bert_modules(self)
        nn.init.zeros_(self.bias)


@torch.no_grad()
def init_bert_modules(root: nn.Module, std: float = 0.02) -> None:
    """normal(std) for every Linear and Embedding weight under `root`, zero biases, LN 1/0."""
    for module in root.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
