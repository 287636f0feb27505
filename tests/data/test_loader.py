"""The train loader: batch contract, epoch order over global indices, exact resume."""

import pytest
import torch

from blip_recipes.config import DataConfig, DataSourceConfig
from blip_recipes.data import build_train_loader
from blip_recipes.data.samples import EpochPlan


def _cfg(batch_size=4, num_workers=0, num_samples=40, **kw):
    return DataConfig(
        sources=[DataSourceConfig(kind="synthetic", num_samples=num_samples, image_size=32)],
        batch_size=batch_size,
        num_workers=num_workers,
        prefetch_factor=2,
        pin_memory=False,
        **kw,
    )


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _equal(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x) and len(a) == len(b)


def test_batch_contract(synthetic_tokenizer):
    loader = build_train_loader(_cfg(), synthetic_tokenizer, 16, seed=0, rank=0, world_size=1)
    assert loader.steps_per_epoch == 10
    batch = next(loader)
    assert set(batch) == {"images", "input_ids", "attention_mask", "image_ids"}
    assert batch["image_ids"].shape == (4,) and batch["image_ids"].dtype == torch.int64
    assert batch["images"].shape == (4, 3, 16, 16) and batch["images"].dtype == torch.uint8
    assert batch["input_ids"].shape == (4, 30) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].shape == (4, 30) and batch["attention_mask"].dtype == torch.long
    assert loader.stats()["samples"] == 4 and loader.stats()["bad_samples"] == 0


def test_iteration_is_infinite_and_epochs_reshuffle(synthetic_tokenizer):
    loader = build_train_loader(_cfg(), synthetic_tokenizer, 16, seed=0, rank=0, world_size=1)
    batches = _take(loader, 25)  # 2.5 epochs of 10 steps
    assert loader.stats()["epoch"] == 2
    first = torch.cat([b["input_ids"] for b in batches[:10]])
    second = torch.cat([b["input_ids"] for b in batches[10:20]])
    assert not torch.equal(first, second)  # new order ...
    key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert key(first) == key(second)  # ... over the same captions


def test_every_sample_once_per_epoch_across_ranks():
    plan = EpochPlan([list(range(37)), list(range(10))], [1.0, 2.0], seed=3)
    assert plan.length == 57
    order = plan.order(0)
    ids = sorted(order.tolist())
    assert ids == sorted(list(range(37)) + list(range(37, 47)) * 2)
    assert not (plan.order(1) == order).all()
    # Global batch 8 over 2 ranks of 4: 7 steps cover positions 0..55 exactly once.
    assert [plan.advance(0, 0, 8, s) for s in (0, 6, 7, 8)] == [(0, 0), (0, 48), (1, 0), (1, 8)]


def test_ranks_partition_each_global_batch(synthetic_tokenizer):
    one = build_train_loader(_cfg(batch_size=8), synthetic_tokenizer, 16, 0, rank=0, world_size=1)
    r0 = build_train_loader(_cfg(batch_size=4), synthetic_tokenizer, 16, 0, rank=0, world_size=2)
    r1 = build_train_loader(_cfg(batch_size=4), synthetic_tokenizer, 16, 0, rank=1, world_size=2)
    for _ in range(3):
        full, a, b = next(one), next(r0), next(r1)
        for k in full:
            assert torch.equal(full[k], torch.cat([a[k], b[k]]))


@pytest.mark.parametrize("workers_before, workers_after", [(0, 0), (2, 2), (2, 0)])
def test_resume_mid_epoch_bitwise(synthetic_tokenizer, workers_before, workers_after):
    ref = build_train_loader(_cfg(), synthetic_tokenizer, 16, 5, rank=0, world_size=1)
    expected = _take(ref, 9)
    run = build_train_loader(_cfg(num_workers=workers_before), synthetic_tokenizer, 16, 5, 0, 1)
    assert _equal(_take(run, 5), expected[:5])
    state = run.state_dict()
    resumed = build_train_loader(_cfg(num_workers=workers_after), synthetic_tokenizer, 16, 5, 0, 1)
    resumed.load_state_dict(state)
    assert _equal(_take(resumed, 4), expected[5:9])
    assert resumed.stats()["samples"] == 36


