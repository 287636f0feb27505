"""The Python API: load a BLIP checkpoint, caption images, score image-text pairs, extract features.

    from blip_recipes import load_model, caption_images, score_pairs, image_features, text_features

    model, tokenizer = load_model("outputs/blip_base", device="cuda")
    captions = caption_images(model, tokenizer, ["cat.jpg"], method="beam")
    scores = score_pairs(model, tokenizer, ["cat.jpg", "cat.jpg"], ["a cat", "a truck"])
    sims = image_features(model, ["cat.jpg"]) @ text_features(model, tokenizer, ["a cat"]).T

Images everywhere are paths, raw bytes, PIL images or uint8 (3, H, W) tensors (resized and
centre-cropped to the model's input size like the evaluation transform), or an already normalised
float (B, 3, S, S) batch. Texts are cleaned like the reference evaluation (lower case, punctuation
removed, at most ``max_words`` words) unless ``clean=False``. Every function runs without
gradients, in eval mode (the model's mode is restored), on the model's device.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from blip_recipes import _API
from blip_recipes.evaluation.generation import caption_images  # noqa: F401  (re-exported)

__all__ = list(_API)  # the names `blip_recipes` re-exports lazily (one list for both)


class LoadedModel(NamedTuple):
    """What :func:`load_model` returns; unpacks as ``model, tokenizer = load_model(...)``."""

    model: nn.Module
    """A ``BlipPretrain`` in eval mode (entry points ``encode_image``, ``encode_text``,
    ``itm_logits``, ``next_token_logits``, ``temperature``)."""
    tokenizer: Any
    """The run's tokenizer: ``tokenizer(texts, max_length) -> (ids, mask)``, ``decode(ids)``."""


class PairScores(NamedTuple):
    """Scores of N image-text pairs (all (N,) float32 tensors on the CPU)."""

    itm: torch.Tensor
    """ITM match probability in [0, 1] (softmax of the ITM head, column "match")."""
    itc: torch.Tensor
    """ITC cosine similarity in [-1, 1] of the normalised image and text features."""
    itc_logit: torch.Tensor
    """``itc / temperature``: the contrastive logit the model was trained with."""


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    tokenizer: str | Path | Any = None,
    tokenizer_kind: str = "wordpiece",
    model_name: str | None = None,
    dtype: torch.dtype | None = None,
    trust_pickle: bool = False,
) -> LoadedModel:
    """Load any supported checkpoint as a ``BlipPretrain`` and its tokenizer.

    Args:
        path: a DCP checkpoint of ``blip_pretrain`` (a ``step-N`` folder or the run folder: its
            newest complete step), a Hugging Face BLIP folder (retrieval, captioning, or a folder
            holding both, e.g. a ``blip convert --to hf`` export), a reference BLIP ``.pth``, or a
            consolidated ``.pt`` / ``.safetensors``.
        device: where to put the model ("cpu", "cuda", "cuda:1", ...).
        tokenizer: None for the one recorded with the checkpoint (DCP ``config.toml`` /
            ``model_args.json``, HF folder files); else a ``vocab.txt`` / tokenizer folder path
            (of ``tokenizer_kind``) or a tokenizer object.
        tokenizer_kind: "wordpiece" (BERT), "bpe" or "synthetic", for a ``tokenizer`` path.
        model_name: builder preset (``blip_pretrain_base``, ...) for what the tensors cannot tell
            (attention heads, norm eps) when the checkpoint does not record it.
        dtype: cast the weights (e.g. ``torch.bfloat16``); default keeps fp32.
        trust_pickle: allow arbitrary objects in torch pickles (trusted files only).

    Returns:
        ``LoadedModel(model, tokenizer)``, the model in eval mode on ``device``.

    Raises:
        ValueError: no tokenizer is recorded with the checkpoint and none was given.
        blip_recipes.interop.files.CheckpointLayoutError: an unknown checkpoint layout.
        FileNotFoundError: ``path`` does not exist.
    """
    from blip_recipes.config import TokenizerConfig
    from blip_recipes.data import build_tokenizer
    from blip_recipes.interop.loading import build_model_from_weights, tokenizer_from_weights
    from blip_recipes.interop.readers import read_weights

    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file or folder")
    weights = read_weights(path, trust_pickle=trust_pickle)
    if tokenizer is None and tokenizer_kind == "synthetic":
        tokenizer = build_tokenizer(TokenizerConfig(kind="synthetic"))
    elif tokenizer is None:
        tokenizer = tokenizer_from_weights(weights)
        if tokenizer is None:
            raise ValueError(
                f"no tokenizer recorded with {path} that can be built here: pass "
                "tokenizer=PATH (bert-base-uncased vocab.txt or tokenizer folder)"
            )
    elif isinstance(tokenizer, (str, Path)):
        tokenizer = build_tokenizer(TokenizerConfig(kind=tokenizer_kind, path=str(tokenizer)))
    model = build_model_from_weights(weights, model_name, tokenizer)
    model.to(device=device, dtype=dtype)
    return LoadedModel(model.eval(), tokenizer)


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    weight = model.visual_encoder.patch_embed.proj.weight
    return weight.device, weight.dtype


