"""The demonstration HDF5 file: one writer for every recorder (scripted expert, DAgger).

Layout: see ``producer/demos.py``. Only the parent process writes; a file is written as
``<file>.partial`` and renamed when finalized (:func:`finish_file`).
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
from common.init_states import BENCHMARK, BenchmarkStateLeak, assert_no_benchmark_states, parse_init
from producer.expert import EpisodeResult

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: initial states recorded (init_sim_state, init_source, init_object_qpos)
OBS_KEYS = ("agentview_rgb", "eye_in_hand_rgb", "ee_states", "gripper_states", "joint_states")


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


class DemoWriter:
    """Writes episodes into ``data/demo_K`` groups; the parent process is its only user.

    Every episode's initial state is checked against the task's benchmark initial states before it is
    written: a fresh start that matches one is dropped and counted (``leaks``), never written.
    """

    def __init__(self, path: Path, compression: str = "gzip") -> None:
        import h5py

        self.path = path
        self.compression = None if compression == "none" else compression
        self.file = h5py.File(path, "w", libver="latest")
        self.data = self.file.create_group("data")
        self.num_demos = 0
        self.total = 0
        self.names_by_task: dict[int, list[tuple[tuple[str, int], str]]] = {}
        self.leaks: list[str] = []
        self.unchecked: list[str] = []
        self.benchmark_starts = 0
        self.nearest_benchmark_m = float("inf")

    def _dataset(self, group: Any, name: str, array: np.ndarray, image: bool = False) -> None:
        kwargs: dict[str, Any] = {}
        if image:
            kwargs["chunks"] = (1, *array.shape[1:])  # one frame per chunk: cheap random access
            if self.compression == "gzip":
                kwargs.update(compression="gzip", compression_opts=4)
            elif self.compression == "lzf":
                kwargs.update(compression="lzf")
        group.create_dataset(name, data=array, **kwargs)

    def admissible(self, meta: dict[str, Any], init_sim_state: np.ndarray) -> bool:
        """False (logged, counted) for a fresh start that is a benchmark initial state."""
        kind, _ = parse_init(meta["init_source"])
        if kind == BENCHMARK:  # allowed by the caller's explicit override only
            self.benchmark_starts += 1
            return True
        try:
            near = assert_no_benchmark_states(
                init_sim_state, meta["suite"], meta["task_name"], meta["init_object_qpos"],
                what=f"{meta['task_name']} {meta['init_source']}",
            )  # fmt: skip
        except BenchmarkStateLeak as exc:
            log.error("dropped: %s", exc)
            self.leaks.append(meta["init_source"])
            return False
        except (OSError, ValueError) as exc:  # benchmark states unreadable now: keep it
            log.error("written unchecked (the trainers check it again): %s", exc)
            self.unchecked.append(meta["init_source"])
            return True
        self.nearest_benchmark_m = min(self.nearest_benchmark_m, float(near.min()))
        return True

    def add(self, result: EpisodeResult, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> str | None:
        """Write one episode (``arrays``: OBS_KEYS in ``obs/``, the rest at the top; ``meta["attrs"]``:
        extra attributes). Returns its name, or None if its start is a benchmark state (dropped)."""
        if not self.admissible(meta, arrays["init_sim_state"]):
            return None
        name = f"demo_{self.num_demos}"
        g = self.data.create_group(name)
        n = int(arrays["actions"].shape[0])
        obs = g.create_group("obs")
        for key in OBS_KEYS:
            self._dataset(obs, key, arrays[key], image=key.endswith("_rgb"))
        for key, array in arrays.items():
            if key not in OBS_KEYS:
                self._dataset(g, key, array)
        kind, index = parse_init(meta["init_source"])
        attrs = {
            "num_samples": n, "instruction": meta["instruction"], "task_name": meta["task_name"],
            "task_id": result.task_id, "success": bool(result.success), "init_source": f"{kind}:{index}",
            "init_state": index if kind == BENCHMARK else -1, "fresh_attempts": int(meta["fresh_attempts"]),
            "init_object_qpos": np.asarray(meta["init_object_qpos"], dtype=np.int64), **meta.get("attrs", {}),
        }  # fmt: skip
        g.attrs.update(attrs)
        self.num_demos += 1
        self.total += n
        self.names_by_task.setdefault(result.task_id, []).append(((kind, index), name))
        self.file.flush()
        return name

    def finish(self, attrs: dict[str, Any]) -> None:
        import h5py

        for k, v in attrs.items():
            self.data.attrs[k] = v
        self.data.attrs["total"] = self.total
        self.data.attrs["num_demos"] = self.num_demos
        self.data.attrs["init_check"] = json.dumps(
            {"benchmark_starts_written": self.benchmark_starts, "fresh_dropped_as_benchmark": self.leaks,
             "unchecked": self.unchecked,
             "nearest_benchmark_m": None if self.nearest_benchmark_m == float("inf") else self.nearest_benchmark_m}
        )  # fmt: skip
        # Validation split: the episodes of the highest initial state of every task.
        train: list[str] = []
        valid: list[str] = []
        for _, items in sorted(self.names_by_task.items()):
            items.sort()
            if len(items) > 1:
                valid.append(items[-1][1])
                train.extend(n for _, n in items[:-1])
            else:
                train.extend(n for _, n in items)
        mask = self.file.create_group("mask")
        dt = h5py.string_dtype()
        mask.create_dataset("train", data=np.array(train, dtype=object), dtype=dt)
        mask.create_dataset("valid", data=np.array(valid, dtype=object), dtype=dt)
        self.file.close()


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
