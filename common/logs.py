"""One logging setup per process; every line carries the process name. Progress bars that suit the stream.

:func:`progress_bar` is ``tqdm`` on a terminal. Into a file or a pipe (a log file of ``make demo``) a
redrawn bar would be one endless line of carriage returns that the next log line continues; there it
writes each refresh as a line of its own, at most every ``LOG_FILE_INTERVAL_S`` seconds.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import IO, Any

from tqdm import tqdm

#: Seconds between two progress lines written to a file or pipe.
LOG_FILE_INTERVAL_S = 10.0

_FORMAT = "%(asctime)s %(processName)s[%(process)d] %(levelname)s %(name)s: %(message)s"


def setup_logging(process_name: str | None = None, level: str | int | None = None) -> None:
    """Configure the root logger once. ``RSD_LOG_LEVEL`` overrides the default INFO level."""
    import multiprocessing

    if process_name:
        multiprocessing.current_process().name = process_name
    level = level or os.environ.get("RSD_LOG_LEVEL", "INFO")
    root = logging.getLogger()
    if getattr(root, "_rsd_configured", False):
        root.setLevel(level)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    root.handlers[:] = [handler]
    root.setLevel(level)
    root._rsd_configured = True  # type: ignore[attr-defined]


class _LineStream:
    """A file for tqdm that writes each redraw as one whole line (no carriage returns, no padding)."""

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> None:
        for line in text.replace("\r", "\n").split("\n"):
            line = line.rstrip()
            if line and line != self.last:  # tqdm redraws the last state once more when it closes
                self.stream.write(line + "\n")
                self.last = line

    def flush(self) -> None:
        self.stream.flush()


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(iterable: Any = None, file: IO[str] | None = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)`` writing to ``file`` (default: stderr); whole lines unless a terminal."""
    stream = sys.stderr if file is None else file
    if _is_tty(stream):
        return tqdm(iterable, file=stream, **kwargs)
    kwargs["dynamic_ncols"] = False
    kwargs["mininterval"] = max(float(kwargs.get("mininterval", 0.0)), LOG_FILE_INTERVAL_S)
    return tqdm(iterable, file=_LineStream(stream), ascii=True, **kwargs)
