"""BERT building blocks of the MED, in post-LN BERT arithmetic (LayerNorm eps 1e-12 in the
reference): word + position embeddings, one attention (self or cross, through
`F.scaled_dot_product_attention` with boolean masks, True = attend), the feed-forward block, the
LM head (its projection is the word-embedding matrix, read at call time, plus its own bias), and
BERT's weight initialisation.
"""

from __future__ import annotations

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


__all__ = [
    "BertAttention",
    "BertFeedForward",
    "CrossKV",
    "LMHead",
    "TextEmbeddings",
    "init_bert_modules",
]
