"""The worker side of the evaluation fleet: what runs inside each worker process (or Ray actor).

* :class:`EpisodeRunner` holds one simulator at a time (rebuilt when the worker moves to another task)
  and one act callable per arm (built once from its :class:`~evaluator.protocol.ArmSpec`); it runs a
  job ``(arm, task, initial state, attempt)`` and returns the episode's record, never raising: an
  exception of the simulator or the policy gives an ``errored`` record.
* :class:`LocalBackend` runs runners in spawned worker processes on this machine, one pipe each, with
  one torch / BLAS / llvmpipe thread per worker (:func:`worker_env`); a worker that dies is reported to
  the dispatcher (:func:`evaluator.fleet.dispatch`), which records the attempt and restarts it.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing as mp
import os
import random
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from multiprocessing.connection import wait as wait_ready
from typing import Any

import numpy as np
import torch

from common.logs import setup_logging
from evaluator.episode import EpisodeEnv, run_episode
from evaluator.protocol import ArmSpec

log = logging.getLogger("evaluator.fleet")

Job = tuple[str, int, int, int]  # (arm, task, initial state, attempt)
EnvFactory = Callable[[dict[str, Any]], EpisodeEnv]
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def resolve(dotted: str) -> Callable[..., Any]:
    """'package.module:function' -> the function."""
    module, _, name = dotted.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import {dotted!r}: {exc}") from exc


def worker_env(torch_threads: int) -> dict[str, str]:
    """Environment variables of a worker process: thread limits and a headless GL backend."""
    env = {k: str(torch_threads) for k in THREAD_VARS}
    env.update(
        LP_NUM_THREADS="1", MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"), TOKENIZERS_PARALLELISM="false"
    )
    if env["MUJOCO_GL"] == "egl":
        env["PYOPENGL_PLATFORM"] = os.environ.get("PYOPENGL_PLATFORM", "egl")
    return env


def seed_episode(seed: int, task_id: int, init_state: int) -> None:
    """The same numpy / random / torch seeds for every arm of one (task, initial state)."""
    a, b = np.random.SeedSequence([seed, task_id, init_state]).generate_state(2)
    np.random.seed(int(a))
    random.seed(int(a))
    torch.manual_seed(int(b))


class EpisodeRunner:
    """Inside one worker: one simulator at a time, one act callable per arm; :meth:`run` never raises."""

    def __init__(
        self,
        arms: dict[str, ArmSpec],
        env_base: dict[str, Any],
        env_factory: EnvFactory,
        worker_id: int,
        torch_threads: int = 1,
    ) -> None:
        self.arms, self.env_base, self.env_factory = arms, env_base, env_factory
        self.worker_id = worker_id
        self.acts: dict[str, Any] = {}
        self.env: Any = None
        self.env_task: int | None = None
        torch.set_num_threads(torch_threads)

    def _act(self, arm: str) -> Any:
        if arm not in self.acts:
            spec = self.arms[arm]
            self.acts[arm] = resolve(spec.builder)(spec)
        return self.acts[arm]

    def _env(self, task_id: int, init_state: int) -> Any:
        if self.env is None or self.env_task != task_id:
            self.close()
            self.env = self.env_factory({**self.env_base, "task_id": task_id, "init_state": init_state})
            self.env_task = task_id
        return self.env

    def run(self, job: Job) -> dict[str, Any]:
        arm, task_id, init_state, attempt = job
        rec: dict[str, Any] = {
            "type": "episode", "arm": arm, "task_id": task_id, "init_state": init_state,
            "attempt": attempt, "worker": self.worker_id, "backbone": "", "error": "", "extra": {},
            "steps": 0, "queries": 0, "act_s": 0.0,
        }  # fmt: skip
        t0 = time.perf_counter()
        stage = "build"
        try:
            act = self._act(arm)
            rec["backbone"] = str(getattr(act, "backbone_id", ""))
            stage = "episode"
            env = self._env(task_id, init_state)
            seed_episode(int(self.env_base.get("seed", 0)), task_id, init_state)
            res = run_episode(env, act, init_state, suite=self.env_base.get("suite", ""), task_id=task_id)
            extra = act.episode_extra() if hasattr(act, "episode_extra") else {}
            rec.update(status="success" if res.success else "failed", steps=res.steps, queries=res.queries)
            rec.update(act_s=res.act_s, extra=dict(extra or {}))
        except Exception as exc:  # a crash is an errored episode, never a failure; the env may be broken
            self.close()
            tb = traceback.format_exc(limit=6)
            rec.update(
                status="errored", error=f"{stage}: {type(exc).__name__}: {exc}"[:500], traceback=tb[-3000:]
            )
            log.error("%s task %d init %d errored (%s): %s", arm, task_id, init_state, stage, exc)
        rec["wall_s"] = time.perf_counter() - t0
        rec["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return rec

    def close(self) -> None:
        if self.env is not None and hasattr(self.env, "close"):
            with contextlib.suppress(Exception):
                self.env.close()
        self.env, self.env_task = None, None


def _local_worker(
    wid: int, conn: Any, arms: dict, env_base: dict, env_factory: EnvFactory, threads: int
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the workers
    setup_logging(f"fleet-{wid}")
    runner = EpisodeRunner(arms, env_base, env_factory, wid, threads)
    try:
        while True:
            job = conn.recv()
            if job is None:
                break
            conn.send(runner.run(job))
    except (EOFError, BrokenPipeError):  # the parent is gone
        pass
    finally:
        runner.close()


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class LocalBackend:
    """Worker processes on this machine (spawned: a clean interpreter each, no inherited GL or torch state)."""

    def __init__(
        self, arms: dict[str, ArmSpec], env_base: dict, env_factory: EnvFactory, torch_threads: int = 1
    ):
        self.args = (arms, env_base, env_factory, torch_threads)
        self.ctx = mp.get_context("spawn")
        self.procs: dict[int, Any] = {}
        self.conns: dict[int, Any] = {}
        self.dead: set[int] = set()

    def _spawn(self, wid: int) -> None:
        parent, child = self.ctx.Pipe()
        p = self.ctx.Process(
            target=_local_worker, args=(wid, child, *self.args), name=f"fleet-{wid}", daemon=True
        )
        with _environ(worker_env(self.args[3])):
            p.start()
        child.close()
        self.procs[wid], self.conns[wid] = p, parent
        self.dead.discard(wid)

    def start(self, workers: int) -> int:
        for wid in range(workers):
            self._spawn(wid)
        return workers

    def submit(self, wid: int, job: Job) -> None:
        try:
            self.conns[wid].send(job)
        except (BrokenPipeError, OSError):
            pass  # reported as dead by poll()

    def poll(self, timeout: float) -> list[tuple[str, int, Any]]:
        live = {wid: c for wid, c in self.conns.items() if wid not in self.dead}
        ready = set(wait_ready(list(live.values()), timeout)) if live else set()
        events: list[tuple[str, int, Any]] = []
        for wid, conn in live.items():
            if conn in ready:
                try:
                    events.append(("result", wid, conn.recv()))
                    continue
                except (EOFError, OSError):
                    pass
            elif self.procs[wid].is_alive():
                continue
            self.procs[wid].join(timeout=5)
            self.dead.add(wid)
            events.append(("died", wid, f"worker process exited with code {self.procs[wid].exitcode}"))
        return events

    def restart(self, wid: int) -> None:
        self._stop(wid, graceful=False)
        self._spawn(wid)

    def _stop(self, wid: int, graceful: bool) -> None:
        self._stop_all([wid], graceful)

    def _stop_all(self, wids: list[int], graceful: bool, grace_s: float = 10.0) -> None:
        """Stop workers together: every one is asked to finish first, then all share one deadline per
        phase (ask, terminate, kill). Stopping them one at a time let a fleet of workers that are slow to
        exit (a renderer's teardown) keep the report waiting for minutes after the last episode."""
        procs = [self.procs[w] for w in wids]
        phases: list[tuple[Callable[[Any], None] | None, float]] = [(lambda p: p.terminate(), 10.0),
                                                                     (lambda p: p.kill(), 5.0)]  # fmt: skip
        if graceful:
            for w in wids:
                if self.procs[w].is_alive():
                    with contextlib.suppress(OSError):
                        self.conns[w].send(None)
            phases.insert(0, (None, grace_s))
        for signal_fn, wait_s in phases:
            alive = [p for p in procs if p.is_alive()]
            if not alive:
                break
            if signal_fn is not None:
                for p in alive:
                    signal_fn(p)
            deadline = time.monotonic() + wait_s
            for p in alive:
                p.join(timeout=max(0.0, deadline - time.monotonic()))
        for w in wids:
            self.conns[w].close()

    def close(self) -> None:
        self._stop_all(list(self.procs), graceful=True)
