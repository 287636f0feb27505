"""`checkpoint.init_from` must hold the model the config builds.

A training checkpoint records its run's config (``config.toml`` in the run folder, or
``model_args.json`` beside a converted checkpoint). Before anything is built, the model preset,
the embedding size and the tokenizer (its kind and vocabulary size) are compared with the
config's: a mismatch would otherwise surface as missing or misshapen weights deep in the
recipe. Each mismatch is one line naming what the config says, what the checkpoint holds and the
override that uses the checkpoint's. The resolution is not compared: fine-tuning interpolates the
ViT position embedding to ``model.image_size``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from blip_recipes.config.checks import LaunchContext, register_validator
from blip_recipes.config.loader import load_toml
from blip_recipes.config.sections import Config
from blip_recipes.data.tokenizers import vocab_size_estimate
from blip_recipes.interop.files import latest_dcp_step


def recorded_shape(step_dir: Path) -> dict[str, Any] | None:
    """``{"name", "embed_dim", "tokenizer": TokenizerConfig-like}`` recorded with a DCP
    checkpoint folder (None when it records nothing)."""
    for config_file in (step_dir / "config.toml", step_dir.parent.parent / "config.toml"):
        if config_file.is_file():
            cfg = load_toml(config_file)
            return {"name": cfg.model.name, "embed_dim": cfg.model.embed_dim,
                    "tokenizer": cfg.tokenizer}  # fmt: skip
    args_file = step_dir / "model_args.json"
    if args_file.is_file():
        recorded = json.loads(args_file.read_text())
        model = recorded.get("model") or {}
        return {"name": model.get("name"), "embed_dim": model.get("embed_dim"),
                "tokenizer": _Tok(**(recorded.get("tokenizer") or {}))}  # fmt: skip
    return None


class _Tok:
    def __init__(self, kind: str | None = None, path: str | None = None, **_: Any) -> None:
        self.kind, self.path = kind, path


def _describe(tok: Any) -> str:
    return tok.kind if tok.kind == "synthetic" or not tok.path else f"{tok.kind} {tok.path}"


@register_validator
def _init_from_matches(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    source = cfg.checkpoint.init_from
    if not source or not Path(source).is_dir():
        return
    try:
        step = latest_dcp_step(source)
        shape = recorded_shape(step) if step is not None else None
    except Exception:  # noqa: BLE001 - an unreadable checkpoint is reported by its own check
        return
    if not shape:
        return
    where = f"checkpoint.init_from {source}"
    name, embed = shape.get("name"), shape.get("embed_dim")
    if name and name != cfg.model.name:
        yield (
            f"'model.name' is {cfg.model.name} but {where} holds a {name} model: set "
            f"model.name={name} to start from it"
        )
    if embed and embed != cfg.model.embed_dim:
        yield (
            f"'model.embed_dim' is {cfg.model.embed_dim} but {where} has embed_dim {embed}: set "
            f"model.embed_dim={embed} to start from it"
        )
    tok, mine = shape.get("tokenizer"), cfg.tokenizer
    if tok is None or not tok.kind:
        return
    theirs, ours = vocab_size_estimate(tok), vocab_size_estimate(mine)
    if tok.kind != mine.kind or (theirs and ours and theirs != ours):
        sizes = f" (vocabulary {ours} vs {theirs})" if theirs and ours and theirs != ours else ""
        fix = f"tokenizer.kind={tok.kind}" + (f" tokenizer.path={tok.path}" if tok.path else "")
        yield (
            f"'tokenizer' is {_describe(mine)} but {where} was trained with {_describe(tok)}"
            f"{sizes}: set {fix} to start from it"
        )


__all__ = ["recorded_shape"]