def test_resume_on_one_rank_from_two_rank_state(synthetic_tokenizer):
    ranks = [
        build_train_loader(_cfg(batch_size=4), synthetic_tokenizer, 16, 1, rank=r, world_size=2)
        for r in range(2)
    ]
    for _ in range(3):
        for loader in ranks:
            next(loader)
    states = [loader.state_dict() for loader in ranks]
    assert (
        states[0]["epoch"] == states[1]["epoch"] and states[0]["position"] == states[1]["position"]
    )
    expected = [
        torch.cat([a["input_ids"], b["input_ids"]]) for a, b in zip(*(_take(r, 2) for r in ranks))
    ]
    single = build_train_loader(
        _cfg(batch_size=8), synthetic_tokenizer, 16, 1, rank=0, world_size=1
    )
    single.load_state_dict(states[0])
    got = [b["input_ids"] for b in _take(single, 2)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_resume_with_another_global_batch_continues_at_same_sample(synthetic_tokenizer):
    ref = build_train_loader(_cfg(batch_size=4), synthetic_tokenizer, 16, 2, 0, 1)
    ids = torch.cat([b["input_ids"] for b in _take(ref, 10)])  # one epoch of 40
    run = build_train_loader(_cfg(batch_size=4), synthetic_tokenizer, 16, 2, 0, 1)
    _take(run, 3)
    wider = build_train_loader(_cfg(batch_size=6), synthetic_tokenizer, 16, 2, 0, 1)
    wider.load_state_dict(run.state_dict())
    got = torch.cat([b["input_ids"] for b in _take(wider, 4)])  # samples 12..35
    assert torch.equal(got, ids[12:36])
    next(wider)  # 36 + 6 > 40: the tail is dropped, the next epoch begins
    assert wider.stats()["epoch"] == 1


def test_too_small_data_is_clear(synthetic_tokenizer):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        build_train_loader(_cfg(batch_size=8, num_samples=10), synthetic_tokenizer, 16, 0, 0, 2)


def test_synthetic_image_ids_are_sample_indices(synthetic_tokenizer):
    loader = build_train_loader(_cfg(), synthetic_tokenizer, 16, seed=0, rank=0, world_size=1)
    ids = torch.cat([next(loader)["image_ids"] for _ in range(10)])  # one epoch
    assert sorted(ids.tolist()) == list(range(40))
    plan_order = loader.plan.order(0)[:40].tolist()
    assert ids.tolist() == plan_order


def _worker_processes(loader):
    inner = loader._iterator.mapper._it._it  # ParallelMapper -> its implementation -> iterator
    return inner._workers


def test_workers_ignore_stop_signals_and_close(synthetic_tokenizer):
    import os
    import signal

    ref = _take(build_train_loader(_cfg(), synthetic_tokenizer, 16, 3, 0, 1), 6)
    loader = build_train_loader(_cfg(num_workers=2), synthetic_tokenizer, 16, 3, 0, 1)
    got = _take(loader, 2)
    workers = _worker_processes(loader)
    assert len(workers) == 2 and all(w.is_alive() for w in workers)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert signal.SIGTERM not in blocked and signal.SIGUSR1 not in blocked  # the rank gets them
    for w in workers:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            os.kill(w.pid, sig)
    got += _take(loader, 4)
    assert all(w.is_alive() for w in workers)
    assert _equal(got, ref)
    loader.close()
    assert not any(w.is_alive() for w in workers)
    assert _equal(
        _take(loader, 1), _take(build_train_loader(_cfg(), synthetic_tokenizer, 16, 3, 0, 1), 7)[6:]
    )


EXIT_WITH_OPEN_LOADER = """
import sys
from blip_recipes.config import DataConfig, DataSourceConfig, TokenizerConfig
from blip_recipes.data import build_tokenizer, build_train_loader
source = DataSourceConfig(**eval(sys.argv[1]))
cfg = DataConfig(sources=[source], batch_size=4, num_workers=2, pin_memory=False)
loader = build_train_loader(cfg, build_tokenizer(TokenizerConfig(kind="synthetic")), 16, 0)
next(loader)
print("batch")
"""


def exit_with_open_loader(source: dict) -> None:
    """A process that ends with its loader's workers alive (they ignore SIGTERM) still exits."""
    import subprocess
    import sys

    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", EXIT_WITH_OPEN_LOADER, repr(source)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == "batch", out.stderr


def test_process_exits_with_an_open_loader():
    exit_with_open_loader({"kind": "synthetic", "num_samples": 40, "image_size": 32})
