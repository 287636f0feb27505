"""The video retrieval recipe on a tiny Hugging Face BLIP folder and generated mp4 files: its
numbers equal the library's on the same decoded frames, 2 ranks through `blip run` equal one
process, and bad settings end in one line before any model work."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.recipes.launch import REPO, env

pytest.importorskip("av")
pytest.importorskip("transformers")

FRAMES = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from blip_recipes.config import TokenizerConfig
    from blip_recipes.data import build_tokenizer
    from blip_recipes.data.video import write_test_video
    from tests.recipes.test_blip_eval_retrieval import _hf_model

    tmp = tmp_path_factory.mktemp("video_eval")
    tok = build_tokenizer(TokenizerConfig(kind="synthetic"))
    _hf_model(tok).save_pretrained(tmp / "hf_retrieval")
    rng = np.random.default_rng(0)
    (tmp / "videos").mkdir()
    lines = []
    for v in range(5):
        frames = rng.integers(0, 256, (7 + v, 24, 40, 3), dtype=np.uint8)
        write_test_video(tmp / "videos" / f"video{v}.mp4", frames)
        words = rng.choice(["red", "blue", "dog", "runs", "a", "man", "talks"], size=5)
        lines.append(json.dumps({"clip_name": f"video{v}", "caption": " ".join(words)}))
    (tmp / "test.jsonl").write_text("\n".join(lines) + "\n")
    return tmp, tok


def _overrides(tmp, out):
    return [f"job.output_dir={out}", "tokenizer.kind=synthetic", "model.image_size=32",
            f"eval.checkpoint={tmp / 'hf_retrieval'}", f"video.annotation={tmp / 'test.jsonl'}",
            f"video.root={tmp / 'videos'}", f"video.num_frames={FRAMES}", "eval.k_test=3",
            "eval.batch_size=2", "eval.save_scores=true", "eval.progress=false",
            "data.num_workers=0", "parallel.device=cpu", "metrics.tensorboard=false"]  # fmt: skip


def test_recipe_numbers_equal_the_library_on_the_decoded_frames(setup, tmp_path, capsys):
    from blip_recipes.data.video import read_video_frames
    from blip_recipes.evaluation.video_retrieval import (
        load_video_retrieval_data,
        score_video_retrieval,
        video_retrieval_metrics,
    )
    from blip_recipes.interop.loading import build_model_from_weights
    from blip_recipes.interop.readers import read_weights
    from recipes.blip_eval_retrieval_video import main

    tmp, tok = setup
    torch.set_num_threads(1)
    assert main(["--config", "eval_retrieval_msrvtt", *_overrides(tmp, tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "video retrieval (ITM rerank)" in out and "MdR" in out
    got = json.loads((tmp_path / "video_retrieval.json").read_text())

    data = load_video_retrieval_data(str(tmp / "test.jsonl"), str(tmp / "videos"))
    data.images = [read_video_frames(p, FRAMES, 32) for p in data.images]
    model = build_model_from_weights(read_weights(tmp / "hf_retrieval"), tokenizer=tok).eval()
    expected = score_video_retrieval(model, tok, data, num_frames=FRAMES, k_test=3)
    assert got == pytest.approx(video_retrieval_metrics(expected))
    assert {"txt_r1", "vid_r10", "vid_mdR", "r_mean", "itc_vid_mdR"} <= set(got)
    saved = torch.load(tmp_path / "retrieval_scores.pt")
    torch.testing.assert_close(saved["i2t_itm"], expected.i2t_itm, atol=1e-5, rtol=0)


def test_missing_videos_and_settings_are_one_line(setup, tmp_path, capsys):
    from recipes.blip_eval_retrieval_video import main

    tmp, _ = setup
    with pytest.raises(SystemExit) as stop:  # the config checks, before any model is read
        main(["--config", "eval_retrieval_msrvtt", *_overrides(tmp, tmp_path / "a"),
              f"video.root={tmp}"])  # fmt: skip
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "names 5 of 5 videos that are not files" in err
    assert "video0.mp4" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()
    rc = main(["--config", "eval_retrieval_msrvtt", *_overrides(tmp, tmp_path / "b"),
               "video.annotation=null"])  # fmt: skip
    assert rc == 1 and "set video.annotation" in capsys.readouterr().err


def test_validate_names_missing_videos_before_launch(setup, tmp_path, capsys):
    from blip_recipes.cli import main

    tmp, _ = setup
    rc = main(["validate", "--config", "eval_retrieval_msrvtt", *_overrides(tmp, tmp_path),
               "video.suffix=.webm"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "'video.annotation' names 5 of 5 videos that are not files" in err
    assert "video0.webm" in err
    assert main(["validate", "--config", "eval_retrieval_msrvtt", *_overrides(tmp, tmp_path)]) == 0


@pytest.mark.slow  # three interpreters through `blip run`
def test_two_ranks_equal_one_rank(setup, tmp_path):
    tmp, _ = setup
    for name, nproc in (("one", 1), ("two", 2)):
        launcher = ["--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else []
        args = [sys.executable, "-m", "blip_recipes.cli", "run", *launcher,
                "blip_eval_retrieval_video", "--config", "eval_retrieval_msrvtt",
                *_overrides(tmp, tmp_path / name)]  # fmt: skip
        proc = subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one = torch.load(tmp_path / "one" / "retrieval_scores.pt")
    two = torch.load(tmp_path / "two" / "retrieval_scores.pt")
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, atol=1e-5, rtol=0, msg=key)
    assert json.loads((tmp_path / "two" / "video_retrieval.json").read_text()) == pytest.approx(
        json.loads((tmp_path / "one" / "video_retrieval.json").read_text())
    )


def test_a_video_that_does_not_decode_is_one_line(setup, tmp_path, capsys):
    import shutil

    from recipes.blip_eval_retrieval_video import main

    tmp, _ = setup
    videos = tmp_path / "videos"
    shutil.copytree(tmp / "videos", videos)
    (videos / "video3.mp4").write_bytes((videos / "video3.mp4").read_bytes()[:200])  # truncated
    rc = main(["--config", "eval_retrieval_msrvtt", *_overrides(tmp, tmp_path / "out"),
               f"video.root={videos}"])  # fmt: skip
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1 and last.startswith("error: cannot decode video ") and "video3.mp4" in last
    assert not (tmp_path / "out" / "video_retrieval.json").exists()


@pytest.mark.slow  # two ranks through `blip run`
def test_a_video_that_does_not_decode_on_one_of_two_ranks_is_one_line(setup, tmp_path):
    """Rank 1's video3 does not decode in a loader worker while rank 0 waits in the features'
    all-gather: rank 1 says so in one line and leaves without a barrier, rank 0's collective
    ends at once with one line (it used to wait job.collective_timeout_s, then print the
    barrier's traceback on both ranks)."""
    import shutil

    tmp, _ = setup
    videos = tmp_path / "videos"
    shutil.copytree(tmp / "videos", videos)
    (videos / "video3.mp4").write_bytes((videos / "video3.mp4").read_bytes()[:200])
    args = [sys.executable, "-m", "blip_recipes.cli", "run", "--standalone", "--nproc-per-node",
            "2", "blip_eval_retrieval_video", "--config", "eval_retrieval_msrvtt",
            *_overrides(tmp, tmp_path / "out"), f"video.root={videos}", "data.num_workers=2",
            "eval.batch_size=1"]  # fmt: skip
    proc = subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=240)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "error: cannot decode video " in proc.stderr and "video3.mp4" in proc.stderr
    assert "a peer rank left the job while this rank waited" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
