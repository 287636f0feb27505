"""Fixtures for data tests: tiny vocabularies, images and annotation files built in tmp_path."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from PIL import Image

from blip_recipes.config import TokenizerConfig
from blip_recipes.data import build_tokenizer

WORDS = ["a", "red", "circle", "dog", "on", "the", "beach", "##s", "running", "photo", "of"]


@pytest.fixture
def bert_vocab_file(tmp_path):
    """A BERT-layout vocab.txt: [PAD]=0, [unused0..98], [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103."""
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)]
    tokens += ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(tokens) + "\n")
    return path


@pytest.fixture
def tiktoken_file(tmp_path):
    """A .tiktoken file: the 256 bytes plus a few merges."""
    ranks = [bytes([b]) for b in range(256)] + [b"re", b"red", b" red", b"ci", b"cir"]
    path = tmp_path / "tiny.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)))
    return path


@pytest.fixture(scope="session")
def synthetic_tokenizer():
    return build_tokenizer(TokenizerConfig(kind="synthetic"))


@pytest.fixture
def make_image():
    """``make_image(path, size=(64, 48), mode="RGB", fmt=None, seed=0)`` writes a noise image."""
    return write_image


def write_image(path, size=(64, 48), mode="RGB", fmt=None, seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, format=fmt)
    return path


@pytest.fixture
def json_dataset(tmp_path):
    """12 JPEGs + BLIP JSON annotations; returns (annotation path, image root, records)."""
    root = tmp_path / "images"
    root.mkdir()
    records = []
    for i in range(12):
        write_image(root / f"{i:03d}.jpg", seed=i)
        records.append({"image": f"{i:03d}.jpg", "caption": f"A photo of dog {i}!"})
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(records))
    return ann, root, records
