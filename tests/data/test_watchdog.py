"""The bound on a rank's wait for a batch: dead and stuck workers, stop requests (both loaders)."""

import io
import os
import signal
import time

import pytest

from blip_recipes.config import DataConfig, DataSourceConfig
from blip_recipes.data import BadSampleError, build_train_loader, synthetic_sample
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
    return DataConfig(sources=[source], batch_size=4, num_workers=1, pin_memory=False,
                      shuffle_buffer=4, **kw)  # fmt: skip


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


# Stuck (SIGSTOPped) workers: map-style only. A shard DataLoader worker stopped in the middle of
# sending a batch blocks the rank's read of its queue, which runs in the rank's thread.
map_only = pytest.mark.parametrize("loader_with_worker", ["map"], indirect=True)


@map_only
def test_a_stuck_worker_ends_the_wait_after_timeout_s(loader_with_worker):
    loader = loader_with_worker(timeout_s=1.5)
    (worker,) = _workers(loader)
    os.kill(worker.pid, signal.SIGSTOP)
    message, waited = _next_until_error(loader)
    assert "no batch from the data loader in 2 s (data.timeout_s=1.5)" in message
    assert f"(pid {worker.pid}) are alive" in message and 1.5 <= waited < 6
    start = time.monotonic()
    loader.close()  # a stopped worker does not exit by itself: it gets SIGKILL at once
    assert not worker.is_alive() and time.monotonic() - start < 5


@map_only
def test_a_stop_request_ends_a_stuck_wait(loader_with_worker, monkeypatch):
    monkeypatch.setattr(watchdog_module, "STOP_GRACE_S", 1.0)
    loader = loader_with_worker(timeout_s=60)
    loader.stop_requested = lambda: True
    (worker,) = _workers(loader)
    os.kill(worker.pid, signal.SIGSTOP)
    message, waited = _next_until_error(loader)
    assert "stopped while waiting for a batch" in message and waited < 5


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
