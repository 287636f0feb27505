"""BLIP JSON / JSONL sources, eval annotations, and bad-sample handling in the loader."""

import json
import logging
import random

import pytest
import torch
from PIL import Image

from blip_recipes.config import DataConfig, DataSourceConfig
from blip_recipes.data import (
    AnnotationError,
    BadSampleError,
    JsonlSource,
    JsonSource,
    build_train_loader,
    load_retrieval_annotations,
)


def _cfg(sources, batch_size=4, **kw):
    kw.setdefault("num_workers", 0)
    return DataConfig(sources=sources, batch_size=batch_size, pin_memory=False, **kw)


def test_json_source_reads_records(json_dataset):
    ann, root, records = json_dataset
    src = JsonSource([str(ann), str(ann)], str(root))
    assert len(src) == 24
    path, caption, origin = src.get(13, random.Random(0))
    assert path == str(root / "001.jpg") == origin and caption == "A photo of dog 1!"


def test_caption_list_draws_one_per_visit(tmp_path):
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps([{"image": "x.jpg", "caption": ["one", "two", "three"]}]))
    src = JsonSource([str(ann)])
    assert {src.get(0, random.Random(s))[1] for s in range(30)} == {"one", "two", "three"}


def test_url_instead_of_image_is_a_clear_error(tmp_path):
    ann = tmp_path / "laion.json"
    ann.write_text(json.dumps([{"url": "http://x/y.jpg", "caption": "c"}]))
    with pytest.raises(AnnotationError, match="'url' but no 'image'.*download"):
        JsonSource([str(ann)])
    jl = tmp_path / "laion.jsonl"
    jl.write_text(json.dumps({"url": "http://x/y.jpg", "caption": "c"}) + "\n")
    with pytest.raises(AnnotationError, match="'url' but no 'image'"):
        JsonlSource([str(jl)])


def test_jsonl_matches_json(json_dataset, tmp_path):
    ann, root, records = json_dataset
    jl = tmp_path / "ann.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    a, b = JsonSource([str(ann)], str(root)), JsonlSource([str(jl)], str(root))
    assert len(a) == len(b) == 12
    assert all(a.get(i, random.Random(0)) == b.get(i, random.Random(0)) for i in range(12))
    cfgs = [
        DataSourceConfig(kind=k, paths=[str(p)], image_root=str(root))
        for k, p in (("json", ann), ("jsonl", jl))
    ]
    la = build_train_loader(_cfg(cfgs[:1]), _tok(), 16, 0)
    lb = build_train_loader(_cfg(cfgs[1:]), _tok(), 16, 0)
    for _ in range(4):
        x, y = next(la), next(lb)
        assert all(torch.equal(x[k], y[k]) for k in x)


def _tok():
    from blip_recipes.config import TokenizerConfig
    from blip_recipes.data import build_tokenizer

    return build_tokenizer(TokenizerConfig(kind="synthetic"))


def _karpathy_records():
    """COCO-Karpathy-train-like: one record per caption, ids as strings or ints, one without."""
    return [
        {"image": "a.jpg", "caption": "a one", "image_id": "coco_7"},
        {"image": "b.jpg", "caption": "b one", "image_id": 3},
        {"image": "a.jpg", "caption": "a two", "image_id": "coco_7"},
        {"image": "c.jpg", "caption": "c one"},
        {"image": "b.jpg", "caption": "b two", "image_id": 3},
        {"image": "c.jpg", "caption": "c two"},
        {"image": "a2.jpg", "caption": "a2", "image_id": "coco_7"},  # the id decides, not the path
    ]


@pytest.mark.parametrize("kind", ["json", "jsonl"])
def test_image_ids_dense_in_first_appearance_order(tmp_path, kind):
    records = _karpathy_records()
    first, second = tmp_path / f"one.{kind}", tmp_path / f"two.{kind}"
    for path, part in ((first, records[:4]), (second, records[4:])):
        if kind == "json":
            path.write_text(json.dumps(part))
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in part))
    src = (JsonSource if kind == "json" else JsonlSource)([str(first), str(second)])
    assert [src.image_id(i) for i in range(len(src))] == [0, 1, 0, 2, 1, 2, 0]
    assert src.num_images == 3


