"""CapFilt: bootstrap a pretraining corpus with a captioner and a filter (BLIP, section 3.3).

The captioner samples synthetic captions for web images; the filter's ITM head scores the web
caption and every synthetic one; captions scored as matching are kept, and images with at least
one kept caption form the new annotation set. Modules, one job each:

- :mod:`.units`: inputs cut into work units, units assigned to ranks, a unit's web pairs;
- :mod:`.models`: the captioner and filter protocols and their `BlipPretrain` implementations;
- :mod:`.filtering`: which scored captions of an image survive;
- :mod:`.process`: one unit end to end (images, captions, scores, selection, statistics);
- :mod:`.outputs`: JSONL records and tar shards, written atomically;
- :mod:`.run_folder`: the output folder's layout and the guard against mixing runs;
- :mod:`.stats`: per-unit counters and their merge.

The recipe is ``recipes/blip_capfilt.py``; see ``docs/capfilt.md``.
"""

from blip_recipes.capfilt.filtering import ScoredCaption, select_captions
from blip_recipes.capfilt.models import (
    Captioner,
    ModelCaptioner,
    ModelScorer,
    Scorer,
    TextScores,
    load_checkpoint,
)
from blip_recipes.capfilt.process import FilterSettings, KeptImage, decode_threads, process_unit
from blip_recipes.capfilt.run_folder import OutputFolderError, RunFolder, claim, run_identity
from blip_recipes.capfilt.stats import UnitStats, merge_stats
from blip_recipes.capfilt.units import (
    AnnotationInputs,
    WebPair,
    WorkUnit,
    input_kind,
    shard_pairs,
    shard_units,
    units_of_rank,
)

__all__ = [
    "AnnotationInputs",
    "Captioner",
    "FilterSettings",
    "KeptImage",
    "ModelCaptioner",
    "ModelScorer",
    "OutputFolderError",
    "RunFolder",
    "ScoredCaption",
    "Scorer",
    "TextScores",
    "UnitStats",
    "WebPair",
    "WorkUnit",
    "claim",
    "input_kind",
    "load_checkpoint",
    "merge_stats",
    "decode_threads",
    "process_unit",
    "run_identity",
    "select_captions",
    "shard_pairs",
    "shard_units",
    "units_of_rank",
]
