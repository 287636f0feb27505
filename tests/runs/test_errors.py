"""How a recipe reports an error: one line and an exit status; the traceback in the rank log."""

from __future__ import annotations

import logging

import pytest

from blip_recipes.config import ConfigError
from blip_recipes.runs.errors import RunStoppedError, exit_status_for_error, one_line


def _raise(error: BaseException) -> BaseException:
    try:
        raise error
    except BaseException as e:
        return e


@pytest.mark.parametrize(
    "error, status, line",
    [
        (FileNotFoundError("no such file: x.json"), 2, "FileNotFoundError: no such file: x.json"),
        (ConfigError("'data.batch_size' must be positive"), 2, "'data.batch_size' must be positive"),
        (RuntimeError("CUDA error: an illegal memory access\nmore text"), 1,
         "RuntimeError: CUDA error: an illegal memory access"),
        (RunStoppedError("the run lock was removed"), 1, "the run lock was removed"),
        (RuntimeError("[gloo/unbound_buffer.cc:78] Timed out waiting 5000ms for recv"), 1,
         "a peer rank did not answer within job.collective_timeout_s="),
        (RuntimeError("[gloo/pair.cc:553] Connection closed by peer [127.0.0.1]:48319. Ch"), 1,
         "a peer rank left the job while this rank waited for it in a collective"),
    ],
)  # fmt: skip
def test_error_becomes_one_line_and_an_exit_status(tmp_path, error, status, line):
    log = tmp_path / "rank0.log"
    handler = logging.FileHandler(log)
    logging.getLogger().addHandler(handler)
    try:
        records: list[logging.LogRecord] = []
        logger = logging.getLogger("test_recipe")
        logger.addHandler(catcher := logging.Handler())
        catcher.emit = records.append  # type: ignore[method-assign]
        assert exit_status_for_error(_raise(error), "recipe", logger) == status
        logger.removeHandler(catcher)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert [r.getMessage() for r in records] == [f"recipe: {one_line(error)}"]
    assert line in records[0].getMessage() and "\n" not in records[0].getMessage()
    assert "Traceback (most recent call last)" in log.read_text()  # only in the file
