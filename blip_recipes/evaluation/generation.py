"""Image captioning with the BLIP decoder: greedy, beam search and nucleus sampling.

The decoder input is `[DEC] prompt-tokens` (the reference prompt is "a picture of ", whose
`[CLS]` becomes `[DEC]` and whose `[SEP]` is dropped); generation stops at `[SEP]`. Lengths
follow Hugging Face `generate` (and so the reference): `max_length` / `min_length` count the
whole sequence, prompt included. The returned captions exclude the prompt.

Decoding runs through the model's entry points (`encode_image`, `next_token_logits`), so an
FSDP2-sharded model works as it is. The image tokens' cross-attention keys/values are computed
once per image and reused at every step; all beams of an image attend them as one packed query
sequence. The causal self-attention is recomputed over the prefix each step (no self-attention KV
cache: the MED layer has none), which is cheap at caption lengths.

    captions = caption_images(model, tokenizer, ["cat.jpg"], method="beam", num_beams=3)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from blip_recipes.data import build_eval_transform, normalize_images
from blip_recipes.evaluation._dist import is_sharded

Method = Literal["greedy", "beam", "nucleus"]
DEFAULT_PROMPT = "a picture of "


class _Decoder:
    """Next-token logits for prefixes through the model's `next_token_logits` entry point,
    reusing the images' cross-attention keys/values after the first step."""

    def __init__(self, model: nn.Module, image_embeds: torch.Tensor, rows_per_image: int) -> None:
        self.model = model
        self.image_embeds: torch.Tensor | None = image_embeds
        self.rows_per_image = rows_per_image
        self.cross_kv = None

    def __call__(self, seq: torch.Tensor) -> torch.Tensor:
        """seq (M * k, L) prefixes, image-major -> (M * k, V) fp32 logits of token L + 1."""
        logits, self.cross_kv = self.model.next_token_logits(
            seq, self.image_embeds, self.cross_kv, self.rows_per_image
        )
        self.image_embeds = None
        return logits


def _repetition_penalty(scores: torch.Tensor, seq: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every token already in `seq` (as Hugging Face applies it)."""
    if penalty == 1.0:
        return scores
    picked = scores.gather(1, seq)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, seq, picked)


def _block_eos(scores: torch.Tensor, length: int, min_length: int, eos: int) -> torch.Tensor:
    if length < min_length:
        scores = scores.clone()
        scores[:, eos] = -float("inf")
    return scores


def _top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask all but the `top_k` most likely tokens and the smallest set whose mass reaches
    `top_p` (at least one token is always kept)."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token
        remove[:, 0] = False
        logits = logits.masked_fill(remove.scatter(1, order, remove), -float("inf"))
    return logits


def _sample(
    probs: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None
) -> torch.Tensor:
    """One token per row of probs (R, V): from one generator for all rows, or from each row's
    own generator (a sequence of R), so that a row's draws do not depend on the other rows."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    if len(generator) != probs.shape[0]:
        raise ValueError(f"{len(generator)} generators for {probs.shape[0]} rows")
    return torch.cat([torch.multinomial(row[None], 1, generator=g)[0]
                      for row, g in zip(probs, generator)])  # fmt: skip


def _greedy_or_sample(decoder, prompt, batch, max_length, min_length, eos, pad, penalty,
                      sample, top_k, top_p, temperature, generator, stop_early):  # fmt: skip
    seq = prompt.expand(batch, -1).clone()
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt.device)
    while seq.shape[1] < max_length:
        scores = _repetition_penalty(decoder(seq), seq, penalty)
        scores = _block_eos(scores, seq.shape[1], min_length, eos)
        if sample:
            scores = _top_k_top_p(scores / temperature, top_k, top_p)
            probs = scores.softmax(dim=-1)
            token = _sample(probs, generator)
        else:
            token = scores.argmax(dim=-1)
        token = torch.where(finished, torch.full_like(token, pad), token)
        seq = torch.cat([seq, token[:, None]], dim=1)
        finished |= token == eos
        if stop_early and bool(finished.all()):
            break
    out = []
    for row in seq[:, prompt.shape[1] :]:
        ends = (row == eos).nonzero()
        out.append(row[: int(ends[0])] if len(ends) else row)
    return out


