"""tools/caption.py on a converted tiny checkpoint: same captions as the library, deterministic
for greedy and beam, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blip_recipes.evaluation.generation import caption_images
from blip_recipes.interop.exporters import consolidated_state_dict
from blip_recipes.training.init_checkpoint import save_training_checkpoint
from tests.evaluation.eval_helpers import tiny_model, tokenizer
from tests.recipes.launch import env

TOOL = Path(__file__).resolve().parents[2] / "tools" / "caption.py"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("caption")
    model = tiny_model(seed=5)
    model.model_args = {"name": "blip_pretrain_tiny", "vision_width": 48, "vision_heads": 2,
                        "text_width": 32, "text_heads": 2, "text_ffn_dim": 64, "embed_dim": 16,
                        "max_positions": 40, "vocab_size": model.text.embeddings.word_embeddings.num_embeddings,
                        "image_size": 32}  # fmt: skip
    save_training_checkpoint(model, None, tmp / "ckpt", {"kind": "synthetic"})
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (36, 30, 3), dtype=np.uint8)).save(tmp / f"{i}.png")
        paths.append(str(tmp / f"{i}.png"))
    assert set(consolidated_state_dict(model)) == set(model.state_dict())
    return tmp, model, paths


def _tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True,
                          text=True, timeout=180, env=env())  # fmt: skip


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_tool_prints_library_captions(setup, method):
    tmp, model, paths = setup
    proc = _tool(tmp / "ckpt", *paths, "--method", method, "--max-length", "14", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    with torch.no_grad():
        expected = caption_images(model, tokenizer(), paths, method=method, max_length=14)
    assert [line["image"] for line in lines] == paths
    assert [line["caption"] for line in lines] == expected
    if method == "beam":  # deterministic across processes
        again = _tool(tmp / "ckpt", *paths, "--method", method, "--max-length", "14", "--json")
        assert again.stdout == proc.stdout


def test_tool_unknown_layout_error(setup, tmp_path):
    paths = setup[2]
    torch.save({"x.weight": torch.zeros(1)}, tmp_path / "odd.pth")
    proc = _tool(tmp_path / "odd.pth", *paths)
    assert proc.returncode == 1 and "x.weight" in proc.stderr


def test_tool_names_a_missing_image(setup, tmp_path):
    proc = _tool(tmp_path / "odd.pth", tmp_path / "nowhere.jpg")
    assert proc.returncode == 1 and "nowhere.jpg" in proc.stderr
