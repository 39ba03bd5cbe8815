"""One shutdown rule for the long-running commands (docs/DESIGN.md §12): SIGINT and SIGTERM ask to stop.

    stop = threading.Event()
    with stop_on_signals(stop, log, "finishing the current batch, then saving"):
        work(stop)      # looks at stop between units of work, saves what it has and returns
    # everything is saved here: SIGINT and SIGTERM are ignored from now on

* The first signal sets ``stop`` and logs ``"<SIGNAL>: <message>"``; the work finishes its current
  unit, saves and returns.
* A repeated signal sets ``stop`` again, or, with ``again``, sets that event instead and logs
  ``"<SIGNAL> again: <again_message>"`` as a warning (the producer: stop waiting for the trainer's
  acknowledgements).
* On leaving the block both signals are ignored (``SIG_IGN``), for the rest of the process: the work is
  saved, and a late signal (a second Ctrl-C, a supervisor's SIGTERM while the interpreter shuts down,
  when Python's own handlers are gone) must not turn the clean exit into a kill (exit code -2).
  Children started after that inherit the ignored signals; a caller that runs the work in-process
  and goes on (a test) restores its handlers itself.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def stop_on_signals(
    stop: threading.Event,
    log: logging.Logger,
    message: str,
    again: threading.Event | None = None,
    again_message: str = "",
) -> Iterator[threading.Event]:
    """Set ``stop`` on SIGINT/SIGTERM inside the block (``again`` on a repeated one); ignore both after it.

    Must be entered in the main thread (Python runs signal handlers there only)."""

    def on_signal(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if again is not None and stop.is_set():
            log.warning("%s again: %s", name, again_message)
            again.set()
            return
        log.info("%s: %s", name, message)
        stop.set()

    for s in SIGNALS:
        signal.signal(s, on_signal)
    try:
        yield stop
    finally:
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)
