"""The bound on a rank's wait for a batch: dead and stuck workers, reads that hang without
workers, stop requests (both loaders)."""

import io
import json
import os
import signal
import threading
import time

import pytest
import torch
from PIL import Image

from blip_recipes.config import DataConfig, DataSourceConfig
from blip_recipes.data import BadSampleError, build_train_loader, synthetic_sample
from blip_recipes.data import samples as samples_module
from blip_recipes.data import watchdog as watchdog_module
from blip_recipes.data.tar_format import write_shard
from blip_recipes.data.watchdog import LoaderError, describe_exit


def _map_cfg(**kw):
    source = DataSourceConfig(kind="synthetic", num_samples=64, image_size=32)
    return DataConfig(sources=[source], batch_size=4, num_workers=1, pin_memory=False, **kw)


def _shard_cfg(tmp_path, **kw):
    samples = []
    for i in range(24):
        img, caption = synthetic_sample(0, i, 32)
        buf = io.BytesIO()
        img.save(buf, format="JPEG")
        samples.append((f"k{i}", buf.getvalue(), "jpg", caption))
    write_shard(str(tmp_path / "s.tar"), samples)
    source = DataSourceConfig(kind="shards", paths=[str(tmp_path / "s.tar")])
    return DataConfig(sources=[source], batch_size=4, pin_memory=False, shuffle_buffer=4,
                      **{"num_workers": 1, **kw})  # fmt: skip


def _workers(loader):
    """The loader's worker processes (map-style pipeline or shard DataLoader)."""
    it = loader._iterator
    return it.workers() if hasattr(it, "workers") else list(it._workers)


@pytest.fixture(params=["map", "shards"])
def loader_with_worker(request, tmp_path, synthetic_tokenizer):
    """``make(**data_cfg_overrides)`` -> a 1-worker loader that delivered one batch."""
    made = []

    def make(**kw):
        cfg = _map_cfg(**kw) if request.param == "map" else _shard_cfg(tmp_path, **kw)
        loader = build_train_loader(cfg, synthetic_tokenizer, 16, 0, 0, 1)
        next(loader)
        made.append(loader)
        return loader

    yield make
    for loader in made:
        loader.close()


def _next_until_error(loader, limit=20):
    start = time.monotonic()
    with pytest.raises(LoaderError) as info:
        for _ in range(limit):  # prefetched batches come first
            next(loader)
    return str(info.value), time.monotonic() - start


def test_describe_exit():
    assert describe_exit(-9).startswith("died with SIGKILL (out of memory?")
    assert describe_exit(-11) == "died with SIGSEGV"
    assert describe_exit(3) == "exited with code 3"


def test_a_killed_worker_ends_the_wait_naming_it(loader_with_worker):
    loader = loader_with_worker()
    (worker,) = _workers(loader)
    os.kill(worker.pid, signal.SIGKILL)
    message, waited = _next_until_error(loader)
    assert message.startswith(f"rank 0: data loader worker 0 (pid {worker.pid}) died with SIGKILL")
    assert "\n" not in message and waited < 5


def test_a_stuck_worker_ends_the_wait_after_timeout_s(loader_with_worker):
    """SIGSTOP of the worker, never continued: the wait ends after data.timeout_s naming the
    worker and its state. The shard loader's rank used to block for good, receiving a batch's
    shared memory from the stopped worker in its own thread."""
    loader = loader_with_worker(timeout_s=1.5)
    (worker,) = _workers(loader)
    os.kill(worker.pid, signal.SIGSTOP)
    message, waited = _next_until_error(loader)
    assert "no batch from the data loader in 2 s (data.timeout_s=1.5)" in message
    assert f"worker 0 (pid {worker.pid}, stopped by a signal (SIGSTOP" in message
    assert "\n" not in message and 1.5 <= waited < 6
    start = time.monotonic()
    loader.close()  # a stopped worker does not exit by itself: it gets SIGKILL at once
    assert not worker.is_alive() and time.monotonic() - start < 5


def test_a_stop_request_ends_a_stuck_wait(loader_with_worker, monkeypatch):
    monkeypatch.setattr(watchdog_module, "STOP_GRACE_S", 1.0)
    loader = loader_with_worker(timeout_s=60)
    loader.stop_requested = lambda: True
    (worker,) = _workers(loader)
    os.kill(worker.pid, signal.SIGSTOP)
    message, waited = _next_until_error(loader)
    assert "stopped while waiting for a batch" in message and waited < 5


