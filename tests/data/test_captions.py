import pytest

from blip_recipes.data import pre_caption


@pytest.mark.parametrize(
    "raw, max_words, expected",
    [
        ("A Dog (running)  on the beach!!", 30, "a dog running on the beach"),
        ("  Hello.World  ", 30, "hello world"),
        ('quote"s *star* #tag: semi; tilde~', 30, "quote s star tag semi tilde"),
        ("one two three four five", 3, "one two three"),
        (
            "keeps, commas and 'apostrophes' - dashes?",
            30,
            "keeps, commas and 'apostrophes' - dashes?",
        ),
        ("trailing newline\n", 30, "trailing newline"),
        ("...!!!", 30, ""),
        ("tab\tkept single", 30, "tab\tkept single"),
    ],
)
def test_pre_caption(raw, max_words, expected):
    assert pre_caption(raw, max_words) == expected


def test_pre_caption_max_words_counts_after_cleaning():
    caption = " ".join(f"w{i}." for i in range(40))
    assert pre_caption(caption, 30).split(" ") == [f"w{i}" for i in range(30)]
