"""Size estimates of a configured run from the model presets: parameters and checkpoint bytes.

Models are built on the meta device (no memory, no initialisation), so an estimate costs well
under a second, before anything is launched.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from blip_recipes.config.sections import Config


def model_preset(name: str) -> dict[str, Any] | None:
    """The builder preset of model `name` (patch size, positions, widths), or None."""
    from blip_recipes.models.builders import _PRESETS

    return _PRESETS.get(name)


def vocab_size_estimate(tok) -> int | None:
    """The tokenizer's vocabulary size without loading it (None: unknown, use the preset's)."""
    try:
        if tok.kind == "synthetic":
            from blip_recipes.data.tokenizers import synthetic_vocab

            return len(synthetic_vocab())
        if not tok.path:
            return None
        path = Path(tok.path)
        if tok.kind == "wordpiece" and path.is_dir():
            path = path / "vocab.txt"
        if path.is_file():
            with path.open("rb") as f:
                lines = sum(1 for line in f if line.strip())
            return lines + (2 if tok.kind == "wordpiece" else 7)  # added special tokens
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=16)
def _parameter_counts(name: str, **kwargs: Any) -> tuple[int, int]:
    import torch
    from torch.overrides import TorchFunctionMode

    from blip_recipes.models.builders import build_model, build_momentum_encoders

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
        queue_size=cfg.model.queue_size,
    )
    vocab = vocab_size_estimate(cfg.tokenizer)
    if vocab is not None:
        kwargs["vocab_size"] = vocab
    params, momentum = _parameter_counts(cfg.model.name, **kwargs)
    queues = 2 * cfg.model.embed_dim * cfg.model.queue_size
    return {
        "bytes": 4 * (3 * params + momentum + queues),
        "parameters": params,
        "momentum_parameters": momentum,
        "queue_values": queues,
    }
