"""Initialisation from plain local checkpoints: BERT (text side) and DeiT/timm ViT (vision).

Both return partial state dicts in our `BlipPretrain` key space: load them with
`model.load_state_dict(sd, strict=False)` or DCP's `set_model_state_dict(..., strict=False)`
(before or after sharding). Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from blip_recipes.interop._names import (
    DECODER_SELF,
    ENCODER_SELF,
    LM_HEAD,
    TEXT_EMBEDDINGS,
    TEXT_FFN,
    map_prefixed,
)
from blip_recipes.models.vit import interpolate_pos_embed

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "pytorch_model.pth")


def init_source(value: str | Path | None) -> str | None:
    """The path of a `model.text_init` / `model.vision_init` setting, or None for "start from
    random weights": None, "" and the explicit word "none" (any case)."""
    if value is None:
        return None
    text = str(value).strip()
    return None if not text or text.lower() == "none" else text


def init_source_problem(source: str | Path) -> str | None:
    """Why ``source`` cannot be read as init weights (missing, or a folder without a weights
    file), or None when it looks readable. Checks the file system only; loads nothing."""
    path = Path(source)
    if not path.exists():
        return "does not exist"
    if path.is_dir() and not any((path / name).exists() for name in _WEIGHT_FILES):
        return f"is a folder without a weights file ({', '.join(_WEIGHT_FILES)})"
    return None


def load_state_dict_file(source: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a file (.safetensors, .bin, .pth) or an HF-style folder.

    A `{"model": ...}` / `{"state_dict": ...}` wrapper is unwrapped. Tensors load on the CPU.
    """
    path = Path(source)
    if path.is_dir():
        found = [path / name for name in _WEIGHT_FILES if (path / name).exists()]
        if not found:
            raise FileNotFoundError(f"no weights file ({', '.join(_WEIGHT_FILES)}) in {path}")
        path = found[0]
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
    return loaded


def _as_state_dict(source: str | Path | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(source) if isinstance(source, dict) else load_state_dict_file(source)


def bert_init_state_dict(
    source: str | Path | dict[str, torch.Tensor],
    vocab_size: int,
    seed: int = 0,
    std: float = 0.02,
) -> dict[str, torch.Tensor]:
    """BERT weights -> our text side, as the reference initialises it from bert-base-uncased.

    Both self-attentions (encoder and decoder) start from BERT's self-attention; embeddings and
    FFNs from BERT; the MLM head (`cls.predictions.*`, when present) into our LM head. Token-type
    embeddings and the pooler are dropped; cross-attention is not touched (stays random).
    Word-embedding rows beyond BERT's vocabulary are drawn from normal(std) with `seed`; the
    LM bias is padded with zeros.

    Args:
        source: `BertModel` / `BertForMaskedLM` folder, weights file, or state dict
            (`bert.`-prefixed or bare names).
        vocab_size: our vocabulary (30524 with [DEC] and [ENC]).
        seed: seed of the new embedding rows.
        std: std of the new embedding rows.

    Returns:
        Partial `BlipPretrain` state dict (keys under `text.` and `lm_head.`).
    """
    sd = _as_state_dict(source)
    prefix = "bert." if any(k.startswith("bert.") for k in sd) else ""
    body = TEXT_EMBEDDINGS + TEXT_FFN
    out = map_prefixed(sd, prefix, "text.", body + ENCODER_SELF, reverse=True)
    out |= map_prefixed(sd, prefix, "text.", DECODER_SELF, reverse=True)
    out |= map_prefixed(sd, "cls.predictions.", "lm_head.", LM_HEAD, reverse=True)

    word_key = "text.embeddings.word_embeddings.weight"
    if word_key in out:
        word = out[word_key]
        if word.shape[0] < vocab_size:
            generator = torch.Generator().manual_seed(seed)
            extra = torch.randn(vocab_size - word.shape[0], word.shape[1], generator=generator)
            out[word_key] = torch.cat([word, (extra * std).to(word.dtype)])
        else:
            out[word_key] = word[:vocab_size]
    if "lm_head.bias" in out:
        bias = out["lm_head.bias"]
        padded = bias.new_zeros(vocab_size)
        count = min(vocab_size, bias.shape[0])
        padded[:count] = bias[:count]
        out["lm_head.bias"] = padded
    return out


def vit_init_state_dict(
    source: str | Path | dict[str, torch.Tensor],
    image_size: int,
    patch_size: int = 16,
) -> dict[str, torch.Tensor]:
    """DeiT / timm ViT weights -> our `visual_encoder.*`.

    The classification head (`head.*`, `head_dist.*`), the distillation token and its position
    are dropped; the position embedding is interpolated (bicubic) to `image_size`.

    Args:
        source: `.pth` file (`checkpoint["model"]` or bare dict) or state dict.
        image_size: our training resolution.
        patch_size: our patch size.

    Returns:
        Partial `BlipPretrain` state dict (keys under `visual_encoder.`).
    """
    sd = _as_state_dict(source)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    keep = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
    out = {f"visual_encoder.{k}": v for k, v in sd.items() if k.startswith(keep)}
    pos = out.get("visual_encoder.pos_embed")
    if pos is not None:
        if "dist_token" in sd:
            pos = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)
        out["visual_encoder.pos_embed"] = interpolate_pos_embed(
            pos, (image_size // patch_size) ** 2
        )
    return out
