"""The retrieval recipe through the real `blip run` CLI on a tiny Hugging Face BLIP folder: its
numbers and scores equal those computed directly with transformers' BlipForImageTextRetrieval
(ITM with [ENC] first; ITC from last_hidden_state[:, 0] projections); 2 ranks equal 1 rank."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from blip_recipes.config import TokenizerConfig
from blip_recipes.data import build_eval_transform, build_tokenizer, normalize_images, pre_caption
from blip_recipes.evaluation import positive_ranks, retrieval_metrics
from tests.recipes.launch import REPO, env

transformers = pytest.importorskip("transformers")

WORDS = ["red", "blue", "green", "circle", "square", "triangle", "small", "large", "on", "left"]
K_TEST = 4


def _hf_model(tok):
    config = transformers.BlipConfig(
        text_config=dict(vocab_size=tok.vocab_size, hidden_size=32, encoder_hidden_size=48,
                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=40, bos_token_id=tok.dec_token_id,
                         pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id),
        vision_config=dict(hidden_size=48, intermediate_size=192, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=16),
        image_text_hidden_size=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BlipForImageTextRetrieval(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    tok = build_tokenizer(TokenizerConfig(kind="synthetic"))
    hf = _hf_model(tok)
    hf.save_pretrained(tmp / "hf_retrieval")
    rng = np.random.default_rng(0)
    records = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp / f"img{i}.png")
        caps = [
            " ".join(rng.choice(WORDS, size=rng.integers(3, 8))).upper() + "!" for _ in range(2)
        ]
        records.append({"image": f"img{i}.png", "caption": caps})
    (tmp / "test.json").write_text(json.dumps(records))
    return tmp, tok, hf, records


def _run(tmp, out, nproc=1):
    launcher = ["--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else []
    args = [sys.executable, "-m", "blip_recipes.cli", "run", *launcher, "blip_eval_retrieval",
            "--config", "eval_retrieval", f"job.output_dir={out}", "tokenizer.kind=synthetic",
            "model.image_size=32", f"eval.checkpoint={tmp / 'hf_retrieval'}",
            f"eval.annotation={tmp / 'test.json'}", f"eval.image_root={tmp}", f"eval.k_test={K_TEST}",
            "eval.batch_size=4", "eval.save_scores=true", "data.num_workers=0", "parallel.device=cpu"]  # fmt: skip
    proc = subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@torch.no_grad()
def _direct(tmp, tok, hf, records):
    """All pairs scored with transformers, then the protocol on dense matrices."""
    transform = build_eval_transform(32)
    pixels = normalize_images(torch.stack([transform(str(tmp / r["image"])) for r in records]))
    texts = [pre_caption(c, 30) for r in records for c in r["caption"]]
    txt2img = torch.tensor([i for i, r in enumerate(records) for _ in r["caption"]])
    ids, mask = tok(texts, max_length=35)
    itc = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False).itm_score
    n_img, n_txt = itc.shape
    enc = ids.clone()
    enc[:, 0] = tok.enc_token_id
    itm = torch.empty(n_img, n_txt)
    for i in range(n_img):
        out = hf(
            input_ids=enc,
            pixel_values=pixels[i : i + 1].expand(n_txt, -1, -1, -1),
            attention_mask=mask,
        )
        itm[i] = out.itm_score[:, 1]

    def ranks(score, sims, positives):
        order = torch.argsort(sims, dim=1, descending=True, stable=True)
        top = torch.zeros_like(sims, dtype=torch.bool).scatter(1, order[:, :K_TEST], True)
        return positive_ranks(torch.where(top, score + 1e4, sims - 1e4), positives), positive_ranks(
            sims, positives
        )

    pos = txt2img[None, :] == torch.arange(n_img)[:, None]
    txt_ranks, itc_txt = ranks(itm + itc, itc, pos)
    img_ranks, itc_img = ranks(itm.t() + itc.t(), itc.t(), pos.t())
    metrics = retrieval_metrics(txt_ranks, img_ranks) | retrieval_metrics(itc_txt, itc_img, "itc_")
    return metrics, itc, itm


def test_recipe_on_hf_folder_equals_transformers(setup, tmp_path):
    tmp, tok, hf, records = setup
    proc = _run(tmp, tmp_path / "out")
    expected, itc, itm = _direct(tmp, tok, hf, records)
    got = json.loads((tmp_path / "out" / "retrieval.json").read_text())
    for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean",
                "itc_txt_r1", "itc_img_r1", "itc_r_mean"):  # fmt: skip
        assert key in got
    assert got == pytest.approx(expected)
    scores = torch.load(tmp_path / "out" / "retrieval_scores.pt")
    rows = torch.arange(itc.shape[0])[:, None]
    torch.testing.assert_close(
        scores["i2t_itc"], itc[rows, scores["i2t_candidates"]], atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        scores["i2t_itm"], itm[rows, scores["i2t_candidates"]], atol=1e-5, rtol=0
    )
    cols = torch.arange(itc.shape[1])[:, None]
    torch.testing.assert_close(
        scores["t2i_itm"], itm.t()[cols, scores["t2i_candidates"]], atol=1e-5, rtol=0
    )
    assert "text retrieval (ITM rerank)" in proc.stdout and "R@10" in proc.stdout
    assert list((tmp_path / "out" / "tensorboard").glob("events.out.tfevents.*"))


def test_two_ranks_equal_one_rank(setup, tmp_path):
    tmp = setup[0]
    _run(tmp, tmp_path / "one")
    _run(tmp, tmp_path / "two", nproc=2)
    one = torch.load(tmp_path / "one" / "retrieval_scores.pt")
    two = torch.load(tmp_path / "two" / "retrieval_scores.pt")
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, atol=1e-5, rtol=0, msg=key)
    assert json.loads((tmp_path / "two" / "retrieval.json").read_text()) == pytest.approx(
        json.loads((tmp_path / "one" / "retrieval.json").read_text())
    )


def test_missing_checkpoint_setting_is_a_clear_error(tmp_path):
    args = [sys.executable, "-m", "blip_recipes.cli", "run", "blip_eval_retrieval", "--config",
            "eval_retrieval", f"job.output_dir={tmp_path}", "tokenizer.kind=synthetic",
            f"eval.checkpoint={tmp_path / 'nowhere.pth'}"]  # fmt: skip
    proc = subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "nowhere.pth does not exist" in proc.stderr


# ------------------------------------------------------------------ tokenizer, resolution, step 0
def _main(capsys, tmp, out, *overrides):
    """The recipe in this process; returns (exit code, stdout + stderr)."""
    from recipes.blip_eval_retrieval import main

    rc = main(["--config", "eval_retrieval", f"job.output_dir={out}", f"eval.annotation={tmp / 'test.json'}",
               f"eval.image_root={tmp}", f"eval.k_test={K_TEST}", "eval.batch_size=4", "eval.progress=false",
               "data.num_workers=0", "parallel.device=cpu", "metrics.tensorboard=false", *overrides])  # fmt: skip
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def test_resolution_must_match_the_checkpoint(setup, tmp_path, capsys):
    tmp = setup[0]
    ckpt = f"eval.checkpoint={tmp / 'hf_retrieval'}"
    rc, log = _main(
        capsys, tmp, tmp_path / "a", ckpt, "tokenizer.kind=synthetic", "model.image_size=48"
    )
    assert rc == 1 and "was trained at 32 px but model.image_size is 48" in log
    assert "Set model.image_size=32, or eval.allow_resolution_change=true" in log
    assert not (tmp_path / "a" / "retrieval.json").exists()
    rc, log = _main(capsys, tmp, tmp_path / "b", ckpt, "tokenizer.kind=synthetic", "model.image_size=48",
                    "eval.allow_resolution_change=true")  # fmt: skip
    assert rc == 0 and "WARNING" in log and "Evaluating at 48 px" in log
    rc, log = _main(
        capsys, tmp, tmp_path / "c", ckpt, "tokenizer.kind=synthetic", "model.image_size=32"
    )
    assert rc == 0 and "resolution: 32 px (the checkpoint's)" in log
    assert "tokenizer: from the config's [tokenizer], kind=synthetic" in log  # none in the folder


def test_dcp_checkpoint_brings_its_tokenizer_recorded_absolutely(
    setup, tmp_path, capsys, monkeypatch
):
    from blip_recipes.interop.loading import build_model_from_weights
    from blip_recipes.interop.readers import read_weights
    from blip_recipes.training.init_checkpoint import save_training_checkpoint

    tmp, tok = setup[0], setup[1]
    model = build_model_from_weights(read_weights(tmp / "hf_retrieval"), tokenizer=tok)
    monkeypatch.chdir(tmp_path)
    save_training_checkpoint(
        model, None, "dcp/step-7", {"kind": "wordpiece", "path": "tok/vocab.txt"}
    )
    recorded = json.loads((tmp_path / "dcp" / "step-7" / "model_args.json").read_text())
    assert recorded["tokenizer"]["path"] == str(tmp_path / "tok" / "vocab.txt")
    save_training_checkpoint(model, None, tmp_path / "syn" / "step-7", {"kind": "synthetic"})
    # the config's tokenizer does not exist: the checkpoint's is used (and validation knows it)
    rc, log = _main(capsys, tmp, tmp_path / "out", f"eval.checkpoint={tmp_path / 'syn'}",
                    "tokenizer.path=/nowhere/vocab.txt", "model.image_size=32")  # fmt: skip
    assert rc == 0, log
    assert "tokenizer: recorded with the checkpoint, kind=synthetic" in log
    assert json.loads((tmp_path / "out" / "retrieval.json").read_text())


def test_step_0_from_the_config(setup, tmp_path, capsys):
    tmp = setup[0]
    args = ("eval.checkpoint=init", "model.name=blip_pretrain_tiny", "model.image_size=32",
            "momentum.queue_size=75", "tokenizer.kind=synthetic")  # fmt: skip
    rc, log = _main(capsys, tmp, tmp_path / "init", *args)
    assert rc == 0, log
    assert "evaluating the initial weights of this config (step 0) at 32 px" in log
    first = json.loads((tmp_path / "init" / "retrieval.json").read_text())
    rc, _ = _main(capsys, tmp, tmp_path / "again", *args)
    assert json.loads((tmp_path / "again" / "retrieval.json").read_text()) == first  # seeded
