"""The ``main(argv)`` of every recipe: config from the command line -> set-up -> work -> clean-up,
and the exit status.

A training recipe's file ends with::

    def main(argv=None):
        return run_training_recipe(BlipPretrainRecipe, argv, __doc__ or "")

and an inference recipe's (``setup``, ``run``, ``cleanup``; no checkpoints saved)::

    def main(argv=None):
        return run_inference_recipe(RetrievalEvalRecipe, argv, __doc__ or "", "blip_eval_retrieval")

Exit statuses: 0 done (also a stop before training started, or a stop that saved a checkpoint),
2 a user error (the configuration, the output folder), 1 a runtime failure, each said in one line
(the traceback goes to the rank log, or before the line when there is none).

No barrier after a failure: the process group is torn down with a barrier only when every rank
got to the end (or agreed to stop before training). A failure may be this rank's alone (its
loader worker died, a video does not decode, its disk is full) while the other ranks wait in a
collective; a barrier would wait for them, and they for it, ``job.collective_timeout_s`` (600 s
by default) before the job could end, and then fail with a traceback of its own. Without it the
rank exits at once, the others' collective sees the closed connection and ends in one line, and
torchrun stops the job.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from blip_recipes.checkpoint import (
    CheckpointCorruptError,
    CheckpointWriteError,
    NonFiniteCheckpointError,
)
from blip_recipes.config import parse_recipe_args
from blip_recipes.data.watchdog import LoaderError, set_wait_timeout
from blip_recipes.metrics import MetricsWriteError
from blip_recipes.metrics.run_logging import configure_logging
from blip_recipes.runs.errors import exit_status_for_error
from blip_recipes.runs.nonfinite import NonFiniteLossError
from blip_recipes.runs.stop import StoppedBeforeStartError

RUN_FAILURES = (NonFiniteLossError, NonFiniteCheckpointError, CheckpointWriteError,
                CheckpointCorruptError, MetricsWriteError, LoaderError)  # fmt: skip
"""Runtime failures of a training run said in one line without a traceback (exit 1): it
diverged (non-finite steps, a checkpoint that would hold NaN/Inf), a save or a metrics write
failed, a checkpoint is damaged, or its data failed (a loader worker died, no batch within
data.timeout_s, too many bad samples)."""


def run_training_recipe(recipe_cls: type, argv: list[str] | None, description: str) -> int:
    """``recipe_cls(cfg)`` -> ``setup()`` -> ``train()`` -> ``cleanup(barrier)``; the exit status.

    The recipe's logger is ``logging.getLogger(<its module's file stem>)``, the name its
    one-line errors carry. ``cleanup(barrier=False)`` after any failure (see the module docstring).
    """
    cfg = parse_recipe_args(argv, description=description)
    set_wait_timeout(cfg.data.timeout_s)  # the evaluation loaders' (the training loader's own)
    configure_logging()  # rank 0 on the console; every rank in <output_dir>/logs/rank<r>.log
    name = recipe_name(recipe_cls)
    logger = logging.getLogger(name)
    recipe = recipe_cls(cfg)
    healthy = False  # no barrier at shutdown unless every rank got to the end
    try:
        recipe.setup()
        recipe.train()
        healthy = True
    except StoppedBeforeStartError as e:  # every rank agreed on it
        healthy = True
        logger.warning("%s", e)
        return 0
    except RUN_FAILURES as e:
        logger.error("%s", e)
        return 1
    except Exception as e:  # one line on the console, the traceback in the rank log
        return exit_status_for_error(e, name, logger)
    finally:
        recipe.cleanup(barrier=healthy)
    return 0


def run_inference_recipe(
    recipe_cls: type,
    argv: list[str] | None,
    description: str,
    name: str,
    user_errors: tuple[type[BaseException], ...] = (),
    failures: tuple[type[BaseException], ...] = (),
) -> int:
    """``recipe_cls(cfg)`` -> ``setup()`` -> ``run()`` -> ``cleanup(barrier)``; the exit status.

    ``user_errors`` exit 2 and ``ValueError`` / ``FileNotFoundError`` / ``failures`` exit 1, each as
    ``error: <message>`` on stderr; anything else is one line named ``name``, exit 1.
    ``cleanup(barrier=False)`` after any failure (see the module docstring).
    """
    cfg = parse_recipe_args(argv, description=description, saves_checkpoints=False)
    set_wait_timeout(cfg.data.timeout_s)  # the evaluation loaders'
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True
    )
    recipe = recipe_cls(cfg)
    healthy = False
    try:
        recipe.setup()
        recipe.run()
        healthy = True
    except user_errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, *failures) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # one line; the traceback before it (no rank log here)
        return exit_status_for_error(e, name, logging.getLogger(name))
    finally:
        recipe.cleanup(barrier=healthy)
    return 0


def recipe_name(recipe_cls: type) -> str:
    """The recipe's name: the stem of the file that defines it (recipes loaded from a file are
    not always in ``sys.modules``: then its module's name)."""
    module: Any = sys.modules.get(recipe_cls.__module__)
    source = getattr(module, "__file__", None) or recipe_cls.__module__
    return Path(source).stem
