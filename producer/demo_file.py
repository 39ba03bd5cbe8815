"""What every demonstration recorder (scripted expert, DAgger) keeps while it writes a file: per-file
counts (:class:`ShardStats`), errored episodes, and the file-level attributes written when a file is
finalized (:func:`finish_file`: ``<file>.partial`` renamed to the file).

The file format, its writer and its readers: :mod:`common.demos` (docs/DESIGN.md §8.2).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from common.cli import config_to_dict
from common.demos import SCHEMA_VERSION, DemoWriter
from producer.expert import EpisodeResult

log = logging.getLogger(__name__)


def git_revision() -> str:
    """The short commit of the code that records (``unknown`` outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def errored(
    task_id: int, init_state: int | str, exc: BaseException
) -> tuple[EpisodeResult, None, dict[str, Any]]:
    """What a worker returns for an episode that raised: the recorder counts it and goes on."""
    return EpisodeResult(task_id, init_state, False, 0, 0.0), None, {"error": f"{type(exc).__name__}: {exc}"}


@dataclass
class ShardStats:
    """What one output file saw: episodes done, failures, steps, seconds per episode."""

    planned: int
    done: int = 0
    steps: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    env_args: dict[str, Any] | None = None

    def add(self, result: EpisodeResult, meta: dict[str, Any]) -> None:
        self.done += 1
        if "error" in meta:  # the episode crashed: counted, logged, nothing written
            self.errors.append(
                {"task_id": result.task_id, "init_state": result.init_state, "error": meta["error"]}
            )
            log.error("task %d %s errored: %s", result.task_id, result.init_state, meta["error"])
            return
        self.steps += result.steps
        self.seconds.append(result.seconds)
        self.env_args = self.env_args or meta["env_args"]
        if not result.success:
            self.failures.append({"task_id": result.task_id, "init_state": result.init_state})


def finish_file(writer: DemoWriter, stats: ShardStats, cfg: Any, revision: str, source: str) -> None:
    """Write the file-level attributes, close it and rename ``<file>.partial`` to the file."""
    writer.finish(
        {
            "schema_version": SCHEMA_VERSION,
            "env_args": json.dumps(stats.env_args or {}),
            "config": json.dumps(config_to_dict(cfg)),
            "num_failures": len(stats.failures),
            "num_episodes": stats.done,
            "complete": stats.done == stats.planned
            and not stats.errors,  # errored episodes: --resume retries
            "failures": json.dumps(stats.failures),
            "num_errors": len(stats.errors),
            "errors": json.dumps(stats.errors),
            "mean_episode_seconds": float(np.mean(stats.seconds)) if stats.seconds else float("nan"),
            "source": source,
            "repository_version": revision,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    )
    os.replace(writer.path, writer.path.with_name(writer.path.name.removesuffix(".partial")))
