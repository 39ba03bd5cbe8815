"""Record scripted-expert demonstrations to HDF5 in the LIBERO/robomimic layout.

Worker processes run expert episodes in the real simulator and send each episode back to the
parent through the pool's result queue; only the parent writes the file, so a crashed worker cannot
corrupt it. A file is written as ``<out>.partial`` and renamed when complete. With
``--shard-episodes N`` the episodes go to shards ``<out stem>-000.hdf5``, ``-001``, … of N episodes
each (in job order), each a complete file on its own: a run that is stopped or killed leaves every
finished shard usable, and ``--resume`` records only the shards not yet complete.

Episodes start from fresh initial states by default (``--init-states fresh:0-49``: new random object
placements drawn from fresh seeds; see ``common/init_states.py``). The 50 benchmark initial states of
every task are the evaluation set: recording from them needs ``--allow-benchmark-states`` (legacy
data only), and every fresh start is compared to them before it is written (a match is dropped and
counted).

The file layout, its writer (:class:`common.demos.DemoWriter`) and its readers: :mod:`common.demos`
(docs/DESIGN.md §8.2).

    python -m producer.demos --out data/demos/libero_spatial_fresh.hdf5 --tasks 0-9 --init-states fresh:0-49
    python -m producer.demos --out /work/data/fresh/spatial.hdf5 --init-states fresh:0-59 \
        --shard-episodes 20 --resume        # shards; run again to finish after a stop
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.demos import DemoWriter
from common.init_states import (
    BENCHMARK,
    OVERRIDE_FLAG,
    parse_init,
)
from producer.demo_file import ShardStats, errored, finish_file, git_revision
from producer.env import EnvConfig
from producer.expert import (
    SUPPORTED_SUITES,
    EpisodeResult,
    close_worker_env,
    env_config,
    run_episode,
    validate_episode_selection,
    worker_env,
)

log = logging.getLogger(__name__)


Job = tuple[EnvConfig, "int | str", float]  # (the task's env config, initial state, action noise)


@dataclass
class DemosConfig:
    """Record scripted-expert demonstrations in the real LIBERO simulator to HDF5."""

    out: Path = field(
        default=Path("data/demos/libero_spatial_fresh.hdf5"), metadata={"help": "output HDF5 file"}
    )
    suite: str = field(default="libero_spatial", metadata={"help": f"suite, one of {SUPPORTED_SUITES}"})
    tasks: str = field(default="0-9", metadata={"help": "task ids, e.g. 0-9 or 0,4,7"})
    init_states: str = field(
        default="fresh:0-49",
        metadata={"help": "fresh seeds (fresh:0-499: new random initial states) or, with "
                  f"{OVERRIDE_FLAG}, benchmark init-state indices (0..49, the evaluation set)"},
    )  # fmt: skip
    workers: int = field(default=2, metadata={"help": "parallel worker processes"})
    image_size: int = field(default=128, metadata={"help": "square camera image size"})
    seed: int = field(default=0, metadata={"help": "environment seed (episodes are deterministic)"})
    max_steps: int | None = field(default=None, metadata={"help": "step limit (none: the suite's)"})
    keep_failures: bool = field(default=False, metadata={"help": "also store failed episodes"})
    compression: str = field(
        default="gzip", metadata={"help": "image compression", "choices": ["gzip", "lzf", "none"]}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace existing output files"})
    max_minutes: float | None = field(
        default=None,
        metadata={"help": "stop after this many minutes and finalize the file with the episodes done"},
    )
    shard_episodes: int = field(
        default=0, metadata={"help": "write shards of N episodes (<out stem>-000.hdf5, ...; 0: one file)"}
    )
    resume: bool = field(
        default=False, metadata={"help": "keep the complete shards already written, record the others"}
    )
    allow_benchmark_states: bool = field(
        default=False,
        metadata={"help": "LEGACY DATA ONLY: record from benchmark initial states (the evaluation set)"},
    )
    action_noise: float = field(
        default=0.0,
        metadata={"help": "std of a Gaussian bias on the executed translation actions, redrawn every 8 steps; "
                  "the recorded actions stay the expert's, which corrects the drift and re-plans after a "
                  "missed grasp (0: none)"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.task_ids, self.init_ids = validate_episode_selection(
            self.suite, self.tasks, self.init_states, self.workers
        )
        bench = [i for i in self.init_ids if parse_init(i)[0] == BENCHMARK]
        if bench and not self.allow_benchmark_states:
            raise ValueError(
                f"--init-states {self.init_states} names benchmark initial states, the evaluation set; "
                f"record training data from fresh ones (e.g. fresh:0-49), or pass {OVERRIDE_FLAG} (legacy only)"
            )
        if not 0.0 <= self.action_noise <= 1.0:
            raise ValueError(f"action_noise {self.action_noise} must be in [0, 1] (actions are in [-1, 1])")
        if self.compression not in ("gzip", "lzf", "none"):
            raise ValueError(f"compression {self.compression!r}; valid: gzip, lzf, none")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes {self.max_minutes} must be > 0")
        if self.shard_episodes < 0:
            raise ValueError(f"shard_episodes {self.shard_episodes} must be >= 0")
        if self.resume and not self.shard_episodes:
            raise ValueError("--resume needs --shard-episodes (it keeps complete shards)")
        if self.resume and self.overwrite:
            raise ValueError("pass either --resume or --overwrite")
        existing = [p for p, _ in plan_shards(self, []) if p.exists()] if self.shard_episodes else (
            [self.out] if self.out.exists() else [])  # fmt: skip
        if existing and not (self.overwrite or self.resume):
            raise ValueError(f"{existing[0]} exists; pass --overwrite to replace or --resume to continue")


def plan_jobs(cfg: DemosConfig) -> list[Job]:
    """Initial-state-major order: every prefix of the run covers all tasks evenly, so a run stopped
    early (SIGINT/SIGTERM, --max-minutes, a killed shard run) still leaves balanced data."""
    return [
        (
            env_config(cfg.suite, t, i, image_size=cfg.image_size, seed=cfg.seed, max_steps=cfg.max_steps),
            i,
            cfg.action_noise,
        )
        for i in cfg.init_ids
        for t in cfg.task_ids
    ]


def plan_shards(cfg: DemosConfig, jobs: list[Job]) -> list[tuple[Path, list[Job]]]:
    """(file, its jobs) in job order: one file, or shards of ``shard_episodes`` episodes."""
    if not cfg.shard_episodes:
        return [(cfg.out, jobs)]
    n = len(cfg.task_ids) * len(cfg.init_ids)
    k = cfg.shard_episodes
    return [
        (cfg.out.with_name(f"{cfg.out.stem}-{i // k:03d}{cfg.out.suffix}"), jobs[i : i + k])
        for i in range(0, n, k)
    ]


def shard_complete(path: Path) -> bool:
    """Whether ``path`` is a finalized file that recorded all of its planned episodes."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return bool(f["data"].attrs.get("complete", False))
    except (OSError, KeyError):
        return False


