"""Builders: component builders (`vit`, `med`) take every hyperparameter; model builders
(`blip_pretrain_tiny/base/large`) are named presets with literal numbers and keyword overrides.

`build_model(name, **overrides)` and `build_momentum_encoders(name, **overrides)` look presets up
by name for the recipe; given the same overrides they build matching online and momentum modules.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from blip_recipes.models.bert_blocks import BertAttention, BertFeedForward, LMHead, TextEmbeddings
from blip_recipes.models.blip import BlipPretrain
from blip_recipes.models.med import MED, MEDLayer
from blip_recipes.models.momentum_encoders import MomentumEncoders
from blip_recipes.models.vit import (
    DropPath,
    PatchEmbedding,
    VisionAttention,
    VisionBlock,
    VisionMLP,
    VisionTransformer,
)


def vit(
    patch_size: int = 16,
    image_size: int = 224,
    width: int = 768,
    depth: int = 12,
    heads: int = 12,
    mlp_ratio: float = 4.0,
    drop_path_rate: float = 0.0,
    norm_eps: float = 1e-6,
    attention_dropout: float = 0.0,
) -> VisionTransformer:
    """Build a pre-norm ViT (no classification head).

    Args:
        patch_size: patch side in pixels.
        image_size: training resolution (square); sets the position-embedding length.
        width: token width D.
        depth: number of blocks.
        heads: attention heads.
        mlp_ratio: MLP hidden width / D.
        drop_path_rate: stochastic depth of the last block; block i gets rate * i / (depth - 1).
            With a rate > 0 every block draws a mask (block 0 one of ones), so that all blocks
            run the same code and share one compiled graph.
        norm_eps: LayerNorm eps (1e-6 in the reference).
        attention_dropout: dropout on attention probabilities.

    Returns:
        `VisionTransformer` with uninitialised weights (call `init_weights()`).
    """
    if image_size % patch_size != 0:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
    enabled = drop_path_rate > 0.0
    blocks = [
        VisionBlock(
            attn=VisionAttention(width, heads, attention_dropout),
            mlp=VisionMLP(width, int(width * mlp_ratio)),
            norm1=nn.LayerNorm(width, eps=norm_eps),
            norm2=nn.LayerNorm(width, eps=norm_eps),
            drop_path=DropPath(rate, enabled=enabled),
        )
        for rate in rates
    ]
    model = VisionTransformer(
        patch_embed=PatchEmbedding(patch_size, width),
        blocks=blocks,
        norm=nn.LayerNorm(width, eps=norm_eps),
        num_patches=(image_size // patch_size) ** 2,
        width=width,
    )
    model.init_weights()
    return model


def med(
    vocab_size: int = 30524,
    width: int = 768,
    depth: int = 12,
    heads: int = 12,
    ffn_dim: int = 3072,
    vision_width: int = 768,
    max_positions: int = 512,
    dropout: float = 0.1,
    attention_dropout: float | None = None,
    norm_eps: float = 1e-12,
    pad_token_id: int = 0,
    text_only: bool = False,
    self_attention: str = "both",
) -> MED:
    """Build a MED (BERT with cross-attention and a causal copy of self-attention per layer).

    Args:
        vocab_size: word-embedding rows.
        width: hidden width D.
        depth: number of layers.
        heads: attention heads.
        ffn_dim: FFN intermediate width.
        vision_width: width of the image tokens (cross-attention key/value input).
        max_positions: position-embedding rows.
        dropout: hidden dropout (embeddings, attention outputs, FFN).
        attention_dropout: dropout on attention probabilities; None = `dropout`.
        norm_eps: LayerNorm eps (1e-12 in BERT).
        pad_token_id: padding row of the word embeddings.
        text_only: build only the bidirectional self-attention and FFN (momentum text encoder).
        self_attention: which self-attentions each layer has: "both" (BLIP's shared MED),
            "bidirectional" (an encoder only, VQA's question encoder) or "causal" (a decoder
            only, VQA's answer decoder).

    Returns:
        `MED` with BERT-initialised weights.
    """
    attention_dropout = dropout if attention_dropout is None else attention_dropout
    if self_attention not in ("both", "bidirectional", "causal"):
        raise ValueError(
            f"self_attention must be 'both', 'bidirectional' or 'causal', got {self_attention!r}"
        )
    bidirectional = self_attention != "causal"
    causal = self_attention != "bidirectional" and not text_only

    def attention(kv_width: int) -> BertAttention:
        return BertAttention(width, heads, kv_width, dropout, attention_dropout, norm_eps)

    layers = [
        MEDLayer(
            self_attn=attention(width) if bidirectional else None,
            ffn=BertFeedForward(width, ffn_dim, dropout, norm_eps),
            causal_self_attn=attention(width) if causal else None,
            cross_attn=None if text_only else attention(vision_width),
        )
        for _ in range(depth)
    ]
    embeddings = TextEmbeddings(vocab_size, width, max_positions, pad_token_id, dropout, norm_eps)
    model = MED(embeddings, layers, width)
    model.init_weights()
    return model


_PRESETS: dict[str, dict[str, Any]] = {
    # tiny: 4 text heads of 16 rather than 2 of 32, at the same cost: its ITM learns to check the
    # colours of a synthetic image within configs/debug.toml's 800 steps (75% ITM accuracy; with
    # 2 heads 69%, barely above the 67% prior of one match to two hard negatives)
    "blip_pretrain_tiny": dict(
        vocab_size=30524, image_size=32, patch_size=16, vision_width=64, vision_depth=2,
        vision_heads=2, text_width=64, text_depth=2, text_heads=4, text_ffn_dim=256,
        embed_dim=32, drop_path_rate=0.0, queue_size=64, max_positions=64,
    ),
    "blip_pretrain_base": dict(
        vocab_size=30524, image_size=224, patch_size=16, vision_width=768, vision_depth=12,
        vision_heads=12, text_width=768, text_depth=12, text_heads=12, text_ffn_dim=3072,
        embed_dim=256, drop_path_rate=0.0, queue_size=57600, max_positions=512,
    ),
    "blip_pretrain_large": dict(
        vocab_size=30524, image_size=224, patch_size=16, vision_width=1024, vision_depth=24,
        vision_heads=16, text_width=768, text_depth=12, text_heads=12, text_ffn_dim=3072,
        embed_dim=256, drop_path_rate=0.1, queue_size=57600, max_positions=512,
    ),
}  # fmt: skip

_MODEL_ARGS = (
    "enc_token_id",
    "dec_token_id",
    "temp_init",
)


def preset(name: str) -> dict[str, Any] | None:
    """The hyperparameters of preset ``name`` (a copy: patch size, positions, widths, depths,
    heads...), or None for an unknown name."""
    return dict(_PRESETS[name]) if name in _PRESETS else None


def _spec(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    if name not in _PRESETS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(_PRESETS)}")
    spec = dict(_PRESETS[name])
    spec.update(
        pad_token_id=0, text_dropout=0.1, mlp_ratio=4.0, vision_norm_eps=1e-6, text_norm_eps=1e-12
    )
    allowed = set(spec) | set(_MODEL_ARGS) | {"label_smoothing"}  # the VQA model's
    unknown = set(overrides) - allowed
    if unknown:
        raise TypeError(
            f"unknown arguments for {name}: {sorted(unknown)}; allowed: {sorted(allowed)}"
        )
    spec.update(overrides)
    return spec


def _vision(spec: dict[str, Any]) -> VisionTransformer:
    return vit(
        patch_size=spec["patch_size"],
        image_size=spec["image_size"],
        width=spec["vision_width"],
        depth=spec["vision_depth"],
        heads=spec["vision_heads"],
        mlp_ratio=spec["mlp_ratio"],
        drop_path_rate=spec["drop_path_rate"],
        norm_eps=spec["vision_norm_eps"],
    )


def _text(spec: dict[str, Any], text_only: bool) -> MED:
    return med(
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
        text_only=text_only,
    )


def build_model(name: str, **overrides: Any) -> BlipPretrain:
    """Build the online pretraining model of preset `name` with keyword overrides.

    Overrides: vocab_size, image_size, patch_size, vision_width/depth/heads, text_width/depth/
    heads, text_ffn_dim, text_dropout, embed_dim, drop_path_rate, max_positions, pad_token_id,
    enc_token_id, dec_token_id, temp_init, mlp_ratio, norm eps; `queue_size` is accepted (the
    preset's numbers are shared with `build_momentum_encoders`) but lives only on the momentum
    state (`preset_queue_size`), not on the model.
    """
    spec = _spec(name, overrides)
    model = BlipPretrain(
        visual_encoder=_vision(spec),
        text=_text(spec, text_only=False),
        vision_proj=nn.Linear(spec["vision_width"], spec["embed_dim"]),
        text_proj=nn.Linear(spec["text_width"], spec["embed_dim"]),
        itm_head=nn.Linear(spec["text_width"], 2),
        lm_head=LMHead(spec["text_width"], spec["vocab_size"], spec["text_norm_eps"]),
        **{key: spec[key] for key in _MODEL_ARGS if key in spec},
    )
    model.lm_head.init_weights()
    return model


def build_momentum_encoders(name: str, **overrides: Any) -> MomentumEncoders:
    """Build the momentum encoders matching `build_model(name, **overrides)`: ViT, vision_proj,
    a text-only MED (no causal or cross-attention) and text_proj. Weights are placeholders until
    `MomentumState.copy_from(online)`."""
    spec = _spec(name, overrides)
    return MomentumEncoders(
        visual_encoder=_vision(spec),
        vision_proj=nn.Linear(spec["vision_width"], spec["embed_dim"]),
        text_encoder=_text(spec, text_only=True),
        text_proj=nn.Linear(spec["text_width"], spec["embed_dim"]),
    )


def preset_queue_size(name: str, **overrides: Any) -> int:
    """The queue size of preset `name` after overrides (57600 for base and large)."""
    return int(_spec(name, overrides)["queue_size"])


def blip_pretrain_tiny(**overrides: Any) -> BlipPretrain:
    """Tiny CPU model: ViT 64 wide, 2 blocks, 2 heads, 32 px; MED 64 wide, 2 layers, 4 heads;
    E = 32."""
    return build_model("blip_pretrain_tiny", **overrides)


def blip_pretrain_base(**overrides: Any) -> BlipPretrain:
    """ViT-B/16 at 224 px + BERT-base MED, E = 256: 252,441,919 trainable parameters."""
    return build_model("blip_pretrain_base", **overrides)


def blip_pretrain_large(**overrides: Any) -> BlipPretrain:
    """ViT-L/16 at 224 px (drop-path 0.1) + BERT-base MED with 1024-wide cross-attention."""
    return build_model("blip_pretrain_large", **overrides)


MODEL_BUILDERS = {
    "blip_pretrain_tiny": blip_pretrain_tiny,
    "blip_pretrain_base": blip_pretrain_base,
    "blip_pretrain_large": blip_pretrain_large,
}