def _beam_search(decoder, prompt, batch, num_beams, max_length, min_length, eos, penalty,
                 length_penalty, stop_early):  # fmt: skip
    """Beam search with Hugging Face's bookkeeping (transformers 5, `early_stopping=False`).

    Each step keeps the 2K best continuations of an image's K beams; those among the first K
    that end in EOS (or reach `max_length`) become hypotheses scored by sum of log-probs /
    generated length ** length_penalty (EOS counted); the K best non-EOS ones run on. An image is
    done once it has K hypotheses and its best running beam, normalised by the current length,
    cannot beat the worst of them.
    """
    device, k, prompt_len = prompt.device, num_beams, prompt.shape[1]
    seq = prompt.expand(batch * k, -1).clone()
    beam_scores = torch.full((batch, k), -1e9, device=device)
    beam_scores[:, 0] = 0.0
    beam_scores = beam_scores.view(-1)
    hyps: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(batch)]
    done = [False] * batch

    def add(b: int, score: float, tokens: torch.Tensor) -> None:
        hyps[b].append((score, tokens))
        hyps[b].sort(key=lambda h: -h[0])
        del hyps[b][k:]

    while seq.shape[1] < max_length:
        scores = torch.log_softmax(decoder(seq), dim=-1)
        scores = _repetition_penalty(scores, seq, penalty)
        scores = _block_eos(scores, seq.shape[1], min_length, eos)
        vocab = scores.shape[-1]
        total = (scores + beam_scores[:, None]).view(batch, k * vocab)
        top_scores, top_index = torch.topk(total, 2 * k, dim=1)
        last = seq.shape[1] + 1 >= max_length
        generated = seq.shape[1] + 1 - prompt_len
        next_beams, next_tokens, next_scores = [], [], []
        for b in range(batch):
            candidates = list(zip(top_scores[b].tolist(), top_index[b].tolist()))
            running = []
            for rank, (score, index) in enumerate(candidates):
                beam, token = b * k + index // vocab, index % vocab
                if not done[b] and rank < k and (token == eos or last):
                    tokens = seq[beam, prompt_len:]
                    if token != eos:
                        tokens = torch.cat([tokens, tokens.new_tensor([token])])
                    add(b, score / generated**length_penalty, tokens.clone())
                if token != eos and len(running) < k:
                    running.append((beam, token, score))
            if not done[b] and len(hyps[b]) == k:
                best_running = running[0][2] / generated**length_penalty
                done[b] = hyps[b][-1][0] >= best_running
            for beam, token, score in running:
                next_beams.append(beam)
                next_tokens.append(token)
                next_scores.append(score)
        if last or (stop_early and all(done)):
            break
        beam_idx = torch.tensor(next_beams, device=device)
        token_t = torch.tensor(next_tokens, device=device)
        seq = torch.cat([seq.index_select(0, beam_idx), token_t[:, None]], dim=1)
        beam_scores = torch.tensor(next_scores, device=device, dtype=beam_scores.dtype)
    return [hyps[b][0][1] if hyps[b] else seq[b * k, prompt_len:] for b in range(batch)]