def record_episode(
    cfg: EnvConfig, init_state: int | str, action_noise: float = 0.0
) -> tuple[EpisodeResult, dict[str, np.ndarray]]:
    """Run one expert episode with both cameras observed on every step; return arrays per key."""
    env = worker_env(cfg)
    result, rec = run_episode(env, init_state, record=True, action_noise=action_noise)
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
        "init_sim_state": np.asarray(env.initial_state, dtype=np.float64),  # [S]
    }
    return result, arrays


def episode_meta(env: Any) -> dict[str, Any]:
    """What the writer records about an episode's task and start (``env`` right after the episode)."""
    return {
        "instruction": env.task.instruction,
        "env_args": env.env_args(),
        "task_name": env.task.name,
        "suite": env.cfg.suite,
        "init_source": env.init_source,
        "init_object_qpos": env.object_qpos_index(),
        "fresh_attempts": env.fresh_attempts if env.init_source.startswith("fresh") else 0,
    }


def _worker(args: Job) -> tuple[EpisodeResult, dict[str, np.ndarray], dict[str, Any]]:
    from common.logs import setup_logging

    cfg, init_state, noise = args
    setup_logging()
    try:
        result, arrays = record_episode(cfg, init_state, action_noise=noise)
    except Exception as exc:  # a simulator error ends this episode only
        close_worker_env()  # the next episode builds a new environment
        return errored(cfg.task_id, init_state, exc)
    meta = episode_meta(worker_env(cfg))
    meta["attrs"] = {"action_noise": float(noise), "expert_recoveries": int(result.recoveries)}
    return result, arrays, meta


