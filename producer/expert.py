"""A scripted expert for the libero_spatial tasks (its success rate: ``python -m tools.expert_eval``).

All ten libero_spatial tasks are "pick up the black bowl <somewhere> and place it on the plate". The
expert reads the target from the task's BDDL goal (``['on', 'akita_black_bowl_1', 'plate_1']``; the
second bowl is an identical distractor, so it picks by name) and the object poses from the
simulator, and acts through the same 7-d delta end-effector action space as the policies
(OSC_POSE: Δposition, Δaxis-angle, gripper; each in [-1, 1]).

Waypoints (a phase advances when the grip site is within 1 cm of its target, or after 50 steps):
grasp the bowl's rim on the side facing the robot base, with the gripper yawed so that its fingers
close across the rim; go 10 cm above the rim point, descend to bowl z + 3.5 cm, close, lift to
max(bowl z, plate z) + 12 cm, move so that the bowl (as observed) is over the plate, lower, open.

    python -m tools.expert_eval --suite libero_spatial --tasks 0-9 --init-states 0-4 --workers 2
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.init_states import parse_inits
from common.schedule import parse_range
from producer.env import SUITES, EnvConfig, LiberoEnv

log = logging.getLogger(__name__)

SUPPORTED_SUITES = ("libero_spatial",)

# Geometry of the libero_spatial scenes (metres).
ROBOT_BASE_XY = np.array([-0.66, 0.0])
RIM_RADIUS = 0.05  # bowl rim (outer radius ~0.055) measured from the bowl's origin, in xy
ABOVE = 0.10  # approach height above the rim point
GRASP_DZ = 0.035  # grip-site height above the bowl's origin when grasping
LIFT_DZ = 0.12  # carry height above max(bowl z, plate z)
PLACE_DZ = 0.045  # bowl height above the plate origin when releasing (grip site: + GRASP_DZ)
POS_GAIN = 15.0  # proportional gain: action = clip(gain * error, -1, 1)
ROT_SCALE = 0.5  # rad per unit rotation action (robosuite OSC_POSE)
TOL = 0.01  # phase tolerance (m)
DESCEND_XY = 0.025  # a take-over descends (rather than going back up to approach) within this of the grasp xy
PHASE_TIMEOUT = 50  # steps
CLOSE_STEPS = 10
# A blocked phase (other than the descent, which must keep pressing down to the grasp height)
STALL_WINDOW = 5  # steps: advances when
STALL_MOVE = 0.002  # the grip site moved less than this over the window while within STALL_TOL
STALL_TOL = 0.025
FINGERS_OPEN = 0.03  # finger qpos above which the gripper counts as open (0.0395 fully open)
FINGERS_EMPTY = 0.006  # finger qpos below which a closed gripper holds nothing (0.004 on a bowl's rim)
# Lifting, carrying or lowering, MISS_AFTER steps into the phase, with the grip site more than MISS_DZ above its
# grasp height over the bowl: the bowl is not in hand, so the expert re-plans.
MISS_DZ = 0.04
MISS_AFTER = 5
MAX_RECOVERIES = 3  # re-plans after a miss per episode
NOISE_HOLD = 8  # steps a demonstration's action-noise bias is held (a policy chunk)


def _rotz(theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _quat_to_mat(q: np.ndarray) -> np.ndarray:
    """[x, y, z, w] -> [3, 3] rotation matrix."""
    x, y, z, w = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _mat_to_axisangle(r: np.ndarray) -> np.ndarray:
    """[3, 3] rotation matrix -> [3] axis-angle vector."""
    cos = np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0)
    angle = math.acos(cos)
    if angle < 1e-6:
        return np.zeros(3)
    if math.pi - angle < 1e-4:  # near 180°: take the axis from the symmetric part
        axis = np.sqrt(np.clip((np.diag(r) + 1.0) / 2.0, 0.0, None))
        i = int(np.argmax(axis))
        for j in range(3):
            if j != i:
                axis[j] = math.copysign(axis[j], r[i, j] + r[j, i])
        return axis / np.linalg.norm(axis) * angle
    axis = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]]) / (2 * math.sin(angle))
    return axis * angle


# The gripper pointing straight down with its fingers opening along world y: 180° about x.
_DOWN = np.diag([1.0, -1.0, -1.0])


class ScriptedExpert:
    """Waypoint expert for "pick up the black bowl … and place it on the plate"."""

    PHASES = ("approach", "descend", "close", "lift", "carry", "lower", "release")

    def __init__(self, env: LiberoEnv) -> None:
        if env.cfg.suite not in SUPPORTED_SUITES:
            raise ValueError(f"the scripted expert supports {SUPPORTED_SUITES}, not {env.cfg.suite!r}")
        self.env = env
        self.recoveries = 0  # re-plans after a missed grasp or a dropped bowl (kept across replan())
        self.reset()

    def reset(self) -> None:
        """Call after ``env.reset()``: reads the goal and the settled object poses."""
        goal = self.env.goal_state
        if len(goal) != 1 or goal[0][0] != "on":
            raise ValueError(f"expected a single 'on' goal, got {goal}")
        _, self.obj, self.target = goal[0]
        self.phase = 0
        self.phase_steps = 0
        self.history: list[np.ndarray] = []
        self.rise: np.ndarray | None = None  # a waypoint straight up before the approach (mid-episode)
        bowl = self.env.object_pos(self.obj)
        toward_base = ROBOT_BASE_XY - bowl[:2]
        self.u = toward_base / np.linalg.norm(toward_base)  # unit xy from bowl to robot base
        self.grasp_xy = bowl[:2] + RIM_RADIUS * self.u
        self.grasp_z = bowl[2] + GRASP_DZ
        # Fingers open along the eef y axis; align it with u (either sign: the gripper is symmetric).
        current_y = _quat_to_mat(self.env.robot_state()["eef_quat"])[:, 1]
        yaw_u = math.atan2(self.u[1], self.u[0])
        candidates = [yaw_u + math.pi / 2, yaw_u - math.pi / 2]  # Rz(yaw)·_DOWN has y = (sin, -cos)…
        best = min(
            candidates,
            key=lambda yaw: np.linalg.norm((_rotz(yaw) @ _DOWN)[:, 1] - current_y),
        )
        self.rot_goal = _rotz(best) @ _DOWN
        # The carry height comes from where the bowl rested at the episode's start, so that an expert taking
        # over with the bowl already lifted carries at the height the running expert does (the bowl's
        # height now would put it LIFT_DZ above itself, and the take-over would keep lifting).
        rest = getattr(self.env, "start_object_pos", {}).get(self.obj, bowl)
        self.carry_z = max(rest[2], self.env.object_pos(self.target)[2]) + LIFT_DZ
        self.carry_xy = self.grasp_xy.copy()

    def replan(self) -> str:
        """Take over mid-episode: re-read the scene and pick the phase that fits it; returns its name.

        Goal reached -> release. Bowl grasped -> lower if it is over the plate, carry if it is up at the
        carry height (from where the bowl rested at the start), else lift (straight up from here). Bowl not
        grasped -> close if the fingers are around the rim (open or still closing), descend if they are open
        above it (within ``DESCEND_XY`` in xy, as the running expert is while descending), else approach
        (straight up first if the gripper is low, away from the rim, so that it does not sweep through the
        scene). On the running expert's own states the take-over acts as it does (tests/producer/test_expert.py).
        """
        self.reset()  # geometry (grasp point, yaw, carry height) from the current poses
        env = self.env
        eef, bowl, plate = env.eef_pos(), env.object_pos(self.obj), env.object_pos(self.target)
        fingers = float(env.gripper_qpos()[0])
        open_fingers = fingers > FINGERS_OPEN
        above_grasp = np.linalg.norm(eef[:2] - self.grasp_xy) < TOL
        if env.success():
            name = "release"
        elif env.is_grasped(self.obj):
            self.grasp_xy = eef[:2].copy()
            if np.linalg.norm(plate[:2] - bowl[:2]) < 2 * TOL:
                name = "lower"
            else:
                name = "carry" if eef[2] > self.carry_z - TOL else "lift"
        elif fingers > FINGERS_EMPTY and above_grasp and abs(eef[2] - self.grasp_z) < 1.5 * TOL:
            name = "close"  # open, or closing around the rim
        elif (
            open_fingers
            and self.grasp_z - TOL < eef[2]
            and (
                (above_grasp and eef[2] < self.grasp_z + ABOVE + TOL)  # the approach point reached
                or (
                    np.linalg.norm(eef[:2] - self.grasp_xy) < DESCEND_XY
                    and eef[2] < self.grasp_z + ABOVE - TOL
                )
            )
        ):
            name = "descend"  # on the way down the running expert still closes the last cm or two in xy
        else:
            name = "approach"
            if eef[2] < self.grasp_z + ABOVE - 2 * TOL and not above_grasp:
                self.rise = np.array([eef[0], eef[1], self.grasp_z + ABOVE])
        self.phase = self.PHASES.index(name)
        return name

    @property
    def phase_name(self) -> str:
        return self.PHASES[min(self.phase, len(self.PHASES) - 1)]

    def _advance(self) -> None:
        self.phase += 1
        self.phase_steps = 0
        self.history.clear()

    def _stalled(self, eef: np.ndarray, err: np.ndarray) -> bool:
        self.history.append(eef.copy())
        if len(self.history) <= STALL_WINDOW:
            return False
        moved = np.linalg.norm(self.history[-1] - self.history[-1 - STALL_WINDOW])
        return bool(moved < STALL_MOVE and np.linalg.norm(err) < STALL_TOL)

    def act(self) -> np.ndarray:
        """The next action [7] float32 for the env's current state."""
        state = self.env.robot_state()
        eef = state["eef_pos"]
        bowl = self.env.object_pos(self.obj)
        plate = self.env.object_pos(self.target)
        name = self.phase_name
        if (
            name in ("lift", "carry", "lower")
            and self.phase_steps >= MISS_AFTER
            and eef[2] - bowl[2] > GRASP_DZ + MISS_DZ
            and self.recoveries < MAX_RECOVERIES
        ):
            # The grasp missed or the bowl fell: the grip site rose away from it. Start again from the phase
            # that fits the scene (an approach from above, with the gripper open), as a take-over would.
            self.recoveries += 1
            name = self.replan()
            log.debug("bowl not in hand: re-planned to %s (recovery %d)", name, self.recoveries)
        gripper = 1.0 if name in ("close", "lift", "carry", "lower") else -1.0

        if name == "approach":
            goal = np.array([*self.grasp_xy, self.grasp_z + ABOVE]) if self.rise is None else self.rise
        elif name == "descend":
            goal = np.array([*self.grasp_xy, self.grasp_z])
        elif name == "close":
            goal = np.array([*self.grasp_xy, self.grasp_z])
        elif name == "lift":
            goal = np.array([*self.grasp_xy, self.carry_z])
        elif name == "carry":
            # move the grip site so that the bowl's observed centre comes over the plate
            goal = np.array([*(eef[:2] + plate[:2] - bowl[:2]), self.carry_z])
        elif name == "lower":
            goal = np.array([*(eef[:2] + plate[:2] - bowl[:2]), plate[2] + PLACE_DZ + GRASP_DZ])
        else:  # release
            goal = eef.copy()

        err = goal - eef
        if name == "carry":
            err_done = np.linalg.norm(plate[:2] - bowl[:2]) < TOL and abs(err[2]) < 2 * TOL
        elif name == "descend":  # fingertips may rest on the bowl a few mm above the target
            err_done = np.linalg.norm(err[:2]) < TOL and abs(err[2]) < TOL
        else:
            err_done = np.linalg.norm(err) < TOL
        self.phase_steps += 1
        if name == "close":
            if self.phase_steps >= CLOSE_STEPS:
                self._advance()
        elif name == "release":
            pass  # hold still with the gripper open until the episode ends
        elif self.rise is not None:  # up, then on with the approach
            if err_done or self._stalled(eef, err) or self.phase_steps >= PHASE_TIMEOUT:
                self.rise = None
                self.phase_steps = 0
                self.history.clear()
        elif err_done or (name != "descend" and self._stalled(eef, err)) or self.phase_steps >= PHASE_TIMEOUT:
            self._advance()

        current = _quat_to_mat(state["eef_quat"])
        rot_err = _mat_to_axisangle(self.rot_goal @ current.T)  # world-frame rotation to the goal
        action = np.zeros(7, dtype=np.float32)
        action[:3] = np.clip(POS_GAIN * err, -1.0, 1.0)
        action[3:6] = np.clip(rot_err / ROT_SCALE, -1.0, 1.0)
        action[6] = gripper
        return action


