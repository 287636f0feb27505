"""Hugging Face transformers BLIP <-> ours (state dicts only; no hub access).

- `BlipForImageTextRetrieval`: `vision_model.*`, `text_encoder.*` (bidirectional self-attention),
  `vision_proj`, `text_proj`, `itm_head`.
- `BlipForConditionalGeneration`: `vision_model.*`, `text_decoder.bert.*` (causal self-attention)
  and `text_decoder.cls.predictions.*` (LM head; `decoder.weight` is the word embeddings).

A pretraining model maps onto both (shared text tensors are written twice). `temp`, the momentum
weights and the queues have no HF slot. Exported configs must set the vision LayerNorm eps to
1e-6 (HF's default is 1e-5): `hf_blip_config(model)` does.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from blip_recipes.interop._names import (
    LM_HEAD,
    TEXT_DECODER,
    TEXT_EMBEDDINGS,
    TEXT_ENCODER,
    TEXT_FFN,
    VIT_TO_HF,
    map_prefixed,
)

HEADS = ("vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias",
         "itm_head.weight", "itm_head.bias")  # fmt: skip


def ours_to_hf_retrieval(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our `BlipPretrain` state dict -> `BlipForImageTextRetrieval` state dict."""
    out = map_prefixed(state_dict, "visual_encoder.", "vision_model.", VIT_TO_HF)
    out |= map_prefixed(state_dict, "text.", "text_encoder.", TEXT_ENCODER)
    out |= {key: state_dict[key] for key in HEADS if key in state_dict}
    return out


