"""select_captions: threshold, top-k synthetic by ITC, ties, repeated texts."""

from __future__ import annotations

from blip_recipes.capfilt import ScoredCaption, select_captions


def _c(text, source, itm, itc=0.0):
    return ScoredCaption(text, source, itm, itc)


def test_threshold_keeps_order_and_web_first():
    caps = [_c("w1", "web", 0.5), _c("w2", "web", 0.49), _c("s1", "synthetic", 0.7),
            _c("s2", "synthetic", 0.2)]  # fmt: skip
    assert [c.text for c in select_captions(caps, 0.5)] == ["w1", "s1"]
    assert select_captions(caps, 0.8) == []


def test_top_k_ranks_passing_synthetic_by_itc_with_ties_to_the_earlier():
    caps = [_c("w", "web", 0.9, 0.0), _c("a", "synthetic", 0.9, 0.3),
            _c("b", "synthetic", 0.2, 0.9), _c("c", "synthetic", 0.6, 0.5),
            _c("d", "synthetic", 0.6, 0.3)]  # fmt: skip
    assert [c.text for c in select_captions(caps, 0.5, 1)] == ["w", "c"]
    assert [c.text for c in select_captions(caps, 0.5, 2)] == ["w", "a", "c"]  # a ties d: a
    assert [c.text for c in select_captions(caps, 0.5, 0)] == ["w"]


def test_repeated_text_is_kept_once():
    caps = [_c("a dog", "web", 0.9), _c("a dog", "synthetic", 0.8), _c("a cat", "synthetic", 0.8),
            _c("a cat", "synthetic", 0.8)]  # fmt: skip
    kept = select_captions(caps, 0.5)
    assert [(c.text, c.source) for c in kept] == [("a dog", "web"), ("a cat", "synthetic")]


def test_blank_captions_are_never_kept():
    caps = [_c("", "web", 0.9), _c("  ", "synthetic", 0.99), _c("a dog", "synthetic", 0.8)]
    assert [c.text for c in select_captions(caps, 0.0)] == ["a dog"]
    assert select_captions(caps[:2], 0.0) == []


def test_itm_quantiles_merge_exactly_across_units():
    from blip_recipes.capfilt.stats import SourceCounts

    a, b = SourceCounts(), SourceCounts()
    for i, itm in enumerate([0.015, 0.02, 0.3, 0.31, 0.325, 0.99, 1.0]):
        (a if i % 2 else b).add(itm, itm >= 0.5)
    a.merge(b)
    assert a.quantiles() == {"p0": 0.01, "p10": 0.02, "p50": 0.32, "p90": 1.0, "p100": 1.0}
    assert SourceCounts().quantiles() == {}
