"""VQA question files, their one-line errors, and the VQA training loader's batches."""

from __future__ import annotations

import json

import pytest
import torch

from blip_recipes.config.sections import DataConfig, DataSourceConfig
from blip_recipes.data.sources import AnnotationError
from blip_recipes.data.synthetic_vqa import write_synthetic_vqa
from blip_recipes.data.vqa import (
    answer_weights,
    build_vqa_train_loader,
    load_answer_list,
    load_vqa_records,
    pre_question,
)


def test_pre_question_and_weights():
    assert pre_question("What's on the TABLE?!  ") == "what's on the table?"
    assert pre_question("a b c d", max_words=2) == "a b"
    answers, weights = answer_weights(["2"] * 6 + ["3"] * 3 + ["many"])
    assert answers == ["2", "3", "many"] and weights == pytest.approx([0.6, 0.3, 0.1])
    assert answer_weights("yes") == (["yes"], [0.2])


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"image": "a.jpg", "answer": ["x"]}, "record 0: missing 'question'"),
        ({"image": "a.jpg", "question": "q?", "answer": []}, "record 0: 'answer' must be"),
        ({"image": "a.jpg", "question": "q?", "answer": [3]}, "record 0: 'answer' must be"),
        ({"image": "", "question": "q?", "answer": "x"}, "'image' must be a non-empty string"),
        ({"image": "a.jpg", "question": "q?"}, "record 0: missing 'answer'"),
        ({"image": "a.jpg", "question": "q?", "answer": "x", "question_id": [1]}, "question_id"),
    ],
)
def test_bad_records_name_file_record_and_key(tmp_path, record, message):
    path = tmp_path / "q.json"
    path.write_text(json.dumps([record]))
    with pytest.raises(AnnotationError, match=message) as info:
        load_vqa_records(str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_test_files_need_no_answers_and_ids_are_unique(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text('{"image": "a.jpg", "question": "q?"}\n{"image": "b.jpg", "question": "r"}\n')
    records = load_vqa_records(str(path), "root", need_answers=False)
    assert [r.question_id for r in records] == [0, 1] and records[0].image == "root/a.jpg"
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps([{"image": "a", "question": "q", "question_id": 7}] * 2))
    with pytest.raises(AnnotationError, match="question_id 7 appears twice"):
        load_vqa_records(str(dup), need_answers=False)
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(["yes", "no", "yes"]))
    with pytest.raises(AnnotationError, match="'yes' is listed more than once"):
        load_answer_list(str(answers))


def _loader(paths, tokenizer, batch_size=4, world_size=1, rank=0, workers=0):
    cfg = DataConfig(
        sources=[DataSourceConfig(kind="json", paths=[str(paths["train"])],
                                  image_root=str(paths["image_root"]))],
        batch_size=batch_size, num_workers=workers, randaugment=False, min_scale=0.5,
        min_image_size=4,
    )  # fmt: skip
    return build_vqa_train_loader(cfg, tokenizer, 32, seed=3, rank=rank, world_size=world_size)


def test_loader_batches_answers_weights_and_counts_bad_images(tmp_path, synthetic_tokenizer):
    paths = write_synthetic_vqa(tmp_path, num_train=12, num_test=0, seed=1)
    (paths["image_root"] / "000003.png").write_bytes(b"not a png")
    loader = _loader(paths, synthetic_tokenizer)
    batches = [next(loader) for _ in range(3)]  # one epoch: the bad image is met once
    batch = batches[0]
    assert batch["images"].shape == (4, 3, 32, 32) and batch["images"].dtype == torch.uint8
    rows = batch["answer_question"]
    assert rows.tolist() == sorted(rows.tolist()) and set(rows.tolist()) == {0, 1, 2, 3}
    per_question = torch.zeros(4).index_add_(0, rows, batch["answer_weights"])
    assert torch.allclose(per_question, torch.ones(4))  # each record's weights sum to 1
    assert batch["answer_ids"].shape[0] == rows.shape[0] == batch["answer_mask"].shape[0]
    assert batch["question_ids"].shape[0] == 4
    assert int(batch["question_mask"].sum(1).max()) == batch["question_ids"].shape[1]
    assert loader.stats()["bad_samples"] == 1
    state = loader.state_dict()
    following = next(loader)
    resumed = _loader(paths, synthetic_tokenizer)
    resumed.load_state_dict(state)
    again = next(resumed)
    assert all(torch.equal(following[k], again[k]) for k in following)


def test_loader_refuses_other_source_kinds(tmp_path, synthetic_tokenizer):
    cfg = DataConfig(sources=[DataSourceConfig(kind="synthetic")], num_workers=0)
    with pytest.raises(ValueError, match="kinds must be json or jsonl, got 'synthetic'"):
        build_vqa_train_loader(cfg, synthetic_tokenizer, 32, seed=0)