def ours_to_hf_captioning(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our `BlipPretrain` state dict -> `BlipForConditionalGeneration` state dict."""
    out = map_prefixed(state_dict, "visual_encoder.", "vision_model.", VIT_TO_HF)
    out |= map_prefixed(state_dict, "text.", "text_decoder.bert.", TEXT_DECODER)
    out |= map_prefixed(state_dict, "lm_head.", "text_decoder.cls.predictions.", LM_HEAD)
    prefix = "text_decoder.cls.predictions."
    if "text.embeddings.word_embeddings.weight" in state_dict:
        out[prefix + "decoder.weight"] = state_dict["text.embeddings.word_embeddings.weight"]
    if "lm_head.bias" in state_dict:
        out[prefix + "decoder.bias"] = state_dict["lm_head.bias"]
    return out


def hf_to_ours(
    retrieval: dict[str, torch.Tensor] | None = None,
    captioning: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """HF state dicts -> our `BlipPretrain` keys (a partial state dict; load with strict=False).

    Args:
        retrieval: `BlipForImageTextRetrieval` state dict: ViT, text encoder, heads.
        captioning: `BlipForConditionalGeneration` state dict: ViT, decoder, LM head. Where both
            hold a shared tensor (ViT, embeddings, cross-attention, FFN), `retrieval` wins.

    Returns:
        Our keys; `temp` is never present (no HF slot).
    """
    out: dict[str, torch.Tensor] = {}
    if captioning is not None:
        out |= map_prefixed(captioning, "vision_model.", "visual_encoder.", VIT_TO_HF, True)
        out |= map_prefixed(captioning, "text_decoder.bert.", "text.", TEXT_DECODER, True)
        out |= map_prefixed(
            captioning, "text_decoder.cls.predictions.", "lm_head.", LM_HEAD, reverse=True
        )
    if retrieval is not None:
        out |= map_prefixed(retrieval, "vision_model.", "visual_encoder.", VIT_TO_HF, True)
        out |= map_prefixed(retrieval, "text_encoder.", "text.", TEXT_ENCODER, True)
        out |= {key: retrieval[key] for key in HEADS if key in retrieval}
    return out


def hf_text_model_to_med(
    state_dict: dict[str, torch.Tensor], decoder: bool = False, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """A `BlipTextModel` state dict (optionally under `prefix`) -> our MED keys (no `text.`).

    With `decoder=True` its self-attention maps to our causal self-attention.
    """
    pairs = TEXT_DECODER if decoder else TEXT_ENCODER
    return map_prefixed(state_dict, prefix, "", pairs, reverse=True)


def hf_vision_model_to_vit(
    state_dict: dict[str, torch.Tensor], prefix: str = ""
) -> dict[str, torch.Tensor]:
    """A `BlipVisionModel` state dict (optionally under `prefix`) -> our ViT keys."""
    return map_prefixed(state_dict, prefix, "", VIT_TO_HF, reverse=True)


def hf_blip_config(model: Any, **text_config_overrides: Any) -> Any:
    """A `transformers.BlipConfig` describing `model` (a `BlipPretrain`), for export or parity.

    Vision LayerNorm eps is copied from the model (1e-6 in the reference); dropout is 0 (HF
    defaults); bos = `model.dec_token_id`, pad = `model.pad_token_id`. Extra keyword arguments
    go to the text config (e.g. `label_smoothing=0.1`, `sep_token_id=...`).
    """
    from transformers import BlipConfig

    vit, text = model.visual_encoder, model.text
    block = vit.blocks[0]
    first = text.layers[0]
    cross_kv_width = first.cross_attn.key.in_features
    text_config = dict(
        vocab_size=text.embeddings.word_embeddings.num_embeddings,
        hidden_size=text.width,
        encoder_hidden_size=cross_kv_width,
        intermediate_size=first.ffn.fc1.out_features,
        num_hidden_layers=len(text.layers),
        num_attention_heads=first.self_attn.heads,
        max_position_embeddings=text.embeddings.position_embeddings.num_embeddings,
        layer_norm_eps=first.ffn.norm.eps,
        bos_token_id=model.dec_token_id,
        pad_token_id=model.pad_token_id,
    )
    text_config |= text_config_overrides
    patch = vit.patch_embed.proj.kernel_size[0]
    vision_config = dict(
        hidden_size=vit.width,
        intermediate_size=block.mlp.fc1.out_features,
        num_hidden_layers=len(vit.blocks),
        num_attention_heads=block.attn.heads,
        image_size=int(round(vit.num_patches**0.5)) * patch,
        patch_size=patch,
        layer_norm_eps=vit.norm.eps,
    )
    return BlipConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_text_hidden_size=model.embed_dim,
    )


# ------------------------------------------------------------------ model card
MODEL_CARD_FILE = "README.md"

_FRONT_MATTER = """---
# license: a placeholder; set the license of the weights and of the training data
license: other
library_name: transformers
pipeline_tag: image-to-text
tags:
- blip
- image-text-retrieval
- image-captioning
---
"""


def _last_record(path: Path) -> dict[str, Any] | None:
    """The last JSON object of a JSON-lines file (a torn last line is skipped)."""
    if not path.is_file():
        return None
    last = None
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            last = record
    return last


def _metric_rows(record: dict[str, Any]) -> list[str]:
    rows = ["| metric | value |", "|---|---|"]
    for key, value in record.items():
        if key in ("time", "step") or isinstance(value, (dict, list)):
            continue
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        rows.append(f"| {key} | {text} |")
    return rows


_SYNTHETIC_ONLY = ("num_samples", "image_size")  # fields of [[data.sources]] only synthetic reads


def _source_text(source: dict[str, Any]) -> str:
    kind = source.get("kind", "?")
    skip = {"kind"} | (set() if kind == "synthetic" else set(_SYNTHETIC_ONLY))
    rest = ", ".join(
        f"{k}={v}" for k, v in source.items() if k not in skip and v not in (None, "", [])
    )
    return f"- `{kind}`" + (f": {rest}" if rest else "")


def _prompt_text(recipe: str | None, config: dict[str, Any]) -> str:
    """What the decoder was trained to continue: caption fine-tuning's prompt, else none."""
    if recipe == "blip_finetune_caption":
        prompt = config.get("caption", {}).get("prompt", "a picture of ")
        return (
            f"Captioning was fine-tuned with the decoder prompt `{prompt}`: start captions with it."
        )
    if recipe is None:
        return "The recipe that made these weights was not recorded; its decoder prompt is unknown."
    return (
        f"`{recipe}` trains the decoder without a prompt (captions follow [DEC] directly); "
        '`blip caption` starts from `a picture of ` as the reference BLIP does, `--prompt ""` '
        "from nothing."
    )


def model_card(
    name: str,
    *,
    step: int | None = None,
    source: str | None = None,
    config_text: str | None = None,
    metrics: dict[str, Any] | None = None,
    eval_metrics: dict[str, Any] | None = None,
    model_args: dict[str, Any] | None = None,
    recipe: str | None = None,
) -> str:
    """A Hugging Face model card (``README.md`` text with YAML front matter) for an export.

    Args:
        name: the model's title (the run's ``job.name`` or the folder name).
        step: the training step of the exported weights.
        source: the checkpoint the export was converted from.
        config_text: the run's ``config.toml`` (shown in full; its ``[[data.sources]]`` are
            listed under "Training data").
        metrics: the last record of the run's ``metrics.jsonl``.
        eval_metrics: the last record of the run's ``eval.jsonl``.
        model_args: builder arguments of the model (preset name and sizes).
        recipe: the recipe that made the weights (from the run's ``run_info.json``); the card's
            prompt line follows it (only caption fine-tuning trains with a decoder prompt).
    """
    config: dict[str, Any] = {}
    if config_text:
        try:
            config = tomllib.loads(config_text)
        except tomllib.TOMLDecodeError:
            config = {}
    lines = [_FRONT_MATTER, f"# {name}", ""]
    lines += [
        "A BLIP vision-language model (ViT image encoder + BERT-style multimodal text "
        "encoder-decoder) pretrained with image-text contrastive (ITC), image-text matching "
        "(ITM) and captioning (LM) losses, exported from blip-recipes.",
        "",
        "- `retrieval/`: `BlipForImageTextRetrieval` (ITC features, ITM head)",
        "- `captioning/`: `BlipForConditionalGeneration` (image captioning)",
        "",
        "```python",
        "from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval",
        "",
        'captioner = BlipForConditionalGeneration.from_pretrained("THIS_FOLDER/captioning")',
        'retriever = BlipForImageTextRetrieval.from_pretrained("THIS_FOLDER/retrieval")',
        "```",
        "",
        _prompt_text(recipe, config),
        "",
        "The same folder also loads with `blip_recipes.load_model` and `blip caption`.",
        "",
        "## Training",
        "",
    ]
    if recipe:
        lines.append(f"- recipe: `{recipe}`")
    if config.get("job", {}).get("name"):
        lines.append(f"- job.name: `{config['job']['name']}`")
    if step is not None:
        lines.append(f"- step: {step}")
    if source:
        lines.append(f"- converted from: `{source}`")
    model_cfg = config.get("model") or model_args or {}
    if model_cfg.get("name"):
        lines.append(f"- model preset: `{model_cfg['name']}`")
    training = config.get("training", {})
    for key in ("steps", "epochs", "mixed_precision"):
        if key in training:
            lines.append(f"- training.{key}: {training[key]}")
    if "batch_size" in config.get("data", {}):
        lines.append(f"- per-device batch size: {config['data']['batch_size']}")
    if lines[-1] == "":
        lines.append("Not recorded with the checkpoint.")
    sources = config.get("data", {}).get("sources") or []
    lines += ["", "## Training data", ""]
    lines += [_source_text(src) for src in sources] or [
        "Not recorded with the checkpoint: describe the image-text data the model saw."
    ]
    if metrics or eval_metrics:
        lines += ["", "## Metrics", ""]
        if metrics:
            lines += [f"Last training record (step {metrics.get('step', '?')}):", ""]
            lines += _metric_rows(metrics) + [""]
        if eval_metrics:
            lines += [f"Last evaluation (step {eval_metrics.get('step', '?')}):", ""]
            lines += _metric_rows(eval_metrics) + [""]
    if config_text:
        lines += ["", "## Training config", "", "```toml", config_text.strip(), "```"]
    lines += ["", "## License", "", "Set the `license` above before publishing."]
    return "\n".join(lines).replace("\n\n\n", "\n\n").rstrip() + "\n"


def _recipe_of(run_dir: Path) -> str | None:
    """The recipe ``run_info.json`` records (its file's stem), None when absent or unreadable."""
    try:
        info = json.loads((run_dir / "run_info.json").read_text())
        return Path(info["recipe"]["path"]).stem
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_model_card(out_dir: str | Path, source: str | Path, **extra: Any) -> Path:
    """Write ``out_dir/README.md`` for an HF export of ``source``.

    For a DCP source (a ``step-N`` folder, a checkpoints folder or a run folder), the step and the
    run's ``config.toml`` (beside the step or in the run folder), ``metrics.jsonl`` and
    ``eval.jsonl`` are read; other sources give a card with placeholders. ``extra`` goes to
    :func:`model_card` (e.g. ``model_args``).

    Returns:
        The written path.
    """
    from blip_recipes.interop.files import latest_dcp_step

    out_dir, source = Path(out_dir), Path(source)
    step_dir = latest_dcp_step(source) if source.is_dir() else None
    step = config_text = metrics = eval_metrics = None
    name = source.stem
    if step_dir is not None:
        run_dir = step_dir.parent.parent
        match = re.fullmatch(r"step-(\d+)", step_dir.name)
        step = int(match.group(1)) if match else None
        name = run_dir.name if match else step_dir.name
        for config_file in (step_dir / "config.toml", run_dir / "config.toml"):
            if config_file.is_file():
                config_text = config_file.read_text()
                break
        metrics = _last_record(run_dir / "metrics.jsonl")
        eval_metrics = _last_record(run_dir / "eval.jsonl")
        extra.setdefault("recipe", _recipe_of(run_dir))
    # the title is the run's folder (what the user named the run), not job.name, which a config
    # shares with every run made from it
    text = model_card(name, step=step, source=str(source), config_text=config_text,
                      metrics=metrics, eval_metrics=eval_metrics, **extra)  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MODEL_CARD_FILE
    path.write_text(text)
    return path


__all__ = [
    "MODEL_CARD_FILE",
    "TEXT_EMBEDDINGS",
    "TEXT_FFN",
    "hf_blip_config",
    "hf_text_model_to_med",
    "hf_to_ours",
    "hf_vision_model_to_vit",
    "model_card",
    "ours_to_hf_captioning",
    "ours_to_hf_retrieval",
    "write_model_card",
]
