"""File-level conversion: any checkpoint users bring -> our model (+ momentum state), and our
weights -> DCP, Hugging Face folders, consolidated state dicts or a reference `.pth`.

The key mapping itself lives in `reference.py` / `hf.py`; this module decides which mapping a
file needs, infers the model's shape from the tensors, checks that every source key found a
place, and writes the outputs.

    weights = read_weights("model_base.pth")          # reference / HF / DCP / our .pt
    model = build_model_from_weights(weights, tokenizer=tok)
    momentum = build_momentum_from_weights(model, weights)
    save_training_checkpoint(model, momentum, "outputs/from_ref/checkpoints/step-0")
    export_hf(model, "hf_out", tokenizer=tok)          # hf_out/retrieval, hf_out/captioning
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blip_recipes.config.recorded import MODEL_ARGS_FILE, recorded_model_and_tokenizer
from blip_recipes.interop.files import (
    CheckpointLayoutError,
    compact_copies,
    detect_layout,
    hf_subfolders,
    latest_dcp_step,
    read_dcp,
    read_hf_folder,
    read_safetensors_metadata,
    read_state_dict_file,
    save_dcp,
    save_state_dict_file,
    staged_output,
)
from blip_recipes.interop.hf import (
    hf_blip_config,
    hf_to_ours,
    ours_to_hf_captioning,
    ours_to_hf_retrieval,
)
from blip_recipes.interop.reference import ours_to_reference, reference_to_ours

logger = logging.getLogger(__name__)

"""Written beside converted DCP checkpoints: the builder preset and overrides that rebuild it."""
MOMENTUM_CROSS_ATTN = "momentum_cross_attn"
"""DCP top-level key (and flat-file key prefix) of a reference file's momentum cross-attention,
which our momentum encoder has no slot for: kept so that a reference export gives it back."""
_QUEUE_KEYS = ("image_queue", "text_queue", "queue_ptr")
_IGNORED_SUFFIXES = ("position_ids",)
_REFERENCE_DROPPABLE = ("idx_queue",)  # retrieval fine-tuning's image-id queue (not pretraining)


@dataclass
class CheckpointWeights:
    """Weights read from any supported layout, in our key space.

    Attributes:
        model: `BlipPretrain` state dict (partial when the source is, e.g. one HF folder).
        momentum: `MomentumEncoders` state dict, or None when the source has none.
        queues: `image_queue` (E, Q), `text_queue` (E, Q), `queue_ptr` (1,) when present.
        source: the path read.
        layout: "dcp", "reference", "hf" or "ours" (a consolidated state dict of ours).
        model_args: `{"name": preset, **builder overrides}` recorded with the checkpoint, if any.
        hf_config: `config.json` of an HF folder (the first one), if any.
        tokenizer: a `[tokenizer]`-section dict recorded with the checkpoint, if any.
        momentum_cross_attn: a reference file's momentum cross-attention, keys
            `text_encoder.layers.#.cross_attn.*` (empty when the source has none).
    """

    model: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor] | None = None
    queues: dict[str, torch.Tensor] = field(default_factory=dict)
    source: str = ""
    layout: str = ""
    model_args: dict[str, Any] | None = None
    hf_config: dict[str, Any] | None = None
    tokenizer: dict[str, Any] | None = None
    momentum_cross_attn: dict[str, torch.Tensor] = field(default_factory=dict)


def _unplaced_error(
    source: str, layout: str, keys: list[str], limit: int = 8
) -> CheckpointLayoutError:
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return CheckpointLayoutError(
        f"{source}: read as {layout}, but {len(keys)} key(s) have no place in the BLIP "
        f"pretraining model: {', '.join(keys[:limit])}{more}"
    )


def _check_placed(source: str, layout: str, original: dict, produced: dict, drop=()) -> None:
    unplaced = [
        k for k in original
        if k not in produced and not k.endswith(_IGNORED_SUFFIXES) and k not in drop
    ]  # fmt: skip
    if unplaced:
        raise _unplaced_error(source, layout, unplaced)


def classify_state_dict(state_dict: dict[str, Any]) -> str:
    """Which key space a flat state dict uses: "ours", "reference", "hf_retrieval",
    "hf_captioning" or "hf_pair" (both HF models merged).

    Raises:
        CheckpointLayoutError: naming the first keys when no layout fits.
    """
    keys = list(state_dict)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("text.layers.") or has("text.embeddings.") or has("lm_head.") or has("momentum."):
        return "ours"
    if has("vision_model."):
        retrieval, captioning = has("text_encoder.") or has("itm_head."), has("text_decoder.")
        if retrieval and captioning:
            return "hf_pair"
        if retrieval or captioning:
            return "hf_retrieval" if retrieval else "hf_captioning"
    if has("visual_encoder.") or has("text_encoder.") or has("text_decoder.bert."):
        return "reference"
    raise CheckpointLayoutError(
        f"unknown checkpoint layout: none of our, reference BLIP or Hugging Face BLIP names; "
        f"first keys: {', '.join(keys[:8])}"
    )


def split_hf_pair(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """A merged HF state dict -> (retrieval part, captioning part); the ViT goes to both."""
    vision = {k: v for k, v in state_dict.items() if k.startswith("vision_model.")}
    captioning = vision | {k: v for k, v in state_dict.items() if k.startswith("text_decoder.")}
    retrieval = {k: v for k, v in state_dict.items() if k not in captioning} | vision
    return retrieval, captioning


def _from_reference(sd: dict, source: str) -> CheckpointWeights:
    split = reference_to_ours(sd)
    produced = ours_to_reference(
        split.model, split.momentum, split.queues, split.momentum_cross_attn
    )
    _check_placed(source, "a reference BLIP checkpoint", sd, produced, _REFERENCE_DROPPABLE)
    return CheckpointWeights(split.model, split.momentum, dict(split.queues), source, "reference",
                             momentum_cross_attn=split.momentum_cross_attn)  # fmt: skip


def _from_hf(retrieval: dict | None, captioning: dict | None, source: str) -> CheckpointWeights:
    model = hf_to_ours(retrieval, captioning)
    if retrieval is not None:
        _check_placed(
            source, "HF BlipForImageTextRetrieval", retrieval, ours_to_hf_retrieval(model)
        )
    if captioning is not None:
        produced = ours_to_hf_captioning(model)
        _check_placed(source, "HF BlipForConditionalGeneration", captioning, produced)
    return CheckpointWeights(model, None, {}, source, "hf")


def _from_ours(sd: dict, source: str) -> CheckpointWeights:
    cross_prefix = f"{MOMENTUM_CROSS_ATTN}."
    model = {k: v for k, v in sd.items()
             if not k.startswith("momentum.") and not k.startswith(cross_prefix)}  # fmt: skip
    momentum = {k[len("momentum.encoders.") :]: v for k, v in sd.items()
                if k.startswith("momentum.encoders.")}  # fmt: skip
    queues = {k: sd[f"momentum.{k}"] for k in _QUEUE_KEYS if f"momentum.{k}" in sd}
    weights = CheckpointWeights(model, momentum or None, queues, source, "ours")
    weights.momentum_cross_attn = {k[len(cross_prefix) :]: v for k, v in sd.items()
                                   if k.startswith(cross_prefix)}  # fmt: skip
    return weights


def weights_from_state_dict(
    state_dict: dict[str, torch.Tensor], source: str = "<state dict>"
) -> CheckpointWeights:
    """Map a flat state dict in any known key space to ours (see :func:`classify_state_dict`)."""
    kind = classify_state_dict(state_dict)
    if kind == "ours":
        return _from_ours(state_dict, source)
    if kind == "reference":
        return _from_reference(state_dict, source)
    if kind == "hf_pair":
        return _from_hf(*split_hf_pair(state_dict), source)
    retrieval = state_dict if kind == "hf_retrieval" else None
    captioning = state_dict if kind == "hf_captioning" else None
    return _from_hf(retrieval, captioning, source)


def read_weights(path: str | Path, trust_pickle: bool = False) -> CheckpointWeights:
    """Read a checkpoint in any supported layout into our key space.

    Args:
        path: a DCP checkpoint (or a run folder: newest complete step), a Hugging Face folder
            (or a folder of retrieval + captioning subfolders), a reference BLIP `.pth`, or a
            consolidated `.pt` / `.safetensors` of ours or of HF.
        trust_pickle: allow arbitrary objects in torch pickles.

    Raises:
        CheckpointLayoutError: for unknown layouts, naming the first keys it could not place.
    """
    path = Path(path)
    layout = detect_layout(path)
    if layout == "dcp":
        step_dir = latest_dcp_step(path)
        assert step_dir is not None
        flat = read_dcp(step_dir, ("model", "momentum", MOMENTUM_CROSS_ATTN))
        sd = {k[len("model.") :]: v for k, v in flat.items() if k.startswith("model.")}
        sd |= {k: v for k, v in flat.items() if not k.startswith("model.")}
        weights = _from_ours(sd, str(step_dir))
        weights.layout = "dcp"
        weights.model_args, weights.tokenizer = recorded_model_and_tokenizer(step_dir)
        return weights
    if layout == "hf":
        retrieval = captioning = config = None
        for folder in hf_subfolders(path):
            folder_config, sd = read_hf_folder(folder)
            kind = classify_state_dict(sd)
            config = config or folder_config
            if kind == "hf_pair":
                retrieval, captioning = split_hf_pair(sd)
            elif kind == "hf_retrieval":
                retrieval = sd
            elif kind == "hf_captioning":
                captioning = sd
            else:
                raise CheckpointLayoutError(
                    f"{folder}: not a BLIP retrieval or captioning model ({kind} keys)"
                )
        weights = _from_hf(retrieval, captioning, str(path))
        weights.hf_config = config
        tok_dir = next((f for f in hf_subfolders(path)
                        if (f / "tokenizer.json").is_file() or (f / "vocab.txt").is_file()), None)  # fmt: skip
        if tok_dir is not None:
            weights.tokenizer = {"kind": "wordpiece", "path": str(tok_dir)}
        return weights
    weights = weights_from_state_dict(read_state_dict_file(path, trust_pickle), str(path))
    recorded = read_safetensors_metadata(path).get(MODEL_ARGS_FILE)
    if recorded:
        weights.model_args = json.loads(recorded)
    return weights


# ------------------------------------------------------------------ building our model
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
                               ("label_smoothing", text_cfg, "label_smoothing"),
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
        value = args.get(key, preset.get(key, defaults[key].default))
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
        raise _unplaced_error(
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


def build_momentum_from_weights(
    model: nn.Module,
    weights: CheckpointWeights,
    seed: int = 0,
    queue_size: int | None = None,
    **kwargs: Any,
):
    """A `MomentumState` for `model`: the checkpoint's momentum weights and queues when present,
    otherwise a copy of the online weights and freshly seeded queues (as a new run starts).

    Args:
        model: the online model built by :func:`build_model_from_weights`.
        weights: what was read.
        seed: seed of freshly initialised queues.
        queue_size: Q of the run that will load it (`model.queue_size` in its config); default
            the checkpoint's queue length, else the preset's. Queues cannot be resized.
        kwargs: `MomentumState.build` options (momentum, train_mode).
    """
    from blip_recipes.training.momentum import MomentumState

    args = dict(getattr(model, "model_args", {}))
    name = args.pop("name", "blip_pretrain_base")
    stored = weights.queues.get("image_queue")
    if queue_size is not None:
        if stored is not None and stored.shape[1] != queue_size:
            raise ValueError(
                f"{weights.source} holds queues of length {stored.shape[1]}, not {queue_size}: "
                "keep the checkpoint's model.queue_size (queues are not resized)"
            )
        args["queue_size"] = queue_size
    state = MomentumState.build(name, seed=seed, **kwargs, **args)
    state.copy_from(model)
    if weights.momentum:
        result = state.encoders.load_state_dict(weights.momentum, strict=False)
        if result.unexpected_keys:
            raise _unplaced_error(weights.source, "momentum weights", list(result.unexpected_keys))
        if result.missing_keys:
            logger.warning("%s: momentum tensors copied from the online model: %s",
                           weights.source, ", ".join(result.missing_keys[:6]))  # fmt: skip
    with torch.no_grad():
        for key in _QUEUE_KEYS:
            if key in weights.queues:
                target = getattr(state, key)
                value = weights.queues[key].reshape(target.shape).to(target.dtype)
                target.copy_(value)
    return state


# ------------------------------------------------------------------ writing
def save_training_checkpoint(
    model: nn.Module,
    momentum: Any,
    path: str | Path,
    tokenizer_section: dict | None = None,
    momentum_cross_attn: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `{"model", "momentum"}` as a DCP checkpoint folder the pretraining recipe can load.

    `checkpoint.init_from=<path>` initialises a run from its model weights. A `model_args.json`
    beside it records the builder arguments (and tokenizer section, its path made absolute)
    for later conversions and evaluation. A reference file's momentum cross-attention (no
    training use) goes under its own top-level key, `momentum_cross_attn`, when given.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = {"model": get_model_state_dict(model)}
    if momentum is not None:
        state["momentum"] = momentum.state_dict()
        if momentum_cross_attn:
            state[MOMENTUM_CROSS_ATTN] = dict(momentum_cross_attn)
    out = save_dcp(state, path)
    tok = dict(tokenizer_section) if tokenizer_section else None
    if tok and tok.get("path"):  # absolute: read later from any working folder
        tok["path"] = str(Path(tok["path"]).absolute())
    recorded = {"model": getattr(model, "model_args", None), "tokenizer": tok}
    (out / MODEL_ARGS_FILE).write_text(json.dumps(recorded, indent=2, default=str))
    return out


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
        out |= {f"momentum.{k}": getattr(momentum, k).detach() for k in _QUEUE_KEYS}
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
        queues = {k: getattr(momentum, k) for k in _QUEUE_KEYS}
    elif momentum_cross_attn:
        raise ValueError("momentum_cross_attn is written with the momentum state only")
    state = ours_to_reference(model.state_dict(), momentum_sd, queues, momentum_cross_attn)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": compact_copies(state)}, path)
    return path


FORMATS = ("dcp", "hf", "pt", "safetensors", "reference")
"""Output formats of :func:`convert_checkpoint`."""


def output_format(dest: str | Path, to: str | None = None) -> str:
    """`to`, or the format implied by the destination's suffix (a folder means DCP)."""
    if to is not None:
        if to not in FORMATS:
            raise ValueError(f"unknown output format {to!r}; choose one of {', '.join(FORMATS)}")
        return to
    suffix = Path(dest).suffix
    return {".pt": "pt", ".pth": "pt", ".bin": "pt", ".safetensors": "safetensors"}.get(
        suffix, "dcp"
    )


