"""The captioner and the filter: what CapFilt asks of each (two small protocols, the seam tests
plant their own behind), their implementations over a `BlipPretrain`, and checkpoint loading.

- A :class:`Captioner` turns a batch of images into ``num_captions`` captions per image, each
  image's sampling seeded by the caller (so a caption depends on the image and its seed only).
- A :class:`Scorer` scores text rows against images: ITM probability of "match" and ITC cosine
  similarity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

from blip_recipes.data import normalize_images, pre_caption
from blip_recipes.data._seeding import derive_seed
from blip_recipes.evaluation.generation import DEFAULT_PROMPT, generate, prompt_ids
from blip_recipes.models.inputs import model_image_size


class TextScores(NamedTuple):
    """Scores of R text rows against their images, each (R,) float32 on the CPU."""

    itm: torch.Tensor
    """ITM probability of "match" in [0, 1]."""
    itc: torch.Tensor
    """ITC cosine similarity in [-1, 1]."""


class Captioner(Protocol):
    """Synthetic captions for images."""

    image_size: int
    """Side the images are given at (eval transform)."""

    def __call__(self, images: torch.Tensor, seeds: Sequence[int]) -> list[list[str]]:
        """images: uint8 (B, 3, S, S); seeds: B ints -> B lists of captions (prompt stripped)."""
        ...


class Scorer(Protocol):
    """Image-text match scores."""

    image_size: int
    """Side the images are given at (eval transform)."""

    def __call__(
        self, images: torch.Tensor, texts: Sequence[str], image_rows: torch.Tensor
    ) -> TextScores:
        """images: uint8 (B, 3, S, S); texts: R raw captions; image_rows: (R,) int64, the image
        of each text -> :class:`TextScores` of the R rows."""
        ...


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    weight = model.visual_encoder.patch_embed.proj.weight
    return weight.device, weight.dtype


class ModelCaptioner:
    """Nucleus sampling through a `BlipPretrain`'s decoder (:func:`blip_recipes.evaluation.generation.generate`).

    Caption ``n`` of an image given seed ``s`` is drawn with its own generator seeded by
    ``derive_seed(s, n)``: it does not depend on the batch or on other images.

    Args:
        model: the captioning model (eval mode is set here).
        tokenizer: its tokenizer.
        num_captions: captions per image.
        prompt: decoder prompt (stripped from the captions).
        max_length, min_length: token lengths, `[DEC]` and prompt included.
        top_p, top_k: nucleus mass and top-k limit (0 = none).
        repetition_penalty: CTRL penalty on generated tokens.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, num_captions: int = 1, *,
                 prompt: str = DEFAULT_PROMPT, max_length: int = 20, min_length: int = 5,
                 top_p: float = 0.9, top_k: int = 50,
                 repetition_penalty: float = 1.1) -> None:  # fmt: skip
        self.model, self.tokenizer = model.eval(), tokenizer
        self.num_captions = num_captions
        self.prompt = prompt_ids(tokenizer, prompt)
        self.options = dict(max_length=max_length, min_length=min_length, top_p=top_p,
                            top_k=top_k, repetition_penalty=repetition_penalty)  # fmt: skip
        self.image_size = model_image_size(model)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, seeds: Sequence[int]) -> list[list[str]]:
        if images.shape[0] == 0:
            return []
        device, dtype = _device_dtype(self.model)
        n = self.num_captions
        pixels = normalize_images(images.to(device), dtype).repeat_interleave(n, dim=0)
        generators = [torch.Generator(device).manual_seed(derive_seed(seed, i))
                      for seed in seeds for i in range(n)]  # fmt: skip
        outs = generate(self.model, pixels, self.prompt, self.tokenizer.sep_token_id,
                        self.tokenizer.pad_token_id, "nucleus", generator=generators,
                        **self.options)  # fmt: skip
        texts = [self.tokenizer.decode(ids.tolist()).strip() for ids in outs]
        return [texts[b * n : (b + 1) * n] for b in range(images.shape[0])]


class ModelScorer:
    """ITM (`[ENC]` first, image-grounded text encoder) and ITC of a `BlipPretrain`, each image
    encoded once for all its texts. Texts are cleaned like the reference evaluation.

    Args:
        model: the filtering model (eval mode is set here).
        tokenizer: its tokenizer.
        text_max_length: tokens per text (35 in the reference's retrieval).
        max_words: words kept by the cleaning.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, text_max_length: int = 35,
                 max_words: int = 30) -> None:  # fmt: skip
        self.model, self.tokenizer = model.eval(), tokenizer
        self.text_max_length, self.max_words = text_max_length, max_words
        self.image_size = model_image_size(model)

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, texts: Sequence[str], image_rows: torch.Tensor
    ) -> TextScores:
        if len(texts) == 0:
            return TextScores(torch.zeros(0), torch.zeros(0))
        device, dtype = _device_dtype(self.model)
        image = self.model.encode_image(normalize_images(images.to(device), dtype))
        cleaned = [pre_caption(t, self.max_words) for t in texts]
        ids, mask = self.tokenizer(cleaned, max_length=self.text_max_length)
        ids, mask, rows = ids.to(device), mask.to(device), image_rows.to(device)
        text_feat = self.model.encode_text(ids, mask).feat
        itc = (image.feat[rows].float() * text_feat.float()).sum(-1)
        logits = self.model.itm_logits(image.embeds, ids, mask, image_rows=rows)
        return TextScores(logits.float().softmax(-1)[:, 1].cpu(), itc.cpu())


def load_checkpoint(path: str, fallback_tokenizer: Any = None, model_name: str | None = None,
                    device: torch.device | str = "cpu") -> tuple[nn.Module, Any, str]:  # fmt: skip
    """A `BlipPretrain` and its tokenizer from any checkpoint :func:`read_weights` reads.

    The tokenizer is the one recorded with the checkpoint when it can be built here, else
    ``fallback_tokenizer`` (the config's [tokenizer]).

    Returns:
        (model in eval mode on ``device``, tokenizer, a description of where the tokenizer came
        from for the log).

    Raises:
        ValueError: no tokenizer recorded and no fallback.
    """
    from blip_recipes.interop.loading import build_model_from_weights, tokenizer_from_weights
    from blip_recipes.interop.readers import read_weights

    weights = read_weights(path)
    tokenizer, where = tokenizer_from_weights(weights), "recorded with the checkpoint"
    if tokenizer is None:
        if fallback_tokenizer is None:
            raise ValueError(f"{path}: no tokenizer recorded with it; configure [tokenizer]")
        tokenizer, where = fallback_tokenizer, "the config's [tokenizer]"
    recorded = weights.model_args or weights.hf_config
    model = build_model_from_weights(
        weights, model_name=None if recorded else model_name, tokenizer=tokenizer
    )
    return model.to(device).eval(), tokenizer, where


__all__ = [
    "Captioner",
    "ModelCaptioner",
    "ModelScorer",
    "Scorer",
    "TextScores",
    "load_checkpoint",
]
