"""tools/convert_checkpoint.py end to end: reference .pth -> DCP -> HF folders and -> safetensors,
each step checked by model outputs; unknown layouts fail naming the keys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blip_recipes.checkpoint import load_model_weights
from blip_recipes.interop import ours_to_reference
from blip_recipes.interop.loading import load_model
from blip_recipes.models import build_model
from tests.evaluation.eval_helpers import tiny_model, tokenizer
from tests.interop.convert_helpers import assert_outputs_close, hf_outputs, our_outputs
from tests.models.tiny_blip import TINY, make_text

TOOL = Path(__file__).resolve().parents[2] / "tools" / "convert_checkpoint.py"
transformers = pytest.importorskip("transformers")


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True,
                          text=True, timeout=180)  # fmt: skip


def _inputs(tok):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids, mask = make_text(2, seed=2)
    ids = ids.clamp(max=tok.vocab_size - 3)
    return images, ids, mask


def test_reference_to_dcp_to_hf_and_safetensors(tmp_path):
    tok = tokenizer()
    model = tiny_model(seed=4)
    torch.save({"model": ours_to_reference(model.state_dict())}, tmp_path / "ref.pth")

    proc = _tool(tmp_path / "ref.pth", tmp_path / "run" / "checkpoints" / "step-0",
                 "--tokenizer-kind", "synthetic", "--queue-size", "32",
                 "--set", "vision_heads=2", "--set", "text_heads=2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = build_model("blip_pretrain_tiny", **{**TINY, "vocab_size": tok.vocab_size})
    load_model_weights(tmp_path / "run" / "checkpoints" / "step-0", fresh)  # checkpoint.init_from
    images, ids, mask = _inputs(tok)
    expected = our_outputs(model, images, ids, mask)
    assert_outputs_close(our_outputs(fresh.eval(), images, ids, mask), expected, atol=0)

    proc = _tool(tmp_path / "run", tmp_path / "hf", "--to", "hf")  # tokenizer recorded in the DCP
    assert proc.returncode == 0, proc.stderr[-2000:]
    retrieval, info = transformers.BlipForImageTextRetrieval.from_pretrained(
        tmp_path / "hf" / "retrieval", output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    captioning = transformers.BlipForConditionalGeneration.from_pretrained(
        tmp_path / "hf" / "captioning"
    )
    assert (tmp_path / "hf" / "captioning" / "tokenizer.json").is_file()
    assert captioning.config.text_config.sep_token_id == tok.sep_token_id
    theirs = hf_outputs(retrieval.eval(), captioning.eval(), images, ids, mask)
    assert_outputs_close(expected, theirs)

    proc = _tool(tmp_path / "run", tmp_path / "flat.safetensors", "--no-momentum")
    assert proc.returncode == 0, proc.stderr[-2000:]
    back = load_model(tmp_path / "flat.safetensors")  # builder args in the header
    assert_outputs_close(our_outputs(back, images, ids, mask), expected, atol=0)

    before = (tmp_path / "flat.safetensors").read_bytes()
    proc = _tool(tmp_path / "ref.pth", tmp_path / "flat.safetensors", "--set", "vision_heads=2",
                 "--set", "text_heads=2", "--tokenizer-kind", "synthetic")  # fmt: skip
    assert proc.returncode == 2 and "--force" in proc.stderr  # a user's file is never replaced
    assert (tmp_path / "flat.safetensors").read_bytes() == before


def test_unknown_layout_fails_naming_keys(tmp_path):
    torch.save({"encoder.weird.weight": torch.zeros(1)}, tmp_path / "odd.pth")
    proc = _tool(tmp_path / "odd.pth", tmp_path / "out")
    assert proc.returncode == 1
    assert "unknown checkpoint layout" in proc.stderr and "encoder.weird.weight" in proc.stderr
