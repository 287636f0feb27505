"""BLIP vision-language pretraining recipes.

The Python API (:mod:`blip_recipes.api`) is importable from here; torch is imported only when one
of its names is first used::

    from blip_recipes import load_model, caption_images, score_pairs

    model, tokenizer = load_model("outputs/blip_base", device="cuda")
"""

from __future__ import annotations

from importlib import metadata as _metadata
from typing import Any

try:
    __version__ = _metadata.version("blip-recipes")
except _metadata.PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"

_API = (
    "LoadedModel",
    "PairScores",
    "caption_images",
    "image_features",
    "load_model",
    "score_pairs",
    "text_features",
)

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        from blip_recipes import api

        return getattr(api, name)
    raise AttributeError(f"module 'blip_recipes' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
