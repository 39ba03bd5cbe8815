"""Record scripted-expert demonstrations to HDF5 in the LIBERO/robomimic layout.

Worker processes run expert episodes in the real simulator and send each episode back to the
parent through the pool's result queue; only the parent writes the file, so a crashed worker cannot
corrupt it. The file is written as ``<out>.partial`` and renamed when complete.

Layout (N steps of one episode; images exactly as the policy sees them, upright uint8):

    data/                       attrs: env_args (JSON), total, num_demos, num_failures, config (JSON), …
    data/demo_K/                attrs: num_samples, instruction, task_id, init_state, success, seed
        actions            [N, 7]  float32   the env's action space ([-1, 1]; gripper -1 open, +1 close)
        obs/agentview_rgb  [N, h, w, 3] uint8
        obs/eye_in_hand_rgb [N, h, w, 3] uint8
        obs/ee_states      [N, 6]  float64   eef position (3), axis-angle (3)
        obs/gripper_states [N, 2]  float64   finger joint positions
        obs/joint_states   [N, 7]  float64   arm joint positions
        states             [N, S]  float64   flattened MuJoCo state (for replay)
        rewards            [N]     float32
        dones              [N]     uint8
    mask/train, mask/valid      demo names (valid: the last init state of every task)

``obs[i]`` is the observation on which ``actions[i]`` was taken; ``rewards[i]``/``dones[i]`` follow it.

    python -m producer.demos --out data/demos/libero_spatial_expert.hdf5 --tasks 0-9 --init-states 5-24
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from producer.env import EnvConfig
from producer.expert import (
    SUPPORTED_SUITES,
    EpisodeResult,
    close_worker_env,
    run_episode,
    validate_episode_selection,
    worker_env,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
OBS_KEYS = ("agentview_rgb", "eye_in_hand_rgb", "ee_states", "gripper_states", "joint_states")


@dataclass
class DemosConfig:
    """Record scripted-expert demonstrations in the real LIBERO simulator to one HDF5 file."""

    out: Path = field(
        default=Path("data/demos/libero_spatial_expert.hdf5"), metadata={"help": "output HDF5 file"}
    )
    suite: str = field(default="libero_spatial", metadata={"help": f"suite, one of {SUPPORTED_SUITES}"})
    tasks: str = field(default="0-9", metadata={"help": "task ids, e.g. 0-9 or 0,4,7"})
    init_states: str = field(
        default="5-24",
        metadata={"help": "init-state indices (0..49); 0-4 are kept for closed-loop evaluation"},
    )
    workers: int = field(default=2, metadata={"help": "parallel worker processes"})
    image_size: int = field(default=128, metadata={"help": "square camera image size"})
    seed: int = field(default=0, metadata={"help": "environment seed (episodes are deterministic)"})
    max_steps: int | None = field(default=None, metadata={"help": "step limit (none: the suite's)"})
    keep_failures: bool = field(default=False, metadata={"help": "also store failed episodes"})
    compression: str = field(
        default="gzip", metadata={"help": "image compression", "choices": ["gzip", "lzf", "none"]}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output file"})
    max_minutes: float | None = field(
        default=None,
        metadata={"help": "stop after this many minutes and finalize the file with the episodes done"},
    )

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.task_ids, self.init_ids = validate_episode_selection(
            self.suite, self.tasks, self.init_states, self.workers
        )
        if self.compression not in ("gzip", "lzf", "none"):
            raise ValueError(f"compression {self.compression!r}; valid: gzip, lzf, none")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes {self.max_minutes} must be > 0")
        if self.out.exists() and not self.overwrite:
            raise ValueError(f"{self.out} exists; pass --overwrite to replace it")


def record_episode(cfg: EnvConfig, init_state: int) -> tuple[EpisodeResult, dict[str, np.ndarray]]:
    """Run one expert episode with both cameras observed on every step; return arrays per key."""
    env = worker_env(cfg)
    result, rec = run_episode(env, init_state, record=True)
    assert rec is not None
    arrays = {
        "actions": np.asarray(rec["actions"], dtype=np.float32),  # [N, 7]
        "agentview_rgb": np.asarray(rec["agentview_rgb"], dtype=np.uint8),  # [N, h, w, 3]
        "eye_in_hand_rgb": np.asarray(rec["eye_in_hand_rgb"], dtype=np.uint8),  # [N, h, w, 3]
        "ee_states": np.asarray(rec["ee_states"], dtype=np.float64),  # [N, 6]
        "gripper_states": np.asarray(rec["gripper_states"], dtype=np.float64),  # [N, 2]
        "joint_states": np.asarray(rec["joint_states"], dtype=np.float64),  # [N, 7]
        "states": np.asarray(rec["states"], dtype=np.float64),  # [N, S]
        "rewards": np.asarray(rec["rewards"], dtype=np.float32),  # [N]
        "dones": np.asarray(rec["dones"], dtype=np.uint8),  # [N]
    }
    return result, arrays


def _worker(args: tuple[EnvConfig, int]) -> tuple[EpisodeResult, dict[str, np.ndarray], dict[str, Any]]:
    from common.logs import setup_logging

    cfg, init_state = args
    setup_logging()
    result, arrays = record_episode(cfg, init_state)
    env = worker_env(cfg)
    meta = {"instruction": env.task.instruction, "env_args": env.env_args(), "task_name": env.task.name}
    return result, arrays, meta


def _ignore_sigint() -> None:
    """Pool initializer: Ctrl-C reaches the parent, which stops cleanly and terminates the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _git_revision() -> str:
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
    """Writes episodes into ``data/demo_K`` groups; the parent process is its only user."""

    def __init__(self, path: Path, compression: str = "gzip") -> None:
        import h5py

        self.path = path
        self.compression = None if compression == "none" else compression
        self.file = h5py.File(path, "w", libver="latest")
        self.data = self.file.create_group("data")
        self.num_demos = 0
        self.total = 0
        self.names_by_task: dict[int, list[tuple[int, str]]] = {}

    def _dataset(self, group: Any, name: str, array: np.ndarray, image: bool = False) -> None:
        kwargs: dict[str, Any] = {}
        if image:
            kwargs["chunks"] = (1, *array.shape[1:])  # one frame per chunk: cheap random access
            if self.compression == "gzip":
                kwargs.update(compression="gzip", compression_opts=4)
            elif self.compression == "lzf":
                kwargs.update(compression="lzf")
        group.create_dataset(name, data=array, **kwargs)

    def add(self, result: EpisodeResult, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> str:
        name = f"demo_{self.num_demos}"
        g = self.data.create_group(name)
        n = int(arrays["actions"].shape[0])
        obs = g.create_group("obs")
        for key in OBS_KEYS:
            self._dataset(obs, key, arrays[key], image=key.endswith("_rgb"))
        for key in ("actions", "states", "rewards", "dones"):
            self._dataset(g, key, arrays[key])
        g.attrs["num_samples"] = n
        g.attrs["instruction"] = meta["instruction"]
        g.attrs["task_name"] = meta["task_name"]
        g.attrs["task_id"] = result.task_id
        g.attrs["init_state"] = result.init_state
        g.attrs["success"] = bool(result.success)
        self.num_demos += 1
        self.total += n
        self.names_by_task.setdefault(result.task_id, []).append((result.init_state, name))
        self.file.flush()
        return name

    def finish(self, attrs: dict[str, Any]) -> None:
        import h5py

        for k, v in attrs.items():
            self.data.attrs[k] = v
        self.data.attrs["total"] = self.total
        self.data.attrs["num_demos"] = self.num_demos
        # Validation split: the episodes of the highest init state of every task.
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


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    from common.cli import config_to_dict, parse_config
    from common.logs import setup_logging

    cfg = parse_config(DemosConfig, argv, prog="python -m producer.demos")
    setup_logging("demos")
    logging.getLogger("producer").setLevel(logging.WARNING)  # the progress bar says enough
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    partial = cfg.out.with_name(cfg.out.name + ".partial")
    # Init-state-major order: every prefix of the run covers all tasks evenly, so a run stopped early
    # (SIGINT/SIGTERM or --max-minutes) still leaves a balanced, finalized file.
    jobs = [
        (
            EnvConfig(
                suite=cfg.suite,
                task_id=t,
                init_state=i,
                image_size=cfg.image_size,
                seed=cfg.seed,
                max_steps=cfg.max_steps,
            ),
            i,
        )
        for i in cfg.init_ids
        for t in cfg.task_ids
    ]
    stop = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        log.warning("signal %d: finishing the file with the episodes recorded so far", signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_stop)
    revision = _git_revision()  # the code that records the episodes (at the start of the run)
    writer = DemoWriter(partial, cfg.compression)
    env_args: dict[str, Any] | None = None
    failures: list[dict[str, int]] = []
    steps = 0
    done = 0
    episode_seconds: list[float] = []
    t0 = time.perf_counter()
    # One rasterizer thread per worker: the workers already fill the cores (images are identical).
    os.environ.setdefault("LP_NUM_THREADS", "1")
    ctx = mp.get_context("spawn")
    with contextlib.ExitStack() as stack:
        if cfg.workers == 1:  # in this process (simplest to debug); the file is still .partial until done
            episodes = map(_worker, jobs)
            stack.callback(close_worker_env)
        else:
            pool = stack.enter_context(ctx.Pool(cfg.workers, initializer=_ignore_sigint))
            episodes = pool.imap(_worker, jobs)
        bar = tqdm(episodes, total=len(jobs), desc="demos", unit="ep")
        for result, arrays, meta in bar:  # in job order: demo numbering does not depend on timing
            steps += result.steps
            episode_seconds.append(result.seconds)
            if env_args is None:
                env_args = meta["env_args"]
            if not result.success:
                failures.append({"task_id": result.task_id, "init_state": result.init_state})
            if result.success or cfg.keep_failures:
                writer.add(result, arrays, meta)
            bar.set_postfix(kept=writer.num_demos, failed=len(failures))
            done += 1
            if cfg.max_minutes is not None and time.perf_counter() - t0 > 60 * cfg.max_minutes:
                log.warning(
                    "--max-minutes %.1f reached after %d/%d episodes", cfg.max_minutes, done, len(jobs)
                )
                stop.set()
            if stop.is_set():
                break  # leaving the ExitStack terminates the pool
    wall = time.perf_counter() - t0
    if env_args is None:  # stopped before the first episode
        env_args = {}
    writer.finish(
        {
            "schema_version": SCHEMA_VERSION,
            "env_args": json.dumps(env_args),
            "config": json.dumps(config_to_dict(cfg)),
            "num_failures": len(failures),
            "num_episodes": done,
            "complete": done == len(jobs),
            "failures": json.dumps(failures),
            "source": "scripted expert (producer/expert.py)",
            "repository_version": revision,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    )
    os.replace(partial, cfg.out)
    n = done
    if done < len(jobs):
        print(f"stopped early: {done} of {len(jobs)} planned episodes recorded")
    print(
        f"{cfg.out}: {writer.num_demos} demos, {writer.total} samples; "
        f"{n - len(failures)}/{n} episodes succeeded, {len(failures)} failed {failures if failures else ''}"
    )
    print(
        f"{wall:.0f} s wall for {n} episodes on {cfg.workers} workers ({wall / n:.1f} s per episode, "
        f"{steps / wall:.1f} env steps/s overall; {np.mean(episode_seconds):.1f} s per episode in a worker)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