def convert_checkpoint(
    source: str | Path,
    dest: str | Path,
    to: str | None = None,
    model_name: str | None = None,
    tokenizer: Any = None,
    queue_size: int | None = None,
    seed: int = 0,
    momentum: bool = True,
    strict: bool = False,
    trust_pickle: bool = False,
    tokenizer_section: dict[str, Any] | None = None,
    overwrite: bool = False,
    **overrides: Any,
) -> Path:
    """Convert any supported checkpoint into one output format (what `tools/convert_checkpoint.py`
    runs).

    Args:
        source: DCP checkpoint / run folder, HF folder(s), reference `.pth`, or our `.pt` /
            `.safetensors`.
        dest: output path: a folder for "dcp" and "hf", a file otherwise.
        to: "dcp" (`{"model", "momentum"}`, for `checkpoint.init_from`), "hf" (`dest/retrieval`
            and `dest/captioning`), "pt" / "safetensors" (one flat state dict of ours),
            "reference" (reference BLIP `{"model": ...}` `.pth`); default from `dest`'s suffix.
        model_name: builder preset for what shapes cannot tell (heads, eps) when the source does
            not record it.
        tokenizer: the tokenizer of the run (token ids; tokenizer files for "hf"); default the
            one recorded with the source when it can be built locally.
        queue_size: queue length of the momentum state written to "dcp" (the run's
            `model.queue_size`); default the source's, else the preset's.
        seed: seed of freshly initialised queues when the source has none.
        momentum: include momentum weights and queues ("dcp", "pt", "safetensors", "reference").
        strict: every model tensor must come from the source.
        trust_pickle: allow arbitrary objects in torch pickles.
        tokenizer_section: `[tokenizer]` settings recorded beside a "dcp" output (e.g.
            `{"kind": "wordpiece", "path": ...}`); default what the source recorded.
        overwrite: replace an existing `dest` (file or non-empty folder); otherwise that is an
            error. Either way the output is written to a temporary sibling and renamed into
            place at the end, so a failed conversion leaves `dest` as it was.
        overrides: builder arguments (e.g. `vision_heads=16`).

    Returns:
        The written path.

    Raises:
        FileExistsError: `dest` exists and `overwrite` is false.
        ValueError: `dest` is the source or holds it (replacing it would delete the source).
    """
    fmt = output_format(dest, to)
    dest = Path(dest)
    if dest.suffix == "" and fmt in ("pt", "safetensors"):
        dest = dest.with_suffix(".pt" if fmt == "pt" else ".safetensors")
    resolved, src = dest.resolve(), Path(source).resolve()
    if dest.exists() and (resolved == src or resolved in src.parents):
        raise ValueError(f"{dest} is the source {source} or holds it; write somewhere else")
    weights = read_weights(source, trust_pickle=trust_pickle)
    if tokenizer is None:
        tokenizer = tokenizer_from_weights(weights)
    model = build_model_from_weights(weights, model_name, tokenizer, strict, **overrides)
    state = cross = None
    if momentum and fmt != "hf":
        state = build_momentum_from_weights(model, weights, seed=seed, queue_size=queue_size)
        cross = weights.momentum_cross_attn
    with staged_output(dest, overwrite) as tmp:
        if fmt == "dcp":
            tok = tokenizer_section or weights.tokenizer
            save_training_checkpoint(model, state, tmp, tok, cross)
        elif fmt == "hf":
            from blip_recipes.interop.hf import write_model_card

            export_hf(model, tmp, tokenizer)
            write_model_card(tmp, source)  # README.md: config, data, step, last metrics
        elif fmt == "reference":
            if state is not None and not cross:
                logger.info("%s: the momentum cross-attention (unused in training) is a copy of "
                            "the online cross-attention", dest)  # fmt: skip
            save_reference(model, tmp, state, cross)
        else:
            save_consolidated(model, tmp, state, cross)
    return dest


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
    config = hf_blip_config(model, label_smoothing=getattr(model, "label_smoothing", 0.1),
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
    from blip_recipes.evaluation.retrieval import model_image_size

    size = model_image_size(model)
    config = {
        "image_processor_type": "BlipImageProcessor",
        "do_resize": True, "size": {"height": size, "width": size}, "resample": 3,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(IMAGE_MEAN), "image_std": list(IMAGE_STD), "do_convert_rgb": True,
    }  # fmt: skip
    (folder / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


__all__ = [
    "FORMATS",
    "MODEL_ARGS_FILE",
    "MOMENTUM_CROSS_ATTN",
    "CheckpointLayoutError",
    "CheckpointWeights",
    "build_model_from_weights",
    "build_momentum_from_weights",
    "classify_state_dict",
    "consolidated_state_dict",
    "convert_checkpoint",
    "export_hf",
    "infer_model_shape",
    "load_model",
    "model_args_for",
    "output_format",
    "read_weights",
    "save_consolidated",
    "save_reference",
    "save_training_checkpoint",
    "split_hf_pair",
    "tokenizer_from_weights",
    "weights_from_state_dict",
]
