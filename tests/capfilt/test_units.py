"""Work units: input kinds, units over several annotation files, rank assignment, shard pairs."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from blip_recipes.capfilt import (
    AnnotationInputs,
    input_kind,
    shard_pairs,
    shard_units,
    units_of_rank,
)


def test_input_kind_from_suffixes():
    assert input_kind(["a.json", "b.json"]) == "json"
    assert input_kind(["a.jsonl"]) == "jsonl"
    assert input_kind(["s-{000..009}.tar", "https://host/x.tar?sig=1", "pipe:cat y"]) == "shards"
    assert input_kind(["whatever"], "jsonl") == "jsonl"
    with pytest.raises(ValueError, match="mix kinds"):
        input_kind(["a.json", "b.tar"])
    with pytest.raises(ValueError, match="cannot tell the kind of 'a.txt'.*capfilt.input_kind"):
        input_kind(["a.txt"])


def _write(path, n, start):
    path.write_text(json.dumps([{"image": f"{start + i}.jpg", "caption": f"c{start + i}"}
                                for i in range(n)]))  # fmt: skip


def test_units_run_across_files_and_ranks_keep_only_theirs(tmp_path):
    _write(tmp_path / "a.json", 5, 0)
    _write(tmp_path / "b.json", 4, 5)
    paths = [str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    every = AnnotationInputs(paths, "root", 4)
    units = every.units()
    assert [(u.start, u.stop) for u in units] == [(0, 4), (4, 8), (8, 9)]
    assert [p.key for p in every.pairs(units[1])] == ["4.jpg", "5.jpg", "6.jpg", "7.jpg"]
    pair = next(every.pairs(units[1]))
    assert pair.image == "root/4.jpg" and pair.captions == ("c4",) and "a.json:4" in pair.origin
    assert [u.index for u in units_of_rank(units, 1, 2)] == [1]
    assert [u.index for u in units_of_rank(units, 0, 2)] == [0, 2]
    rank1 = AnnotationInputs(paths, "root", 4, keep=lambda u: u % 2 == 1)
    assert rank1.units() == units and set(rank1.records) == {1}
    with pytest.raises(KeyError, match="unit-00000 were not loaded"):
        list(rank1.pairs(units[0]))


def test_shard_pairs_read_images_and_caption_lists(tmp_path):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("a.jpg", b"img"), ("a.json", b'{"caption": ["x", "y"], "url": 1}'),
                           ("b.txt", b"only text"), ("c.png", b"png"),
                           ("c.json", b"{broken")):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (unit,) = shard_units([str(path)])
    pairs = list(shard_pairs(unit))
    assert [(p.key, p.image, p.image_ext, p.captions) for p in pairs] == [
        ("a", b"img", "jpg", ("x", "y")),
        ("b", None, "", ("only text",)),
        ("c", b"png", "png", ()),
    ]
    assert pairs[1].origin == "s.tar/b"


def test_shard_urls_stream_through_the_shard_reader(tmp_path):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("k.jpg", b"img"), ("k.txt", b"a caption")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (unit,) = shard_units([f"pipe:cat {path}"])
    assert [(p.key, p.image, p.captions) for p in shard_pairs(unit)] == [
        ("k", b"img", ("a caption",))
    ]