# ------------------------------------------------------------------------------------ evaluation
def validate_episode_selection(
    suite: str, tasks: str, init_states: str, workers: int
) -> tuple[list[int], list[int]]:
    """Check a suite / task range / init-state range / worker count for the expert's commands.

    ``init_states``: benchmark indices (``5-24``) or fresh seeds (``fresh:0-499``).
    Returns (task ids, init states: ints or ``fresh:N`` labels); raises ValueError naming the bad value
    and the valid ones.
    """
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; valid suites: {list(SUITES)}")
    if suite not in SUPPORTED_SUITES:
        raise ValueError(f"the scripted expert supports {list(SUPPORTED_SUITES)}, not {suite!r}")
    task_ids = parse_range(tasks, SUITES[suite], "task id")
    init_ids = parse_inits(init_states)
    if workers < 1:
        raise ValueError(f"workers {workers} must be >= 1")
    return task_ids, init_ids


@dataclass
class EpisodeResult:
    task_id: int
    init_state: int | str  # benchmark index or fresh:<seed>
    success: bool
    steps: int
    seconds: float
    recoveries: int = 0  # the expert's re-plans after a missed grasp or a dropped bowl


def noise_rng(seed: int, task_id: int, init_state: int | str) -> np.random.Generator:
    """The action-noise generator of one episode: fixed by (env seed, task, start), so episodes repeat."""
    return np.random.default_rng([seed, task_id, zlib.crc32(str(init_state).encode())])