def _ignore_sigint() -> None:
    """Pool initializer: Ctrl-C reaches the parent, which stops cleanly and terminates the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def episode_stream(jobs: list[Job], workers: int, worker: Any = _worker) -> Iterator[Iterator[Any]]:
    """``worker(job)`` for every job, in job order: in this process (1 worker) or a spawn pool."""
    # One rasterizer thread per worker: the workers already fill the cores (images are identical).
    os.environ.setdefault("LP_NUM_THREADS", "1")
    with contextlib.ExitStack() as stack:
        if workers == 1:  # in this process (simplest to debug)
            stack.callback(close_worker_env)
            yield map(worker, jobs)
        else:
            pool = stack.enter_context(mp.get_context("spawn").Pool(workers, initializer=_ignore_sigint))
            yield pool.imap(worker, jobs)  # leaving the context terminates the pool


def install_stop_handlers() -> threading.Event:
    """SIGINT/SIGTERM set the returned event: the recorder finishes the current file and stops."""
    stop = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        log.warning("signal %d: finishing the file with the episodes recorded so far", signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_stop)
    return stop


def record(cfg: DemosConfig, shards: list[tuple[Path, list[Job]]]) -> list[ShardStats]:
    """Record the shards' episodes with one worker pool; finalize every file (complete or not)."""
    from tqdm import tqdm

    stop = install_stop_handlers()
    revision = git_revision()  # the code that records the episodes (at the start of the run)
    jobs = [job for _, js in shards for job in js]
    t0 = time.perf_counter()
    all_stats: list[ShardStats] = []
    with episode_stream(jobs, cfg.workers) as episodes:
        bar = tqdm(episodes, total=len(jobs), desc="demos", unit="ep")
        shard_iter = iter(shards)
        writer = stats = None
        for result, arrays, meta in bar:  # in job order: demo numbering does not depend on timing
            if writer is None:
                path, shard_jobs = next(shard_iter)
                path.parent.mkdir(parents=True, exist_ok=True)
                writer = DemoWriter(path.with_name(path.name + ".partial"), cfg.compression)
                stats = ShardStats(planned=len(shard_jobs))
                all_stats.append(stats)
            stats.add(result, meta)
            if arrays is not None and (result.success or cfg.keep_failures):
                writer.add(result, arrays, meta)
            bar.set_postfix(
                file=writer.path.name.split(".")[0], kept=writer.num_demos, failed=len(stats.failures)
            )
            if cfg.max_minutes is not None and time.perf_counter() - t0 > 60 * cfg.max_minutes:
                log.warning(
                    "--max-minutes %.1f reached after %d/%d episodes", cfg.max_minutes, bar.n + 1, len(jobs)
                )
                stop.set()
            if stats.done == stats.planned or stop.is_set():
                finish_file(writer, stats, cfg, revision, "scripted expert (producer/expert.py)")
                log.info("%s: %d demos of %d episodes, %d failed, %.1f s per episode in a worker",
                         path, writer.num_demos, stats.done, len(stats.failures), np.mean(stats.seconds))  # fmt: skip
                writer = None
            if stop.is_set():
                break
    return all_stats


def main(argv: list[str] | None = None) -> int:
    from common.cli import parse_config
    from common.logs import setup_logging

    cfg = parse_config(DemosConfig, argv, prog="python -m producer.demos")
    setup_logging("demos")
    logging.getLogger("producer").setLevel(logging.WARNING)  # the progress bar says enough
    logging.getLogger(__name__).setLevel(logging.INFO)  # one line per finished file
    shards = plan_shards(cfg, plan_jobs(cfg))
    todo = [(p, js) for p, js in shards if not (cfg.resume and shard_complete(p))]
    if len(todo) < len(shards):
        log.info("--resume: %d of %d shards already complete", len(shards) - len(todo), len(shards))
    t0 = time.perf_counter()
    stats = record(cfg, todo) if todo else []
    wall = time.perf_counter() - t0
    n = sum(s.done for s in stats)
    planned = sum(len(js) for _, js in todo)
    if n < planned:
        print(f"stopped early: {n} of {planned} planned episodes recorded")
    failures = [f for s in stats for f in s.failures]
    print(f"{[str(p) for p, _ in todo[: len(stats)]]}: {n - len(failures)}/{n} episodes succeeded, "
          f"{len(failures)} failed {failures if failures else ''}")  # fmt: skip
    if n:
        steps = sum(s.steps for s in stats)
        seconds = [x for s in stats for x in s.seconds]
        print(f"{wall:.0f} s wall for {n} episodes on {cfg.workers} workers ({wall / n:.1f} s per episode, "
              f"{steps / wall:.1f} env steps/s overall; {np.mean(seconds):.1f} s per episode in a worker)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
