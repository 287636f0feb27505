"""What a unit writes: JSONL records and tar shards with provenance, readable by the pretraining
loader; byte-stable files; the output folder guard."""

from __future__ import annotations

import json

import pytest

from blip_recipes.capfilt import (
    AnnotationInputs,
    FilterSettings,
    OutputFolderError,
    RunFolder,
    claim,
    process_unit,
    shard_pairs,
    shard_units,
)
from blip_recipes.capfilt.outputs import (
    concatenate,
    jsonl_bytes,
    remove_leftovers,
    shard_bytes,
    write_atomic,
)
from blip_recipes.config import DataConfig, DataSourceConfig, TokenizerConfig
from blip_recipes.data import build_tokenizer, build_train_loader
from blip_recipes.data.tar_format import decode_caption, iter_tar_samples
from tests.capfilt.planted import (
    MATCH,
    PlantedCaptioner,
    PlantedScorer,
    planted_corpus,
    planted_shards,
)


def _json_kept(tmp_path):
    records = planted_corpus(tmp_path)
    inputs = AnnotationInputs([str(tmp_path / "web.json")], str(tmp_path / "images"), 100)
    unit = inputs.units()[0]
    kept, _ = process_unit(unit, inputs.pairs(unit), PlantedCaptioner([True]), PlantedScorer(),
                           FilterSettings(), 0, 4)  # fmt: skip
    return records, kept


def _loader_batch(source: DataSourceConfig, batch_size: int):
    cfg = DataConfig(sources=[source], batch_size=batch_size, num_workers=0, pin_memory=False,
                     randaugment=False, shuffle_buffer=4)  # fmt: skip
    tok = build_tokenizer(TokenizerConfig(kind="synthetic"))
    return next(iter(build_train_loader(cfg, tok, 16, seed=0)))


def test_jsonl_records_carry_provenance_and_feed_the_pretraining_loader(tmp_path):
    records, kept = _json_kept(tmp_path)
    path = tmp_path / "out.jsonl"
    write_atomic(path, jsonl_bytes(kept, "cap.pth", "filt.pth"))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["image"] for r in lines] == [r["image"] for r in records]
    assert lines[0]["caption"] == ["A red square.", "a red thing"]
    assert lines[0]["capfilt"] == {"sources": ["web", "synthetic"], "itm": [MATCH, MATCH],
                                   "captioner": "cap.pth", "filter": "filt.pth"}  # fmt: skip
    assert lines[1]["capfilt"]["sources"] == ["synthetic"]
    source = DataSourceConfig(kind="jsonl", paths=[str(path)], image_root=str(tmp_path / "images"))
    batch = _loader_batch(source, 4)
    assert batch["images"].shape == (4, 3, 16, 16) and batch["input_ids"].shape[0] == 4


def test_shards_copy_image_bytes_and_feed_the_pretraining_loader(tmp_path):
    shards = planted_shards(tmp_path / "in", shards=1, per_shard=6)
    unit = shard_units(shards)[0]
    kept, stats = process_unit(unit, shard_pairs(unit), PlantedCaptioner([False]),
                               PlantedScorer(), FilterSettings(), 0, 4)  # fmt: skip
    assert [k.pair.key for k in kept] == ["00000", "00002", "00004"]
    out = tmp_path / "capfilt-00000.tar"
    write_atomic(out, shard_bytes(kept, "c", "f"))
    inputs = {key: files for key, files, _, _ in iter_tar_samples(shards[0])}
    samples = list(iter_tar_samples(str(out)))
    assert [key for key, *_ in samples] == ["00000", "00002", "00004"]
    for key, files, _, _ in samples:
        assert sorted(files) == ["json", "png"] and files["png"] == inputs[key]["png"]
        meta = json.loads(files["json"])
        assert meta["image"] == f"{key}.png" and meta["capfilt"]["sources"] == ["web"]
        assert decode_caption(files) == meta["caption"] == [inputs[key]["txt"].decode()]
    batch = _loader_batch(DataSourceConfig(kind="shards", paths=[str(out)]), 3)
    assert batch["images"].shape == (3, 3, 16, 16)


def test_files_are_a_function_of_their_content(tmp_path):
    _, kept = _json_kept(tmp_path)
    assert jsonl_bytes(kept, "c", "f") == jsonl_bytes(kept, "c", "f")
    shards = planted_shards(tmp_path / "in", shards=1, per_shard=4)
    unit = shard_units(shards)[0]
    one, _ = process_unit(unit, shard_pairs(unit), PlantedCaptioner(), PlantedScorer(),
                          FilterSettings(), 0, 4)  # fmt: skip
    first = shard_bytes(one, "c", "f")
    two, _ = process_unit(unit, shard_pairs(unit), PlantedCaptioner(), PlantedScorer(),
                          FilterSettings(), 0, 2)  # fmt: skip
    assert shard_bytes(two, "c", "f") == first


def test_atomic_write_and_leftovers(tmp_path):
    write_atomic(tmp_path / "a.jsonl", b"x\n")
    assert [p.name for p in tmp_path.iterdir()] == ["a.jsonl"]
    (tmp_path / "b.jsonl.tmp-123").write_bytes(b"half")
    assert [p.name for p in remove_leftovers(tmp_path)] == ["b.jsonl.tmp-123"]
    write_atomic(tmp_path / "b.jsonl", b"y\n")
    assert concatenate([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tmp_path / "m") == 4
    assert (tmp_path / "m").read_bytes() == b"x\ny\n"


def test_claim_refuses_other_runs_and_foreign_files(tmp_path):
    identity = {"version": 1, "inputs": ["a.json"], "settings": {"threshold": 0.5}}
    folder = RunFolder(tmp_path / "out")
    assert claim(folder, identity) is False
    assert claim(folder, identity) is True  # the same run again: continue it
    other = {**identity, "settings": {"threshold": 0.7}}
    with pytest.raises(OutputFolderError, match=r"another CapFilt run \(settings.threshold: "
                                                r"0.5 -> 0.7\)"):  # fmt: skip
        claim(folder, other)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(OutputFolderError, match="not empty and holds no CapFilt run"):
        claim(RunFolder(tmp_path / "mine"), identity)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputFolderError, match="is a file"):
        claim(RunFolder(tmp_path / "file"), identity)
