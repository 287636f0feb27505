"""Inference loading: our model (and its tokenizer) built to the shape of weights read from any
layout, and the weights loaded into it.

The builder arguments come from the tensors' shapes, what the checkpoint recorded (builder
arguments, an HF config) and the preset, in that order; heads and norm eps, which shapes do not
show, come from the preset or the caller.

    model = load_model("model_base.pth", tokenizer=tok)   # eval mode, CPU, fp32
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blip_recipes.interop.files import CheckpointLayoutError
from blip_recipes.interop.readers import CheckpointWeights, read_weights, unplaced_error

logger = logging.getLogger(__name__)


def _count(prefix: str, keys) -> int:
    indices = {int(k[len(prefix) :].split(".", 1)[0]) for k in keys if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def infer_model_shape(model_sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Builder overrides that follow from tensor shapes (widths, depths, vocab, image size...).

    Heads and norm eps are not visible in shapes; they come from the preset or the caller.
    """
    sd, keys = model_sd, list(model_sd)
    out: dict[str, Any] = {}
    if "visual_encoder.cls_token" in sd:
        width = sd["visual_encoder.cls_token"].shape[-1]
        patch = sd["visual_encoder.patch_embed.proj.weight"].shape[-1]
        side = int(round((sd["visual_encoder.pos_embed"].shape[1] - 1) ** 0.5))
        out |= dict(vision_width=width, patch_size=patch, image_size=side * patch,
                    vision_depth=_count("visual_encoder.blocks.", keys))  # fmt: skip
        fc1 = sd.get("visual_encoder.blocks.0.mlp.fc1.weight")
        if fc1 is not None:
            out["mlp_ratio"] = fc1.shape[0] / width
    if "text.embeddings.word_embeddings.weight" in sd:
        vocab, width = sd["text.embeddings.word_embeddings.weight"].shape
        out |= dict(vocab_size=vocab, text_width=width, text_depth=_count("text.layers.", keys),
                    max_positions=sd["text.embeddings.position_embeddings.weight"].shape[0])  # fmt: skip
        fc1 = sd.get("text.layers.0.ffn.fc1.weight")
        if fc1 is not None:
            out["text_ffn_dim"] = fc1.shape[0]
        if "vision_width" not in out and "text.layers.0.cross_attn.key.weight" in sd:
            out["vision_width"] = sd["text.layers.0.cross_attn.key.weight"].shape[1]
    for proj in ("vision_proj.weight", "text_proj.weight"):
        if proj in sd:
            out["embed_dim"] = sd[proj].shape[0]
            break
    return out


def _preset_for(shape: dict[str, Any], name: str | None) -> str:
    if name:
        return name
    return {768: "blip_pretrain_base", 1024: "blip_pretrain_large"}.get(
        shape.get("vision_width", 0), "blip_pretrain_tiny"
    )


def _heads(width: int, preset_width: int, preset_heads: int) -> int:
    if width == preset_width:
        return preset_heads
    return width // 64 if width % 64 == 0 else max(1, width // 32)


