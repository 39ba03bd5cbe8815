"""Simulator fleets for closed-loop evaluation: paired arms, the standard protocol, resumable results.

API (the closed-loop arms of ``make eval`` and ``make eval-vla`` both call it)::

    from evaluator.fleet import run_protocol
    from evaluator.protocol import ArmSpec

    arms = [ArmSpec("baseline", draft="runs/d.pt", decoding="baseline"),
            ArmSpec("rsd_strict", draft="runs/d.pt", decoding="strict"),
            ArmSpec("rsd_relaxed", draft="runs/d.pt", decoding="relaxed", params={"tau": 0.8})]
    result = run_protocol(arms, workers=2, results_path="runs/eval/episodes.jsonl")   # 10 tasks x 50 inits
    result.summary(margin=0.03)      # JSON report (evaluator.protocol_report); result.markdown() for tables

``run_protocol(arms, tasks=range(10), init_states=range(50), workers=2, results_path=…, ray_address=None,
seed=0, max_steps=None, *, suite="libero_spatial", image_size=128, retries=1, env_factory=make_libero_env,
torch_threads=1, episode_timeout_s=1800, progress=True) -> ProtocolResult``

* Every (arm, task, initial state) episode runs once, paired: the same env seed and the same per-episode
  numpy/torch seeds (from ``seed``, task and initial state) for every arm. The first arm is the baseline
  of the report's comparisons.
* One simulator per worker process (rebuilt when the worker moves to another task; jobs of the task a
  worker already simulates are handed to it first), one act callable per arm built once per worker from
  its :class:`~evaluator.protocol.ArmSpec` (``builder``, default :func:`evaluator.arms.build_act`). Worker
  processes are spawned with one torch / BLAS / llvmpipe thread each (``torch_threads``).
* Each finished episode is appended to ``results_path`` at once (:class:`~evaluator.protocol.ResultsLog`);
  calling again with the same arguments resumes and runs only the episodes without an outcome. A results
  file of another protocol or other arms raises :class:`~evaluator.protocol.ProtocolMismatch`.
* A crash inside an episode (simulator, policy) or of the worker process itself (a segfault, a kill, a
  hang past ``episode_timeout_s``) records that attempt as ``errored`` — never as a failure — restarts the
  worker if it died, and runs the episode again up to ``retries`` more times; the run goes on.
  Duplicate results of one key are ignored (idempotent by (arm, task, initial state)). Many errored
  attempts in a row (a policy that cannot be built, a broken install) stop the run with the last error.
* A progress bar shows the ETA and each arm's running success. Ctrl-C stops the workers, keeps every
  finished episode and returns a result with ``interrupted=True``.
* ``ray_address`` (``"auto"``, ``"local"`` or a cluster address) runs the workers as Ray actors
  (:mod:`evaluator.fleet_ray`) with the same semantics.
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
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from multiprocessing.connection import wait as wait_ready
from pathlib import Path
from typing import Any
from typing import Protocol as TypingProtocol

import numpy as np
import torch
from tqdm import tqdm

from common.logs import setup_logging
from evaluator.episode import EpisodeEnv, make_libero_env, run_episode
from evaluator.protocol import ArmSpec, Key, Protocol, ResultsLog, make_header, outcomes
from evaluator.protocol_report import ProtocolResult

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


# ------------------------------------------------------------------------------------------ backends
class Backend(TypingProtocol):
    """Runs jobs on numbered workers. ``poll`` returns ("result", wid, record) / ("died", wid, reason)."""

    def start(self, workers: int) -> int: ...
    def submit(self, wid: int, job: Job) -> None: ...
    def poll(self, timeout: float) -> list[tuple[str, int, Any]]: ...
    def restart(self, wid: int) -> None: ...
    def close(self) -> None: ...


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
        p, conn = self.procs[wid], self.conns[wid]
        if graceful and p.is_alive():
            with contextlib.suppress(OSError):
                conn.send(None)
            p.join(timeout=10)
        if p.is_alive():
            p.terminate()
            p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
        conn.close()

    def close(self) -> None:
        for wid in list(self.procs):
            self._stop(wid, graceful=True)


# ------------------------------------------------------------------------------------------ dispatcher
class _Scheduler:
    """Pending jobs grouped by task; a worker gets a job of the task its simulator has when there is one."""

    def __init__(self, jobs: Sequence[Job]) -> None:
        self.by_task: dict[int, deque[Job]] = {}
        for job in jobs:
            self.by_task.setdefault(job[1], deque()).append(job)

    def __len__(self) -> int:
        return sum(len(q) for q in self.by_task.values())

    def push_front(self, job: Job) -> None:
        self.by_task.setdefault(job[1], deque()).appendleft(job)

    def pop(self, prefer_task: int | None) -> Job | None:
        if prefer_task is not None and self.by_task.get(prefer_task):
            return self.by_task[prefer_task].popleft()
        for q in self.by_task.values():
            if q:
                return q.popleft()
        return None


def dispatch(
    backend: Backend,
    jobs: Sequence[Job],
    results: ResultsLog,
    arm_names: Sequence[str],
    workers: int,
    retries: int = 1,
    episode_timeout_s: float = 1800.0,
    progress: bool = True,
) -> int:
    """Run ``jobs`` on ``backend`` until each has an outcome or is out of retries; returns attempts recorded."""
    sched = _Scheduler(jobs)
    final, _, _ = outcomes(results.records)
    done: set[Key] = set(final)
    wins = {a: sum(1 for k, r in final.items() if k[0] == a and r["status"] == "success") for a in arm_names}
    runs = {a: sum(1 for k in final if k[0] == a) for a in arm_names}
    in_flight: dict[int, tuple[Job, float]] = {}
    last_task: dict[int, int | None] = {}
    recorded = errored = errored_in_row = restarts = 0
    max_restarts, max_in_row = 3 * workers + 3, max(10, 2 * workers)
    bar = tqdm(total=len(jobs), desc="episodes", unit="ep", disable=not progress, dynamic_ncols=True)

    def feed(wid: int) -> None:
        job = sched.pop(last_task.get(wid))
        if job is not None:
            backend.submit(wid, job)
            in_flight[wid], last_task[wid] = (job, time.monotonic()), job[1]

    def record(rec: dict[str, Any], job: Job | None) -> None:
        nonlocal recorded, errored, errored_in_row
        key: Key = (rec["arm"], rec["task_id"], rec["init_state"])
        if key in done:  # a late duplicate (a retried attempt that finished after all): never counted twice
            return
        results.append(rec)
        recorded += 1
        if rec["status"] == "errored":
            errored, errored_in_row = errored + 1, errored_in_row + 1
            if job is not None and job[3] <= retries:
                sched.push_front((job[0], job[1], job[2], job[3] + 1))
            else:
                bar.update(1)
            if errored_in_row >= max_in_row:
                raise RuntimeError(f"{errored_in_row} errored episodes in a row; last error: {rec['error']}")
        else:
            done.add(key)
            errored_in_row = 0
            runs[key[0]] += 1
            wins[key[0]] += rec["status"] == "success"
            bar.update(1)
        bar.set_postfix_str(" ".join(f"{a} {wins[a]}/{runs[a]}" for a in arm_names) + f" errored {errored}")

    try:
        for wid in range(backend.start(min(workers, len(jobs)))):
            feed(wid)
        while in_flight:
            for kind, wid, payload in backend.poll(1.0):
                job = in_flight.pop(wid, (None, 0.0))[0]
                if kind == "result":
                    record(
                        payload,
                        job
                        if job and job[:3] == (payload["arm"], payload["task_id"], payload["init_state"])
                        else None,
                    )
                    feed(wid)
                    continue
                restarts += 1
                if job is not None:
                    log.error("worker %d died during %s task %d init %d: %s", wid, *job[:3], payload)
                    record(_errored(job, wid, f"worker died: {payload}"), job)
                if restarts > max_restarts:
                    raise RuntimeError(f"workers died {restarts} times; last: {payload}")
                backend.restart(wid)
                last_task[wid] = None
                feed(wid)
            now = time.monotonic()
            for wid, (job, t0) in list(in_flight.items()):
                if now - t0 > episode_timeout_s:
                    in_flight.pop(wid)
                    record(_errored(job, wid, f"timed out after {episode_timeout_s:.0f} s"), job)
                    backend.restart(wid)
                    last_task[wid] = None
                    feed(wid)
    finally:
        bar.close()
    return recorded


def _errored(job: Job, wid: int, reason: str) -> dict[str, Any]:
    arm, task_id, init_state, attempt = job
    return {
        "type": "episode", "arm": arm, "task_id": task_id, "init_state": init_state, "attempt": attempt,
        "worker": wid, "backbone": "", "status": "errored", "error": reason, "extra": {},
        "steps": 0, "queries": 0, "act_s": 0.0, "wall_s": 0.0,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip


def check_arms(arms: Sequence[ArmSpec]) -> dict[str, ArmSpec]:
    """Arm names unique, builders importable, local files present (usage errors before any worker starts)."""
    if not arms:
        raise ValueError("at least one arm is needed")
    by_name = {a.name: a for a in arms}
    if len(by_name) != len(arms):
        raise ValueError(f"arm names must be unique, got {[a.name for a in arms]}")
    for a in arms:
        resolve(a.builder)
        if a.draft and not Path(a.draft).is_file():
            raise ValueError(f"arm {a.name}: draft checkpoint {a.draft} does not exist")
        if a.weights and a.backend == "embedded" and not a.allow_random and not Path(a.weights).exists():
            raise ValueError(f"arm {a.name}: weights {a.weights} do not exist")
    return by_name


def run_protocol(
    arms: Sequence[ArmSpec],
    tasks: Sequence[int] = tuple(range(10)),
    init_states: Sequence[int] = tuple(range(50)),
    workers: int = 2,
    results_path: str | Path = "runs/protocol/episodes.jsonl",
    ray_address: str | None = None,
    seed: int = 0,
    max_steps: int | None = None,
    *,
    suite: str = "libero_spatial",
    image_size: int = 128,
    retries: int = 1,
    env_factory: EnvFactory = make_libero_env,
    torch_threads: int = 1,
    episode_timeout_s: float = 1800.0,
    progress: bool = True,
) -> ProtocolResult:
    """Run every (arm, task, initial state) episode without an outcome in ``results_path``; see the module doc."""
    if workers < 1 or retries < 0 or torch_threads < 1:
        raise ValueError(
            f"need workers >= 1, retries >= 0, torch_threads >= 1; got {workers}, {retries}, {torch_threads}"
        )
    protocol = Protocol(suite, tuple(tasks), tuple(init_states), seed, max_steps, image_size)
    by_name = check_arms(arms)
    results = ResultsLog(results_path, make_header(protocol, arms))
    final, _, _ = outcomes(results.records)
    jobs: list[Job] = [
        (a.name, t, i, 1) for t in protocol.tasks for i in protocol.init_states for a in arms
        if (a.name, t, i) not in final
    ]  # fmt: skip
    log.info("%s; %d arms; %d of %d episodes to run -> %s", protocol.describe(), len(arms), len(jobs),
             protocol.episodes_per_arm * len(arms), results_path)  # fmt: skip
    interrupted, recorded, t0 = False, 0, time.time()
    try:
        if jobs:
            if ray_address:
                from evaluator.fleet_ray import RayBackend  # heavy optional dependency

                backend: Backend = RayBackend(
                    ray_address, by_name, protocol.env_base(), env_factory, torch_threads
                )
            else:
                backend = LocalBackend(by_name, protocol.env_base(), env_factory, torch_threads)
            try:
                recorded = dispatch(
                    backend, jobs, results, list(by_name), workers, retries, episode_timeout_s, progress
                )
            except KeyboardInterrupt:
                interrupted = True
                log.warning(
                    "interrupted: finished episodes are kept in %s; run again to resume", results_path
                )
            finally:
                with contextlib.suppress(KeyboardInterrupt):
                    backend.close()
    finally:
        results.close()
    result = ProtocolResult(protocol, make_header(protocol, arms)["arms"], results.records, str(results_path),
                            interrupted=interrupted, wall_s=time.time() - t0, episodes_run=recorded,
                            skipped_lines=results.skipped_lines)  # fmt: skip
    done, _, _ = outcomes(results.records)
    result.complete = len(done) == protocol.episodes_per_arm * len(arms)
    return result
