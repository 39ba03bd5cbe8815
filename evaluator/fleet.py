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
  its :class:`~evaluator.protocol.ArmSpec` (``builder``, default :func:`evaluator.fleet_arms.build_act`). Worker
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
import logging
import time
from collections import deque
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from typing import Protocol as TypingProtocol

from tqdm import tqdm

from evaluator.episode import make_libero_env
from evaluator.fleet_worker import EnvFactory, Job, LocalBackend, resolve
from evaluator.protocol import ArmSpec, Key, Protocol, ResultsLog, make_header, outcomes
from evaluator.protocol_report import ProtocolResult

log = logging.getLogger("evaluator.fleet")


# ------------------------------------------------------------------------------------------ backends
class Backend(TypingProtocol):
    """Runs jobs on numbered workers. ``poll`` returns ("result", wid, record) / ("died", wid, reason)."""

    def start(self, workers: int) -> int: ...
    def submit(self, wid: int, job: Job) -> None: ...
    def poll(self, timeout: float) -> list[tuple[str, int, Any]]: ...
    def restart(self, wid: int) -> None: ...
    def close(self) -> None: ...


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


def dispatch(backend: Backend, jobs: Sequence[Job], results: ResultsLog, arm_names: Sequence[str], workers: int,
             retries: int = 1, episode_timeout_s: float = 1800.0, progress: bool = True) -> int:  # fmt: skip
    """Run ``jobs`` on ``backend`` until each has an outcome or is out of retries; returns attempts recorded."""
    sched = _Scheduler(jobs)
    final, _, _ = outcomes(results.records)
    done: set[Key] = set(final)
    wins = {a: sum(1 for k, r in final.items() if k[0] == a and r["status"] == "success") for a in arm_names}
    runs = {a: sum(1 for k in final if k[0] == a) for a in arm_names}
    in_flight: dict[int, tuple[Job, float]] = {}
    last_task: dict[int, int | None] = {}
    recorded = errored = errored_in_row = restarts = 0
    max_restarts, max_in_row = 3 * workers + 3 + len(jobs) // 20, max(10, 2 * workers)
    bar = tqdm(total=len(jobs), desc="episodes", unit="ep", disable=not progress, dynamic_ncols=True)

    def feed(wid: int) -> None:
        job = sched.pop(last_task.get(wid))
        if job is not None:
            backend.submit(wid, job)
            in_flight[wid], last_task[wid] = (job, time.monotonic()), job[1]

    def record(rec: dict[str, Any], job: Job | None) -> None:
        nonlocal recorded, errored, errored_in_row
        key = _key(rec)
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
                if kind == "result":  # a result that is not the job in flight is stale: never retried
                    record(payload, job if job and job[:3] == _key(payload) else None)
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


def _key(rec: dict[str, Any]) -> Key:
    return rec["arm"], rec["task_id"], rec["init_state"]


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
    header = make_header(protocol, arms)
    results = ResultsLog(results_path, header)
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
    result = ProtocolResult(protocol, header["arms"], results.records, str(results_path),
                            interrupted=interrupted, wall_s=time.time() - t0, episodes_run=recorded,
                            skipped_lines=results.skipped_lines)  # fmt: skip
    done, _, _ = outcomes(results.records)
    result.complete = len(done) == protocol.episodes_per_arm * len(arms)
    return result