def model_args_for(
    weights: CheckpointWeights,
    model_name: str | None = None,
    tokenizer: Any = None,
    **overrides: Any,
) -> dict[str, Any]:
    """`{"name": preset, **overrides}` that `build_model` needs to hold `weights`.

    Order of precedence: explicit `overrides` > tensor shapes > what the checkpoint recorded
    (`model_args`, HF config) > the preset. Token ids come from `tokenizer` when given.
    """
    from blip_recipes.models.builders import _spec

    recorded = dict(weights.model_args or {})
    name = model_name or recorded.pop("name", None)
    recorded.pop("name", None)
    shape = infer_model_shape(weights.model)
    name = _preset_for(shape, name)
    preset = _spec(name, {})
    args: dict[str, Any] = dict(recorded)
    hf = weights.hf_config
    if hf:
        text_cfg, vision_cfg = hf.get("text_config", {}), hf.get("vision_config", {})
        for ours, cfg, key in (("vision_heads", vision_cfg, "num_attention_heads"),
                               ("text_heads", text_cfg, "num_attention_heads"),
                               ("vision_norm_eps", vision_cfg, "layer_norm_eps"),
                               ("text_norm_eps", text_cfg, "layer_norm_eps"),
                               ("dec_token_id", text_cfg, "bos_token_id"),
                               ("pad_token_id", text_cfg, "pad_token_id")):  # fmt: skip
            if cfg.get(key) is not None:
                args[ours] = cfg[key]
    args |= shape
    if "vision_heads" not in args and "vision_width" in shape:
        args["vision_heads"] = _heads(
            shape["vision_width"], preset["vision_width"], preset["vision_heads"]
        )
    if "text_heads" not in args and "text_width" in shape:
        args["text_heads"] = _heads(shape["text_width"], preset["text_width"], preset["text_heads"])
    if weights.queues.get("image_queue") is not None:
        args["queue_size"] = weights.queues["image_queue"].shape[1]
    if tokenizer is not None:
        args |= dict(pad_token_id=tokenizer.pad_token_id, enc_token_id=tokenizer.enc_token_id,
                     dec_token_id=tokenizer.dec_token_id)  # fmt: skip
        vocab = args.get("vocab_size", preset["vocab_size"])
        if tokenizer.vocab_size > vocab:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the checkpoint's word "
                f"embeddings only {vocab} rows: wrong tokenizer for {weights.source}?"
            )
    elif "dec_token_id" in args and "enc_token_id" not in args:
        vocab = args.get("vocab_size", preset["vocab_size"])
        if args["dec_token_id"] + 1 < vocab:
            args["enc_token_id"] = args["dec_token_id"] + 1  # [ENC] follows [DEC] (BERT + 2)
    args |= overrides
    import inspect

    from blip_recipes.models import BlipPretrain

    defaults = inspect.signature(BlipPretrain).parameters
    vocab = args.get("vocab_size", preset["vocab_size"])
    for key in ("enc_token_id", "dec_token_id", "pad_token_id"):
        value = args.get(key, preset[key] if key in preset else defaults[key].default)
        if not 0 <= value < vocab:
            raise ValueError(
                f"{key}={value} is outside the vocabulary of {weights.source} ({vocab} rows): "
                "pass the tokenizer (or the token ids) the checkpoint was trained with"
            )
    return {"name": name, **args}


def build_model_from_weights(
    weights: CheckpointWeights,
    model_name: str | None = None,
    tokenizer: Any = None,
    strict: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Build a `BlipPretrain` shaped like `weights` and load them (eval mode, CPU, fp32).

    Tensors the source lacks (e.g. `temp` and the LM head for an HF retrieval folder) keep the
    builder's initialisation and are logged; with `strict` they are an error. A source tensor the
    model has no slot for is always an error naming it.
    """
    from blip_recipes.models import build_model

    args = model_args_for(weights, model_name, tokenizer, **overrides)
    name = args.pop("name")
    model = build_model(name, **args)
    state = dict(weights.model)
    if "temp" in state and state["temp"].dim() == 0:
        state["temp"] = state["temp"].reshape(1)
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise unplaced_error(
            weights.source, f"{weights.layout} weights", list(result.unexpected_keys)
        )
    if result.missing_keys:
        message = (f"{weights.source}: {len(result.missing_keys)} model tensor(s) not in the "
                   f"checkpoint keep their initialisation: {', '.join(result.missing_keys[:6])}"
                   f"{' ...' if len(result.missing_keys) > 6 else ''}")  # fmt: skip
        if strict:
            raise CheckpointLayoutError(message)
        logger.warning(message)
    model.model_args = {"name": name, **args}  # type: ignore[attr-defined]
    return model.eval()


def load_model(
    path: str | Path,
    model_name: str | None = None,
    tokenizer: Any = None,
    strict: bool = False,
    trust_pickle: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Our `BlipPretrain` from any supported checkpoint path (see :func:`read_weights`).

    Without `tokenizer`, the one recorded with the checkpoint is used when it can be built
    locally (token ids); otherwise ids come from the recorded arguments or `overrides`.
    """
    weights = read_weights(path, trust_pickle=trust_pickle)
    if tokenizer is None:
        tokenizer = tokenizer_from_weights(weights)
    return build_model_from_weights(weights, model_name, tokenizer, strict, **overrides)


def tokenizer_from_weights(weights: CheckpointWeights) -> Any:
    """The tokenizer recorded with a checkpoint (config.toml / model_args.json / HF folder)
    when it can be built from local files; None otherwise."""
    section = weights.tokenizer
    if not section:
        return None
    from blip_recipes.config import TokenizerConfig
    from blip_recipes.data import build_tokenizer

    known = {
        k: v for k, v in section.items() if k in ("kind", "path", "max_length") and v is not None
    }
    cfg = TokenizerConfig(**known)
    if cfg.kind != "synthetic" and not (cfg.path and Path(cfg.path).exists()):
        return None
    try:
        return build_tokenizer(cfg)
    except (OSError, ValueError) as e:
        logger.warning("tokenizer recorded with %s could not be built: %s", weights.source, e)
        return None


__all__ = [
    "build_model_from_weights",
    "infer_model_shape",
    "load_model",
    "model_args_for",
    "tokenizer_from_weights",
]
