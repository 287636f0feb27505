"""The model an evaluation recipe scores: `eval.checkpoint` read in any layout (or `init`),
its tokenizer, and the resolution it is evaluated at.

The tokenizer is the checkpoint's when it carries one that can be built here (an HF folder's
files, the `[tokenizer]` recorded in a DCP checkpoint's config.toml / model_args.json);
otherwise the config's `[tokenizer]`. The evaluation resolution is `model.image_size`, which
must be the one the checkpoint was trained at (read from its position embeddings) unless
`eval.allow_resolution_change=true` (interpolated position embeddings, a warning).
"""

from __future__ import annotations

import logging
import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blip_recipes.config import Config
from blip_recipes.data import build_tokenizer
from blip_recipes.interop.loading import build_model_from_weights, tokenizer_from_weights
from blip_recipes.interop.readers import CheckpointWeights, read_weights
from blip_recipes.models.inputs import model_image_size

INIT = "init"
"""`eval.checkpoint` value that evaluates the freshly initialised model of the config (step 0)."""


@dataclass
class EvaluatedModel:
    """What :func:`load_evaluated_model` returns.

    Attributes:
        model: the model in eval mode, on the CPU.
        tokenizer: the one to encode texts with.
        image_size: the input side to evaluate at.
        step: the training step of a `step-N` checkpoint (0 otherwise), for TensorBoard.
        source, layout: where the weights came from, for the log.
    """

    model: nn.Module
    tokenizer: Any
    image_size: int
    step: int
    source: str
    layout: str


def load_evaluated_model(cfg: Config, log: logging.Logger) -> EvaluatedModel:
    """Read `eval.checkpoint` (or build the `init` model), pick the tokenizer, check the
    resolution; the choices are logged to `log`.

    Raises:
        ValueError: no `eval.checkpoint`, or a resolution other than the checkpoint's.
    """
    ev = cfg.eval
    if not ev.checkpoint:
        raise ValueError(
            "set eval.checkpoint (a DCP checkpoint, reference .pth or HF folder, or init)"
        )
    if ev.checkpoint == INIT:
        tokenizer = build_tokenizer(cfg.tokenizer)
        log.info("tokenizer: %s", _describe_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path))
        model = _initial_model(cfg, tokenizer)
        source, layout, step = "the initial weights of this config", "step 0", 0
    else:
        weights = read_weights(ev.checkpoint)
        tokenizer = _tokenizer_for(weights, cfg, log)
        recorded = weights.model_args or weights.hf_config
        model = build_model_from_weights(
            weights, model_name=None if recorded else cfg.model.name, tokenizer=tokenizer
        )
        source, layout, step = weights.source, weights.layout, _step_of(weights.source)
    image_size = _resolution(model, source, cfg, log)
    return EvaluatedModel(model, tokenizer, image_size, step, source, layout)


def eval_autocast(cfg: Config, device: torch.device):
    """`training.mixed_precision` for evaluation: auto = bf16 autocast on CUDA, fp32 on CPU."""
    choice = cfg.training.mixed_precision
    if choice == "auto":
        choice = "bf16" if device.type == "cuda" else "fp32"
    if choice == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def _tokenizer_for(weights: CheckpointWeights, cfg: Config, log: logging.Logger) -> Any:
    recorded = tokenizer_from_weights(weights)
    section = weights.tokenizer or {}
    if recorded is not None:
        log.info(
            "tokenizer: recorded with the checkpoint, %s",
            _describe_tokenizer(section.get("kind"), section.get("path")),
        )
        return recorded
    if section:
        log.warning(
            "tokenizer recorded with %s (%s) is not available here; using the config's "
            "[tokenizer] instead",
            weights.source, _describe_tokenizer(section.get("kind"), section.get("path")),
        )  # fmt: skip
    tok = cfg.tokenizer
    log.info(
        "tokenizer: from the config's [tokenizer], %s", _describe_tokenizer(tok.kind, tok.path)
    )
    return build_tokenizer(tok)


def _resolution(model: nn.Module, source: str, cfg: Config, log: logging.Logger) -> int:
    trained = model_image_size(model)
    wanted = cfg.model.image_size
    if wanted == trained:
        log.info("resolution: %d px (the checkpoint's)", trained)
        return wanted
    message = (
        f"{source} was trained at {trained} px but model.image_size is {wanted}: evaluating "
        "at another resolution interpolates the position embeddings and usually lowers the "
        "scores."
    )
    if not cfg.eval.allow_resolution_change:
        raise ValueError(
            f"{message} Set model.image_size={trained}, or eval.allow_resolution_change=true "
            f"to evaluate at {wanted} px anyway"
        )
    log.warning("%s Evaluating at %d px because eval.allow_resolution_change=true", message, wanted)
    return wanted


def _describe_tokenizer(kind: Any, path: Any) -> str:
    if kind == "synthetic":
        return "kind=synthetic"
    where = Path(path).absolute() if path else "no path"
    return f"kind={kind}, path={where}"


def _initial_model(cfg: Config, tokenizer: Any) -> nn.Module:
    """What blip_pretrain starts from with this config (seed, text/vision init, init_from)."""
    from blip_recipes.models import build_model
    from blip_recipes.training.build import initial_weights, model_kwargs

    state = initial_weights(cfg, tokenizer)
    model = build_model(cfg.model.name, **model_kwargs(cfg, tokenizer))
    model.load_state_dict(state)
    return model.eval()


def _step_of(source: str) -> int:
    """The training step of a `step-N` checkpoint (0 for other sources)."""
    match = re.search(r"step-(\d+)$", source.rstrip("/"))
    return int(match.group(1)) if match else 0


__all__ = ["INIT", "EvaluatedModel", "eval_autocast", "load_evaluated_model"]
