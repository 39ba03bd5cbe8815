"""Which (task, initial state) a producer's episode index runs: shared by the producer and archive readers."""

from __future__ import annotations

from typing import Any

INIT_STATES = 50  # initial states per LIBERO task


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
    init_state = (first + i % n + (episode // per_pass) * n) % INIT_STATES
    return int(tasks[i // n]), init_state


def parse_range(text: str, upper: int, what: str) -> list[int]:
    """'0-9' / '0,3,5' / '2' -> sorted unique ints in [0, upper); ValueError lists the valid range."""
    out: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise ValueError(f"bad {what} range {text!r}; use e.g. 0-9 or 0,2,5") from None
    bad = sorted(i for i in out if not 0 <= i < upper)
    if not out or bad:
        raise ValueError(f"{what} {bad or text!r} out of range; valid: 0..{upper - 1}")
    return sorted(out)
