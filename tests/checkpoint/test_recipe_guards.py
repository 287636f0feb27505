"""The recipe's own checkpoint guards, in this process: weights with a NaN are never saved and
the run stops with an error naming the step and the checkpoint it can resume from."""

from __future__ import annotations

import importlib.util
import math
import signal

import pytest
import torch

from blip_recipes.checkpoint import NonFiniteCheckpointError, verify_checkpoint
from blip_recipes.config import parse_recipe_args
from blip_recipes.config.registry import resolve_config, resolve_recipe
from tests.recipes.launch import TINY


def _recipe_module():
    path = resolve_recipe("blip_pretrain")
    spec = importlib.util.spec_from_file_location("blip_recipe_guards_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_refuses_to_checkpoint_nan_weights(tmp_path):
    module = _recipe_module()
    out = tmp_path / "run"
    argv = ["--config", str(resolve_config("debug")), *TINY, f"job.output_dir={out}",
            "training.steps=2", "checkpoint.interval=1"]  # fmt: skip
    recipe = module.BlipPretrainRecipe(parse_recipe_args(argv, description=""))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        recipe.setup()
        recipe.train()  # saves step-1 and step-2
        assert verify_checkpoint(out / "checkpoints" / "step-2").ok
        recipe.train_state.step = 3
        with torch.no_grad():
            next(recipe.model.parameters()).view(-1)[0] = math.nan
        with pytest.raises(NonFiniteCheckpointError) as err:
            recipe.save_checkpoint()
        msg = str(err.value)
        assert msg.startswith("refusing to save checkpoint step-3: non-finite (NaN/Inf) weights")
        assert f"the newest intact checkpoint remains {out / 'checkpoints' / 'step-2'}" in msg
        assert not (out / "checkpoints" / "step-3").exists()
    finally:
        recipe.cleanup()
        for sig, handler in handlers.items():  # setup installed the recipe's own
            signal.signal(sig, handler)
