"""The Python API (blip_recipes.api): the README example on a tiny checkpoint, every supported
checkpoint format through load_model, and scores / features against the model's entry points."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import blip_recipes
from blip_recipes import api
from blip_recipes.evaluation.generation import caption_images
from blip_recipes.interop.exporters import export_hf, save_consolidated
from blip_recipes.training.init_checkpoint import save_training_checkpoint
from tests.evaluation.eval_helpers import tiny_model, tokenizer

ROOT = Path(__file__).resolve().parents[1]
EMBED_DIM = 16  # the tiny test model's


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    model = tiny_model(seed=3)
    model.model_args = {"name": "blip_pretrain_tiny", "vision_width": 48, "vision_heads": 2,
                        "text_width": 32, "text_heads": 2, "text_ffn_dim": 64, "embed_dim": 16,
                        "max_positions": 40, "vocab_size": model.text.embeddings.word_embeddings.num_embeddings,
                        "image_size": 32}  # fmt: skip
    save_training_checkpoint(model, None, tmp / "run" / "checkpoints" / "step-10",
                             {"kind": "synthetic"})  # fmt: skip
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(tmp / f"{name}.jpg")
    return tmp, model.eval()


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs(setup, monkeypatch, capsys):
    tmp, model = setup
    code = _readme_example()
    assert '"outputs/debug"' in code
    monkeypatch.chdir(tmp)
    namespace: dict = {}
    exec(code.replace('"outputs/debug"', repr(str(tmp / "run"))), namespace)
    captions, scores = namespace["captions"], namespace["scores"]
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    assert scores.itm.shape == scores.itc.shape == scores.itc_logit.shape == (2,)
    assert ((scores.itm >= 0) & (scores.itm <= 1)).all()
    assert namespace["image_feat"].shape == (2, EMBED_DIM)
    assert namespace["text_feat"].shape == (3, EMBED_DIM)
    assert namespace["similarity"].shape == (2, 3)
    with torch.no_grad():  # the loaded model captions as the in-memory one
        assert captions == caption_images(model, tokenizer(), [tmp / "cat.jpg", tmp / "dog.jpg"])


def test_api_is_lazy_and_reexported():
    assert blip_recipes.load_model is api.load_model
    assert blip_recipes.caption_images is caption_images
    assert set(api.__all__) <= set(dir(blip_recipes))
    code = "import sys, blip_recipes; print('torch' in sys.modules, blip_recipes.__version__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split()[0] == "False", proc.stderr


def _probe(model, tok, images):
    texts = ["a red circle", "two blue squares"]
    scores = api.score_pairs(model, tok, images, texts)
    return scores, api.image_features(model, images), api.text_features(model, tok, texts)


def test_load_model_every_format_gives_the_same_model(setup, tmp_path):
    tmp, model = setup
    images = [tmp / "cat.jpg", tmp / "dog.jpg"]
    expected = _probe(model, tokenizer(), images)
    paths = {"dcp run folder": tmp / "run", "dcp step": tmp / "run" / "checkpoints" / "step-10"}
    paths["safetensors"] = save_consolidated(model, tmp_path / "model.safetensors")
    if pytest.importorskip("transformers"):
        export_hf(model, tmp_path / "hf", tokenizer())
        paths["hf"] = tmp_path / "hf"
    for kind, path in paths.items():
        extra = {} if kind.startswith("dcp") else {"tokenizer_kind": "synthetic"}
        loaded, tok = api.load_model(path, device="cpu", **extra)
        assert not loaded.training
        got = _probe(loaded, tok, images)
        for a, b in zip(expected[0], got[0]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=kind)
        torch.testing.assert_close(expected[1], got[1], atol=1e-5, rtol=1e-5, msg=kind)
        torch.testing.assert_close(expected[2], got[2], atol=1e-5, rtol=1e-5, msg=kind)


def test_load_model_errors(setup, tmp_path):
    tmp, model = setup
    with pytest.raises(FileNotFoundError):
        api.load_model(tmp_path / "nowhere")
    path = save_consolidated(model, tmp_path / "bare.safetensors")  # records no tokenizer
    with pytest.raises(ValueError, match="tokenizer"):
        api.load_model(path)


def test_scores_and_features_match_the_entry_points(setup):
    tmp, model = setup
    tok = tokenizer()
    images = [tmp / "cat.jpg", tmp / "dog.jpg", tmp / "cat.jpg"]
    texts = ["A red circle!", "two blue squares", "a small green triangle"]
    model.train()  # the API evaluates in eval mode and restores the mode
    scores = api.score_pairs(model, tok, images, texts, batch_size=2)
    img, txt = api.image_features(model, images), api.text_features(model, tok, texts)
    assert model.training
    model.eval()
    assert img.shape == txt.shape == (3, EMBED_DIM)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(scores.itc, (img * txt).sum(-1), atol=1e-5, rtol=1e-5)
    temp = float(model.temperature().detach())
    torch.testing.assert_close(scores.itc_logit, scores.itc / temp)
    with torch.no_grad():  # ITM by hand: cleaned texts, 35 tokens, the image tokens
        pixels = api._pixels(model, images, None)
        embeds = model.encode_image(pixels).embeds
        ids, mask = tok(["a red circle", "two blue squares", "a small green triangle"], 35)
        itm = model.itm_logits(embeds, ids, mask).softmax(-1)[:, 1]
    torch.testing.assert_close(scores.itm, itm, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one text per image"):
        api.score_pairs(model, tok, images, texts[:2])


def test_features_accept_tensors(setup):
    tmp, model = setup
    uint8 = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    from_uint8 = api.image_features(model, list(uint8))
    from blip_recipes.data import normalize_images

    normalised = api.image_features(model, normalize_images(uint8))
    torch.testing.assert_close(from_uint8, normalised)
    assert api.text_features(model, tokenizer(), "one text").shape == (1, EMBED_DIM)
