"""The NoCaps recipe on a tiny checkpoint and generated images: the submission holds the
library's captions in the server's format, the per-domain scores are those of the library on
the same captions, a split without references gives the submission only, 2 ranks equal one."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.recipes.launch import REPO, env

DOMAINS = ["in-domain", "near-domain", "out-domain", "near-domain", "in-domain"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from blip_recipes.training.init_checkpoint import save_training_checkpoint
    from tests.evaluation.eval_helpers import tiny_model

    tmp = tmp_path_factory.mktemp("nocaps")
    save_training_checkpoint(tiny_model(), None, tmp / "ckpt" / "step-3", {"kind": "synthetic"})
    rng = np.random.default_rng(0)
    for i in range(len(DOMAINS)):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(tmp / f"{i}.jpg")
    captions = _library_captions([str(tmp / f"{i}.jpg") for i in range(len(DOMAINS))])
    records = []
    for i, domain in enumerate(DOMAINS):
        refs = [" ".join(rng.choice(["red", "blue", "square", "on", "left", "small"], 4))
                for _ in range(3)]  # fmt: skip
        if i < 2:  # one right caption in-domain and near-domain: scores well above zero
            refs[0] = captions[i]
        records.append({"image": f"{i}.jpg", "img_id": 100 + i, "caption": refs,
                        "domain": domain})  # fmt: skip
    (tmp / "val.json").write_text(json.dumps(records))
    test = [{"image": r["image"], "img_id": r["img_id"]} for r in records]
    (tmp / "test.json").write_text(json.dumps(test))
    return tmp, records


def _library_captions(paths):
    from blip_recipes.evaluation.captioning import generate_captions
    from tests.evaluation.eval_helpers import tiny_model, tokenizer

    return generate_captions(tiny_model(), tokenizer(), paths, method="beam", image_size=32,
                             batch_size=2, num_beams=2, max_length=8, min_length=5,
                             repetition_penalty=1.1)  # fmt: skip


def _overrides(tmp, out, split="val"):
    return [f"job.output_dir={out}", "tokenizer.kind=synthetic", "model.image_size=32",
            f"eval.checkpoint={tmp / 'ckpt'}", f"eval.annotation={tmp / f'{split}.json'}",
            f"eval.image_root={tmp}", "eval.batch_size=2", "caption.max_length=8",
            "caption.num_beams=2", "data.num_workers=0", "parallel.device=cpu",
            "metrics.tensorboard=false"]  # fmt: skip


def test_submission_and_domain_scores_equal_the_library(setup, tmp_path, capsys):
    from blip_recipes.evaluation.nocaps import nocaps_scores
    from recipes.blip_eval_nocaps import main

    tmp, records = setup
    torch.set_num_threads(1)
    assert main(["--config", "eval_nocaps", *_overrides(tmp, tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "near-domain" in out and "CIDEr" in out and "5 captions for the server" in out
    got = json.loads((tmp_path / "submission.json").read_text())
    captions = _library_captions([str(tmp / r["image"]) for r in records])
    assert got == [{"image_id": 100 + i, "caption": c} for i, c in enumerate(captions)]
    scores = json.loads((tmp_path / "nocaps_metrics.json").read_text())
    expected = nocaps_scores(captions, [r["caption"] for r in records], DOMAINS)
    assert list(scores) == ["overall", "in-domain", "near-domain", "out-domain"]
    for group, values in expected.items():
        assert scores[group] == pytest.approx(values), group
    assert scores["in-domain"]["CIDEr"] > 1.0 and scores["near-domain"]["CIDEr"] > 1.0


def test_split_without_references_writes_only_the_submission(setup, tmp_path, capsys):
    from recipes.blip_eval_nocaps import main

    tmp, _ = setup
    assert main(["--config", "eval_nocaps", *_overrides(tmp, tmp_path, "test")]) == 0
    assert len(json.loads((tmp_path / "submission.json").read_text())) == 5
    assert not (tmp_path / "nocaps_metrics.json").exists()
    assert "CIDEr" not in capsys.readouterr().out


def test_missing_images_end_in_one_line(setup, tmp_path, capsys):
    from recipes.blip_eval_nocaps import main

    tmp, _ = setup
    rc = main(
        ["--config", "eval_nocaps", *_overrides(tmp, tmp_path), f"eval.image_root={tmp_path}"]
    )
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert rc == 1 and last.startswith("error: 5 of 5 images of") and "Traceback" not in err
    assert "tokenizer" not in err  # stopped before the model was read
    assert not (tmp_path / "submission.json").exists()


@pytest.mark.slow  # three interpreters through `blip run`
def test_two_ranks_equal_one_rank(setup, tmp_path):
    tmp, _ = setup
    for name, nproc in (("one", 1), ("two", 2)):
        launcher = ["--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else []
        args = [sys.executable, "-m", "blip_recipes.cli", "run", *launcher, "blip_eval_nocaps",
                "--config", "eval_nocaps", *_overrides(tmp, tmp_path / name)]  # fmt: skip
        proc = subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for file in ("submission.json", "nocaps_metrics.json"):
        one = json.loads((tmp_path / "one" / file).read_text())
        assert json.loads((tmp_path / "two" / file).read_text()) == one, file