def test_image_id_of_wrong_type_is_named(tmp_path):
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps([{"image": "x.jpg", "caption": "c", "image_id": [1]}]))
    with pytest.raises(AnnotationError, match="a.json record 0: 'image_id' must be"):
        JsonSource([str(ann)])


def test_batches_carry_image_ids_offset_per_source(tmp_path, make_image):
    root = tmp_path / "img"
    root.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg", "a2.jpg"):
        make_image(root / name)
    ann = tmp_path / "karpathy.json"
    ann.write_text(json.dumps(_karpathy_records()))
    sources = [
        DataSourceConfig(kind="json", paths=[str(ann)], image_root=str(root)),
        DataSourceConfig(kind="synthetic", num_samples=5, image_size=32),
    ]
    loader = build_train_loader(_cfg(sources, batch_size=4), _tok(), 16, 0)
    assert loader.steps_per_epoch == 3
    seen = []
    for _ in range(3):  # one epoch: every sample once
        batch = next(loader)
        assert batch["image_ids"].dtype == torch.int64 and batch["image_ids"].shape == (4,)
        seen += batch["image_ids"].tolist()
    # 3 COCO images (ids 0..2: 3, 2 and 2 captions), then the 5 synthetic samples (ids 3..7)
    counts = {i: seen.count(i) for i in set(seen)}
    assert counts == {0: 3, 1: 2, 2: 2, 3: 1, 4: 1, 5: 1, 6: 1, 7: 1}


def test_mixed_sources_by_weight(json_dataset):
    ann, root, _ = json_dataset
    sources = [
        DataSourceConfig(kind="json", paths=[str(ann)], image_root=str(root), weight=2.0),
        DataSourceConfig(kind="synthetic", num_samples=20, weight=0.5, image_size=32),
    ]
    loader = build_train_loader(_cfg(sources), _tok(), 16, 0)
    assert loader.epoch_length == 24 + 10 and loader.steps_per_epoch == 8


def test_retrieval_annotations(tmp_path):
    ann = tmp_path / "test.json"
    ann.write_text(
        json.dumps(
            [
                {"image": "a.jpg", "caption": ["a one", "a two"]},
                {"image": "b.jpg", "caption": ["b one", "b two", "b three"]},
                {"image": "c.jpg", "caption": "c one"},
            ]
        )
    )
    images, captions, txt2img, img2txt = load_retrieval_annotations(str(ann), "/root")
    assert images == ["/root/a.jpg", "/root/b.jpg", "/root/c.jpg"]
    assert captions == ["a one", "a two", "b one", "b two", "b three", "c one"]
    assert txt2img == [0, 0, 1, 1, 1, 2]
    assert img2txt == [[0, 1], [2, 3, 4], [5]]