@torch.no_grad()
def generate(
    model: nn.Module,
    images: torch.Tensor,
    prompt_ids: torch.Tensor,
    eos_token_id: int,
    pad_token_id: int = 0,
    method: Method = "beam",
    max_length: int = 30,
    min_length: int = 5,
    num_beams: int = 3,
    top_p: float = 0.9,
    top_k: int = 50,
    temperature: float = 1.0,
    repetition_penalty: float = 1.0,
    length_penalty: float = 1.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> list[torch.Tensor]:
    """Decode captions for a batch of images.

    Args:
        model: a `BlipPretrain` (visual encoder, MED decoder, LM head); eval mode is the caller's.
        images: (B, 3, H, W) normalised images.
        prompt_ids: (P,) int64 decoder prefix, `[DEC]` first (see :func:`prompt_ids`).
        eos_token_id: `[SEP]`.
        pad_token_id: fills finished rows in greedy / nucleus decoding.
        method: "greedy", "beam" or "nucleus" (top-k + top-p sampling).
        max_length: longest sequence, prompt included.
        min_length: `[SEP]` is forbidden before this length (prompt included).
        num_beams: beams per image ("beam").
        top_p, top_k, temperature: sampling filters ("nucleus"; the reference uses top_p 0.9
            with Hugging Face's default top_k 50).
        repetition_penalty: CTRL penalty on tokens already generated (reference: 1.0 for beam,
            1.1 for nucleus).
        length_penalty: exponent of the length normalisation of finished beams.
        generator: RNG for sampling: one for the batch, or one per image (B generators), which
            makes each image's caption independent of the batch it is decoded in.

    Returns:
        B tensors of generated token ids (prompt and `[SEP]` excluded).
    """
    if method not in ("greedy", "beam", "nucleus"):
        raise ValueError(f"unknown decoding method {method!r}: greedy, beam or nucleus")
    if prompt_ids.dim() != 1 or prompt_ids.numel() == 0:
        raise ValueError("prompt_ids must be a non-empty 1-d tensor starting with [DEC]")
    # Eager: a prefix that grows by one token per step would recompile compiled blocks per length.
    with torch.compiler.set_stance("force_eager"):
        image_embeds = model.encode_image(images).embeds
        decoder = _Decoder(model, image_embeds, num_beams if method == "beam" else 1)
        prompt = prompt_ids.to(image_embeds.device)[None, :]
        stop_early = not is_sharded(model)  # FSDP2 forwards are collectives: same count per rank
        return decode(decoder, prompt, images.shape[0], eos_token_id, pad_token_id, method,
                      max_length, min_length, num_beams, top_p, top_k, temperature,
                      repetition_penalty, length_penalty, generator, stop_early)  # fmt: skip


def decode(
    decoder: Callable[[torch.Tensor], torch.Tensor],
    prompt: torch.Tensor,
    batch: int,
    eos_token_id: int,
    pad_token_id: int = 0,
    method: Method = "beam",
    max_length: int = 30,
    min_length: int = 5,
    num_beams: int = 3,
    top_p: float = 0.9,
    top_k: int = 50,
    temperature: float = 1.0,
    repetition_penalty: float = 1.0,
    length_penalty: float = 1.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    stop_early: bool = True,
) -> list[torch.Tensor]:
    """The decoding loop of :func:`generate` over any next-token function (VQA's answer decoder
    uses it too).

    Args:
        decoder: (rows, T) prefixes, source-major (`num_beams` rows per source for "beam", one
            otherwise) -> (rows, V) fp32 logits of the next token.
        prompt: (1, P) int64 decoder prefix.
        batch: number of sources (images, questions).
        stop_early: stop once every row is finished (False with FSDP2: same call count per rank).
        others: as :func:`generate`.

    Returns:
        `batch` tensors of generated ids (prompt and EOS excluded).
    """
    if method == "beam":
        return _beam_search(decoder, prompt, batch, num_beams, max_length, min_length,
                            eos_token_id, repetition_penalty, length_penalty,
                            stop_early)  # fmt: skip
    return _greedy_or_sample(decoder, prompt, batch, max_length, min_length, eos_token_id,
                             pad_token_id, repetition_penalty, method == "nucleus", top_k,
                             top_p, temperature, generator, stop_early)  # fmt: skip


def prompt_ids(tokenizer: Any, prompt: str = DEFAULT_PROMPT) -> torch.Tensor:
    """`[DEC] prompt-tokens` (the tokenizer's `[CLS]` replaced, its `[SEP]` and padding dropped)."""
    ids, mask = tokenizer([prompt], max_length=max(16, 4 * len(prompt.split()) + 4))
    length = int(mask[0].sum())
    out = ids[0, : length - 1].clone()
    out[0] = tokenizer.dec_token_id
    return out


@torch.no_grad()
def caption_images(
    model: nn.Module,
    tokenizer: Any,
    images: Sequence[Any] | torch.Tensor,
    prompt: str = DEFAULT_PROMPT,
    method: Method = "beam",
    image_size: int | None = None,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    include_prompt: bool = False,
    **generate_kwargs: Any,
) -> list[str]:
    """Captions for images given as paths, bytes, PIL images, uint8 (3, s, s) tensors or a
    normalised float (B, 3, s, s) batch.

    Args:
        model: a `BlipPretrain`; evaluated in eval mode (its mode is restored afterwards).
        tokenizer: the run's tokenizer (`[DEC]`, `[SEP]`, decoding).
        images: what to caption.
        prompt: decoder prompt ("a picture of " in the reference; "" for none).
        method: "greedy", "beam" or "nucleus".
        image_size: input side; default the model's native size.
        batch_size: images per decoding batch.
        device: default the model's device.
        include_prompt: prefix each caption with the prompt text.
        generate_kwargs: :func:`generate` options (max_length, min_length, num_beams, top_p, ...).

    Returns:
        One caption per image.

    Example:
        >>> caption_images(model, tokenizer, ["dog.jpg"], method="greedy")  # doctest: +SKIP
        ['a dog running on the grass']
    """
    from blip_recipes.models.inputs import model_image_size

    was_training = model.training
    model.eval()
    prefix = prompt_ids(tokenizer, prompt)
    try:
        weight = model.visual_encoder.patch_embed.proj.weight
        device = torch.device(device) if device is not None else weight.device
        if isinstance(images, torch.Tensor) and images.is_floating_point():
            pixels_all = images
        else:
            transform = build_eval_transform(image_size or model_image_size(model))
            items = [img if isinstance(img, torch.Tensor) else transform(img) for img in images]
            pixels_all = normalize_images(torch.stack(items))
        captions = []
        for start in range(0, pixels_all.shape[0], batch_size):
            pixels = pixels_all[start : start + batch_size].to(device)
            outs = generate(model, pixels, prefix, tokenizer.sep_token_id,
                            tokenizer.pad_token_id, method, **generate_kwargs)  # fmt: skip
            captions += [tokenizer.decode(ids.tolist()).strip() for ids in outs]
    finally:
        model.train(was_training)
    if include_prompt:
        captions = [prompt + c for c in captions]
    return captions


__all__ = ["DEFAULT_PROMPT", "Method", "caption_images", "decode", "generate", "prompt_ids"]
