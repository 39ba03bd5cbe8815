"""Ray backend of the evaluation fleet: one actor per worker, each with its own simulator and policies.

Used by :func:`evaluator.fleet.run_protocol` when ``ray_address`` is given; the dispatcher is the same
as for local processes, so results, resume, retries and idempotency are identical. An actor that dies
mid-episode (its process killed, its node lost) surfaces as ``RayActorError``: the attempt is recorded
as ``errored``, a fresh actor replaces the dead one and the episode is retried. Ray's own task retries
are off (``max_restarts=0``, ``max_task_retries=0``) so that every attempt is seen and recorded once.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from common.ray_cluster import actor_runtime_env, cluster_cpus, connect, shutdown
from evaluator.fleet_worker import EnvFactory, EpisodeRunner, Job, worker_env
from evaluator.protocol import ArmSpec

log = logging.getLogger("evaluator.fleet_ray")


@ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)
class EpisodeActor:
    """A fleet worker as a Ray actor."""

    def __init__(
        self, wid: int, arms: dict[str, ArmSpec], env_base: dict, env_factory: EnvFactory, threads: int
    ):
        self.runner = EpisodeRunner(arms, env_base, env_factory, wid, threads)

    def run(self, job: Job) -> dict[str, Any]:
        return self.runner.run(job)

    def close(self) -> None:
        self.runner.close()


class RayBackend:
    """:class:`evaluator.fleet.Backend` over Ray actors."""

    def __init__(
        self,
        address: str,
        arms: dict[str, ArmSpec],
        env_base: dict,
        env_factory: EnvFactory,
        threads: int = 1,
    ) -> None:
        self.started = connect(address)
        self.args = (arms, env_base, env_factory, threads)
        self.options = {"runtime_env": actor_runtime_env(worker_env(threads))}
        self.actors: dict[int, Any] = {}
        self.refs: dict[int, Any] = {}

    def _spawn(self, wid: int) -> None:
        self.actors[wid] = EpisodeActor.options(**self.options).remote(wid, *self.args)

    def start(self, workers: int) -> int:
        cpus = cluster_cpus()
        if workers > cpus:
            log.warning(
                "%d workers asked, the Ray cluster has %g CPUs: some actors wait for a CPU", workers, cpus
            )
        for wid in range(workers):
            self._spawn(wid)
        return workers

    def submit(self, wid: int, job: Job) -> None:
        self.refs[wid] = self.actors[wid].run.remote(job)

    def poll(self, timeout: float) -> list[tuple[str, int, Any]]:
        if not self.refs:
            return []
        ready, _ = ray.wait(list(self.refs.values()), num_returns=1, timeout=timeout)
        events: list[tuple[str, int, Any]] = []
        for wid, ref in list(self.refs.items()):
            if ref not in ready:
                continue
            del self.refs[wid]
            try:
                events.append(("result", wid, ray.get(ref, timeout=60)))
            except RayActorError as exc:
                events.append(("died", wid, f"Ray actor died: {str(exc).splitlines()[0][:300]}"))
            except (RayError, GetTimeoutError) as exc:
                events.append(("died", wid, f"Ray error: {type(exc).__name__}: {str(exc)[:300]}"))
        return events

    def restart(self, wid: int) -> None:
        self.refs.pop(wid, None)
        try:
            ray.kill(self.actors[wid], no_restart=True)
        except RayError:
            pass
        self._spawn(wid)

    def close(self) -> None:
        for actor in self.actors.values():
            try:
                ray.kill(actor, no_restart=True)
            except RayError:
                pass
        self.actors.clear()
        self.refs.clear()
        shutdown(self.started)