@pytest.fixture
def broken_dataset(tmp_path, make_image):
    """16 good images and one of each bad kind, plus grey/CMYK/palette/alpha images that are fine."""
    root = tmp_path / "img"
    root.mkdir()
    records = []
    for i in range(16):
        make_image(root / f"good{i}.jpg", seed=i)
        records.append({"image": f"good{i}.jpg", "caption": f"dog {i}"})
    (root / "empty.jpg").write_bytes(b"")
    good = (root / "good0.jpg").read_bytes()
    (root / "trunc.jpg").write_bytes(good[: len(good) // 2])
    (root / "junk.jpg").write_bytes(b"\x00garbage" * 10)
    Image.new("RGB", (800, 8)).save(root / "wide.png")
    for name in ("missing.jpg", "empty.jpg", "trunc.jpg", "junk.jpg", "wide.png"):
        records.append({"image": name, "caption": "a bad one"})
    records.append({"image": "good0.jpg", "caption": "..."})  # empty after pre_caption
    for mode, name in (("L", "grey.png"), ("P", "pal.png"), ("RGBA", "alpha.png")):
        make_image(root / name, mode=mode)
        records.append({"image": name, "caption": f"mode {mode}"})
    make_image(root / "cmyk.jpg", mode="CMYK")
    records.append({"image": "cmyk.jpg", "caption": "mode cmyk"})
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(records))
    return ann, root, len(records)


def test_bad_samples_replaced_counted_and_warned(broken_dataset, caplog):
    ann, root, n = broken_dataset
    src = [DataSourceConfig(kind="json", paths=[str(ann)], image_root=str(root))]
    cfg = _cfg(src, batch_size=2, max_bad_fraction=1.0)
    loader = build_train_loader(cfg, _tok(), 16, 0)
    with caplog.at_level(logging.WARNING, logger="blip_recipes.data"):
        batches = [next(loader) for _ in range(n // 2)]  # one epoch
    assert all(b["images"].shape == (2, 3, 16, 16) for b in batches)
    stats = loader.stats()
    assert stats["samples"] == n and stats["bad_samples"] >= 6
    text = caplog.text
    for name in ("missing.jpg", "empty.jpg", "trunc.jpg", "junk.jpg", "wide.png", "empty caption"):
        assert name in text
    # Deterministic replacement: a second run gives the same batches, also with workers.
    again = build_train_loader(
        _cfg(src, batch_size=2, max_bad_fraction=1.0, num_workers=2), _tok(), 16, 0
    )
    for b in batches:
        c = next(again)
        assert all(torch.equal(b[k], c[k]) for k in b)


def _bad_log(folder, rank=0):
    path = folder / f"bad_samples.rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_bad_sample_is_named_in_the_log(broken_dataset, tmp_path, caplog, num_workers):
    ann, root, n = broken_dataset
    Image.new("RGB", (1, 1)).save(root / "pixel.png")  # a tracking pixel
    Image.new("RGB", (7, 100)).save(root / "thin.png")  # shorter side below 8
    records = json.loads(ann.read_text())
    records += [{"image": name, "caption": "a tiny one"} for name in ("pixel.png", "thin.png")]
    ann.write_text(json.dumps(records))
    n += 2
    src = [DataSourceConfig(kind="json", paths=[str(ann)], image_root=str(root))]
    cfg = _cfg(src, batch_size=2, max_bad_fraction=1.0, num_workers=num_workers)
    loader = build_train_loader(cfg, _tok(), 16, 0)
    out = tmp_path / "run"
    loader.open_bad_sample_log(out)
    with caplog.at_level(logging.WARNING, logger="blip_recipes.data"):
        for _ in range(3 * n // 2):  # three epochs: the warnings stop naming files, the log not
            next(loader)
    log = _bad_log(out)
    assert len(log) == loader.stats()["bad_samples"] > 3 * 8
    named = {r["sample"].rsplit("/", 1)[-1] for r in log}
    bad_files = {"missing.jpg", "empty.jpg", "trunc.jpg", "junk.jpg", "wide.png", "pixel.png",
                 "thin.png", "good0.jpg"}  # fmt: skip
    assert named == bad_files
    reasons = {r["sample"].rsplit("/", 1)[-1]: r["reason"] for r in log}
    assert "too small 1x1" in reasons["pixel.png"] and "too small 7x100" in reasons["thin.png"]
    assert "aspect" in reasons["wide.png"] and reasons["missing.jpg"] == "missing file"
    assert reasons["good0.jpg"] == "empty caption after cleaning"
    for r in log:
        assert r["rank"] == 0 and 1 <= r["step"] <= 3 * n // 2 and r["epoch"] in (0, 1, 2)
        assert r["source"].startswith("json[") and 0 <= r["position"] < n
    assert [r["step"] for r in log] == sorted(r["step"] for r in log)
    # Every full epoch visits (and names) every bad file again.
    for epoch in (0, 1, 2):
        assert {r["sample"].rsplit("/", 1)[-1] for r in log if r["epoch"] == epoch} == bad_files
    warned = [r for r in caplog.records if "replaced" in r.getMessage()]
    assert len(warned) < len(log)  # the console is rate-limited, the file is not


def test_bad_sample_log_after_a_restart(broken_dataset, tmp_path):
    ann, root, n = broken_dataset
    src = [DataSourceConfig(kind="json", paths=[str(ann)], image_root=str(root))]
    cfg = _cfg(src, batch_size=2, max_bad_fraction=1.0)
    out = tmp_path / "run"

    def run(steps, resume_step=None, state=None, batches_per_step=1):
        loader = build_train_loader(cfg, _tok(), 16, 0)
        if state is not None:
            loader.load_state_dict(state)
        loader.open_bad_sample_log(out, resume_step=resume_step, batches_per_step=batches_per_step)
        states = []
        for _ in range(steps * batches_per_step):
            next(loader)
            states.append(loader.state_dict())
        loader.close_bad_sample_log()
        return states

    states = run(n // 2)  # one epoch, then "crash"
    first = _bad_log(out)
    k = 4  # the checkpoint the run resumes from
    run(n // 2 - k, resume_step=k, state=states[k - 1])
    again = _bad_log(out)
    assert again == first  # records after step k replaced by the same ones, none twice
    backup = out / "bad_samples.rank0.jsonl.1"
    assert [json.loads(x) for x in backup.read_text().splitlines()] == first  # nothing lost
    run(2)  # a fresh start in the same folder moves the old file aside
    assert (out / "bad_samples.rank0.jsonl.2").exists()
    assert all(r["step"] <= 2 for r in _bad_log(out))
    # Gradient accumulation: two loader batches per optimizer step.
    (out / "bad_samples.rank0.jsonl").unlink()
    run(n // 4, batches_per_step=2)
    assert {r["step"] for r in _bad_log(out)} <= set(range(1, n // 4 + 1))
    assert max(r["step"] for r in _bad_log(out)) > n // 8


def test_rank_zero_handles_log_files_of_ranks_gone(tmp_path):
    from blip_recipes.data.counters import BadSampleLog

    for r in (0, 1, 2, 3):
        (tmp_path / f"bad_samples.rank{r}.jsonl").write_text('{"step": 9, "sample": "x"}\n')
    BadSampleLog(tmp_path, rank=0, world_size=2, resume_step=5).close()
    assert (tmp_path / "bad_samples.rank0.jsonl").read_text() == ""
    assert (tmp_path / "bad_samples.rank1.jsonl").read_text() != ""  # rank 1's own business
    for r in (2, 3):
        assert (tmp_path / f"bad_samples.rank{r}.jsonl").read_text() == ""
        assert (tmp_path / f"bad_samples.rank{r}.jsonl.1").exists()


def test_too_many_bad_samples_stop_the_run(broken_dataset):
    ann, root, n = broken_dataset
    src = [DataSourceConfig(kind="json", paths=[str(ann)], image_root=str(root))]
    cfg = _cfg(src, batch_size=2, max_bad_fraction=0.05, bad_fraction_min_samples=10)
    loader = build_train_loader(cfg, _tok(), 16, 0)
    with pytest.raises(BadSampleError, match="max_bad_fraction"):
        for _ in range(100):
            next(loader)


def test_missing_annotation_file_is_named(tmp_path):
    from blip_recipes.config.sections import DataSourceConfig
    from blip_recipes.data.sources import build_map_source

    cfg = DataSourceConfig(kind="json", paths=[str(tmp_path / "absent.json")])
    with pytest.raises(FileNotFoundError, match="absent.json"):
        build_map_source(cfg, seed=0)


def test_jsonl_bad_first_line_names_file_and_line(tmp_path):
    from blip_recipes.data.sources import AnnotationError, JsonlSource

    path = tmp_path / "ann.jsonl"
    path.write_text('{"image": "a.jpg", "caption": "x"\n{"image": "b.jpg", "caption": "y"}\n')
    with pytest.raises(AnnotationError, match=rf"^{path} line 1: not JSON \(Expecting ',' "
                       r"delimiter at character 35\); expected one object per line"):  # fmt: skip
        JsonlSource([str(path)])
    path.write_text('{"image": "a.jpg", "caption": "x"}\nnot json\n')
    source = JsonlSource([str(path)])
    with pytest.raises(Exception, match=rf"^{path} line 2: not JSON") as info:
        source.get(1, __import__("random").Random(0))
    assert info.value.origin == f"{path} line 2"
