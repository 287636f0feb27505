"""process_unit on the planted corpus: which images and captions survive, their provenance and
scores, top-k by ITC, bad images, statistics, and per-image sampling seeds."""

from __future__ import annotations

import pytest

from blip_recipes.capfilt import (
    AnnotationInputs,
    FilterSettings,
    merge_stats,
    process_unit,
)
from blip_recipes.data._seeding import derive_seed
from tests.capfilt.planted import MATCH, MISMATCH, PlantedCaptioner, PlantedScorer, planted_corpus

DEFAULT = FilterSettings()


def _run(tmp_path, captioner, settings=DEFAULT, unit_size=100, batch_size=4, seed=0):
    records = planted_corpus(tmp_path)
    inputs = AnnotationInputs([str(tmp_path / "web.json")], str(tmp_path / "images"), unit_size)
    results = [process_unit(u, inputs.pairs(u), captioner, PlantedScorer(), settings, seed,
                            batch_size) for u in inputs.units()]  # fmt: skip
    kept = [k for ks, _ in results for k in ks]
    return records, kept, [s for _, s in results]


def test_wrong_synthetic_captions_keep_matching_pairs_and_drop_swapped(tmp_path):
    records, kept, stats = _run(tmp_path, PlantedCaptioner(right=[False]))
    assert [k.pair.key for k in kept] == [r["image"] for r in records[::2]]
    for k, r in zip(kept, records[::2]):
        assert [c.text for c in k.captions] == [r["caption"]]
        assert [(c.source, c.itm) for c in k.captions] == [("web", MATCH)]
    total = merge_stats(stats)
    assert total["images"] == 12 and total["images_kept"] == 6
    assert total["web"] | {} == {"captions": 12, "kept": 6, "kept_fraction": 0.5,
                                 "mean_itm": pytest.approx(0.5), "mean_itm_kept": MATCH,
                                 "itm_quantiles": {"p0": 0.25, "p10": 0.26, "p50": 0.26,
                                                   "p90": 0.76, "p100": 0.76}}  # fmt: skip
    assert total["synthetic"]["captions"] == 12 and total["synthetic"]["kept"] == 0
    assert total["synthetic"]["mean_itm"] == pytest.approx(MISMATCH)
    assert total["captions_generated"] == 12 and total["bad_images"] == 0


def test_right_synthetic_captions_rescue_swapped_pairs(tmp_path):
    records, kept, stats = _run(tmp_path, PlantedCaptioner(right=[True]))
    assert [k.pair.key for k in kept] == [r["image"] for r in records]
    for i, k in enumerate(kept):
        sources = [c.source for c in k.captions]
        assert sources == (["web", "synthetic"] if i % 2 == 0 else ["synthetic"])
        assert k.captions[-1].text.startswith("a ") and k.captions[-1].text.endswith("thing")
        assert all(c.itm == MATCH for c in k.captions)
    total = merge_stats(stats)
    assert total["images_kept_fraction"] == 1.0 and total["synthetic"]["kept_fraction"] == 1.0
    assert total["captions_kept"] == 18


@pytest.mark.parametrize("top_k, expected", [(None, [0, 2, 3]), (1, [3]), (2, [2, 3]), (0, [])])
def test_synthetic_top_k_by_itc_among_those_passing(tmp_path, top_k, expected):
    # captions 0, 2, 3 are right; ITC grows with the caption index (extra words)
    captioner = PlantedCaptioner(right=[True, False, True, True])
    _, kept, _ = _run(tmp_path, captioner, FilterSettings(0.5, top_k))
    first = kept[0]  # a matching pair: its web caption always stays, first
    assert first.captions[0].source == "web"
    synthetic = [c.text for c in first.captions if c.source == "synthetic"]
    assert synthetic == [f"a red thing{' here' * n}" for n in expected]


def test_threshold_is_inclusive(tmp_path):
    _, kept, _ = _run(tmp_path, PlantedCaptioner(right=[False]), FilterSettings(MISMATCH))
    assert len(kept) == 12 and all(len(k.captions) == 2 for k in kept)
    _, kept, _ = _run(tmp_path, PlantedCaptioner(right=[False]), FilterSettings(0.95))
    assert kept == []


def test_bad_images_are_skipped_counted_and_named(tmp_path):
    planted_corpus(tmp_path)
    (tmp_path / "images" / "003.png").write_bytes(b"not an image")
    (tmp_path / "images" / "005.png").unlink()
    captioner = PlantedCaptioner(right=[False])
    inputs = AnnotationInputs([str(tmp_path / "web.json")], str(tmp_path / "images"), 100)
    unit = inputs.units()[0]
    kept, stats = process_unit(unit, inputs.pairs(unit), captioner, PlantedScorer(),
                               FilterSettings(), 0, 4)  # fmt: skip
    assert stats.images == 12 and len(stats.bad_images) == 2
    named = [b["image"] for b in stats.bad_images]
    assert "003.png" in named[0] and "005.png" in named[1]
    assert "cannot open" in stats.bad_images[0]["reason"]
    assert "missing file" in stats.bad_images[1]["reason"]
    assert len(kept) == 6 and stats.web.captions == 10 and len(captioner.seeds) == 10


def test_sampling_seed_is_a_function_of_seed_unit_and_index(tmp_path):
    """Image i of unit u samples from derive_seed(seed, u, i): the same with any batch size."""
    seeds = {}
    for batch_size in (1, 5):
        captioner = PlantedCaptioner()
        _run(tmp_path, captioner, unit_size=5, batch_size=batch_size, seed=7)
        seeds[batch_size] = captioner.seeds
    expected = [derive_seed(7, i // 5, i % 5) for i in range(12)]
    assert seeds[1] == seeds[5] == expected


def test_batches_hold_batch_size_readable_images(tmp_path):
    planted_corpus(tmp_path)
    (tmp_path / "images" / "001.png").write_bytes(b"")
    scorer = PlantedScorer()
    inputs = AnnotationInputs([str(tmp_path / "web.json")], str(tmp_path / "images"), 100)
    unit = inputs.units()[0]
    process_unit(unit, inputs.pairs(unit), PlantedCaptioner(), scorer, FilterSettings(), 0, 5)
    assert scorer.calls == [5, 5, 1]


def test_decode_threads_do_not_change_the_result(tmp_path):
    """Images decode ahead on a thread pool; the kept images, captions, scores and statistics
    (bad images included, in input order) are those of one thread."""
    records = planted_corpus(tmp_path)
    (tmp_path / "images" / records[3]["image"]).write_bytes(b"not an image")
    inputs = AnnotationInputs([str(tmp_path / "web.json")], str(tmp_path / "images"), 100)
    (unit,) = inputs.units()
    one = process_unit(unit, inputs.pairs(unit), PlantedCaptioner(), PlantedScorer(), DEFAULT, 0,
                       4, threads=1)  # fmt: skip
    many = process_unit(unit, inputs.pairs(unit), PlantedCaptioner(), PlantedScorer(), DEFAULT, 0,
                        4, threads=3)  # fmt: skip
    assert [(k.pair.key, k.captions) for k in one[0]] == [(k.pair.key, k.captions) for k in many[0]]
    one_stats, many_stats = one[1].to_dict(), many[1].to_dict()
    one_stats.pop("seconds", None), many_stats.pop("seconds", None)
    assert one_stats == many_stats and len(one[1].bad_images) == 1
