"""Caption evaluation: split loading, decoding across ranks, scoring, the results file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blip_recipes.evaluation.captioning import (
    CaptionData,
    CaptionEvalResult,
    evaluate_captions,
    generate_captions,
    image_id_of,
    load_caption_data,
    score_captions,
)
from blip_recipes.evaluation.generation import caption_images
from blip_recipes.parallel._testing import spawn_ranks
from tests.evaluation.eval_helpers import tiny_data, tiny_model, tokenizer

GENERATE = dict(num_beams=2, max_length=10, min_length=3, batch_size=2)


def split(n_images: int = 5, refs: list[list[str]] | None = None) -> CaptionData:
    data = tiny_data(n_images=n_images, per_image=2, seed=3)
    refs = refs or [[data.texts[i] for i in rows] for rows in data.img2txt]
    return CaptionData(list(data.images), refs, list(range(100, 100 + n_images)))


def test_load_caption_data_reads_references_and_coco_ids(tmp_path):
    records = [
        {"image": "val2014/COCO_val2014_000000391895.jpg", "caption": ["a man", "a person"]},
        {"image": "val2014/COCO_val2014_000000000042.jpg", "caption": "one caption"},
    ]
    (tmp_path / "val.json").write_text(json.dumps(records))
    data = load_caption_data(str(tmp_path / "val.json"), "root")
    assert data.image_ids == [391895, 42]
    assert data.references == [["a man", "a person"], ["one caption"]]
    assert data.images[0] == "root/val2014/COCO_val2014_000000391895.jpg"
    records[1]["image"] = "other/COCO_val2014_000000391895.jpg"  # same id twice: positions
    (tmp_path / "val.json").write_text(json.dumps(records))
    assert load_caption_data(str(tmp_path / "val.json")).image_ids == [0, 1]
    assert image_id_of("flickr/cat.jpg") == "cat"


def test_caption_data_checks_its_lengths():
    with pytest.raises(ValueError, match="must match"):
        CaptionData(["a.jpg"], [["x"], ["y"]], [0])
    with pytest.raises(ValueError, match="without reference"):
        CaptionData(["a.jpg"], [[]], [0])


def test_generate_captions_equals_caption_images_and_keeps_mode():
    model, tok, data = tiny_model().train(), tokenizer(), split()
    captions = generate_captions(model, tok, data.images, **GENERATE)
    expected = caption_images(model, tok, list(data.images), method="beam",
                              **{k: v for k, v in GENERATE.items() if k != "batch_size"})  # fmt: skip
    assert captions == expected and len(captions) == 5
    assert model.training


def test_score_captions_and_results_file(tmp_path):
    data = split(3)
    perfect = [refs[0] for refs in data.references]
    metrics = score_captions(perfect, data)
    assert metrics["Bleu_1"] == pytest.approx(1.0)
    assert metrics["score"] == pytest.approx(metrics["CIDEr"] + metrics["Bleu_4"])
    worse = score_captions(["red"] * 3, data)
    assert worse["score"] < metrics["score"]
    with pytest.raises(ValueError, match="2 captions for 3 images"):
        score_captions(perfect[:2], data)
    path = CaptionEvalResult(perfect, metrics).write(data, tmp_path / "out" / "val.json")
    assert json.loads(path.read_text()) == [
        {"image_id": 100 + i, "caption": c} for i, c in enumerate(perfect)
    ]


def eval_worker(rank: int, world: int, out_dir: str, refs: list[list[str]]) -> None:
    """One gloo rank: evaluate the split with a replicated, then an FSDP2-sharded model; every
    rank saves its results."""
    from torch.distributed.device_mesh import init_device_mesh

    from blip_recipes.config.sections import ParallelConfig
    from blip_recipes.parallel import parallelize_blip

    torch.set_num_threads(1)
    sharded = tiny_model()
    parallelize_blip(sharded, None, ParallelConfig(), init_device_mesh("cpu", (world,)))
    for name, model in (("replicated", tiny_model()), ("fsdp", sharded)):
        result = evaluate_captions(model, tokenizer(), split(refs=refs), **GENERATE)
        out = {"captions": result.captions, "metrics": result.metrics}
        (Path(out_dir) / f"{name}_rank{rank}.json").write_text(json.dumps(out))


def test_two_ranks_equal_one_process(tmp_path):
    """5 images over 2 ranks (3 + 2, batches of 2: rank 1 decodes a dummy batch under FSDP2),
    replicated and FSDP2-sharded: the same captions and scores as one process, on every rank."""
    captions = generate_captions(tiny_model(), tokenizer(), split().images, **GENERATE)
    # references that share n-grams with the captions, so that the scores are not all zero
    refs = [[captions[i], f"{captions[(i + 1) % 5]} red"] for i in range(5)]
    single = evaluate_captions(tiny_model(), tokenizer(), split(refs=refs), **GENERATE)
    assert single.captions == captions and 0 < single.metrics["CIDEr"] < 10
    spawn_ranks(eval_worker, 2, tmp_path, str(tmp_path), refs)
    for name in ("replicated", "fsdp"):
        for rank in range(2):
            got = json.loads((tmp_path / f"{name}_rank{rank}.json").read_text())
            assert got["captions"] == single.captions, (name, rank)
            assert got["metrics"] == pytest.approx(single.metrics, rel=1e-12)
