"""Caption metrics: hand-computed cases and numbers of the coco-caption toolkit.

`test_matches_coco_caption_toolkit` compares with the scores that pycocoevalcap 1.2's
``Bleu(4)`` and ``Cider()`` scorers returned for the same caption sets (pre-tokenized text, so
its Java tokenizer was not involved); the numbers were computed once and are kept here as
constants, so the test needs no extra package.
"""

from __future__ import annotations

import math
import random

import pytest

from blip_recipes.evaluation.caption_metrics import (
    caption_scores,
    cider_d,
    cider_d_per_image,
    corpus_bleu,
    tokenize_caption,
)


def bleu(cand: str, refs: list[str]) -> list[float]:
    return corpus_bleu({0: cand.split()}, {0: [r.split() for r in refs]})


def test_tokenizer_lowercases_splits_clitics_and_drops_punctuation():
    assert tokenize_caption("A man's Dog, running (fast)!") == [
        "a", "man", "'s", "dog", "running", "fast"
    ]  # fmt: skip
    assert tokenize_caption('He don\'t "like" it - really.') == [
        "he", "do", "n't", "like", "it", "really"
    ]  # fmt: skip
    assert tokenize_caption("a black-and-white photo; two cats?") == [
        "a", "black-and-white", "photo", "two", "cats"
    ]  # fmt: skip
    assert tokenize_caption("  ...  ") == []


def test_bleu_hand_computed_precisions():
    # p1 = 3/4, p2 = 2/3, p3 = 1/2, p4 = 0/1; equal lengths: no brevity penalty
    b1, b2, b3, b4 = bleu("a b c d", ["a b c e"])
    assert b1 == pytest.approx(0.75)
    assert b2 == pytest.approx(math.sqrt(0.75 * 2 / 3))
    assert b3 == pytest.approx((0.75 * 2 / 3 * 0.5) ** (1 / 3))
    assert b4 < 1e-3  # no matching 4-gram: only the 1e-15 floor is left
    assert bleu("a b c d e", ["a b c d e"]) == pytest.approx([1.0] * 4)


def test_bleu_clips_counts_by_the_most_in_any_one_reference():
    assert bleu("the the the the", ["the cat", "the the dog"])[0] == pytest.approx(2 / 4)


def test_bleu_brevity_penalty_uses_the_closest_reference_length():
    # closest of (6, 4) to 3 is 4: BP = exp(1 - 4/3)
    assert bleu("a b c", ["a b c d e f", "a b c d"])[0] == pytest.approx(math.exp(1 - 4 / 3))
    # tie between 2 and 4 picks the shorter one: 3 > 2, no penalty
    assert bleu("a b c", ["a b", "a b c d"])[0] == pytest.approx(1.0)


def test_bleu_is_a_corpus_statistic_not_a_mean_of_sentences():
    cands = {0: "a b".split(), 1: "c d e f".split()}
    refs = {0: ["a b".split()], 1: ["c x y z".split()]}
    # unigram matches (2 + 1) / (2 + 4) over the corpus, not mean(1, 1/4)
    assert corpus_bleu(cands, refs)[0] == pytest.approx(3 / 6)


def test_cider_hand_computed():
    # every n-gram in one image's references only: idf = log 2 for all, cosine 1 for n = 1, 2,
    # no 3- or 4-grams: 10 * (1 + 1 + 0 + 0) / 4
    assert cider_d({0: ["a", "b"], 1: ["c", "d"]}, {0: [["a", "b"]], 1: [["c", "d"]]}) == 5.0
    # longer reference: cosines 2 / sqrt(6) and 1 / sqrt(2), length penalty over 1 bigram
    per = cider_d_per_image({0: ["a", "b"], 1: ["d", "e"]}, {0: [["a", "b", "c"]], 1: [["d", "e"]]})
    expected = 10 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    assert per[0] == pytest.approx(expected)


def test_cider_ngrams_in_every_image_carry_no_weight():
    # "a" is in both images' references: idf 0, so a candidate made of it alone scores 0
    per = cider_d_per_image({0: ["a"], 1: ["a", "c"]}, {0: [["a", "b"]], 1: [["a", "c"]]})
    assert per[0] == 0.0 and per[1] > 0


def test_cider_clips_candidate_weights_by_the_reference():
    refs = {0: [["a", "b"]], 1: [["c", "d"]]}
    once = cider_d_per_image({0: ["a", "b"], 1: ["c", "d"]}, refs)[0]
    repeated = cider_d_per_image({0: ["a", "a", "b"], 1: ["c", "d"]}, refs)[0]
    assert repeated < once  # repeating a word cannot raise the score


def test_caption_scores_tokenizes_both_sides():
    scores = caption_scores({7: "A dog, running."}, {7: ["a dog running", "A DOG RUNNING!"]})
    assert scores["Bleu_1"] == pytest.approx(1.0)
    assert set(scores) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr"}


def test_mismatched_ids_are_an_error():
    with pytest.raises(ValueError, match="same images"):
        corpus_bleu({0: ["a"]}, {1: [["a"]]})
    with pytest.raises(ValueError, match="no reference"):
        cider_d({0: ["a"]}, {0: []})


def make_caption_sets(seed: int, n_images: int) -> tuple[dict, dict]:
    """Random references (1-5 per image, noisy copies of a base sentence) and a candidate."""
    rng = random.Random(seed)
    vocab = ("a an the man woman dog cat red blue sitting on standing in of with table street "
             "grass two people riding horse bike").split()  # fmt: skip
    refs, cands = {}, {}
    for i in range(n_images):
        base = [rng.choice(vocab) for _ in range(rng.randint(5, 12))]
        image_refs = []
        for _ in range(rng.randint(1, 5)):
            r = [w if rng.random() < 0.7 else rng.choice(vocab) for w in base]
            r = r[: rng.randint(3, len(r))] + [rng.choice(vocab) for _ in range(rng.randint(0, 3))]
            image_refs.append(r)
        c = [w if rng.random() < 0.6 else rng.choice(vocab) for w in base]
        cands[i] = c[: rng.randint(1, len(base))]
        refs[i] = image_refs
    return cands, refs


# (seed, images, pycocoevalcap Bleu(4) [B1..B4], pycocoevalcap Cider())
COCO_CAPTION_TOOLKIT = [
    (0, 3, [0.22313016007405323, 0.22313016005545908, 0.2231301599996766,
            0.007055995203649732], 1.034730696753352),
    (1, 10, [0.4219076161847946, 0.24156253512850906, 0.15688399786126225,
             0.10293586018123249], 0.9498581563410401),
    (2, 36, [0.509097841259566, 0.3146478109606801, 0.2131482035993678,
             0.1330312711925606], 1.166280433062493),
    (3, 36, [0.49882883791249627, 0.33088561799271043, 0.2232383239607433,
             0.14293502293478444], 1.4942724062318955),
    (4, 1, [0.9999999996666668, 0.44721359534343347, 3.684031497269112e-06,
            1.1362193660082777e-08], None),
]  # fmt: skip


@pytest.mark.parametrize("seed, n_images, bleu_expected, cider_expected", COCO_CAPTION_TOOLKIT)
def test_matches_coco_caption_toolkit(seed, n_images, bleu_expected, cider_expected):
    cands, refs = make_caption_sets(seed, n_images)
    assert corpus_bleu(cands, refs) == pytest.approx(bleu_expected, rel=1e-12, abs=1e-18)
    if cider_expected is not None:  # CIDEr needs more than one image (idf of log 1 is 0)
        assert cider_d(cands, refs) == pytest.approx(cider_expected, rel=1e-12)
