"""LIBERO's suites and tasks: names, step limits, instructions, bddl files and benchmark initial states.

LIBERO itself is imported lazily, after :func:`producer.libero_setup.ensure_libero`: importing
``libero.libero`` without its config file stops at an interactive prompt, and the config (and the GL
backend) must be chosen first. Everything else here is plain data.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

import numpy as np

from producer.libero_setup import ensure_libero

#: Number of tasks of each LIBERO suite (and the default suite first).
SUITES: dict[str, int] = {
    "libero_spatial": 10,
    "libero_object": 10,
    "libero_goal": 10,
    "libero_10": 10,
    "libero_90": 90,
}
#: Episode step limits of the OpenVLA-OFT LIBERO evaluation (policy steps after settling).
MAX_STEPS: dict[str, int] = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}


@dataclass(frozen=True)
class TaskInfo:
    suite: str
    task_id: int
    name: str
    instruction: str
    bddl_file: str
    num_init_states: int


@cache
def _benchmark(suite: str) -> Any:
    """LIBERO's benchmark object of a suite, built once per process (quietly: LIBERO prints a line
    "[info] using task orders ..." every time one is built)."""
    ensure_libero()
    # Lazy on purpose: importing libero.libero before ensure_libero() wrote its config stops at a prompt.
    from libero.libero import benchmark  # imports torch

    with contextlib.redirect_stdout(io.StringIO()):
        return benchmark.get_benchmark_dict()[suite]()


@cache
def list_tasks(suite: str = "libero_spatial") -> tuple[TaskInfo, ...]:
    """The tasks of a suite, in the suite's order (not alphabetical)."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; valid suites: {list(SUITES)}")
    bench = _benchmark(suite)
    out = []
    for i in range(bench.get_num_tasks()):
        task = bench.get_task(i)
        out.append(
            TaskInfo(
                suite=suite,
                task_id=i,
                name=task.name,
                instruction=task.language,
                bddl_file=bench.get_task_bddl_file_path(i),
                num_init_states=len(task_init_states(suite, i)),
            )
        )
    return tuple(out)


@lru_cache(maxsize=16)
def task_init_states(suite: str, task_id: int) -> np.ndarray:
    """[50, state_dim] the task's benchmark initial states (flattened MuJoCo states), as LIBERO ships them."""
    bench = _benchmark(suite)
    return np.asarray(bench.get_task_init_states(task_id))
