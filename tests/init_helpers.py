"""Synthetic demonstration files that record fresh initial states (and so pass the leak check)."""

from __future__ import annotations

from typing import Any

import numpy as np

from common.init_states import benchmark_init_states

SUITE = "libero_spatial"
TASK = "pick_up_the_black_bowl_on_the_cookie_box_and_place_it_on_the_plate"  # task 3
OBJECTS = np.array([i + k for i in (9, 16, 23, 30, 37) for k in range(3)])  # qpos of the 5 objects' xyz


def fresh_state(k: int) -> np.ndarray:
    """A [92] initial state of task 3 that is no benchmark state: state k % 50 with every object moved
    (1 + k/10) cm."""
    state = benchmark_init_states(SUITE, TASK)[k % 50].copy()
    state[1 + OBJECTS] += 0.01 * (1 + k / 10)
    return state


def record_fresh_start(group: Any, k: int) -> None:
    """Give a ``data/demo_K`` group the attributes of a fresh start (seed k), as producer.demos writes them."""
    group.attrs["init_source"] = f"fresh:{k}"
    group.attrs["task_name"] = TASK
    group.attrs["init_object_qpos"] = OBJECTS
    group.create_dataset("init_sim_state", data=fresh_state(k))
