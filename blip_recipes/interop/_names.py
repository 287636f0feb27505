"""Parameter-name tables shared by the reference, Hugging Face and BERT/ViT mappings.

A table is a list of (ours, theirs) templates; `#` stands for a layer index and a trailing
`.weight` / `.bias` is carried over unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

Pairs = list[tuple[str, str]]

VIT_TO_HF: Pairs = [
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj", "embeddings.patch_embedding"),
    ("blocks.#.norm1", "encoder.layers.#.layer_norm1"),
    ("blocks.#.attn.qkv", "encoder.layers.#.self_attn.qkv"),
    ("blocks.#.attn.proj", "encoder.layers.#.self_attn.projection"),
    ("blocks.#.norm2", "encoder.layers.#.layer_norm2"),
    ("blocks.#.mlp.fc1", "encoder.layers.#.mlp.fc1"),
    ("blocks.#.mlp.fc2", "encoder.layers.#.mlp.fc2"),
    ("norm", "post_layernorm"),
]
"""Our ViT names (= reference / timm names) -> HF `BlipVisionModel` names."""


def _attention_pairs(ours: str, theirs: str) -> Pairs:
    return [
        (f"layers.#.{ours}.query", f"encoder.layer.#.{theirs}.self.query"),
        (f"layers.#.{ours}.key", f"encoder.layer.#.{theirs}.self.key"),
        (f"layers.#.{ours}.value", f"encoder.layer.#.{theirs}.self.value"),
        (f"layers.#.{ours}.out", f"encoder.layer.#.{theirs}.output.dense"),
        (f"layers.#.{ours}.norm", f"encoder.layer.#.{theirs}.output.LayerNorm"),
    ]


TEXT_EMBEDDINGS: Pairs = [
    ("embeddings.word_embeddings", "embeddings.word_embeddings"),
    ("embeddings.position_embeddings", "embeddings.position_embeddings"),
    ("embeddings.norm", "embeddings.LayerNorm"),
]
TEXT_FFN: Pairs = [
    ("layers.#.ffn.fc1", "encoder.layer.#.intermediate.dense"),
    ("layers.#.ffn.fc2", "encoder.layer.#.output.dense"),
    ("layers.#.ffn.norm", "encoder.layer.#.output.LayerNorm"),
]
TEXT_CROSS: Pairs = _attention_pairs("cross_attn", "crossattention")
ENCODER_SELF: Pairs = _attention_pairs("self_attn", "attention")
DECODER_SELF: Pairs = _attention_pairs("causal_self_attn", "attention")

TEXT_ENCODER: Pairs = TEXT_EMBEDDINGS + ENCODER_SELF + TEXT_CROSS + TEXT_FFN
"""Our MED (relative to `text.`) -> BERT names of the text encoder."""
TEXT_DECODER: Pairs = TEXT_EMBEDDINGS + DECODER_SELF + TEXT_CROSS + TEXT_FFN
"""Our MED (relative to `text.`) -> BERT names of the decoder's `bert.`."""
TEXT_ONLY_ENCODER: Pairs = TEXT_EMBEDDINGS + ENCODER_SELF + TEXT_FFN
"""A text-only MED (momentum) -> BERT names (no cross-attention)."""

LM_HEAD: Pairs = [
    ("dense", "transform.dense"),
    ("norm", "transform.LayerNorm"),
    ("bias", "bias"),
]
"""Our `lm_head.` -> `cls.predictions.`."""

_SUFFIX = r"((?:\.weight|\.bias)?)$"


def _compile(template: str) -> re.Pattern[str]:
    return re.compile(
        "^" + re.escape(template).replace("\\#", r"(\d+)").replace("#", r"(\d+)") + _SUFFIX
    )


def translate(key: str, pairs: Pairs, reverse: bool = False) -> str | None:
    """Map one name through a table (ours -> theirs, or theirs -> ours with `reverse`).

    Returns None when no template matches.
    """
    for ours, theirs in pairs:
        source, target = (theirs, ours) if reverse else (ours, theirs)
        match = _compile(source).match(key)
        if match is None:
            continue
        groups = match.groups()
        out = target
        for index in groups[:-1]:
            out = out.replace("#", index, 1)
        return out + groups[-1]
    return None


def map_prefixed(
    state_dict: dict, source_prefix: str, target_prefix: str, pairs: Pairs, reverse: bool = False
) -> dict:
    """Translate every `source_prefix`-key that matches a template; others are skipped."""
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(source_prefix):
            continue
        mapped = translate(key[len(source_prefix) :], pairs, reverse)
        if mapped is not None:
            out[target_prefix + mapped] = value
    return out


def strip_prefixes(state_dict: dict, prefixes: Iterable[str]) -> dict:
    """Remove the first matching prefix from each key (keys without one are kept as they are)."""
    out = {}
    for key, value in state_dict.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        out[key] = value
    return out
