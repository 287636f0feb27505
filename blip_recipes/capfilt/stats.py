"""Counters of a CapFilt unit and their merge into a run's ``stats.json``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

HISTOGRAM_BINS = 100
"""ITM scores are counted in this many equal bins over [0, 1] (quantiles to 0.01)."""

MAX_NAMED_BAD_IMAGES = 100
"""Bad images named in ``stats.json`` (every one is named in its unit's statistics file)."""


@dataclass
class SourceCounts:
    """Captions of one source (web or synthetic): scored, kept, and the sum of their ITM."""

    captions: int = 0
    kept: int = 0
    itm_sum: float = 0.0
    kept_itm_sum: float = 0.0
    itm_histogram: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BINS)
    """Scored captions per ITM bin (bin ``b`` holds ``[b, b + 1) / HISTOGRAM_BINS``, 1.0 in the
    last): merges exactly across units, and gives the quantiles a run that keeps little needs."""

    def add(self, itm: float, kept: bool) -> None:
        self.captions += 1
        self.itm_histogram[min(HISTOGRAM_BINS - 1, max(0, int(itm * HISTOGRAM_BINS)))] += 1
        self.itm_sum += itm
        if kept:
            self.kept += 1
            self.kept_itm_sum += itm

    def merge(self, other: SourceCounts) -> None:
        self.captions += other.captions
        self.kept += other.kept
        self.itm_sum += other.itm_sum
        self.kept_itm_sum += other.kept_itm_sum
        self.itm_histogram = [a + b for a, b in zip(self.itm_histogram, other.itm_histogram)]

    def quantiles(self, qs: Sequence[float] = (0.0, 0.1, 0.5, 0.9, 1.0)) -> dict[str, float]:
        """ITM quantiles from the histogram (the upper edge of the bin that holds each; 0 and
        1 give the lowest and highest non-empty bins' lower and upper edges); {} when nothing
        was scored."""
        total = sum(self.itm_histogram)
        if not total:
            return {}
        out = {}
        for q in qs:
            rank, seen = q * total, 0
            for b, n in enumerate(self.itm_histogram):
                seen += n
                if n and (seen >= rank if q > 0 else True):
                    out[f"p{round(100 * q)}"] = (b + (q > 0)) / HISTOGRAM_BINS
                    break
        return out

    def summary(self) -> dict:
        """Counts, kept fraction and mean ITM (of all scored captions and of the kept ones)."""
        return {
            "captions": self.captions,
            "kept": self.kept,
            "kept_fraction": self.kept / self.captions if self.captions else None,
            "mean_itm": self.itm_sum / self.captions if self.captions else None,
            "mean_itm_kept": self.kept_itm_sum / self.kept if self.kept else None,
            "itm_quantiles": self.quantiles(),
        }


@dataclass
class UnitStats:
    """What one unit did. ``seconds`` is the time it took (not part of the output's identity)."""

    unit: int
    source: str
    images: int = 0
    images_kept: int = 0
    bad_images: list[dict] = field(default_factory=list)
    web: SourceCounts = field(default_factory=SourceCounts)
    synthetic: SourceCounts = field(default_factory=SourceCounts)
    captions_generated: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UnitStats:
        d = dict(d)
        d["web"] = SourceCounts(**d["web"])
        d["synthetic"] = SourceCounts(**d["synthetic"])
        return cls(**d)


def merge_stats(units: Sequence[UnitStats]) -> dict:
    """The run's statistics over units (in unit order, so sums are the same for any layout).

    Returns:
        ``{"units", "images", "images_kept", "images_kept_fraction", "bad_images",
        "bad_image_examples", "web": {...}, "synthetic": {...}, "captions_kept",
        "captions_generated"}``; ``web`` / ``synthetic`` as :meth:`SourceCounts.summary`.
    """
    web, synthetic = SourceCounts(), SourceCounts()
    images = kept = generated = 0
    bad: list[dict] = []
    for u in sorted(units, key=lambda u: u.unit):
        images += u.images
        kept += u.images_kept
        generated += u.captions_generated
        bad += u.bad_images
        web.merge(u.web)
        synthetic.merge(u.synthetic)
    return {
        "units": len(units),
        "images": images,
        "images_kept": kept,
        "images_kept_fraction": kept / images if images else None,
        "bad_images": len(bad),
        "bad_image_examples": bad[:MAX_NAMED_BAD_IMAGES],
        "web": web.summary(),
        "synthetic": synthetic.summary(),
        "captions_kept": web.kept + synthetic.kept,
        "captions_generated": generated,
    }


__all__ = ["HISTOGRAM_BINS", "MAX_NAMED_BAD_IMAGES", "SourceCounts", "UnitStats", "merge_stats"]