@pytest.mark.parametrize("kind", ["map", "shards"])
def test_a_read_that_hangs_without_workers_ends_the_wait(
    kind, tmp_path, synthetic_tokenizer, monkeypatch
):
    """data.num_workers=0: the batch is made in the rank's process, where a read of a hung file
    system never returns (here: opening a FIFO nobody writes). The rank waits for it in another
    thread: after data.timeout_s it ends with one line saying where the read is stuck."""
    fifo = tmp_path / ("image.jpg" if kind == "map" else "hung.tar")
    os.mkfifo(fifo)
    if kind == "map":  # open without the size check first (a FIFO's size is 0)
        monkeypatch.setattr(samples_module, "open_image", Image.open)
        ann = tmp_path / "ann.json"
        ann.write_text(json.dumps([{"image": fifo.name, "caption": "a red circle"}] * 8))
        source = DataSourceConfig(kind="json", paths=[str(ann)], image_root=str(tmp_path))
        cfg = DataConfig(sources=[source], batch_size=2, num_workers=0, pin_memory=False,
                         timeout_s=2.0)  # fmt: skip
    else:
        cfg = _shard_cfg(tmp_path, timeout_s=2.0, num_workers=0)
        cfg.sources[0].paths = [str(fifo)]
    earlier = set(threading.enumerate())  # other tests' loaders may still have threads
    loader = build_train_loader(cfg, synthetic_tokenizer, 16, 0, 0, 1)
    message, waited = _next_until_error(loader)
    assert "no batch from the data loader in 2 s (data.timeout_s=2)" in message
    assert "data.num_workers=0 makes batches in the rank's own process" in message
    assert "(at " in message and "in _io.open" not in message and "\n" not in message
    assert 2.0 <= waited < 15  # a loaded CI host starts the loader slowly
    loader.close()
    # Release the stuck read: a real file at the path it retries, then EOF on the FIFO.
    stuck = [t for t in set(threading.enumerate()) - earlier
             if t.name in ("batch-fetch", "shard-batches")]  # fmt: skip
    fifo.rename(tmp_path / "fifo")
    if kind == "map":
        synthetic_sample(0, 0, 32)[0].save(fifo, format="JPEG")
    else:
        _shard_cfg(tmp_path)  # writes s.tar
        os.replace(tmp_path / "s.tar", fifo)
    os.close(os.open(tmp_path / "fifo", os.O_WRONLY | os.O_NONBLOCK))
    for thread in stuck:
        thread.join(timeout=10)
        assert not thread.is_alive()


def test_worker_side_bad_sample_error_is_one_line(tmp_path, synthetic_tokenizer):
    """All samples bad, map-style, one worker: the worker's BadSampleError reaches the rank as
    it was raised, without torchdata's wrapped traceback."""
    ann = tmp_path / "ann.json"
    ann.write_text('[{"image": "missing.jpg", "caption": "a red circle"}]' * 1)
    source = DataSourceConfig(kind="json", paths=[str(ann)], image_root=str(tmp_path))
    cfg = DataConfig(sources=[source], batch_size=1, num_workers=1, pin_memory=False,
                     max_bad_fraction=1.0)  # fmt: skip
    loader = build_train_loader(cfg, synthetic_tokenizer, 16, 0, 0, 1)
    with pytest.raises(BadSampleError) as info:
        next(loader)
    loader.close()
    assert str(info.value).startswith("50 replacements in a row were bad samples; last: ")
    assert "missing.jpg" in str(info.value) and "\n" not in str(info.value)


class _Blocking(torch.utils.data.Dataset):
    """Item 0 at once; item 1 waits for ``release`` (a read that hangs) in this process."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == 1 and torch.utils.data.get_worker_info() is None:
            self.release.wait()
        return torch.full((2,), i)


@pytest.mark.parametrize("workers", [0, 1])
def test_evaluation_loaders_waits_are_bounded(workers):
    """The evaluation loaders' batches (run_balanced over a DataLoader): a SIGSTOPped worker,
    or without workers a read that hangs, ends the wait after the timeout in one line, and
    the workers get SIGKILL."""
    from blip_recipes.evaluation._dist import run_balanced

    data = _Blocking()
    loader = torch.utils.data.DataLoader(data, batch_size=1, num_workers=workers)
    watchdog_module.set_wait_timeout(2.0)
    try:
        batches = run_balanced(loader, len(loader), lambda b: b, None, balanced=False)
        next(batches)
        if workers:
            (worker,) = _workers_of(batches)
            os.kill(worker.pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(LoaderError) as info:
            for _ in batches:  # a batch made before the stop comes first
                pass
        waited = time.monotonic() - start
    finally:
        watchdog_module.set_wait_timeout(600.0)
        data.release.set()
    message = str(info.value)
    assert "no batch from the data loader in 2 s (data.timeout_s=2)" in message
    if workers:
        assert f"worker 0 (pid {worker.pid}, stopped by a signal" in message
        worker.join(timeout=5)
        assert not worker.is_alive()
    else:
        assert "makes batches in the rank's own process" in message and "__getitem__" in message
    assert "\n" not in message and 2.0 <= waited < 15  # a loaded CI host is slow


def _workers_of(batches):
    """The DataLoader workers behind a run_balanced generator (via watched_batches' frame)."""
    watched = batches.gi_frame.f_locals["iterator"]
    return watched.gi_frame.f_locals["workers"]
