"""Closed-loop success of a chunk policy in LIBERO, episodes in parallel worker processes.

    python -m evaluator.rollout                                  # shipped embedded VLA, libero_spatial 0-9 x init 0-4
    python -m evaluator.rollout --random-weights --out runs/eval_vla/random.json   # random-weight baseline

The policy sees an observation, returns a chunk of T actions, and all T actions run open-loop;
cameras are rendered only at query steps (``LiberoEnv.step(observe=False)`` inside a chunk).

Reusable pieces (the RSD evaluator drives them with its own decoding):

* :func:`run_episode` runs one episode on an env given a callable ``obs -> [T, A] actions``.
* :func:`run_episodes` runs (task, init state) jobs in worker processes; each worker builds its
  act callable once from a picklable factory (e.g. :class:`PolicyActFactory`) and keeps one env per
  task. A crash in a worker (env or policy) is raised as an error, never counted as a failure.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import platform
import queue
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from common.cli import config_to_dict, parse_config
from common.logs import setup_logging
from common.policy import Observation

log = logging.getLogger("evaluator.rollout")

@dataclass(frozen=True)
class PolicyActFactory:
    """Picklable recipe for a worker's act callable: ``load_policy(...)`` then ``act([obs])[0].actions``."""

    name: str = "embedded"
    weights_dir: str | None = None
    codec_dir: str | None = None
    random_weights: bool = False
    seed: int = 0
    device: str = "cpu"

    def __call__(self) -> ActFn:
        from common.vla import load_policy

        policy = load_policy(
            self.name,
            device=self.device,
            weights_dir=self.weights_dir,
            codec_dir=self.codec_dir,
            random_weights=self.random_weights,
            seed=self.seed,
        )

        def act(obs: Observation) -> np.ndarray:
            return policy.act([obs])[0].actions  # [T, A]

        act.backbone_id = policy.backbone_id  # type: ignore[attr-defined]
        return act


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
    from tqdm import tqdm

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
    bar = tqdm(total=len(jobs), desc="episodes", unit="ep", disable=not progress, dynamic_ncols=True)
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
    """Closed-loop success rate of the embedded VLA (or its random-weight baseline) in LIBERO."""

    suite: str = field(default="libero_spatial", metadata={"help": "LIBERO suite"})
    tasks: list[int] = field(default_factory=lambda: list(range(10)), metadata={"help": "task ids"})
    init_states: list[int] = field(
        default_factory=lambda: list(range(5)),
        metadata={"help": "initial-state ids per task (0-4 are kept out of the demonstrations)"},
    )
    workers: int = field(default=2, metadata={"help": "parallel episode worker processes"})
    weights_dir: Path | None = field(
        default=None, metadata={"help": "policy weights (none: assets/embedded_vla)"}
    )
    codec_dir: Path | None = field(default=None, metadata={"help": "codec (none: assets/codec)"})
    random_weights: bool = field(
        default=False, metadata={"help": "evaluate the architecture with random weights"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the random weights and the env"})
    image_size: int = field(default=128, metadata={"help": "camera image size rendered by the env"})
    max_steps: int | None = field(
        default=None, metadata={"help": "policy steps per episode (none: suite limit)"}
    )
    torch_threads: int = field(default=1, metadata={"help": "torch threads per worker"})
    out: Path = field(default=Path("runs/eval_vla/rollout.json"), metadata={"help": "JSON results file"})

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if not self.tasks or not self.init_states:
            raise ValueError("tasks and init_states must be non-empty")
        if any(i < 0 for i in [*self.tasks, *self.init_states]):
            raise ValueError(f"task and init-state ids must be >= 0, got {self.tasks} {self.init_states}")


def main(argv: list[str] | None = None) -> None:
    setup_logging("rollout")
    cfg = parse_config(RolloutConfig, argv, prog="python -m evaluator.rollout")
    from producer.env import EnvConfig

    env_base = {
        "suite": cfg.suite,
        "image_size": cfg.image_size,
        "max_steps": cfg.max_steps,
        "seed": cfg.seed,
    }
    EnvConfig(**env_base, task_id=max(cfg.tasks), init_state=max(cfg.init_states))  # validate early
    factory = PolicyActFactory(
        weights_dir=str(cfg.weights_dir) if cfg.weights_dir else None,
        codec_dir=str(cfg.codec_dir) if cfg.codec_dir else None,
        random_weights=cfg.random_weights,
        seed=cfg.seed,
    )
    jobs = [(t, i) for t in cfg.tasks for i in cfg.init_states]
    t0 = time.time()
    results, backbone = run_episodes(
        jobs, env_base, factory, workers=cfg.workers, torch_threads=cfg.torch_threads
    )
    summary = summarize(results)
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {os.cpu_count()} CPUs, no GPU",
        "policy": backbone,
        "config": config_to_dict(cfg),
        "wall_s": time.time() - t0,
        **summary,
        "results": [asdict(r) for r in results],
    }
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(report, indent=1))
    log.info(
        "%s: success %.1f%% (%d/%d) in %.0f s -> %s",
        backbone,
        100 * summary["success_rate"],
        summary["successes"],
        summary["episodes"],
        report["wall_s"],
        cfg.out,
    )
    for t, s in summary["per_task"].items():
        log.info("  task %s: %d/%d", t, s["successes"], s["episodes"])


if __name__ == "__main__":
    main()
