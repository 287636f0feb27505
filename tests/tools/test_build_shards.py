import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from blip_recipes.data.tar_format import decode_caption, iter_tar_samples

TOOL = Path(__file__).resolve().parents[2] / "tools" / "build_shards.py"


def test_build_shards_resizes_skips_bad_and_keeps_captions(tmp_path):
    root = tmp_path / "img"
    root.mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i in range(7):
        size = (200, 120) if i % 2 else (90, 150)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
            root / f"{i}.jpg"
        )
        records.append({"image": f"{i}.jpg", "caption": f"caption {i}"})
    Image.new("RGBA", (300, 300), (1, 2, 3, 0)).save(root / "alpha.png")
    records.append({"image": "alpha.png", "caption": ["one", "two"]})
    (root / "broken.jpg").write_bytes(b"junk")
    records += [
        {"image": "broken.jpg", "caption": "x"},
        {"image": "missing.jpg", "caption": "x"},
        {"image": "0.jpg", "caption": "!!!"},
    ]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(records))
    out = tmp_path / "shards"
    result = subprocess.run(
        [sys.executable, str(TOOL), "--ann", str(ann), "--image-root", str(root), "--out",
         str(out), "--per-shard", "3", "--resize", "100"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert "skipped 3 bad inputs" in result.stdout
    for name in ("broken.jpg", "missing.jpg", "empty caption"):
        assert name in result.stderr
    shards = sorted(out.glob("*.tar"))
    assert json.loads((out / "sizes.json").read_text()) == {
        "shards-00000.tar": 3, "shards-00001.tar": 3, "shards-00002.tar": 2,
    }  # fmt: skip
    assert [p.name for p in shards] == [f"shards-{i:05d}.tar" for i in range(3)]
    samples = [s for p in shards for s in iter_tar_samples(str(p))]
    assert len(samples) == 8
    for _key, files, *_ in samples:
        from io import BytesIO

        img = Image.open(BytesIO(files["jpg"]))
        assert min(img.size) <= 100 and img.mode == "RGB"
    captions = [decode_caption(files) for _, files, *_ in samples]
    assert captions[:2] == ["caption 0", "caption 1"] and captions[-1] == ["one", "two"]


def test_build_shards_reads_jsonl_and_names_bad_annotation_files(tmp_path):
    root = tmp_path / "img"
    root.mkdir()
    Image.new("RGB", (64, 48), (10, 20, 30)).save(root / "a.jpg")
    ann = tmp_path / "ann.jsonl"
    ann.write_text(json.dumps({"image": "a.jpg", "caption": "a red square"}) + "\n")
    run = [sys.executable, str(TOOL), "--image-root", str(root)]
    ok = subprocess.run([*run, "--ann", str(ann), "--out", str(tmp_path / "s")],
                        capture_output=True, text=True)  # fmt: skip
    assert ok.returncode == 0 and "wrote 1 samples" in ok.stdout
    lines_as_json = tmp_path / "lines.json"
    lines_as_json.write_text(ann.read_text() * 2)
    bad = subprocess.run([*run, "--ann", str(lines_as_json), "--out", str(tmp_path / "t")],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "lines.json" in bad.stderr and ".jsonl suffix" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_build_shards_output_trains_as_written(tmp_path):
    """The shards' sizes.json lets a pretraining config over them validate without
    training.steps_per_epoch (the loader needs the epoch's length)."""
    from blip_recipes.config import LaunchContext, load_config, validate

    root = tmp_path / "img"
    root.mkdir()
    records = []
    for i in range(5):
        Image.new("RGB", (40, 40), (10 * i, 20, 30)).save(root / f"{i}.jpg")
        records.append({"image": f"{i}.jpg", "caption": f"a square of shade {i}"})
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(records))
    out = tmp_path / "shards"
    subprocess.run([sys.executable, str(TOOL), "--ann", str(ann), "--image-root", str(root),
                    "--out", str(out), "--per-shard", "2"], check=True, capture_output=True)  # fmt: skip
    cfg = load_config(TOOL.parents[1] / "configs" / "debug.toml", [
        "data.sources.0.kind=shards", f'data.sources.0.paths=["{out}/shards-{{00000..00002}}.tar"]',
        f"job.output_dir={tmp_path / 'run'}", "data.batch_size=4",
    ])  # fmt: skip
    validate(cfg, LaunchContext())  # raises when a shard's size is unknown
    from blip_recipes.data.shard_files import dataset_size, expand_braces

    assert dataset_size(expand_braces(cfg.data.sources[0].paths[0])) == 5
