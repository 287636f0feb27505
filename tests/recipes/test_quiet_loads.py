"""`blip caption` and `blip convert` on a finished run print their result and nothing else:
no library warnings (DCP's single-process notice, torchao's optional kernels, pytree
deprecations) and no progress bars on stderr."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.recipes.launch import REPO, env, run_recipe
from tests.recipes.test_blip_pretrain import assert_ok


def _blip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blip_recipes.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env())  # fmt: skip


@pytest.mark.slow  # a one-step run, then two commands that import transformers (~30 s on 2 cores)
def test_caption_and_convert_print_only_their_result(tmp_path):
    run = run_recipe(tmp_path / "run", "training.steps=1")
    assert_ok(run)
    image = tmp_path / "img.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(image)

    caption = _blip("caption", str(run.output_dir), str(image))
    assert caption.returncode == 0, caption.stderr
    assert caption.stdout.startswith(f"{image}\t") and len(caption.stdout.splitlines()) == 1
    assert caption.stderr == f"blip caption: using {run.checkpoints()[-1]}\n"  # and nothing else

    convert = _blip("convert", str(run.output_dir), str(tmp_path / "hf"), "--to", "hf")
    assert convert.returncode == 0, convert.stderr
    assert (tmp_path / "hf" / "captioning" / "config.json").exists()
    assert convert.stderr == ""
