"""The stop protocol of a rank: the first stop signal recorded, a second Ctrl-C stops now, an
inherited request and a lost launcher count, and the reason is put in words."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import pytest

from blip_recipes.runs.stop import (
    STOP_REQUEST_ENV,
    STOP_SIGNALS,
    StoppedBeforeStartError,
    StopRequests,
)

ONE_RANK = SimpleNamespace(world_size=1, dp_group=None)


@pytest.fixture
def own_handlers(monkeypatch):
    """Restore this process's handlers and environment after the test installs the recipe's."""
    monkeypatch.delenv(STOP_REQUEST_ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_first_signal_is_kept_and_a_second_sigint_stops_now(own_handlers):
    stop = StopRequests.install()
    assert not stop.requested() and not stop.agreed(ONE_RANK)
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.signal == signal.SIGUSR1 and stop.reason() == "SIGUSR1"
    assert stop.agreed(ONE_RANK)
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)


def test_a_request_inherited_from_the_launcher_stops_before_training(own_handlers, monkeypatch):
    monkeypatch.setenv(STOP_REQUEST_ENV, str(int(signal.SIGTERM)))
    stop = StopRequests.install()
    with pytest.raises(StoppedBeforeStartError, match="^SIGTERM: stopped before training"):
        stop.refuse_start_if_requested(ONE_RANK)


def test_a_lost_launcher_counts_as_a_stop(own_handlers, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    stop = StopRequests.install()
    assert stop.launcher_pid == os.getppid() and not stop.agreed(ONE_RANK)
    stop.launcher_pid = -12345  # the parent this rank started with is gone
    assert stop.agreed(ONE_RANK)
    assert stop.signal == signal.SIGHUP
    assert stop.reason() == "launcher (pid -12345) is gone"


def test_reason_of_a_stop_heard_only_through_the_agreement():
    stop = StopRequests()
    stop.signal = -1
    assert stop.reason() == "stop requested on another rank"
