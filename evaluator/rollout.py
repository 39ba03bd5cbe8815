"""``make eval-vla``: closed-loop success of the embedded VLA in LIBERO under the standard protocol.

    python -m evaluator.rollout                                   # libero_spatial 10 tasks x init 0-49 (500 episodes)
    python -m evaluator.rollout --tasks 0-1 --init-states 0-2     # a smaller run (the report says it is not standard)
    python -m evaluator.rollout --random-weights --out runs/eval_vla/random.json   # random-weight baseline
    python -m evaluator.rollout --ray-address auto --workers 32   # on a Ray cluster (see README)

Episodes run in the evaluation fleet (:mod:`evaluator.fleet`): one simulator per worker process, each
finished episode appended to ``--results`` (JSON lines) at once; running the same command again resumes
where it stopped (Ctrl-C keeps every finished episode). Writes the report to ``--out`` (JSON) and
beside it as markdown (``.md``): success with its Wilson 95 % interval, per-task successes, errored
episodes (crashes, never counted as failures).

Also here, for the RSD evaluator's closed loop until it moves to :func:`evaluator.fleet.run_protocol`:
:func:`run_episodes` runs (task, init state) jobs in worker processes from a picklable act factory
and raises on any crash; :func:`summarize` gives success rates per task. :func:`run_episode` and
:func:`make_libero_env` live in :mod:`evaluator.episode`.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import platform
import queue
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from common.cli import config_to_dict, parse_config
from common.logs import progress_bar, setup_logging
from common.schedule import INIT_STATES, parse_range
from evaluator.episode import ActFn, EpisodeEnv, EpisodeResult, make_libero_env, run_episode
from evaluator.fleet import run_protocol
from evaluator.protocol import ArmSpec, ProtocolMismatch
from evaluator.stats import DEFAULT_MARGIN
from producer.env import SUITES

__all__ = [
    "ActFn",
    "EpisodeEnv",
    "EpisodeResult",
    "make_libero_env",
    "run_episode",
    "run_episodes",
    "summarize",
]

log = logging.getLogger("evaluator.rollout")


def _worker(
    wid: int,
    jobs: Any,
    results: Any,
    env_base: dict[str, Any],
    act_factory: Callable[[], ActFn],
    env_factory: Callable[[dict[str, Any]], EpisodeEnv],
    torch_threads: int,
) -> None:
    setup_logging(f"rollout-{wid}")
    try:
        import torch

        torch.set_num_threads(torch_threads)
        act = act_factory()
        results.put(("ready", wid, getattr(act, "backbone_id", "")))
        env, env_task = None, None
        while True:
            job = jobs.get()
            if job is None:
                break
            task_id, init_state = job
            if env_task != task_id:
                if env is not None and hasattr(env, "close"):
                    env.close()
                env = env_factory({**env_base, "task_id": task_id, "init_state": init_state})
                env_task = task_id
            res = run_episode(env, act, init_state, suite=env_base.get("suite", ""), task_id=task_id)
            res.extra["worker"] = wid
            results.put(("episode", wid, res))
        if env is not None and hasattr(env, "close"):
            env.close()
        results.put(("done", wid, None))
    except BaseException:  # reported to the parent, which raises: a crash is never a policy failure
        results.put(("error", wid, traceback.format_exc()))


def run_episodes(
    jobs: Sequence[tuple[int, int]],
    env_base: dict[str, Any],
    act_factory: Callable[[], ActFn],
    workers: int = 2,
    env_factory: Callable[[dict[str, Any]], EpisodeEnv] = make_libero_env,
    torch_threads: int = 1,
    progress: bool = True,
    timeout_s: float = 3600.0,
) -> tuple[list[EpisodeResult], str]:
    """Run (task_id, init_state) ``jobs`` in ``workers`` processes; returns (results in job order, backbone id).

    ``env_base`` holds the EnvConfig fields shared by all jobs (suite, image size, ...). Jobs are
    handed out in order, so consecutive jobs of one task reuse a worker's env. Raises RuntimeError
    with the worker's traceback if any worker crashes.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    os.environ.setdefault("MUJOCO_GL", "egl")
    ctx = mp.get_context("spawn")
    job_q, res_q = ctx.Queue(), ctx.Queue()
    for job in jobs:
        job_q.put(tuple(job))
    n_workers = min(workers, max(1, len(jobs)))
    for _ in range(n_workers):
        job_q.put(None)
    procs = [
        ctx.Process(
            target=_worker,
            args=(w, job_q, res_q, env_base, act_factory, env_factory, torch_threads),
            name=f"rollout-{w}",
            daemon=True,
        )
        for w in range(n_workers)
    ]
    for p in procs:
        p.start()
    results: dict[tuple[int, int], EpisodeResult] = {}
    backbone = ""
    finished = 0
    deadline = time.monotonic() + timeout_s
    bar = progress_bar(total=len(jobs), desc="episodes", unit="ep", disable=not progress, dynamic_ncols=True)
    try:
        while finished < n_workers:
            try:
                kind, wid, payload = res_q.get(timeout=5.0)
            except queue.Empty:
                dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
                if dead:
                    raise RuntimeError(
                        f"rollout worker {dead[0].name} died with exit code {dead[0].exitcode}"
                    ) from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rollouts did not finish within {timeout_s:.0f} s") from None
                continue
            if kind == "error":
                raise RuntimeError(f"rollout worker {wid} crashed:\n{payload}")
            if kind == "ready":
                backbone = backbone or payload
            elif kind == "episode":
                results[(payload.task_id, payload.init_state)] = payload
                bar.update(1)
                done = list(results.values())
                bar.set_postfix(success=f"{np.mean([r.success for r in done]):.2f}")
            elif kind == "done":
                finished += 1
    finally:
        bar.close()
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(timeout=10)
    missing = [j for j in jobs if tuple(j) not in results]
    if missing:
        raise RuntimeError(f"{len(missing)} episodes have no result, e.g. {missing[:3]}")
    return [results[tuple(j)] for j in jobs], backbone


