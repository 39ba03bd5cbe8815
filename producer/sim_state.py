"""Snapshots of a robosuite environment's full stepping state, to try actions and go back (DAgger labels).

A snapshot holds everything a step depends on: MuJoCo's integration state (warm start included), the
robot's, its controller's and its gripper's arrays (goals, the gripper's ramped command), the env's
clocks and every observable's sampling clock. :class:`producer.env.LiberoEnv` adds its own fields.
:func:`restart_sampling_clocks` makes an episode's observation instants independent of what came before.
"""

from __future__ import annotations

from typing import Any

import mujoco
import numpy as np

_FULL_STATE = mujoco.mjtState.mjSTATE_INTEGRATION  # what a MuJoCo step reads (warm start included)


def _parts(robo: Any) -> tuple[Any, Any, Any]:
    robot = robo.robots[0]
    return robot, robot.controller, robot.gripper


def snapshot_sim(robo: Any) -> dict[str, Any]:
    """The stepping state of the robosuite environment ``robo`` (copies; see the module docstring)."""
    model, data = robo.sim.model._model, robo.sim.data._data
    state = np.empty(mujoco.mj_stateSize(model, _FULL_STATE))
    mujoco.mj_getState(model, data, state, _FULL_STATE)
    return {
        "mujoco": state,
        "arrays": [
            {k: v.copy() for k, v in vars(p).items() if isinstance(v, np.ndarray)} for p in _parts(robo)
        ],
        "env": (robo.timestep, robo.cur_time, robo.done),
        "clocks": {k: (o._time_since_last_sample, o._sampled) for k, o in robo._observables.items()},
    }


def restore_sim(robo: Any, snap: dict[str, Any]) -> None:
    """Put ``robo`` back to a :func:`snapshot_sim` of it (stepping on from it is stepping on from there)."""
    model, data = robo.sim.model._model, robo.sim.data._data
    mujoco.mj_setState(model, data, snap["mujoco"], _FULL_STATE)
    mujoco.mj_forward(model, data)  # positions of the restored state for readers before the next step
    for part, arrays in zip(_parts(robo), snap["arrays"]):
        for k, v in arrays.items():
            setattr(part, k, v.copy())
    robo.timestep, robo.cur_time, robo.done = snap["env"]
    for k, (since, sampled) in snap["clocks"].items():
        robo._observables[k]._time_since_last_sample, robo._observables[k]._sampled = since, sampled


def restart_sampling_clocks(robo: Any) -> None:
    """Put every observable's sampling clock in the same state at the start of each episode.

    robosuite's ``Observable.reset()`` clears the timer but not the "sampled" flag, so without
    this the substep at which observations are taken (and hence the images, the proprio and the
    expert's actions) would depend on what the environment did before the reset. From here on,
    observations are sampled after the first physics substep of each step.
    """
    for observable in robo._observables.values():
        observable._time_since_last_sample = 0.0
        observable._sampled = False
