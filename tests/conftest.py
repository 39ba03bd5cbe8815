"""Test-suite rules shared by every package's tests.

A test that builds a real LIBERO/MuJoCo environment in the test process must say so with
``@pytest.mark.sim`` (``-m "not sim"`` then leaves the simulator out); full episodes are ``slow`` too.

A command run in-process leaves SIGINT and SIGTERM ignored on its way out (common/shutdown.py); every
test gets the handlers back, or a later test's subprocess would inherit the ignored SIGINT (Python then
raises no KeyboardInterrupt: the fleet's Ctrl-C test failed that way in the full suite).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from producer import env as producer_env


@pytest.fixture(autouse=True)
def _simulator_needs_the_sim_marker(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("sim") is not None:
        return
    real_init = producer_env.LiberoEnv.__init__

    def guarded(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        raise AssertionError(f"{request.node.nodeid} builds a LIBERO environment: mark it @pytest.mark.sim")

    monkeypatch.setattr(producer_env.LiberoEnv, "__init__", guarded)
    del real_init


@pytest.fixture(autouse=True)
def _signal_handlers_restored() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