def summarize(results: list[EpisodeResult]) -> dict[str, Any]:
    """Success rate overall and per task, with counts and timing."""
    per_task: dict[int, list[EpisodeResult]] = {}
    for r in results:
        per_task.setdefault(r.task_id, []).append(r)
    return {
        "success_rate": float(np.mean([r.success for r in results])) if results else 0.0,
        "episodes": len(results),
        "successes": int(sum(r.success for r in results)),
        "per_task": {
            str(t): {
                "success_rate": float(np.mean([r.success for r in rs])),
                "successes": int(sum(r.success for r in rs)),
                "episodes": len(rs),
            }
            for t, rs in sorted(per_task.items())
        },
        "mean_steps": float(np.mean([r.steps for r in results])) if results else 0.0,
        "mean_act_ms": 1000 * float(sum(r.act_s for r in results) / max(1, sum(r.queries for r in results))),
    }


@dataclass
class RolloutConfig:
    """Closed-loop success of the embedded VLA (or its random-weight baseline) in LIBERO, standard protocol."""

    suite: str = field(default="libero_spatial", metadata={"help": "LIBERO suite"})
    tasks: str = field(default="0-9", metadata={"help": "task ids, e.g. 0-9 or 0,3,5 (standard: all)"})
    init_states: str = field(
        default="0-49", metadata={"help": "initial states per task, e.g. 0-49 or 0-4 (standard: 0-49)"}
    )
    workers: int = field(default=2, metadata={"help": "episode worker processes (or Ray actors)"})
    ray_address: str | None = field(
        default=None,
        metadata={
            "help": "run the workers as Ray actors: local, auto (a `ray start` cluster here) or HOST:PORT"
        },
    )
    weights_dir: Path | None = field(
        default=None, metadata={"help": "policy weights (none: assets/embedded_vla)"}
    )
    codec_dir: Path | None = field(default=None, metadata={"help": "codec (none: assets/codec)"})
    random_weights: bool = field(
        default=False, metadata={"help": "evaluate the architecture with random weights"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the env, the episodes and the random weights"})
    image_size: int = field(default=128, metadata={"help": "camera image size rendered by the env"})
    max_steps: int | None = field(
        default=None, metadata={"help": "policy steps per episode (none: suite limit, the standard)"}
    )
    retries: int = field(default=1, metadata={"help": "re-runs of an errored (crashed) episode"})
    margin: float = field(default=DEFAULT_MARGIN, metadata={"help": "non-inferiority margin (fraction)"})
    torch_threads: int = field(default=1, metadata={"help": "torch threads per worker"})
    out: Path = field(default=Path("runs/eval_vla/rollout.json"), metadata={"help": "JSON report (+ .md)"})
    results: Path | None = field(
        default=None, metadata={"help": "per-episode results, JSON lines (none: --out with .jsonl)"}
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    task_ids: list[int] = field(init=False, default_factory=list)
    init_state_ids: list[int] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.suite not in SUITES:
            raise ValueError(f"unknown suite {self.suite!r}; valid suites: {list(SUITES)}")
        self.task_ids = parse_range(self.tasks, SUITES[self.suite], "task id")
        self.init_state_ids = parse_range(self.init_states, INIT_STATES, "initial state")
        if self.workers < 1 or self.torch_threads < 1 or self.retries < 0:
            raise ValueError("workers and torch_threads must be >= 1, retries >= 0")
        if not 0 < self.margin < 1:
            raise ValueError(f"margin must be a fraction in (0, 1), got {self.margin}")
        if self.results is None:
            self.results = self.out.with_suffix(".jsonl")


def main(argv: list[str] | None = None) -> int:
    setup_logging("rollout")
    cfg = parse_config(RolloutConfig, argv, prog="python -m evaluator.rollout")
    arm = ArmSpec(
        name="random" if cfg.random_weights else "policy",
        weights=str(cfg.weights_dir) if cfg.weights_dir else None,
        codec=str(cfg.codec_dir) if cfg.codec_dir else None,
        random_weights=cfg.random_weights,
        seed=cfg.seed,
    )
    try:
        result = run_protocol(
            [arm], cfg.task_ids, cfg.init_state_ids, cfg.workers, cfg.results, cfg.ray_address, cfg.seed,
            cfg.max_steps, suite=cfg.suite, image_size=cfg.image_size, retries=cfg.retries,
            torch_threads=cfg.torch_threads, progress=cfg.progress,
        )  # fmt: skip
    except (ProtocolMismatch, ValueError) as exc:
        log.error("%s", exc)
        return 2
    except RuntimeError as exc:
        log.error("stopped: %s (finished episodes are kept in %s)", exc, cfg.results)
        return 1
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {os.cpu_count()} CPUs, no GPU",
        "command": " ".join(["python -m evaluator.rollout", *(sys.argv[1:] if argv is None else argv)]),
        "config": config_to_dict(cfg),
        **result.summary(cfg.margin),
    }
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(report, indent=1))
    cfg.out.with_suffix(".md").write_text(result.markdown(cfg.margin))
    a = report["arms"][arm.name]
    lo, hi = a["wilson95"]
    log.info(
        "%s (%s): success %d/%d (Wilson 95%% %.1f-%.1f%%), %d errored, %d missing; %s -> %s",
        ", ".join(a["backbone"]) or arm.name, report["protocol"]["description"], a["successes"],
        a["episodes"], 100 * lo, 100 * hi, a["errored"], a["missing"],
        "complete" if result.complete else "INCOMPLETE (run again to resume)", cfg.out,
    )  # fmt: skip
    for t, (k, n) in a["per_task"].items():
        log.info("  task %s: %d/%d", t, k, n)
    if result.interrupted:
        return 130
    return 0 if result.complete else 1


if __name__ == "__main__":
    raise SystemExit(main())
