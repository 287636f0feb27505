"""Every recipe's main(): exit statuses, and a process group torn down without a barrier after
any failure (a rank failing alone must not wait for peers still inside a collective)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from blip_recipes.data.watchdog import LoaderError
from blip_recipes.runs import recipe_main
from blip_recipes.runs.stop import StoppedBeforeStartError


class _Recipe:
    """Raises ``error`` from ``setup`` (if any) and records how it was cleaned up."""

    error: BaseException | None = None
    barriers: list[bool] = []

    def __init__(self, cfg) -> None:
        pass

    def setup(self) -> None:
        if self.error is not None:
            raise self.error

    def train(self) -> None:
        pass

    run = train

    def cleanup(self, barrier: bool = True) -> None:
        _Recipe.barriers.append(barrier)


@pytest.fixture
def recipe(monkeypatch):
    cfg = SimpleNamespace(data=SimpleNamespace(timeout_s=600.0))
    monkeypatch.setattr(recipe_main, "parse_recipe_args", lambda *a, **k: cfg)
    monkeypatch.setattr(recipe_main, "configure_logging", lambda: None)
    _Recipe.barriers = []
    return _Recipe


@pytest.mark.parametrize(
    "error, status, barrier",
    [
        (None, 0, True),
        (StoppedBeforeStartError("stopped before training started"), 0, True),
        (LoaderError("rank 1: data loader worker 0 (pid 7) died with SIGKILL"), 1, False),
        (ValueError("cannot decode video v.mp4"), 1, False),
        (RuntimeError("CUDA error"), 1, False),
    ],
)  # fmt: skip
def test_a_failed_rank_tears_down_without_a_barrier(recipe, error, status, barrier):
    recipe.error = error
    assert recipe_main.run_training_recipe(recipe, [], "") == status
    if not isinstance(error, StoppedBeforeStartError):
        assert recipe_main.run_inference_recipe(recipe, [], "", "recipe") == status
    assert set(recipe.barriers) == {barrier}
