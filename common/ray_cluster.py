"""Connecting to Ray for the evaluation and producer fleets (the one place besides the fleets that imports ray).

``--ray-address`` takes:

* ``local`` — start a private Ray instance on this machine (stopped again at the end);
* ``auto`` — join the cluster that ``ray start --head`` started on this machine;
* ``HOST:PORT`` — join the cluster whose head listens there (run the command on a node of that cluster);
* ``ray://HOST:10001`` — Ray Client, from a machine outside the cluster.

Actors run this repository's code from the same path on every node (``PYTHONPATH`` is set to this
checkout for them): install the project at the same path on each node (``make venv``), or share it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import ray

log = logging.getLogger("common.ray_cluster")

REPO_ROOT = Path(__file__).resolve().parents[1]


def connect(address: str, num_cpus: int | None = None) -> bool:
    """Start or join Ray; returns True when this call started a local instance (the caller shuts it down)."""
    if not address:
        raise ValueError("a Ray address is needed: local, auto, HOST:PORT or ray://HOST:PORT")
    if ray.is_initialized():
        return False
    if address == "local":
        # address="local" always starts a new instance, even where a stale `ray start` left its address file
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
        log.info("started a local Ray instance (%s CPUs)", ray.cluster_resources().get("CPU"))
        return True
    ray.init(address=address, log_to_driver=True)
    log.info(
        "joined Ray at %s: %s",
        address,
        {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")},
    )
    return False


def actor_runtime_env(env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    """runtime_env of an actor: this checkout first on PYTHONPATH, plus ``env_vars``."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path, **(env_vars or {})}}


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 0.0))


def shutdown(started: bool) -> None:
    if started and ray.is_initialized():
        ray.shutdown()
