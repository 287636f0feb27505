"""Bad samples through `blip run`: named in bad_samples.rank<r>.jsonl by the rank that met them."""

from __future__ import annotations

import json
import subprocess

import pytest
from PIL import Image

from tests.data.conftest import write_image
from tests.recipes.launch import REPO, env, launch_args


def _dataset(tmp_path, good=40):
    root = tmp_path / "img"
    root.mkdir()
    records = []
    for i in range(good):
        write_image(root / f"good{i}.jpg", seed=i)
        records.append({"image": f"good{i}.jpg", "caption": "a red circle"})
    Image.new("RGB", (1, 1)).save(root / "pixel.png")
    Image.new("RGB", (400, 10)).save(root / "wide.png")
    (root / "junk.jpg").write_bytes(b"not an image")
    for name in ("pixel.png", "wide.png", "junk.jpg", "missing.jpg"):
        records.append({"image": name, "caption": "a red circle"})
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(records))
    return ann, root


def _run(tmp_path, nproc=1):
    ann, root = _dataset(tmp_path)
    out = tmp_path / "run"
    args = launch_args(out, [
        "data.sources.0.kind=json", f'data.sources.0.paths=["{ann}"]',
        f"data.sources.0.image_root={root}", "data.num_workers=1", "data.batch_size=4",
        "momentum.queue_size=16", "data.max_bad_fraction=1.0", "training.steps=11",
    ], nproc)  # fmt: skip
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300, env=env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _check(out, ranks):
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    records = {}
    for r in ranks:
        path = out / f"bad_samples.rank{r}.jsonl"
        records[r] = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        assert all(rec["rank"] == r and 1 <= rec["step"] <= 11 for rec in records[r])
    assert len(records[0]) == metrics[-1]["bad_samples"]  # rank 0's counter, rank 0's file
    named = {rec["sample"].rsplit("/", 1)[-1] for rs in records.values() for rec in rs}
    assert named == {"pixel.png", "wide.png", "junk.jpg", "missing.jpg"}  # >= 1 epoch
    reasons = {rec["sample"].rsplit("/", 1)[-1]: rec["reason"] for rs in records.values()
               for rec in rs}  # fmt: skip
    assert reasons["pixel.png"].startswith("image too small 1x1")


def test_run_names_every_bad_sample(tmp_path):
    _check(_run(tmp_path), ranks=[0])


@pytest.mark.slow
def test_two_ranks_each_write_their_own_file(tmp_path):
    out = _run(tmp_path, nproc=2)
    _check(out, ranks=[0, 1])
    assert (out / "bad_samples.rank1.jsonl").exists()
