"""The documented web-data path end to end, on a loopback HTTP server: BLIP URL annotations ->
`blip data img2dataset-input` -> the printed img2dataset command (run for real) -> webdataset
shards -> the `shards` source, sized from img2dataset's stats.

The server (127.0.0.1) serves photo-like JPEGs, dead URLs (404) and non-image responses (HTML),
so the downloader's failure handling is part of what is checked. img2dataset is an optional
extra: the test runs when an `img2dataset` executable is found (`IMG2DATASET=/path/to/it`, or on
PATH; it may live in its own environment) and is opt-in (`-m slow`).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from blip_recipes.benchmarking.photo_like import photo_like_jpeg
from blip_recipes.commands.img2dataset_input import main as img2dataset_input
from blip_recipes.config import DataConfig, DataSourceConfig
from blip_recipes.data import build_train_loader
from blip_recipes.data.shard_files import shard_sizes
from blip_recipes.data.tar_format import iter_tar_samples

pytestmark = pytest.mark.slow

IMG2DATASET = os.environ.get("IMG2DATASET") or shutil.which("img2dataset")


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        kind, _, name = self.path.strip("/").partition("/")
        if kind == "img":
            body, ctype = photo_like_jpeg(int(name.split(".")[0]), (640, 480)), "image/jpeg"
        elif kind == "html":
            body, ctype = b"<html><body>not an image</body></html>", "text/html"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.skipif(IMG2DATASET is None, reason="img2dataset not installed (optional extra)")
def test_urls_to_shards_to_batches(tmp_path, server, synthetic_tokenizer):
    good = [{"url": f"{server}/img/{i}.jpg", "caption": f"a photo number {i}"} for i in range(6)]
    dead = [{"url": f"{server}/missing/{i}.jpg", "caption": "never served"} for i in range(2)]
    html = [{"url": f"{server}/html/{i}", "caption": "a web page"} for i in range(2)]
    annotations = tmp_path / "web.json"
    annotations.write_text(json.dumps(good[:3] + dead + html + good[3:]))
    urls, shards = tmp_path / "urls.tsv", tmp_path / "shards"
    assert img2dataset_input([str(annotations), "--out", str(urls), "--shards", str(shards)]) == 0

    from blip_recipes.data.img2dataset import img2dataset_command

    args = shlex.split(img2dataset_command(str(urls), str(shards), processes=1))[1:]
    args[args.index("--number_sample_per_shard") + 1] = "4"  # several shards from 10 rows
    args[args.index("--thread_count") + 1] = "4"
    done = subprocess.run([IMG2DATASET, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    tars = sorted(str(p) for p in shards.glob("*.tar"))
    stats = [json.loads(p.read_text()) for p in sorted(shards.glob("*_stats.json"))]
    assert len(tars) == 3 and sum(s["successes"] for s in stats) == 6
    assert sum(s["count"] for s in stats) == 10  # 2 dead + 2 non-image rows failed
    sizes, unknown = shard_sizes(tars)
    assert unknown == [] and sum(sizes.values()) == 6
    captions = set()
    for tar in tars:
        for _key, files, _start, _next in iter_tar_samples(tar):
            captions.add(files["txt"].decode())
            assert (
                min(json.loads(files["json"])["height"], json.loads(files["json"])["width"]) == 384
            )
    assert captions == {r["caption"] for r in good}

    cfg = DataConfig(
        sources=[DataSourceConfig(kind="shards", paths=tars)],
        batch_size=3,
        num_workers=0,
        pin_memory=False,
    )
    loader = build_train_loader(cfg, synthetic_tokenizer, 32, seed=0)
    assert loader.steps_per_epoch == 2  # 6 samples from the stats, batch 3, one rank
    batch = next(loader)
    assert batch["images"].shape == (3, 3, 32, 32) and loader.stats()["bad_samples"] == 0
    loader.close()
