"""Size estimates of a configured run, before anything is launched: the model's parameter
counts, one training checkpoint's bytes and one rank's training memory.

Models are built on the meta device (no memory, no initialisation), so an estimate costs well
under a second.
"""

from __future__ import annotations

import functools
from typing import Any

from blip_recipes.config.sections import Config
from blip_recipes.data.tokenizers import vocab_size_estimate
from blip_recipes.models.builders import build_model, build_momentum_encoders, preset


@functools.lru_cache(maxsize=16)
def _parameter_counts(name: str, **kwargs: Any) -> tuple[int, int]:
    import torch
    from torch.overrides import TorchFunctionMode

    class _NoInit(TorchFunctionMode):
        """Skip random initialisation: on meta it costs a torch._dynamo import, for nothing."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if getattr(func, "__name__", "") in ("normal_", "uniform_", "trunc_normal_"):
                return args[0] if args else kwargs.get("tensor", kwargs.get("input"))
            return func(*args, **kwargs)

    with torch.device("meta"), _NoInit():
        model = build_model(name, **kwargs)
        encoders = build_momentum_encoders(name, **kwargs)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return count(model), count(encoders)


def checkpoint_size_estimate(cfg: Config) -> dict[str, int]:
    """Bytes of one training checkpoint of ``cfg``'s model, from its parameter counts.

    A checkpoint holds, in fp32: the model's parameters, the two AdamW moments of each, the
    momentum encoders' parameters, and the two ITC queues (``embed_dim x queue_size`` each);
    loader, scheduler and RNG states are negligible. The model is built on the meta device
    (no memory, no initialisation); the vocabulary size is read from the tokenizer file when it
    can be without loading the tokenizer (otherwise the preset's, 30524).

    Returns:
        ``{"bytes", "parameters", "momentum_parameters", "queue_values"}``.
    """
    kwargs: dict[str, Any] = dict(
        image_size=cfg.model.image_size,
        embed_dim=cfg.model.embed_dim,
        queue_size=cfg.momentum.queue_size,
    )
    vocab = vocab_size_estimate(cfg.tokenizer)
    if vocab is not None:
        kwargs["vocab_size"] = vocab
    params, momentum = _parameter_counts(cfg.model.name, **kwargs)
    queues = 2 * cfg.model.embed_dim * cfg.momentum.queue_size
    return {
        "bytes": 4 * (3 * params + momentum + queues),
        "parameters": params,
        "momentum_parameters": momentum,
        "queue_values": queues,
    }


def training_memory_estimate(cfg: Config) -> int | None:
    """Bytes one rank needs to train ``cfg``'s model at ``data.batch_size`` (fp32, no
    activation checkpointing), roughly: weights, gradients and two AdamW moments (4 copies), the
    momentum encoders and queues, and the activations kept for backward: per ViT layer and image
    token about 16 x width + heads x tokens values; per text layer and token of each of the four
    text passes (ITC, ITM positive, ITM negative, captioning) about 18 x width + heads x (text +
    image tokens). A rough estimate, for telling a run that fits from one that cannot: for the
    base model at 224 px and batch 75 it gives 20.9 GiB (bert-base-uncased vocabulary), where
    such a CPU run was killed by the out-of-memory killer at about 21 GiB."""
    spec = preset(cfg.model.name)
    if spec is None:
        return None
    try:
        sizes = checkpoint_size_estimate(cfg)
    except Exception:  # noqa: BLE001 - a config validation rejects
        return None
    state = 4 * (4 * sizes["parameters"] + sizes["momentum_parameters"] + sizes["queue_values"])
    image_tokens = (cfg.model.image_size // spec["patch_size"]) ** 2 + 1
    text_tokens = cfg.tokenizer.max_length
    vision = (
        spec["vision_depth"]
        * image_tokens
        * (16 * spec["vision_width"] + spec["vision_heads"] * image_tokens)
    )
    text = (
        spec["text_depth"]
        * 4
        * text_tokens
        * (18 * spec["text_width"] + spec["text_heads"] * (text_tokens + image_tokens))
    )
    return state + 4 * cfg.data.batch_size * (vision + text)


__all__ = ["checkpoint_size_estimate", "training_memory_estimate"]
