"""NoCaps: both annotation formats, the server's submission format, BLEU / CIDEr-D per domain
against hand-computed cases."""

from __future__ import annotations

import json

import pytest

from blip_recipes.evaluation.caption_metrics import caption_scores
from blip_recipes.evaluation.nocaps import (
    load_nocaps_data,
    nocaps_scores,
    submission,
    write_submission,
)

# four images, references share no words across images; two domains
REFS = [["a red car on a road"], ["two dogs play in snow"], ["an owl sits on branch"],
        ["kayak floats near cliffs"]]  # fmt: skip
DOMAINS = ["in-domain", "in-domain", "out-domain", "out-domain"]


def test_per_domain_scores_by_hand():
    """In-domain captions equal their references, out-domain ones share no word with theirs.

    CIDEr-D: every n-gram occurs in one image's references, so within a corpus of M images all
    weights are log(M) and an exact caption has cosine 1 for n = 1..4 and no length penalty:
    10 x 1 = 10 per image; a caption sharing nothing scores 0. BLEU-1 over the whole set: the
    11 words of the two exact captions match, of 20 candidate words; candidate and closest
    reference lengths are equal (20 each), so no brevity penalty.
    """
    captions = [
        REFS[0][0],
        REFS[1][0],
        "the purple elephant dances wildly",
        "zebra umbrella yellow train",
    ]
    scores = nocaps_scores(captions, REFS, DOMAINS)
    assert list(scores) == ["overall", "in-domain", "out-domain"]
    assert scores["in-domain"]["CIDEr"] == pytest.approx(10.0)
    assert scores["out-domain"]["CIDEr"] == pytest.approx(0.0)
    assert scores["overall"]["CIDEr"] == pytest.approx(5.0)
    for n in range(1, 5):
        assert scores["in-domain"][f"Bleu_{n}"] == pytest.approx(1.0)
        assert scores["out-domain"][f"Bleu_{n}"] == pytest.approx(0.0, abs=1e-6)
    assert scores["overall"]["Bleu_1"] == pytest.approx(11 / 20)
    assert scores["overall"]["images"] == 4 and scores["in-domain"]["images"] == 2


def test_a_domain_is_scored_as_its_own_corpus():
    """Per-domain CIDEr uses the domain's own document frequencies: a partly right caption
    scores differently inside its domain than inside the whole split."""
    captions = ["a red car", "two dogs play in snow", "an owl on branch", "kayak near cliffs"]
    scores = nocaps_scores(captions, REFS, DOMAINS)
    subset = caption_scores({0: captions[0], 1: captions[1]}, {0: REFS[0], 1: REFS[1]})
    assert scores["in-domain"]["CIDEr"] == pytest.approx(subset["CIDEr"])
    assert scores["in-domain"]["Bleu_4"] == pytest.approx(subset["Bleu_4"])
    assert nocaps_scores(captions, REFS).keys() == {"overall"}


def test_submission_format_one_entry_per_integer_id(tmp_path):
    records = submission([7, 3, 7, 12], ["a cat", "a dog", "again", "a bird"])
    assert records == [{"image_id": 7, "caption": "a cat"}, {"image_id": 3, "caption": "a dog"},
                       {"image_id": 12, "caption": "a bird"}]  # fmt: skip
    path = write_submission(records, tmp_path / "out" / "nocaps_val.json")
    loaded = json.loads(path.read_text())
    assert loaded == records and all(type(r["image_id"]) is int for r in loaded)
    assert not list((tmp_path / "out").glob("*.tmp"))
    with pytest.raises(ValueError, match="2 captions for 3"):
        submission([1, 2, 3], ["a", "b"])


def test_reference_list_format(tmp_path):
    path = tmp_path / "nocaps_val.json"
    path.write_text(json.dumps([{"image": "val/0013ea2087020901.jpg", "img_id": 0},
                                {"image": "val/0023.jpg", "img_id": "1"}]))  # fmt: skip
    data = load_nocaps_data(path, "root")
    assert data.images == ["root/val/0013ea2087020901.jpg", "root/val/0023.jpg"]
    assert data.image_ids == [0, 1] and data.references is None and data.domains is None


def test_official_format_with_captions_and_domains(tmp_path):
    doc = {"images": [{"id": 4, "file_name": "a.jpg", "domain": "near-domain"},
                      {"id": 9, "file_name": "b.jpg", "domain": "in-domain"}],
           "annotations": [{"image_id": 9, "caption": "x"}, {"image_id": 4, "caption": "y"},
                           {"image_id": 9, "caption": "z"}]}  # fmt: skip
    path = tmp_path / "nocaps_val_4500_captions.json"
    path.write_text(json.dumps(doc))
    data = load_nocaps_data(path)
    assert data.image_ids == [4, 9] and data.references == [["y"], ["x", "z"]]
    assert data.domains == ["near-domain", "in-domain"]
    scores = nocaps_scores(["y", "x"], data.references, data.domains)
    assert list(scores) == ["overall", "in-domain", "near-domain"]  # the server's order


@pytest.mark.parametrize(
    ("content", "message"),
    [([{"image": "a.jpg"}], "record 0: no image id"),
     ([{"image": "a.jpg", "img_id": "x7"}], "image id 'x7' is not an integer"),
     ([{"image": "a.jpg", "img_id": 1, "caption": "c"}, {"image": "b.jpg", "img_id": 2}],
      "1 of 2 images have reference captions; image id 2 has none"),
     ({"images": [{"id": 1, "file_name": "a"}], "annotations": [{"image_id": 5, "caption": "c"}]},
      "image_id 5 is not in 'images'"),
     ({"nothing": []}, "expected a list")],
)  # fmt: skip
def test_bad_annotations_name_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        load_nocaps_data(path)