def run_episode(
    env: LiberoEnv,
    init_state: int | str,
    observe: bool = False,
    record: bool = False,
    action_noise: float = 0.0,
) -> tuple[EpisodeResult, dict[str, Any] | None]:
    """Run the expert for one episode. With ``record``, return the per-step data for a demo file.

    ``action_noise``: standard deviation of a Gaussian bias added to the translation of the actions that are
    *executed*, drawn anew every ``NOISE_HOLD`` steps (a chunk: a policy's errors persist over its chunk,
    white noise would average out); the recorded actions stay the expert's own. Against the expert's
    proportional control a bias b holds the grip site about b / POS_GAIN off its path (2 cm at 0.3), so
    the demonstrations show corrections from states near the path, and re-plans after a grasp the offset
    made it miss (noise injection in the manner of DART)."""
    t0 = time.perf_counter()
    obs = env.reset(init_state)
    expert = ScriptedExpert(env)
    rng = noise_rng(env.cfg.seed, env.cfg.task_id, init_state) if action_noise > 0 else None
    bias = np.zeros(3)
    rec: dict[str, list] | None = None
    if record:
        rec = {k: [] for k in ("agentview_rgb", "eye_in_hand_rgb", "ee_states", "gripper_states",
                               "joint_states", "states", "actions", "rewards", "dones")}  # fmt: skip
    info: dict[str, Any] = {"success": False}
    done = False
    while not done:
        action = expert.act()
        if rec is not None:
            robot = env.robot_state()
            rec["agentview_rgb"].append(obs.agentview)
            rec["eye_in_hand_rgb"].append(obs.wrist)
            rec["ee_states"].append(robot["ee_states"])
            rec["gripper_states"].append(robot["gripper_states"])
            rec["joint_states"].append(robot["joint_states"])
            rec["states"].append(env.sim_state())
            rec["actions"].append(action)
        executed = action
        if rng is not None:
            if env.num_steps % NOISE_HOLD == 0:
                bias = rng.normal(0.0, action_noise, 3)
            executed = action.copy()
            executed[:3] = np.clip(action[:3] + bias, -1.0, 1.0)
        obs, reward, done, info = env.step(executed, observe=record or observe)
        if rec is not None:
            rec["rewards"].append(reward)
            rec["dones"].append(done)
    result = EpisodeResult(
        task_id=env.cfg.task_id,
        init_state=init_state,
        success=bool(info["success"]),
        steps=env.num_steps,
        seconds=time.perf_counter() - t0,
        recoveries=expert.recoveries,
    )
    return result, rec


_worker_env: LiberoEnv | None = None


def worker_env(cfg: EnvConfig) -> LiberoEnv:
    """The worker process's environment, rebuilt only when the task (or its settings) changes."""
    global _worker_env
    if _worker_env is not None:
        old = _worker_env.cfg
        if (old.suite, old.task_id, old.image_size, old.seed, old.max_steps) == (
            cfg.suite, cfg.task_id, cfg.image_size, cfg.seed, cfg.max_steps
        ):  # fmt: skip
            return _worker_env
        _worker_env.close()
        _worker_env = None
    _worker_env = LiberoEnv(cfg)
    return _worker_env


def close_worker_env() -> None:
    """Close the environment that :func:`worker_env` keeps (when it ran in the main process)."""
    global _worker_env
    if _worker_env is not None:
        _worker_env.close()
        _worker_env = None


def env_config(suite: str, task_id: int, init_state: int | str, **kwargs: Any) -> EnvConfig:
    """The EnvConfig of an episode from a benchmark index or a fresh label (fresh: pass it to reset)."""
    return EnvConfig(
        suite=suite, task_id=task_id, init_state=init_state if isinstance(init_state, int) else 0, **kwargs
    )
