"""tools/count_flops.py: executed FLOPs of one step, counted on fake tensors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from blip_recipes.benchmarking.flops import step_flops

TOOL = Path(__file__).resolve().parents[2] / "tools" / "count_flops.py"


def test_base_step_flops_reuse_the_batch_keys_values_for_the_negatives():
    """ViT-B, 224 px: the reference formulation (keys/values of the 197 image tokens projected
    for 4B rows per layer) executes about 301 GFLOP per sample. The packed pass projects them
    once per image and selects the hard negatives' (250.6, of which the one-hot selection is
    0.1 at batch 8); recomputing the negatives' projections executes 267.3."""
    counted = step_flops("blip_pretrain_base", batch=8)
    assert counted.total == pytest.approx(250.6, abs=0.2)
    assert counted.momentum == pytest.approx(38.8, abs=0.2)  # ViT-B + text fwd, no grad
    recompute = step_flops("blip_pretrain_base", batch=8, negative_kv="recompute")
    assert recompute.total == pytest.approx(267.3, abs=0.2)
    assert recompute.total - counted.total >= 15.0


def test_cli_prints_and_writes_json(tmp_path):
    out = tmp_path / "f.json"
    proc = subprocess.run([sys.executable, str(TOOL), "--model", "blip_pretrain_tiny",
                           "--image-size", "32", "--json", str(out)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "blip_pretrain_tiny:" in proc.stdout and out.read_text().startswith("[")
