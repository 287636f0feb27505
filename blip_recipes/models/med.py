"""MED: BLIP's multimodal mixture of encoder-decoder (BERT with cross-attention).

One `MEDLayer` holds everything the text encoder and the text decoder share at that depth (the
cross-attention and the FFN) plus both self-attentions (bidirectional for the encoder, causal for
the decoder), so the sharing is structural: a parameter lives in exactly one module, which is the
unit FSDP2 shards. A layer is called through `forward` with a mode:

- `"text"`: bidirectional self-attention -> FFN (unimodal text encoder, ITC);
- `"multimodal"`: bidirectional self-attention -> cross-attention to image tokens -> FFN (ITM);
- `"decoder"`: causal self-attention -> cross-attention -> FFN (captioning / LM).

A text-only MED (the momentum text encoder) is built with `causal_self_attn=None` and
`cross_attn=None`; it only supports `"text"`.

Post-LN BERT arithmetic throughout (LayerNorm eps 1e-12 in the reference); attention through
`F.scaled_dot_product_attention` with boolean masks (True = attend), which equals the reference's
additive `-10000` masks for every row that has at least one visible key (always true here: the
first token is never padding).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

MEDMode = Literal["text", "multimodal", "decoder"]
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
    width `kv_width` is the vision width).

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

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        return x.view(batch, tokens, self.heads, width // self.heads).transpose(1, 2)

    def key_value(self, source: torch.Tensor) -> CrossKV:
        """source: (B, S, kv_width) -> keys, values, each (B, heads, S, D / heads)."""
        return self._split_heads(self.key(source)), self._split_heads(self.value(source))

    def forward(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None = None,
        key_value: CrossKV | None = None,
    ) -> torch.Tensor:
        """Attend from `hidden` to itself, or to precomputed `key_value`.

        Args:
            hidden: (B, L, D) queries (and keys/values when `key_value` is None).
            mask: boolean, broadcastable to (B, heads, L, S); True = attend. None = all.
            key_value: keys/values (B, heads, S, D / heads) for cross-attention.

        Returns:
            (B, L, D).
        """
        keys, values = self.key_value(hidden) if key_value is None else key_value
        query = self._split_heads(self.query(hidden))
        dropout = self.attention_dropout if self.training else 0.0
        context = F.scaled_dot_product_attention(
            query, keys.to(query.dtype), values.to(query.dtype), attn_mask=mask, dropout_p=dropout
        )
        context = context.transpose(1, 2).reshape(hidden.shape)
        return self.norm(hidden + self.dropout(self.out(context)))


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


class MEDLayer(nn.Module):
    """One MED depth: both self-attentions, the shared cross-attention and the shared FFN.

    Args:
        self_attn: bidirectional self-attention (encoder).
        ffn: feed-forward sublayer (shared).
        causal_self_attn: causal self-attention (decoder); None for a text-only encoder.
        cross_attn: cross-attention to image tokens (shared); None for a text-only encoder.
    """

    def __init__(
        self,
        self_attn: BertAttention,
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
        self_mask: torch.Tensor,
        mode: MEDMode = "text",
        image_embeds: torch.Tensor | None = None,
        image_rows: torch.Tensor | None = None,
        cross_kv: CrossKV | None = None,
    ) -> tuple[torch.Tensor, CrossKV | None]:
        """Run the layer in one mode.

        Args:
            hidden: (B_txt, L, D).
            self_mask: boolean self-attention mask, (B_txt, 1, 1, L) or (B_txt, 1, L, L) causal.
            mode: "text", "multimodal" or "decoder".
            image_embeds: (B_img, N_img, D_vision) image tokens; used to compute the cross
                keys/values when `cross_kv` is None.
            image_rows: (B_txt,) int64, which image each text row attends to; None means row i
                attends to image i (B_img == B_txt).
            cross_kv: keys/values of the image tokens computed earlier in the step by this layer.

        Returns:
            hidden (B_txt, L, D) and the cross keys/values before the row gather (B_img rows),
            so a later call can reuse them; None in "text" mode.
        """
        if mode == "decoder":
            if self.causal_self_attn is None:
                raise ValueError("this MED layer has no causal self-attention (text-only build)")
            hidden = self.causal_self_attn(hidden, self_mask)
        else:
            hidden = self.self_attn(hidden, self_mask)
        if mode != "text":
            if self.cross_attn is None:
                raise ValueError("this MED layer has no cross-attention (text-only build)")
            if cross_kv is None:
                if image_embeds is None:
                    raise ValueError(f"mode {mode!r} needs image_embeds or cross_kv")
                cross_kv = self.cross_attn.key_value(image_embeds)
            keys, values = cross_kv
            if image_rows is not None:
                keys, values = keys.index_select(0, image_rows), values.index_select(0, image_rows)
            hidden = self.cross_attn(hidden, None, (keys, values))
        return self.ffn(hidden), cross_kv


class MEDOutput(NamedTuple):
    """hidden_states: (B, L, D); cross_kv: per-layer image keys/values (None in text mode)."""

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
        mode: MEDMode = "text",
        image_embeds: torch.Tensor | None = None,
        image_rows: torch.Tensor | None = None,
        cross_kv: list[CrossKV] | None = None,
    ) -> MEDOutput:
        """Encode or decode a batch of token ids.

        Args:
            input_ids: (B, L) int64.
            attention_mask: (B, L), 1 = token, 0 = padding.
            mode: "text", "multimodal" or "decoder" (see the module docstring).
            image_embeds: (B_img, N_img, D_vision), needed unless `cross_kv` is given.
            image_rows: (B,) int64 image index per text row; None = row i uses image i.
            cross_kv: per-layer image keys/values returned by an earlier call on the same
                images (the shared cross-attention makes them identical); skips recomputing them.

        Returns:
            `MEDOutput(hidden_states (B, L, D), cross_kv)`.
        """
        hidden = self.embeddings(input_ids)
        pad = attention_mask.bool()[:, None, None, :]
        if mode == "decoder":
            length = input_ids.shape[1]
            causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
            self_mask = pad & causal
        else:
            self_mask = pad
        new_kv: list[CrossKV] = []
        for index, layer in enumerate(self.layers):
            layer_kv = None if cross_kv is None else cross_kv[index]
            hidden, layer_kv = layer(hidden, self_mask, mode, image_embeds, image_rows, layer_kv)
            if layer_kv is not None:
                new_kv.append(layer_kv)
        return MEDOutput(hidden, new_kv if mode != "text" else None)

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

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """hidden (B, L, D), word_embeddings (V, D) -> logits (B, L, V) in fp32.

        The vocab projection runs in fp32 with autocast off (the LM cross-entropy over ~30k
        classes is kept in fp32).
        """
        transformed = self.norm(self.act(self.dense(hidden)))
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
