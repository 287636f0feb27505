"""Caption cleaning exactly as the BLIP reference does it."""

from __future__ import annotations

import re

_PUNCTUATION = re.compile(r'[.!"()*#:;~]')
_WHITESPACE = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """Clean a caption the way BLIP's ``pre_caption`` does.

    Lower-case, replace each of ``.!"()*#:;~`` with a space, collapse runs of whitespace to one
    space, strip the ends (and a trailing newline), keep the first ``max_words`` words.

    Example:
        >>> pre_caption("A Dog (running)  on the beach!!", 4)
        'a dog running on'
    """
    caption = _PUNCTUATION.sub(" ", caption.lower())
    caption = _WHITESPACE.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption
