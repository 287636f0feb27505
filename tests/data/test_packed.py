"""Compact string storage of annotation records."""

import json
import pickle
import random

import pytest

from blip_recipes.data.packed import PackedStrings
from blip_recipes.data.sources import JsonSource


def test_packed_strings_round_trip_across_blocks_and_pickle():
    strings = [f"train2014/COCO_{i:012d}.jpg ünïcode {i % 7}" for i in range(150)] + [""]
    packed = PackedStrings.from_iterable(strings, block_size=16)
    assert len(packed) == 151
    assert [packed[i] for i in (150, 0, 17, 16, 149, 3)] == [
        strings[i] for i in (150, 0, 17, 16, 149, 3)
    ]
    clone = pickle.loads(pickle.dumps(packed))
    assert [clone[i] for i in range(151)] == strings
    assert packed.nbytes < sum(len(s.encode()) for s in strings) / 2  # compressed
    with pytest.raises(IndexError, match="index 151 out of range"):
        packed[151]
    with pytest.raises(ValueError, match="newline"):
        PackedStrings().append("two\nlines")


def test_json_source_keeps_caption_kinds_and_rng_use(tmp_path):
    """A one-caption list still draws from rng, a plain string does not; odd values stay odd."""
    records = [
        {"image": "a.jpg", "caption": "plain"},
        {"image": "b.jpg", "caption": ["only"]},
        {"image": "c.jpg", "caption": []},
        {"image": "d.jpg", "caption": 7},
        {"image": "e.jpg", "caption": ["x\ny", "zwei"]},
    ]
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps(records))
    src = pickle.loads(pickle.dumps(JsonSource([str(ann)], "/r")))
    for i, record in enumerate(records):
        rng_a, rng_b = random.Random(5), random.Random(5)
        path, caption, origin = src.get(i, rng_a)
        assert path == origin == f"/r/{record['image']}"
        cap = record["caption"]
        want = (
            rng_b.choice(cap)
            if isinstance(cap, list) and cap
            else cap
            if isinstance(cap, str)
            else ""
        )
        assert caption == want
        assert rng_a.random() == rng_b.random()  # same draws consumed
