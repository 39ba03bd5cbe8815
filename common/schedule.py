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


def parse_inits(text: str) -> set[int]:
    """'40-49' or '40,41,45-47' -> a set of initial-state indices."""
    out: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            lo, _, hi = part.partition("-")
            a, b = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise ValueError(f"initial states must look like 40-49 or 3,7,10-12, got {text!r}") from None
        if a > b or a < 0:
            raise ValueError(f"bad initial-state range {part!r}")
        out.update(range(a, b + 1))
    if not out:
        raise ValueError(f"no initial states in {text!r}")
    return out
