"""VQA accuracy and answer normalisation on cases computed by hand."""

from __future__ import annotations

import pytest

from blip_recipes.evaluation.vqa_metrics import (
    CONTRACTIONS,
    mean_vqa_accuracy,
    normalize_answer,
    strip_punctuation,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("Two", "2"),
        ("none", "0"),
        ("The dog", "dog"),
        ("a red   AN apple", "red apple"),
        ("dont", "don't"),
        ("yes.", "yes"),
        ("3.5", "3.5"),
        ("  on the\tleft\n", "on left"),
        ("black-and-white", "black and white"),
        ("left, right", "left right"),  # ", " touches a space: deleted
        ("1,000", "1000"),  # digit-comma-digit: every mark deleted
        ("yes!", "yes"),
        ("what?", "what"),
    ],
)
def test_normalize_answer(prediction, expected):
    assert normalize_answer(prediction) == expected


def test_punctuation_rules():
    assert strip_punctuation("a/b") == "a b"
    assert strip_punctuation("a / b") == "a  b"
    assert strip_punctuation("mr.smith") == "mrsmith"
    assert CONTRACTIONS["hed've"] == "he'd've" and CONTRACTIONS["he'dve"] == "he'd've"
    assert "shed" not in CONTRACTIONS and "well" not in CONTRACTIONS


def test_accuracy_hand_computed():
    ten = ["2"] * 3 + ["3"] * 7
    # 3 matches: leaving out a matching annotator gives 2/3 (3 times), else 1 (7 times)
    assert vqa_accuracy("2", ten) == pytest.approx((3 * 2 / 3 + 7) / 10)
    assert vqa_accuracy("3", ten) == 1.0
    assert vqa_accuracy("two", ten) == pytest.approx(0.9)  # number word normalised
    one = ["cat"] + ["dog"] * 9
    assert vqa_accuracy("cat", one) == pytest.approx(9 * (1 / 3) / 10)
    two = ["cat"] * 2 + ["dog"] * 8
    assert vqa_accuracy("cat", two) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert vqa_accuracy("bird", ten) == 0.0
    # human answers lose punctuation only when they differ (the official script's rule)
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 3 + ["shirt"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0
    assert mean_vqa_accuracy(["3", "bird"], [ten, ten]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("x", [])
