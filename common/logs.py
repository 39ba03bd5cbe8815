"""One logging setup per process; every line carries the process name."""

from __future__ import annotations

import logging
import os
import sys

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
