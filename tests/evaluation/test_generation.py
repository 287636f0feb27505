"""Captioning: greedy and beam search equal transformers' BlipForConditionalGeneration.generate
on the same weights, are deterministic; nucleus sampling follows its generator; the prompt and
[DEC] handling; caption_images from files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from blip_recipes.evaluation.generation import caption_images, generate, prompt_ids
from blip_recipes.interop import hf_blip_config, ours_to_hf_captioning
from tests.evaluation.eval_helpers import tiny_model, tokenizer

transformers = pytest.importorskip("transformers")
PROMPT = "a picture of "


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny ops: one intra-op thread avoids OpenMP contention on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup():
    tok = tokenizer()
    model = tiny_model(seed=5)
    with torch.no_grad():  # sharpen the LM so that captions are not all alike
        model.lm_head.bias.add_(
            torch.randn(model.lm_head.bias.shape, generator=torch.Generator().manual_seed(0)) * 2
        )
    config = hf_blip_config(
        model, label_smoothing=0.1, sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id
    )
    hf = transformers.BlipForConditionalGeneration(config).eval()
    hf.load_state_dict(ours_to_hf_captioning(model.state_dict()), strict=True)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return tok, model, hf, images


def _hf_generate(hf, tok, images, **kwargs):
    ids, mask = tok([PROMPT] * images.shape[0], max_length=16)
    length = int(mask[0].sum())
    with torch.no_grad():
        out = hf.generate(
            pixel_values=images,
            input_ids=ids[:, :length],
            attention_mask=mask[:, :length],
            **kwargs,
        )
    prompt_len = length - 1
    result = []
    for row in out[:, prompt_len:]:
        ends = (row == tok.sep_token_id).nonzero()
        row = row[: int(ends[0])] if len(ends) else row
        result.append(row[row != tok.pad_token_id].tolist())
    return result


def test_prompt_ids_put_dec_first_and_drop_sep(setup):
    tok = setup[0]
    ids = prompt_ids(tok, PROMPT)
    assert ids[0] == tok.dec_token_id and tok.sep_token_id not in ids.tolist()
    assert tok.decode(ids[1:]) == "a picture of"
    assert prompt_ids(tok, "").tolist() == [tok.dec_token_id]


@pytest.mark.parametrize("min_length", [1, 12])
def test_greedy_equals_transformers(setup, min_length):
    tok, model, hf, images = setup
    ours = generate(model, images, prompt_ids(tok, PROMPT), tok.sep_token_id, method="greedy",
                    max_length=20, min_length=min_length)  # fmt: skip
    theirs = _hf_generate(
        hf, tok, images, max_length=20, min_length=min_length, num_beams=1, do_sample=False
    )
    assert [o.tolist() for o in ours] == theirs
    assert all(len(o) + 4 >= min_length for o in ours)


@pytest.mark.parametrize("num_beams", [2, 3])
def test_beam_search_equals_transformers(setup, num_beams):
    tok, model, hf, images = setup
    ours = generate(model, images, prompt_ids(tok, PROMPT), tok.sep_token_id, method="beam",
                    num_beams=num_beams, max_length=16, min_length=5)  # fmt: skip
    theirs = _hf_generate(
        hf, tok, images, max_length=16, min_length=5, num_beams=num_beams, do_sample=False
    )
    assert [o.tolist() for o in ours] == theirs


def test_greedy_and_beam_are_deterministic_and_nucleus_follows_its_generator(setup):
    tok, model, _, images = setup
    for method in ("greedy", "beam"):
        a = caption_images(model, tok, images, method=method, max_length=15)
        assert a == caption_images(model, tok, images, method=method, max_length=15)
    sample = lambda seed: caption_images(model, tok, images, method="nucleus", max_length=15,  # noqa: E731
                                         generator=torch.Generator().manual_seed(seed))  # fmt: skip
    assert sample(0) == sample(0)
    assert any(sample(0) != sample(s) for s in (1, 2, 3))


def test_caption_images_from_files(setup, tmp_path):
    tok, model, _, _ = setup
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (50, 40, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
        paths.append(str(tmp_path / f"{i}.png"))
    model.train()
    captions = caption_images(
        model, tok, paths, method="greedy", max_length=12, include_prompt=True
    )
    assert model.training
    assert len(captions) == 2 and all(c.startswith(PROMPT) for c in captions)
    with pytest.raises(ValueError, match="unknown decoding method"):
        caption_images(model, tok, paths, method="topk")
