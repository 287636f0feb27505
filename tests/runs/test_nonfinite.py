"""The consecutive non-finite step count that stops a run at training.max_nonfinite_steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blip_recipes.runs.nonfinite import NonFiniteLossError, NonFiniteRun


def test_count_reaches_the_limit_at_the_exact_step_and_resets_on_a_good_one():
    run = NonFiniteRun(torch.device("cpu"), limit=3)
    oks = [True, False, False, True, False, False, False, False]
    reached = []
    for ok in oks:
        run.update(torch.tensor(ok))
        reached.append(run.reached())
    assert reached == [None, None, None, None, None, None, 3, 4]
    assert run.reached(exact=True) == 4


def test_check_stops_at_the_limit_naming_the_step_and_the_newest_checkpoint():
    run = NonFiniteRun(torch.device("cpu"), limit=2)
    newest = Path("out/checkpoints/step-4")
    run.update(torch.tensor(False))
    run.check(5, lambda: newest, exact=False)  # one skipped step: goes on
    run.update(torch.tensor(False))
    with pytest.raises(NonFiniteLossError) as err:
        run.check(6, lambda: newest, exact=False)
    assert str(err.value) == (
        "2 consecutive steps had a non-finite loss or gradient norm (limit "
        "training.max_nonfinite_steps=2), up to step 6; each skipped its update. "
        f"Newest checkpoint: {newest}"
    )
