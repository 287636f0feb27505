"""Which captions of an image survive the filter (a pure function of the scores)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Source = Literal["web", "synthetic"]


@dataclass(frozen=True)
class ScoredCaption:
    """A caption of an image with the filter's scores.

    Attributes:
        text: the caption as written to the output (web: as given; synthetic: as generated).
        source: "web" or "synthetic".
        itm: ITM probability of "match".
        itc: ITC cosine similarity.
    """

    text: str
    source: Source
    itm: float
    itc: float


def select_captions(
    captions: Sequence[ScoredCaption], threshold: float = 0.5, synthetic_top_k: int | None = None
) -> list[ScoredCaption]:
    """The captions kept for one image, in their given order (web captions first as given).

    A caption is kept when ``itm >= threshold`` and it has a non-blank text (an empty or
    whitespace caption is never written, whatever its score). With ``synthetic_top_k``, at most that many of
    the synthetic captions that pass are kept: those of highest ITC similarity (ties: the earlier
    caption). A text equal to one kept before it is dropped (a sampler can repeat itself).

    Example:
        >>> web = ScoredCaption("a dog", "web", 0.9, 0.3)
        >>> bad = ScoredCaption("a car", "synthetic", 0.2, 0.1)
        >>> [c.text for c in select_captions([web, bad])]
        ['a dog']
    """
    passed = [(i, c) for i, c in enumerate(captions) if c.itm >= threshold and c.text.strip()]
    if synthetic_top_k is not None:
        synthetic = [(i, c) for i, c in passed if c.source == "synthetic"]
        best = sorted(synthetic, key=lambda ic: (-ic[1].itc, ic[0]))[:synthetic_top_k]
        chosen = {i for i, _ in best}
        passed = [(i, c) for i, c in passed if c.source != "synthetic" or i in chosen]
    kept, seen = [], set()
    for _, caption in passed:
        if caption.text not in seen:
            seen.add(caption.text)
            kept.append(caption)
    return kept


__all__ = ["ScoredCaption", "Source", "select_captions"]
