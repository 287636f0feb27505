"""Tar shards: brace patterns, streaming, split over ranks x workers, exact resume."""

import io
import json
import tarfile

import pytest
import torch
from PIL import Image

from blip_recipes.config import DataConfig, DataSourceConfig
from blip_recipes.data import BadSampleError, build_train_loader, synthetic_sample
from blip_recipes.data.shard_files import expand_braces
from blip_recipes.data.shard_streams import _Stream
from blip_recipes.data.tar_format import iter_tar_samples, write_shard


def _jpeg(i):
    img, caption = synthetic_sample(0, i, 32)
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue(), caption


@pytest.fixture
def shard_dir(tmp_path):
    """5 shards of 7 samples (35 in all), keys s{shard}_{i}."""
    for s in range(5):
        samples = []
        for i in range(7):
            data, caption = _jpeg(s * 7 + i)
            samples.append((f"s{s}_{i}", data, "jpg", caption))
        write_shard(str(tmp_path / f"shards-{s:03d}.tar"), samples)
    return tmp_path


def test_expand_braces():
    assert expand_braces("a-{00008..00011}.tar") == [f"a-{i:05d}.tar" for i in range(8, 12)]
    assert expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_iter_tar_samples_and_resume_offsets(shard_dir):
    path = str(shard_dir / "shards-000.tar")
    samples = list(iter_tar_samples(path))
    assert [k for k, *_ in samples] == [f"s0_{i}" for i in range(7)]
    assert set(samples[0][1]) == {"jpg", "txt"}
    resumed = list(iter_tar_samples(path, samples[3][3]))  # from the 4th sample's next offset
    assert [k for k, *_ in resumed] == [f"s0_{i}" for i in range(4, 7)]


@pytest.mark.parametrize("num_shards", [5, 2])
def test_two_ranks_two_workers_see_every_sample_once_per_epoch(shard_dir, num_shards):
    shards = [str(shard_dir / f"shards-{s:03d}.tar") for s in range(num_shards)]
    expected = sorted(f"s{s}_{i}" for s in range(num_shards) for i in range(7))
    for epoch in (0, 1):
        seen = []
        for stream_id in range(4):  # 2 ranks x 2 workers
            stream = iter(_Stream(shards, seed=0, stream=stream_id, num_streams=4, buffer=3))
            for e, (_, key, _) in stream:
                if e > epoch:
                    break
                if e == epoch:
                    seen.append(key)
        assert sorted(seen) == expected


def _cfg(shard_dir, workers, batch_size=3):
    return DataConfig(
        sources=[DataSourceConfig(kind="shards", paths=[str(shard_dir / "shards-{000..004}.tar")])],
        batch_size=batch_size,
        num_workers=workers,
        shuffle_buffer=4,
        pin_memory=False,
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_loader_resume_bitwise(shard_dir, synthetic_tokenizer, workers):
    def build():
        return build_train_loader(_cfg(shard_dir, workers), synthetic_tokenizer, 16, 7, 0, 1)

    ref = build()
    assert ref.steps_per_epoch is None
    expected = [next(ref) for _ in range(16)]  # more than one epoch (35 samples)
    run = build()
    for _ in range(5):
        next(run)
    state = run.state_dict()
    resumed = build()
    resumed.load_state_dict(state)
    for want in expected[5:]:
        got = next(resumed)
        assert all(torch.equal(want[k], got[k]) for k in want)
    assert resumed.stats()["samples"] == 16 * 3


def test_shard_bad_samples_replaced(tmp_path, synthetic_tokenizer):
    good, caption = _jpeg(0)
    samples = [(f"k{i}", good, "jpg", caption) for i in range(6)]
    samples[2] = ("k2", good[:100], "jpg", caption)  # truncated
    samples[4] = ("k4", good, "jpg", "...")  # empty caption
    write_shard(str(tmp_path / "bad.tar"), samples)
    cfg = DataConfig(
        sources=[DataSourceConfig(kind="shards", paths=[str(tmp_path / "bad.tar")])],
        batch_size=4,
        num_workers=0,
        pin_memory=False,
        max_bad_fraction=1.0,
        shuffle_buffer=1,  # stream order k0, k1, ...: the first batch reads k0..k5
    )
    loader = build_train_loader(cfg, synthetic_tokenizer, 16, 0, 0, 1)
    loader.open_bad_sample_log(tmp_path / "run")
    batch = next(loader)
    assert batch["images"].shape == (4, 3, 16, 16)
    assert loader.stats()["bad_samples"] == 2
    log = (tmp_path / "run" / "bad_samples.rank0.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in log]
    assert [(r["sample"], r["step"], r["source"]) for r in records] == [
        ("bad.tar/k2.jpg", 1, "shards"), ("bad.tar/k4", 1, "shards")]  # fmt: skip
    assert records[0]["reason"].startswith("cannot ")
    assert records[1]["reason"] == "empty caption after cleaning"


def test_shard_tiny_image_and_broken_caption_are_bad(tmp_path, synthetic_tokenizer):
    good, caption = _jpeg(0)
    pixel = io.BytesIO()
    Image.new("RGB", (1, 1)).save(pixel, format="PNG")
    samples = [(f"k{i}", good, "jpg", caption) for i in range(5)]
    samples[1] = ("k1", pixel.getvalue(), "png", caption)  # k0 k1 k2 k3 k4 k9, two bad
    write_shard(str(tmp_path / "s.tar"), samples)
    with tarfile.open(tmp_path / "s.tar", "a") as tar:  # a json caption that is not JSON
        for name, payload in (("k9.jpg", good), ("k9.json", b"{not json")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    cfg = DataConfig(
        sources=[DataSourceConfig(kind="shards", paths=[str(tmp_path / "s.tar")])],
        batch_size=5, num_workers=0, pin_memory=False, max_bad_fraction=1.0, shuffle_buffer=1,
    )  # fmt: skip
    loader = build_train_loader(cfg, synthetic_tokenizer, 16, 0, 0, 1)
    batch = next(loader)
    assert batch["images"].shape[0] == batch["input_ids"].shape[0] == 5
    assert loader.stats()["bad_samples"] == 2


def test_shard_image_ids_hash_shard_and_key(shard_dir, synthetic_tokenizer):
    import hashlib

    from blip_recipes.data.tar_format import shard_image_id

    digest = hashlib.blake2b(b"shards-001.tar/s1_3", digest_size=8).digest()
    assert shard_image_id("/any/folder/shards-001.tar", "s1_3") == (
        int.from_bytes(digest, "little") >> 1
    )
    every = {shard_image_id(f"shards-{s:03d}.tar", f"s{s}_{i}") for s in range(5) for i in range(7)}
    assert len(every) == 35 and all(0 <= x < 2**63 for x in every)
    loader = build_train_loader(_cfg(shard_dir, 0, batch_size=5), synthetic_tokenizer, 16, 7, 0, 1)
    seen = torch.cat([next(loader)["image_ids"] for _ in range(7)]).tolist()  # one epoch
    assert sorted(seen) == sorted(every)


def test_process_exits_with_an_open_shard_loader(shard_dir):
    from tests.data.test_loader import exit_with_open_loader

    exit_with_open_loader({"kind": "shards", "paths": [str(shard_dir / "shards-{000..004}.tar")]})


@pytest.mark.parametrize("workers", [0, 1])
def test_a_shard_source_of_only_bad_samples_stops(tmp_path, synthetic_tokenizer, workers):
    samples = [(f"k{i}", b"not an image", "jpg", "a red circle") for i in range(80)]
    write_shard(str(tmp_path / "bad.tar"), samples)
    cfg = DataConfig(
        sources=[DataSourceConfig(kind="shards", paths=[str(tmp_path / "bad.tar")])],
        batch_size=2, num_workers=workers, pin_memory=False, shuffle_buffer=4,
    )  # fmt: skip
    loader = build_train_loader(cfg, synthetic_tokenizer, 16, 0, 0, 1)
    with pytest.raises(BadSampleError, match=r"^rank 0: 51 shard samples in a row were bad"):
        next(loader)
    loader.close()


def _sixteen(tmp_path):
    samples = []
    for i in range(16):
        data, caption = _jpeg(i)
        samples.append((f"k{i:02d}", data, "jpg", caption))
    path = tmp_path / "s.tar"
    write_shard(str(path), samples)
    (tmp_path / "sizes.json").write_text(json.dumps({"s.tar": 16}))
    offsets = [m.offset for m in tarfile.open(path).getmembers()]
    return path, path.read_bytes(), offsets


@pytest.mark.parametrize("damage", ["corrupt header", "truncated"])
def test_a_damaged_shard_counts_and_names_what_it_lost(tmp_path, synthetic_tokenizer, damage,
                                                        caplog):  # fmt: skip
    path, data, offsets = _sixteen(tmp_path)
    if damage == "corrupt header":  # k05.jpg's header: k05 is incomplete, the rest is read
        path.write_bytes(data[: offsets[10]] + b"\xff" * 100 + data[offsets[10] + 100 :])
    else:  # cut inside k06.jpg: k00..k05 are read, 10 samples are lost
        path.write_bytes(data[: offsets[12] + 700])
    cfg = DataConfig(
        sources=[DataSourceConfig(kind="shards", paths=[str(path)])], batch_size=3,
        num_workers=0, pin_memory=False, shuffle_buffer=4, max_bad_fraction=1.0,
    )  # fmt: skip
    loader = build_train_loader(cfg, synthetic_tokenizer, 16, 0, 0, 1)
    loader.open_bad_sample_log(tmp_path / "run")
    for _ in range(8):  # more than one epoch
        next(loader)
    records = [json.loads(x) for x in (tmp_path / "run" / "bad_samples.rank0.jsonl").open()]
    epoch0 = [r for r in records if r["epoch"] == 0]
    if damage == "corrupt header":
        assert [(r["sample"], r["reason"]) for r in epoch0] == [
            ("s.tar/k05", "no image member (txt)")]  # fmt: skip
    else:
        (lost,) = [r for r in epoch0 if "count" in r]
        assert lost["sample"] == "s.tar" and lost["count"] == 10
        assert "10 of its 16 samples (sizes.json) could not be read" in lost["reason"]
        warned = [m for m in caplog.messages if "shard s.tar (epoch 0)" in m]
        assert len(warned) == 1
    assert loader.stats()["bad_samples"] == sum(r.get("count", 1) for r in records)
