"""img2dataset: its input file from BLIP URL annotations, its webdataset output as shards, sizes."""

import csv
import io
import json
import tarfile

import pytest

from blip_recipes.commands.img2dataset_input import main as img2dataset_input
from blip_recipes.config import DataConfig, DataSourceConfig
from blip_recipes.data import build_train_loader, synthetic_sample
from blip_recipes.data.img2dataset import img2dataset_command, write_img2dataset_input
from blip_recipes.data.shard_files import dataset_size, shard_sizes
from blip_recipes.data.tar_format import decode_caption, iter_tar_samples


def _jpeg(i):
    img, caption = synthetic_sample(0, i, 32)
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue(), caption


def _write_img2dataset_shard(folder, shard, n, with_txt=True, stats=True):
    """A shard as img2dataset writes it: KEY.jpg, KEY.txt, KEY.json (metadata) + NNNNN_stats.json."""
    name = f"{shard:05d}"
    with tarfile.open(folder / f"{name}.tar", "w") as tar:
        for i in range(n):
            key = f"{shard:05d}{i:04d}"
            data, caption = _jpeg(shard * 100 + i)
            meta = {
                "url": f"https://example.com/{key}.jpg", "key": key, "status": "success",
                "error_message": None, "width": 32, "height": 32, "original_width": 640,
                "original_height": 480, "exif": "{}", "sha256": "0" * 64,
            }  # fmt: skip
            if not with_txt:
                meta["caption"] = caption
            members = [(f"{key}.jpg", data)]
            if with_txt:
                members.append((f"{key}.txt", caption.encode()))
            members.append((f"{key}.json", json.dumps(meta).encode()))
            for member, payload in members:
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    if stats:
        (folder / f"{name}_stats.json").write_text(
            json.dumps(
                {
                    "count": n + 2,
                    "successes": n,
                    "failed_to_download": 2,
                    "failed_to_resize": 0,
                    "status_dict": {"success": n},
                }
            )  # fmt: skip
        )


def test_input_file_from_json_and_jsonl(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps([
        {"url": "https://x/1.jpg", "caption": "a dog, running"},
        {"url": "https://x/2.jpg", "caption": ["first  caption", "second"]},
        {"url": "", "caption": "no url"},
        {"caption": "no url either"},
        {"url": "https://x/3.jpg", "caption": ""},
    ]))  # fmt: skip
    b = tmp_path / "b.jsonl"
    b.write_text(json.dumps({"url": "https://x/4.jpg", "caption": 'say "hi"\nthere'}) + "\n\n")
    out = tmp_path / "urls.csv"
    stats = write_img2dataset_input([str(a), str(b)], str(out))
    assert (stats.rows, stats.skipped, stats.caption_lists) == (3, 3, 1)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["url"], r["caption"]) for r in rows] == [
        ("https://x/1.jpg", "a dog, running"),
        ("https://x/2.jpg", "first caption"),
        ("https://x/4.jpg", 'say "hi" there'),
    ]
    jsonl = tmp_path / "urls.jsonl"
    write_img2dataset_input([str(a)], str(jsonl))
    assert json.loads(jsonl.read_text().splitlines()[0]) == {
        "url": "https://x/1.jpg", "caption": "a dog, running"}  # fmt: skip
    with pytest.raises(ValueError, match="must end in"):
        write_img2dataset_input([str(a)], str(tmp_path / "urls.parquet"))


def test_command_prints_img2dataset_invocation(tmp_path, capsys):
    a = tmp_path / "a.jsonl"
    a.write_text(json.dumps({"url": "https://x/1.jpg", "caption": "c"}) + "\n")
    out = tmp_path / "urls.tsv"
    assert img2dataset_input([str(a), "--out", str(out), "--shards", "/data/cc"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 1 url/caption rows" in printed
    assert img2dataset_command(str(out), "/data/cc") in printed
    assert "--input_format tsv" in printed and "--output_format webdataset" in printed
    assert out.read_text().splitlines() == ["url\tcaption", "https://x/1.jpg\tc"]
    assert img2dataset_input([str(tmp_path / "missing.json"), "--out", str(out)]) == 2


def test_img2dataset_shard_caption_from_txt_or_json_caption(tmp_path):
    _write_img2dataset_shard(tmp_path, 0, 3)
    _write_img2dataset_shard(tmp_path, 1, 3, with_txt=False)
    for shard in (0, 1):
        samples = list(iter_tar_samples(str(tmp_path / f"{shard:05d}.tar")))
        assert len(samples) == 3
        for i, (_, files, *_rest) in enumerate(samples):
            caption = decode_caption(files)
            assert caption == synthetic_sample(0, shard * 100 + i, 32)[1]
            assert "http" not in caption


def test_sizes_from_stats_and_sizes_json(tmp_path):
    _write_img2dataset_shard(tmp_path, 0, 4)
    _write_img2dataset_shard(tmp_path, 1, 3)
    shards = [str(tmp_path / f"{s:05d}.tar") for s in (0, 1)]
    assert shard_sizes(shards) == ({shards[0]: 4, shards[1]: 3}, [])
    assert dataset_size(shards) == 7
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 40}))  # sizes.json first
    assert dataset_size(shards) == 43
    (tmp_path / "00001_stats.json").unlink()
    assert dataset_size(shards) is None
    assert shard_sizes(shards)[1] == [shards[1]]
    assert dataset_size(["pipe:cat x.tar"]) is None


def test_loader_reads_img2dataset_output_with_its_size(tmp_path, synthetic_tokenizer):
    for s in range(2):
        _write_img2dataset_shard(tmp_path, s, 5)
    cfg = DataConfig(
        sources=[DataSourceConfig(kind="shards", paths=[str(tmp_path / "{00000..00001}.tar")])],
        batch_size=3, num_workers=0, pin_memory=False, shuffle_buffer=4,
    )  # fmt: skip
    loader = build_train_loader(cfg, synthetic_tokenizer, 16, 0, 0, 1)
    assert loader.num_samples == 10 and loader.steps_per_epoch == 3
    batch = next(loader)
    assert batch["images"].shape == (3, 3, 16, 16)
    assert loader.stats()["bad_samples"] == 0
    (tmp_path / "00001_stats.json").unlink()
    assert build_train_loader(cfg, synthetic_tokenizer, 16, 0, 0, 1).steps_per_epoch is None


def test_validation_takes_size_from_stats_or_asks_for_it(tmp_path):
    from pathlib import Path

    from blip_recipes.config import ConfigError, LaunchContext, load_config, validate

    debug = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "debug.toml"

    for s in range(2):
        _write_img2dataset_shard(tmp_path, s, 2)
    paths = f"data.sources.0.paths={tmp_path}/{{00000..00001}}.tar"
    overrides = [
        f"job.output_dir={tmp_path / 'run'}",
        "data.sources.0.kind=shards",
        paths,
        "data.batch_size=2",
    ]  # the 4 samples hold one global batch
    validate(load_config(debug, overrides), LaunchContext())
    (tmp_path / "00001_stats.json").unlink()
    with pytest.raises(ConfigError) as info:
        validate(load_config(debug, overrides), LaunchContext())
    message = str(info.value)
    assert "1 of 2 shard(s) is unknown" in message and "00001.tar" in message
    assert "sizes.json" in message and "training.steps_per_epoch" in message
    remote = [*overrides[:2], "data.sources.0.paths=https://127.0.0.1:9/{0..1}.tar",
              "training.steps_per_epoch=5"]  # fmt: skip
    validate(load_config(debug, remote), LaunchContext())  # remote shards: not checked here
