"""Producer fleets on Ray: ``make produce ARGS="--ray-address ADDR --num-producers N"``.

N producers run as Ray actors (one CPU each, anywhere in the cluster), each with its own producer id
(``<--producer-id>-<i>``) and its share of the tasks (round-robin), and stream to the trainer over
ZeroMQ exactly as a single producer does: reliable delivery, acks, resends, CURVE. Off loopback the
trainer only binds with CURVE keys, and the fleet refuses a non-loopback endpoint without
``--curve-dir`` (the key folder must exist at that path on every node).

A producer whose process dies (killed, out of memory, its node lost) is restarted by Ray
(``max_restarts``, ``--max-restarts``) and resumes with the first episode it had not finished: a
small ledger actor keeps each producer's next episode index. The episode in flight at the crash is
run again from its start in a new producer session (its partial samples, never closed by an
``episode_end``, stay out of the finished episodes).

Ctrl-C / SIGTERM stops every producer cleanly (each closes its current episode as ``incomplete``,
says bye, waits for its acks). Each producer prints its own summary (relayed by Ray); the fleet ends
with one ``FLEET_SUMMARY_JSON`` line holding them all and the ledger.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError

from common.curve import is_loopback
from common.ray_cluster import actor_runtime_env, connect, shutdown
from producer.config import ProducerConfig
from producer.loop import Producer

log = logging.getLogger("producer.fleet")


def fleet_configs(cfg: ProducerConfig) -> list[ProducerConfig]:
    """One config per producer: own id, tasks split round-robin, no fleet fields of its own."""
    n = cfg.num_producers
    if not cfg.curve_dir and not is_loopback(cfg.endpoint):
        raise ValueError(
            f"endpoint {cfg.endpoint} is not loopback: the trainer binds it only with CURVE keys, so pass "
            "--curve-dir (the same key folder on every node)"
        )
    return [
        dataclasses.replace(
            cfg,
            producer_id=f"{cfg.producer_id}-{i}",
            tasks=list(cfg.tasks[i::n]),
            ray_address=None,
            num_producers=1,
        )
        for i in range(n)
    ]


def run_producer(
    cfg: ProducerConfig, first_episode: int, on_episode: Any, stop: threading.Event
) -> dict[str, Any]:
    """The default runner of a producer actor: :class:`producer.loop.Producer` from ``first_episode``."""
    producer = Producer(cfg)
    producer.stop = stop
    producer.first_episode = first_episode
    producer.on_episode = on_episode
    return producer.run()


Runner = Callable[[ProducerConfig, int, Callable[[int, str], None], threading.Event], dict[str, Any]]


@ray.remote(num_cpus=0)
class Ledger:
    """Next episode index and start count of each producer (outlives producer restarts)."""

    def __init__(self) -> None:
        self.next: dict[str, int] = {}
        self.starts: dict[str, int] = {}

    def start(self, pid: str) -> tuple[int, int]:
        self.starts[pid] = self.starts.get(pid, 0) + 1
        return self.next.get(pid, 0), self.starts[pid]

    def done(self, pid: str, episode: int) -> None:
        self.next[pid] = max(self.next.get(pid, 0), episode + 1)

    def state(self) -> dict[str, dict[str, int]]:
        return {"next_episode": dict(self.next), "starts": dict(self.starts)}


@ray.remote(num_cpus=1, max_concurrency=2)  # a second thread serves stop() while run() works
class ProducerActor:
    def __init__(self, cfg: ProducerConfig, ledger: Any, runner: Runner) -> None:
        self.cfg, self.ledger, self.runner = cfg, ledger, runner
        self.stop_event = threading.Event()

    def run(self) -> dict[str, Any]:
        pid = self.cfg.producer_id
        first, starts = ray.get(self.ledger.start.remote(pid))
        if starts > 1:
            logging.getLogger("producer.fleet").warning(
                "producer %s restarted (start %d) at episode %d", pid, starts, first
            )

        def on_episode(episode: int, status: str) -> None:
            ray.get(self.ledger.done.remote(pid, episode))

        summary = self.runner(self.cfg, first, on_episode, self.stop_event)
        return {**summary, "starts": starts, "first_episode": first}

    def stop(self) -> None:
        self.stop_event.set()


def run_fleet(cfg: ProducerConfig, runner: Runner = run_producer, num_cpus: int | None = None) -> int:
    """Start the fleet, wait for every producer, print the summaries; exit code like a single producer.

    ``runner(cfg, first_episode, on_episode, stop_event) -> summary`` runs one producer inside its actor
    (a picklable callable; tests pass a lightweight one).
    """
    configs = fleet_configs(cfg)
    started = connect(cfg.ray_address, num_cpus=num_cpus)
    if not started and is_loopback(cfg.endpoint) and cfg.ray_address not in ("local",):
        log.warning("endpoint %s is loopback: producers on other nodes cannot reach it", cfg.endpoint)
    env = {
        "MUJOCO_GL": "egl",
        "PYOPENGL_PLATFORM": "egl",
        "LP_NUM_THREADS": "1",
        "OMP_NUM_THREADS": str(cfg.threads),
    }
    ledger = Ledger.remote()
    opts = {"max_restarts": cfg.max_restarts, "max_task_retries": cfg.max_restarts,
            "runtime_env": actor_runtime_env(env)}  # fmt: skip
    actors = [ProducerActor.options(**opts).remote(c, ledger, runner) for c in configs]
    pending = {a.run.remote(): c.producer_id for a, c in zip(actors, configs)}
    stopping = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("%s: stopping %d producers", signal.Signals(signum).name, len(actors))
        stopping.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    summaries: dict[str, dict[str, Any]] = {}
    stop_sent = False
    try:
        log.info("fleet of %d producers: %s", len(configs), {c.producer_id: c.tasks for c in configs})
        while pending:
            if stopping.is_set() and not stop_sent:
                for a in actors:
                    a.stop.remote()
                stop_sent = True
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                pid = pending.pop(ref)
                try:
                    summaries[pid] = ray.get(ref)
                except (RayActorError, RayError) as exc:  # out of restarts, or the runner raised
                    log.error("producer %s ended with an error: %s", pid, str(exc).splitlines()[0][:300])
                    summaries[pid] = {
                        "producer_id": pid,
                        "error": str(exc)[:1000],
                        "unacked": -1,
                        "refused": "",
                    }
        ledger_state = ray.get(ledger.state.remote())
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        shutdown(started)
    fleet = {"producers": summaries, "ledger": ledger_state, "finished_at": time.time()}
    print(f"FLEET_SUMMARY_JSON {json.dumps(fleet, sort_keys=True, default=str)}", flush=True)
    if any(s.get("refused") for s in summaries.values()):
        return 2
    return 0 if all(s.get("unacked") == 0 and "error" not in s for s in summaries.values()) else 1
