"""The consecutive non-finite step count that stops a run at training.max_nonfinite_steps."""

from __future__ import annotations

import torch

from recipes.blip_pretrain import _NonFiniteRun


def test_count_reaches_the_limit_at_the_exact_step_and_resets_on_a_good_one():
    run = _NonFiniteRun(torch.device("cpu"), limit=3)
    oks = [True, False, False, True, False, False, False, False]
    reached = []
    for ok in oks:
        run.update(torch.tensor(ok))
        reached.append(run.reached())
    assert reached == [None, None, None, None, None, None, 3, 4]
    assert run.reached(exact=True) == 4
