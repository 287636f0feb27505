"""The model-backed captioner and filter: ITM/ITC equal the Python API's score_pairs; sampled
captions are a function of the image and its seed (not of the batch or the other images)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blip_recipes import api
from blip_recipes.capfilt import ModelCaptioner, ModelScorer
from tests.evaluation.eval_helpers import tiny_model, tokenizer


@pytest.fixture(scope="module")
def model_and_images():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8))
    return tiny_model(seed=3), images


def test_scorer_equals_score_pairs(model_and_images):
    model, images = model_and_images
    tok = tokenizer()
    texts = ["A red circle!", "two blue squares", "a green triangle", "RED", "left of a circle"]
    rows = torch.tensor([0, 0, 1, 3, 2])
    got = ModelScorer(model, tok, text_max_length=35, max_words=30)(images, texts, rows)
    expected = api.score_pairs(model, tok, list(images[rows]), texts)
    torch.testing.assert_close(got.itm, expected.itm, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.itc, expected.itc, atol=1e-6, rtol=0)
    assert got.itm.shape == (5,) and ((got.itm > 0) & (got.itm < 1)).all()


def test_captions_depend_on_the_image_and_its_seed_only(model_and_images):
    model, images = model_and_images
    captioner = ModelCaptioner(model, tokenizer(), num_captions=2)
    batch = captioner(images, [11, 12, 13, 14])
    assert len(batch) == 4 and all(len(c) == 2 for c in batch)
    assert captioner(images[2:3], [13]) == [batch[2]]  # alone, same seed: same captions
    assert captioner(images, [11, 12, 13, 14]) == batch  # again: same
    assert captioner(images[:1], [99]) != [batch[0]]  # another seed: other captions
    assert batch[0][0] != batch[0][1]  # the two captions of an image differ


def test_model_sides_are_the_checkpoints(model_and_images):
    model, _ = model_and_images
    assert ModelCaptioner(model, tokenizer()).image_size == 32
    assert ModelScorer(model, tokenizer()).image_size == 32
