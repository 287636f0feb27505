"""NLVR2-style annotations, the pair augmentation and the pair training loader."""

from __future__ import annotations

import json
import random

import pytest
import torch

from blip_recipes.config.sections import DataConfig
from blip_recipes.data.nlvr import (
    augment_pair,
    build_nlvr_train_loader,
    load_nlvr_annotations,
    swap_sides,
)
from blip_recipes.data.sources import AnnotationError
from tests.data.nlvr_pairs import write_nlvr_split


def test_swap_sides_and_augment():
    assert swap_sides("the left dog faces right") == "the right dog faces left"
    assert swap_sides("leftover rights") == "leftover rights"  # whole words only
    seen = set()
    for seed in range(40):
        left, right, sentence = augment_pair("a", "b", "a dog on the left", random.Random(seed))
        assert (left, right, sentence) in {("a", "b", "a dog on the left"),
                                           ("b", "a", "a dog on the right")}  # fmt: skip
        seen.add(left)
        same = augment_pair("a", "b", "two dogs", random.Random(seed))
        assert same[2] == "two dogs" and same[0] == left  # same draw, no side words
    assert seen == {"a", "b"}


def test_annotations_read_and_bad_records_named(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps([
        {"images": ["x/a.png", "x/b.png"], "sentence": "s", "label": "True"},
        {"images": ["x/c.png", "x/d.png"], "sentence": "t", "label": False},
    ]))  # fmt: skip
    examples = load_nlvr_annotations(path, "root")
    assert [e.label for e in examples] == [1, 0]
    assert examples[0].images == ("root/x/a.png", "root/x/b.png")
    for record, message in (
        ({"images": ["a"], "sentence": "s", "label": "True"}, "two paths"),
        ({"images": ["a", "b"], "sentence": "", "label": "True"}, "'sentence'"),
        ({"images": ["a", "b"], "sentence": "s", "label": "maybe"}, "True or False, got 'maybe'"),
        ({"images": ["a", "b"], "sentence": "s"}, "no 'label'"),
    ):
        path.write_text(json.dumps([record]))
        with pytest.raises(AnnotationError, match=f"dev.json record 0: .*{message}"):
            load_nlvr_annotations(path)


def test_pair_loader_batches_and_resume(tmp_path, synthetic_tokenizer):
    annotation = write_nlvr_split(tmp_path, "train", 12, seed=3, size=16)
    records = json.loads(annotation.read_text())
    tok = synthetic_tokenizer
    cfg = DataConfig(batch_size=4, num_workers=0, pin_memory=False, randaugment=False)

    def loader():
        return build_nlvr_train_loader(cfg, tok, str(annotation), str(tmp_path), 16, seed=0)

    first = loader()
    batch = next(first)
    assert batch["images"].shape == (8, 3, 16, 16) and batch["images"].dtype == torch.uint8
    assert batch["labels"].shape == (4,) and batch["input_ids"].shape[0] == 4
    assert set(batch["labels"].tolist()) <= {0, 1}
    assert sum(r["label"] == "True" for r in records) == 6
    state = first.state_dict()
    expected = next(first)
    again = loader()
    again.load_state_dict(state)
    got = next(again)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert first.steps_per_epoch == 3
