"""common.shutdown: SIGINT/SIGTERM set the stop event, a repeated one the 'again' event, and after the block
both are ignored (the rule make train, make retrain and make produce share)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest

from common.shutdown import SIGNALS, stop_on_signals

log = logging.getLogger("tests.shutdown")


@pytest.fixture(autouse=True)
def keep_handlers():
    saved = {s: signal.getsignal(s) for s in SIGNALS}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def _deliver(signum: int, event: threading.Event) -> None:
    os.kill(os.getpid(), signum)
    deadline = time.time() + 5
    while not event.is_set() and time.time() < deadline:  # the handler runs in the main thread
        time.sleep(0.01)


def test_first_signal_stops_and_after_the_block_signals_are_ignored(caplog):
    caplog.set_level(logging.INFO, logger="tests.shutdown")
    stop = threading.Event()
    with stop_on_signals(stop, log, "saving") as got:
        assert got is stop and not stop.is_set()
        _deliver(signal.SIGTERM, stop)
        assert stop.is_set() and "SIGTERM: saving" in caplog.text
        _deliver(signal.SIGINT, stop)  # a repeated signal without `again`: still only a stop request
        assert "SIGINT: saving" in caplog.text
    assert all(signal.getsignal(s) == signal.SIG_IGN for s in SIGNALS)
    os.kill(os.getpid(), signal.SIGINT)  # ignored: no KeyboardInterrupt
    time.sleep(0.05)


def test_a_repeated_signal_sets_the_again_event(caplog):
    caplog.set_level(logging.INFO, logger="tests.shutdown")
    stop, abort = threading.Event(), threading.Event()
    with stop_on_signals(stop, log, "closing", again=abort, again_message="not waiting"):
        _deliver(signal.SIGINT, stop)
        assert stop.is_set() and not abort.is_set()
        _deliver(signal.SIGINT, abort)
        assert abort.is_set()
    assert "SIGINT: closing" in caplog.text and "SIGINT again: not waiting" in caplog.text


def test_signals_are_ignored_after_the_block_also_when_it_raises():
    with pytest.raises(RuntimeError), stop_on_signals(threading.Event(), log, "x"):
        raise RuntimeError("the work failed")
    assert all(signal.getsignal(s) == signal.SIG_IGN for s in SIGNALS)
