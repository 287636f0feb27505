"""Exporters: our weights written in the layouts others load: one flat state dict of ours
(`.pt` / `.safetensors`), a reference BLIP `.pth` (strict-loadable by the original code, ties kept
as ties) and Hugging Face folders (`retrieval/`, `captioning/`).

    export_hf(model, "hf_out", tokenizer=tok)          # hf_out/retrieval, hf_out/captioning
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blip_recipes.config.recorded import MODEL_ARGS_FILE
from blip_recipes.interop.files import compact_copies, save_state_dict_file
from blip_recipes.interop.hf import hf_blip_config, ours_to_hf_captioning, ours_to_hf_retrieval
from blip_recipes.interop.readers import MOMENTUM_CROSS_ATTN, QUEUE_KEYS
from blip_recipes.interop.reference import ours_to_reference
from blip_recipes.objectives.pretrain import LM_LABEL_SMOOTHING


def consolidated_state_dict(
    model: nn.Module, momentum: Any = None, momentum_cross_attn: dict | None = None
) -> dict[str, torch.Tensor]:
    """One flat state dict: our model keys, plus `momentum.*` keys when `momentum` is given
    (and `momentum_cross_attn.*`, a reference file's momentum cross-attention, when given)."""
    out = {k: v.detach() for k, v in model.state_dict().items()}
    if momentum is not None:
        out |= {
            f"momentum.encoders.{k}": v.detach() for k, v in momentum.encoders.state_dict().items()
        }
        out |= {f"momentum.{k}": getattr(momentum, k).detach() for k in QUEUE_KEYS}
        out |= {f"{MOMENTUM_CROSS_ATTN}.{k}": v for k, v in (momentum_cross_attn or {}).items()}
    return out


def save_consolidated(
    model: nn.Module,
    path: str | Path,
    momentum: Any = None,
    momentum_cross_attn: dict | None = None,
) -> Path:
    """Write :func:`consolidated_state_dict` to `.pt` / `.pth` or `.safetensors` (whose header
    also records the builder arguments, so it rebuilds without hints)."""
    model_args = getattr(model, "model_args", None)
    metadata = {MODEL_ARGS_FILE: json.dumps(model_args)} if model_args else None
    state = consolidated_state_dict(model, momentum, momentum_cross_attn)
    save_state_dict_file(state, path, metadata)
    return Path(path)


def save_reference(
    model: nn.Module,
    path: str | Path,
    momentum: Any = None,
    momentum_cross_attn: dict | None = None,
) -> Path:
    """Write a reference-layout `{"model": ...}` `.pth` that the reference `BLIP_Pretrain` loads
    with a strict `load_state_dict` when `momentum` is given (its exact key set: temp 0-d,
    `position_ids` buffers, momentum `_m` names, queues).

    Tensors the reference shares are stored once (`torch.load` gives them back shared). The
    momentum cross-attention comes from `momentum_cross_attn` (what a reference source held),
    else from copies of the online cross-attention.
    """
    momentum_sd = queues = None
    if momentum is not None:
        momentum_sd = momentum.encoders.state_dict()
        queues = {k: getattr(momentum, k) for k in QUEUE_KEYS}
    elif momentum_cross_attn:
        raise ValueError("momentum_cross_attn is written with the momentum state only")
    state = ours_to_reference(model.state_dict(), momentum_sd, queues, momentum_cross_attn)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": compact_copies(state)}, path)
    return path


def _sep_token_id(model: nn.Module, tokenizer: Any) -> int:
    if tokenizer is not None:
        return tokenizer.sep_token_id
    vocab = model.text.embeddings.word_embeddings.num_embeddings
    if vocab >= 30522:
        return 102  # bert-base-uncased [SEP]
    raise ValueError("pass the tokenizer: the [SEP] id of this vocabulary is unknown")


def export_hf(model: nn.Module, out_dir: str | Path, tokenizer: Any = None) -> dict[str, Path]:
    """Write `out_dir/retrieval` (`BlipForImageTextRetrieval`) and `out_dir/captioning`
    (`BlipForConditionalGeneration`) with config.json, safetensors and, when the tokenizer is a
    WordPiece one, its files.

    The configs carry the model's vision LayerNorm eps (1e-6 for reference models; HF's default
    is 1e-5), label smoothing (0.1), `[DEC]` as bos, `[SEP]` as sep/eos and `[PAD]`. Both load
    with `from_pretrained` with no missing or unexpected weights. `temp`, momentum weights and
    queues have no HF slot.
    """
    import transformers

    out_dir = Path(out_dir)
    sep = _sep_token_id(model, tokenizer)
    config = hf_blip_config(model, label_smoothing=LM_LABEL_SMOOTHING,
                            sep_token_id=sep, eos_token_id=sep)  # fmt: skip
    state = model.state_dict()
    written = {}
    for sub, cls, mapping in (
        ("retrieval", transformers.BlipForImageTextRetrieval, ours_to_hf_retrieval),
        ("captioning", transformers.BlipForConditionalGeneration, ours_to_hf_captioning),
    ):
        hf_model = cls(config).eval()
        hf_model.load_state_dict(mapping(state), strict=True)
        folder = out_dir / sub
        _save_quietly(hf_model, folder)
        backend = getattr(tokenizer, "backend", None)
        if backend is not None and hasattr(backend, "save_pretrained"):
            backend.save_pretrained(folder)
        _save_image_processor(model, folder)
        written[sub] = folder
    return written


def _save_quietly(hf_model: Any, folder: Path) -> None:
    """``save_pretrained`` without its "Writing model shards" progress bar: a tiny export is one
    shard written in milliseconds, and the bar would be the command's only output on stderr."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        hf_model.save_pretrained(folder)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _save_image_processor(model: nn.Module, folder: Path) -> None:
    """preprocessor_config.json with the reference normalisation (skipped if unavailable)."""
    from blip_recipes.data import IMAGE_MEAN, IMAGE_STD
    from blip_recipes.models.inputs import model_image_size

    size = model_image_size(model)
    config = {
        "image_processor_type": "BlipImageProcessor",
        "do_resize": True, "size": {"height": size, "width": size}, "resample": 3,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(IMAGE_MEAN), "image_std": list(IMAGE_STD), "do_convert_rgb": True,
    }  # fmt: skip
    (folder / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


__all__ = ["consolidated_state_dict", "export_hf", "save_consolidated", "save_reference"]
