"""Which (task, initial state) a producer's episode index runs: shared by the producer and archive readers."""

from __future__ import annotations

from typing import Any


def episode_schedule(cfg: Any, episode: int) -> tuple[int, int]:
    """(task id, initial state) of a producer's episode index.

    Task-major over ``tasks`` x ``episodes_per_task`` initial states from ``first_init_state``; with
    ``repeat`` every further pass moves on to the next initial states (modulo the suite's 50). Takes
    the config itself or its dict as recorded in an archive, so that archived episodes can be keyed
    by (task, initial state): with a deterministic policy that key names an episode's states across
    producers and archives (up to float-level drift in the simulator).
    """
    get = cfg.get if isinstance(cfg, dict) else lambda k: getattr(cfg, k)
    tasks, n, first = list(get("tasks")), int(get("episodes_per_task")), int(get("first_init_state"))
    per_pass = len(tasks) * n
    i = episode % per_pass
    init_state = (first + i % n + (episode // per_pass) * n) % 50
    return int(tasks[i // n]), init_state
