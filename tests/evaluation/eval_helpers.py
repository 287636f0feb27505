"""Shared tiny evaluation set-up: a model, a synthetic tokenizer, random images and captions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from blip_recipes.config import TokenizerConfig
from blip_recipes.data import build_tokenizer
from blip_recipes.evaluation import RetrievalData, score_retrieval
from tests.models.tiny_blip import make_model

WORDS = ["red", "blue", "green", "circle", "square", "triangle", "small", "large", "on", "left"]


def tokenizer():
    return build_tokenizer(TokenizerConfig(kind="synthetic"))


def tiny_model(seed: int = 0):
    tok = tokenizer()
    return make_model(seed, vocab_size=tok.vocab_size, enc_token_id=tok.enc_token_id,
                      dec_token_id=tok.dec_token_id)  # fmt: skip


def tiny_data(
    n_images: int = 7, per_image: int = 2, size: int = 32, seed: int = 0
) -> RetrievalData:
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    images = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=gen)
              for _ in range(n_images)]  # fmt: skip
    texts, txt2img, img2txt = [], [], []
    for i in range(n_images):
        img2txt.append(list(range(len(texts), len(texts) + per_image)))
        for _ in range(per_image):
            texts.append(" ".join(rng.choice(WORDS, size=rng.integers(3, 8))))
            txt2img.append(i)
    return RetrievalData(images, texts, txt2img, img2txt)


def score_worker(rank: int, world: int, out_dir: str, fsdp: bool, k_test: int) -> None:
    """One gloo rank: score the tiny set (replicated or FSDP2 model), rank 0 saves the result."""
    torch.set_num_threads(1)
    model = tiny_model()
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh

        from blip_recipes.config.sections import ParallelConfig
        from blip_recipes.parallel import parallelize_blip

        mesh = init_device_mesh("cpu", (world,))
        parallelize_blip(model, None, ParallelConfig(), mesh)
    scores = score_retrieval(model, tokenizer(), tiny_data(), k_test=k_test, batch_size=3)
    torch.save(scores.__dict__, Path(out_dir) / f"scores_rank{rank}.pt")
    captions = tiny_captions(model, rank)
    (Path(out_dir) / f"captions_rank{rank}.json").write_text(json.dumps(captions))


def tiny_captions(model, rank: int = 0) -> dict[str, list[str]]:
    """Greedy and beam captions of (rank-dependent) tiny images: early stops differ by rank."""
    from blip_recipes.evaluation.generation import caption_images

    images = list(tiny_data(n_images=3, seed=rank).images)
    return {m: caption_images(model, tokenizer(), images, method=m, max_length=12, num_beams=2)
            for m in ("greedy", "beam")}  # fmt: skip
