"""Zero-shot classification: prompt averaging, top-k counting and the ITM rerank, checked with
a constructed model whose scores are known."""

from __future__ import annotations

import json
from typing import NamedTuple

import pytest
import torch
from PIL import Image
from torch import nn

from blip_recipes.data.sources import AnnotationError
from blip_recipes.evaluation.zeroshot import (
    class_features,
    evaluate_zeroshot,
    load_annotated,
    load_image_folder,
    prompts,
    topk_correct,
)

CLASSES = ["c0", "c1", "c2"]
TEMPLATES = ["{}", "a {}"]


class Encoded(NamedTuple):
    embeds: torch.Tensor
    feat: torch.Tensor


class FakeTokenizer:
    """Row i: [class index of the text, template index]."""

    def __call__(self, texts, max_length=None):
        ids = [[int(t.split("c")[-1]), 1 if t.startswith("a ") else 0] for t in texts]
        return torch.tensor(ids), torch.ones(len(texts), 2, dtype=torch.long)


class FakeModel(nn.Module):
    """ITC: an image of class t (pixel value 60 t) is closest to class t + 1, then t; text
    feature of (class c, template j) leans on axis c, tilted per template. ITM: +5 for the
    true class only."""

    def encode_text(self, ids, mask):
        feat = torch.nn.functional.one_hot(ids[:, 0], 3).float() * 2 + 0.5 * ids[:, 1:2]
        return Encoded(None, torch.nn.functional.normalize(feat, dim=-1))

    def encode_image(self, images):
        true = (images[:, 0, 0, 0] * 0.26862954 + 0.48145466) * 255 / 60
        true = true.round().long()
        feat = 0.8 * torch.nn.functional.one_hot(
            (true + 1) % 3, 3
        ) + 0.6 * torch.nn.functional.one_hot(true, 3)
        return Encoded(true.float()[:, None, None], feat.float())

    def itm_logits(self, embeds, ids, mask, image_rows):
        true = embeds[image_rows, 0, 0].long()
        return torch.stack([torch.zeros(len(ids)), 5.0 * (ids[:, 0] == true)], dim=1)


@pytest.fixture
def folder(tmp_path):
    for label in range(3):
        (tmp_path / f"c{label}").mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8), (60 * label,) * 3).save(tmp_path / f"c{label}" / f"{i}.png")
    return tmp_path


def test_prompt_features_are_normalised_means():
    assert prompts(CLASSES, TEMPLATES) == ["c0", "a c0", "c1", "a c1", "c2", "a c2"]
    model, tok = FakeModel(), FakeTokenizer()
    feats = class_features(model, tok, CLASSES, TEMPLATES, torch.device("cpu"), batch_size=4)
    per = model.encode_text(*tok(prompts(CLASSES, TEMPLATES))).feat.view(3, 2, 3)
    expected = per.mean(1) / per.mean(1).norm(dim=-1, keepdim=True)
    torch.testing.assert_close(feats, expected)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(3))


def test_topk_counts_by_hand():
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.3, 0.1], [0.0, 0.2, 0.1]])
    labels = torch.tensor([2, 1, 0])
    # row 0: order 1, 2, 0 (label 2 second); row 1: tie -> 0 before 1; row 2: label last
    assert topk_correct(scores, labels, (1, 2, 5)) == {1: 0, 2: 2, 5: 3}


def test_itc_top1_and_itm_rerank_on_a_constructed_model(folder):
    data = load_image_folder(folder)
    assert data.classes == CLASSES and data.labels == [0, 0, 1, 1, 2, 2]
    args = (FakeModel(), FakeTokenizer(), data, TEMPLATES)
    plain = evaluate_zeroshot(*args, image_size=8, device=torch.device("cpu"), batch_size=4)
    assert plain.metrics["top1"] == 0.0 and plain.metrics["top5"] == 100.0  # true class second
    assert plain.metrics["chance_top1"] == pytest.approx(100 / 3)
    reranked = evaluate_zeroshot(*args, image_size=8, device=torch.device("cpu"), batch_size=4,
                                 rerank_k=2)  # fmt: skip
    assert reranked.metrics["rerank_top1"] == 100.0 and reranked.metrics["top1"] == 0.0
    assert reranked.ranking[:, 0].tolist() == data.labels
    # the class left out of the top-2 stays last
    assert all(row[2] == (label + 2) % 3 for row, label in zip(reranked.ranking.tolist(),
                                                               data.labels))  # fmt: skip
    records = reranked.records(data)
    assert records[0]["label"] == "c0" and records[0]["predictions"][0] == "c0"


def test_annotation_with_class_list(tmp_path, folder):
    (tmp_path / "classes.json").write_text(json.dumps(["c0", "c_1", "c2"]))
    records = [{"image": "c1/0.png", "label": "c 1"}, {"image": "c2/0.png", "label": 2}]
    (tmp_path / "ann.json").write_text(json.dumps(records))
    data = load_annotated(tmp_path / "ann.json", tmp_path / "classes.json", str(folder))
    assert data.classes == ["c0", "c 1", "c2"] and data.labels == [1, 2]
    (tmp_path / "ann.json").write_text(json.dumps([{"image": "x.png", "label": "dog"}]))
    with pytest.raises(AnnotationError, match="record 0: label 'dog' is not one of the 3"):
        load_annotated(tmp_path / "ann.json", tmp_path / "classes.json")
