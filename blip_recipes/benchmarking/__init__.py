"""Benchmarking: the recipe's real step per variant vs a transformers-composed baseline.

``tools/benchmark.py`` is the command line; the parts are importable for tests and notebooks.
"""

from blip_recipes.benchmarking.baseline_hf import (
    BaselineDims,
    HFBaselineStep,
    HFComposedBlip,
    build_hf_baseline,
)
from blip_recipes.benchmarking.inputs import synthetic_batches, write_bert_layout_vocab
from blip_recipes.benchmarking.profiling import PARTS, instrument_step, profile_steps, time_split
from blip_recipes.benchmarking.report import format_table
from blip_recipes.benchmarking.runner import run_benchmark
from blip_recipes.benchmarking.settings import BenchmarkSettings
from blip_recipes.benchmarking.timing import StepTimer, TimingSummary
from blip_recipes.benchmarking.variants import PRESETS, Variant, parse_variant, parse_variants

__all__ = [
    "PARTS",
    "PRESETS",
    "BaselineDims",
    "BenchmarkSettings",
    "HFBaselineStep",
    "HFComposedBlip",
    "StepTimer",
    "TimingSummary",
    "Variant",
    "build_hf_baseline",
    "format_table",
    "instrument_step",
    "parse_variant",
    "parse_variants",
    "profile_steps",
    "run_benchmark",
    "synthetic_batches",
    "time_split",
    "write_bert_layout_vocab",
]