def _pixels(model: nn.Module, images: Sequence[Any] | torch.Tensor, image_size: int | None):
    """Normalised float (B, 3, S, S) on the CPU (or ``images`` itself when already that)."""
    from blip_recipes.data import build_eval_transform, normalize_images
    from blip_recipes.models.inputs import model_image_size

    if isinstance(images, torch.Tensor) and images.is_floating_point():
        return images
    transform = build_eval_transform(image_size or model_image_size(model))
    items = [img if isinstance(img, torch.Tensor) else transform(img) for img in images]
    return normalize_images(torch.stack(items))


def _texts(texts: Sequence[str] | str, clean: bool, max_words: int) -> list[str]:
    from blip_recipes.data import pre_caption

    texts = [texts] if isinstance(texts, str) else list(texts)
    return [pre_caption(t, max_words) for t in texts] if clean else texts


class _Eval:
    """no_grad + eval mode for the block, the model's mode restored afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.no_grad = model, torch.no_grad()

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.no_grad.__exit__(*exc)
        self.model.train(self.was_training)


def _image_batches(model, images, image_size, batch_size):
    """Yield ``ImageEncoding`` (embeds (b, 1 + N, D_vision), feat (b, E)) per batch."""
    device, dtype = _device_dtype(model)
    pixels = _pixels(model, images, image_size)
    for start in range(0, pixels.shape[0], batch_size):
        yield model.encode_image(pixels[start : start + batch_size].to(device, dtype))


def image_features(
    model: nn.Module,
    images: Sequence[Any] | torch.Tensor,
    *,
    image_size: int | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """Unit-norm ITC image features.

    Args:
        model: a ``BlipPretrain`` (from :func:`load_model`).
        images: N images (see the module docstring for the accepted kinds).
        image_size: input side; default the model's native size.
        batch_size: images per forward.

    Returns:
        (N, E) float32 on the CPU, each row of L2 norm 1 (E = the model's ``embed_dim``,
        256 for the released BLIP models); ``image_features(...) @ text_features(...).T`` are
        the ITC cosine similarities.
    """
    with _Eval(model):
        feats = [enc.feat.float().cpu() for enc in _image_batches(model, images, image_size,
                                                                   batch_size)]  # fmt: skip
    return torch.cat(feats) if feats else torch.zeros(0, model.vision_proj.out_features)


def text_features(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str] | str,
    *,
    max_length: int = 35,
    batch_size: int = 128,
    clean: bool = True,
    max_words: int = 30,
) -> torch.Tensor:
    """Unit-norm ITC text features (the unimodal text encoder, ``[CLS]`` token).

    Args:
        model: a ``BlipPretrain``.
        tokenizer: its tokenizer (from :func:`load_model`).
        texts: T captions (a single string counts as one).
        max_length: tokens per text, truncated / padded (35 in the reference evaluation).
        batch_size: texts per forward.
        clean: lower-case and strip punctuation as the reference evaluation does.
        max_words: words kept when cleaning.

    Returns:
        (T, E) float32 on the CPU, each row of L2 norm 1.
    """
    device, _ = _device_dtype(model)
    ids, mask = tokenizer(_texts(texts, clean, max_words), max_length=max_length)
    feats = []
    with _Eval(model):
        for start in range(0, ids.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            enc = model.encode_text(ids[rows].to(device), mask[rows].to(device))
            feats.append(enc.feat.float().cpu())
    return torch.cat(feats) if feats else torch.zeros(0, model.text_proj.out_features)


def score_pairs(
    model: nn.Module,
    tokenizer: Any,
    images: Sequence[Any] | torch.Tensor,
    texts: Sequence[str],
    *,
    image_size: int | None = None,
    max_length: int = 35,
    batch_size: int = 32,
    clean: bool = True,
    max_words: int = 30,
) -> PairScores:
    """Score image ``i`` against text ``i`` with ITM (the image-grounded text encoder) and ITC.

    For one image against many texts, repeat the image (``[img] * len(texts)``); for a full
    similarity matrix use :func:`image_features` @ :func:`text_features`.T (ITC only).

    Args:
        model: a ``BlipPretrain``.
        tokenizer: its tokenizer.
        images: N images.
        texts: N captions.
        image_size: input side; default the model's native size.
        max_length: tokens per text (35 in the reference evaluation).
        batch_size: pairs per forward.
        clean: lower-case and strip punctuation as the reference evaluation does.
        max_words: words kept when cleaning.

    Returns:
        ``PairScores(itm, itc, itc_logit)``, each (N,) float32 on the CPU.
    """
    texts = _texts(texts, clean, max_words)
    n_images = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
    if n_images != len(texts):
        raise ValueError(f"score_pairs needs one text per image: {n_images} images, "
                         f"{len(texts)} texts")  # fmt: skip
    device, _ = _device_dtype(model)
    ids, mask = tokenizer(texts, max_length=max_length)
    itm, itc = [], []
    with _Eval(model):
        temperature = float(model.temperature().float().reshape(()))
        batches = _image_batches(model, images, image_size, batch_size)
        for start, enc in zip(range(0, len(texts), batch_size), batches):
            rows = slice(start, start + batch_size)
            b_ids, b_mask = ids[rows].to(device), mask[rows].to(device)
            text_feat = model.encode_text(b_ids, b_mask).feat
            itc.append((enc.feat.float() * text_feat.float()).sum(-1).cpu())
            logits = model.itm_logits(enc.embeds, b_ids, b_mask)
            itm.append(logits.float().softmax(-1)[:, 1].cpu())
    itc_t = torch.cat(itc) if itc else torch.zeros(0)
    return PairScores(torch.cat(itm) if itm else torch.zeros(0), itc_t, itc_t / temperature)
