"""Remote shards: http(s) through fsspec against a loopback server, pipe:, retries, resume."""

import functools
import http.server
import io
import os
import threading

import pytest

from blip_recipes.data import synthetic_sample
from blip_recipes.data.remote import RemoteShardError, RetryingReader, is_remote
from blip_recipes.data.shard_files import list_shards
from blip_recipes.data.shard_streams import _Stream
from blip_recipes.data.tar_format import iter_tar_samples, write_shard

pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")


def _jpeg(i):
    img, caption = synthetic_sample(0, i, 32)
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue(), caption


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single ``Range: bytes=a-b`` support; ``fail`` counts 503s to answer."""

    fail = {"n": 0}

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._serve(head=True)

    def do_GET(self):
        self._serve(head=False)

    def _serve(self, head):
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404)
            return
        if self.fail["n"] > 0 and not head:
            self.fail["n"] -= 1
            self.send_error(503)
            return
        data = open(path, "rb").read()
        rng = self.headers.get("Range")
        if rng:
            a, b = rng.split("=", 1)[1].split("-")
            a, b = int(a), min(int(b) if b else len(data) - 1, len(data) - 1)
            body = data[a : b + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {a}-{b}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)


@pytest.fixture
def served(tmp_path):
    """3 shards of 5 samples served on 127.0.0.1; yields (base URL, folder)."""
    for s in range(3):
        samples = [(f"s{s}_{i}", *_jpeg(s * 5 + i)) for i in range(5)]
        write_shard(str(tmp_path / f"shard-{s}.tar"), [(k, d, "jpg", c) for k, d, c in samples])
    handler = functools.partial(_RangeHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _RangeHandler.fail["n"] = 0
    yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path
    server.shutdown()
    server.server_close()


def _keys(samples):
    return [k for k, *_ in samples]


def test_is_remote():
    assert is_remote("s3://b/x.tar") and is_remote("gs://b/x.tar") and is_remote("pipe:cat x")
    assert is_remote("https://h/x.tar")
    assert not is_remote("/data/x.tar") and not is_remote("file:///data/x.tar")
    assert list_shards(["https://h/s-{0..2}.tar"]) == [f"https://h/s-{i}.tar" for i in range(3)]


def test_http_shard_streams_and_resumes_mid_shard(served):
    base, folder = served
    url = f"{base}/shard-1.tar"
    local = list(iter_tar_samples(str(folder / "shard-1.tar")))
    remote = list(iter_tar_samples(url))
    assert _keys(remote) == [f"s1_{i}" for i in range(5)]
    assert [(s, n) for _, _, s, n in remote] == [(s, n) for _, _, s, n in local]
    assert remote[2][1] == local[2][1]
    resumed = list(iter_tar_samples(url, remote[1][3]))
    assert _keys(resumed) == [f"s1_{i}" for i in range(2, 5)]
    assert [n for *_, n in resumed] == [n for *_, n in remote[2:]]


def test_http_stream_resume_matches_uninterrupted(served):
    base, _ = served
    shards = [f"{base}/shard-{s}.tar" for s in range(3)]
    full = iter(_Stream(shards, seed=3, stream=0, num_streams=1, buffer=4))
    reference = [next(full)[1][1] for _ in range(11)]
    first = _Stream(shards, seed=3, stream=0, num_streams=1, buffer=4)
    it = iter(first)
    got = [next(it)[1][1] for _ in range(6)]
    resumed = iter(_Stream(shards, seed=3, stream=0, num_streams=1, buffer=4, state=first.state))
    got += [next(resumed)[1][1] for _ in range(5)]
    assert got == reference


def test_http_404_names_the_url(served):
    base, _ = served
    url = f"{base}/missing-7.tar"
    with pytest.raises(RemoteShardError, match="missing-7.tar"):
        list(iter_tar_samples(url))


def test_http_retries_transient_errors(served, monkeypatch):
    monkeypatch.setattr("blip_recipes.data.remote.BACKOFF_S", 0.01)
    base, _ = served
    _RangeHandler.fail["n"] = 2
    with RetryingReader(f"{base}/shard-0.tar", 0, attempts=4, backoff=0.01) as f:
        assert len(f.read(100)) == 100
    _RangeHandler.fail["n"] = 10
    with pytest.raises(RemoteShardError, match=r"shard-0.tar.*after 2 attempts"):
        RetryingReader(f"{base}/shard-0.tar", 0, attempts=2, backoff=0.01).read(100)


def test_pipe_shard_and_resume(served):
    _, folder = served
    path = folder / "shard-2.tar"
    url = f"pipe:cat {path}"
    samples = list(iter_tar_samples(url))
    assert _keys(samples) == [f"s2_{i}" for i in range(5)]
    assert _keys(iter_tar_samples(url, samples[2][3])) == ["s2_3", "s2_4"]


def test_pipe_failure_is_an_error(tmp_path):
    with pytest.raises(RemoteShardError, match="status"):
        list(iter_tar_samples(f"pipe:cat {tmp_path / 'nope.tar'}"))


def test_missing_fsspec_names_url_and_extra(monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == "fsspec":
            raise ImportError("no fsspec")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(RemoteShardError, match=r"s3://bucket/a.tar.*blip-recipes\[remote\]"):
        list(iter_tar_samples("s3://bucket/a.tar"))


def test_truncated_remote_shard_ends_like_a_local_one(served):
    base, folder = served
    data = (folder / "shard-0.tar").read_bytes()
    (folder / "cut.tar").write_bytes(data[: len(data) // 2])
    keys = _keys(iter_tar_samples(f"{base}/cut.tar"))
    assert 0 < len(keys) < 5
