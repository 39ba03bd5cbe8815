"""LIBERO environments as the project's policies see them.

:class:`LiberoEnv` wraps one LIBERO task (robosuite + MuJoCo, rendered headless with EGL, or OSMesa
when ``MUJOCO_GL=osmesa``) and returns :class:`common.policy.Observation` objects: both camera images
rotated upright (180°, the convention of the OpenVLA-OFT LIBERO evaluation), 8-d proprio and the
instruction text.

Rendering dominates the cost of a step (LIBERO scenes have ~726k mesh vertices and the CPU
rasterizer is slow). robosuite renders every camera on every ``step()`` when camera observations are
on. This wrapper keeps robosuite's camera observables (so images are sampled at exactly the same
simulation instant as robosuite samples them: robosuite 1.4 samples every observable, proprio
included, after the first physics substep of a control step) but gates their sensors: a camera is
rendered only on steps whose observation the caller asks for (``step(action, observe=False)`` skips
rendering, e.g. inside an open-loop action chunk). The images are pixel-identical to robosuite's
camera observations (tested in ``tests/producer/test_libero_env.py``; speeds in ``docs/bench/libero.md``).

    with LiberoEnv(EnvConfig(suite="libero_spatial", task_id=0, init_state=0)) as env:
        obs = env.reset()                               # settles, then returns the first observation
        obs, reward, done, info = env.step(action)      # action [7] in [-1, 1]; info["success"]
        obs, reward, done, info = env.step(action, observe=False)   # obs is None, no rendering

Step limits per suite are those of the OpenVLA-OFT LIBERO evaluation; ``max_steps`` counts policy
steps after the settle steps.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.init_states import BENCHMARK, parse_init
from common.policy import Observation
from producer.fresh_start import (
    FRESH_ATTEMPTS,
    FRESH_JOINT_NOISE,
    fresh_seed,
    placement_problem,
    settle_motion,
)
from producer.libero_setup import ensure_libero
from producer.render_context import RenderContextKeeper, gate_camera_sensors, make_current
from producer.sim_state import restart_sampling_clocks, restore_sim, snapshot_sim
from producer.suites import MAX_STEPS, SUITES, list_tasks, task_init_states

log = logging.getLogger(__name__)

DEFAULT_CAMERAS = ("agentview", "robot0_eye_in_hand")
ACTION_DIM = 7
#: The no-op used while objects settle: no motion, gripper open.
SETTLE_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float32)


@dataclass
class EnvConfig:
    """One LIBERO task and how to observe it."""

    suite: str = field(default="libero_spatial", metadata={"help": f"LIBERO suite, one of {list(SUITES)}"})
    task_id: int = field(default=0, metadata={"help": "task index inside the suite (suite order)"})
    init_state: int = field(default=0, metadata={"help": "index of the task's fixed initial state (0..49)"})
    image_size: int = field(default=128, metadata={"help": "square camera image size in pixels"})
    cameras: tuple[str, ...] = field(
        default=DEFAULT_CAMERAS,
        metadata={"help": "robosuite camera names: third-person first, then the wrist camera"},
    )
    settle_steps: int = field(default=10, metadata={"help": "no-op steps after reset so that objects settle"})
    max_steps: int | None = field(
        default=None,
        metadata={
            "help": "env steps (actions executed, after the settle steps) per episode, not policy queries "
            "(none: the suite's limit)"
        },
    )
    seed: int = field(
        default=0, metadata={"help": "seed of the scene randomness (fixture placement), per init state"}
    )
    render_every_step: bool = field(
        default=False,
        metadata={"help": "let robosuite render the cameras on every step (slow; for comparison)"},
    )
    reuse_render_context: bool = field(
        default=True,
        metadata={
            "help": "keep the OpenGL render context (uploaded meshes and textures) across the hard reset of "
            "every episode while the scene's assets are unchanged (about 1.2 s per episode on a CPU renderer; "
            "the images are identical)"
        },
    )

    def __post_init__(self) -> None:
        if self.suite not in SUITES:
            raise ValueError(f"unknown suite {self.suite!r}; valid suites: {list(SUITES)}")
        n = SUITES[self.suite]
        if not (isinstance(self.task_id, int) and 0 <= self.task_id < n):
            raise ValueError(f"task_id {self.task_id!r} is not a task of {self.suite}; valid: 0..{n - 1}")
        if self.init_state < 0:
            raise ValueError(f"init_state {self.init_state} is negative; valid: 0..49")
        if not 8 <= self.image_size <= 640:
            raise ValueError(f"image_size {self.image_size} out of range; valid: 8..640")
        self.cameras = tuple(self.cameras)
        if len(self.cameras) != 2:
            raise ValueError(f"cameras {self.cameras} must name two cameras (third-person, wrist)")
        if self.settle_steps < 0:
            raise ValueError(f"settle_steps {self.settle_steps} must be >= 0")
        if self.max_steps is None:
            self.max_steps = MAX_STEPS[self.suite]
        if self.max_steps <= 0:
            raise ValueError(f"max_steps {self.max_steps} must be > 0")


def quat2axisangle(quat: np.ndarray) -> np.ndarray:
    """[x, y, z, w] quaternion -> [3] axis-angle (robosuite's convention, as in LIBERO's datasets)."""
    w = float(np.clip(quat[3], -1.0, 1.0))
    den = math.sqrt(max(1.0 - w * w, 0.0))
    if math.isclose(den, 0.0):
        return np.zeros(3, dtype=np.float64)
    return np.asarray(quat[:3], dtype=np.float64) * 2.0 * math.acos(w) / den


def upright(img: np.ndarray) -> np.ndarray:
    """Rotate a robosuite (OpenGL, bottom-up) image by 180° to what a policy sees: [h, w, 3]."""
    return np.ascontiguousarray(img[::-1, ::-1])


class LiberoEnv:
    """One LIBERO task, stepped with 7-d delta end-effector actions (OSC_POSE, 20 Hz)."""

    def __init__(self, cfg: EnvConfig | None = None, **overrides: Any) -> None:
        if cfg is None:
            cfg = EnvConfig(**overrides)
        elif overrides:
            raise TypeError("pass either an EnvConfig or keyword overrides, not both")
        self.cfg = cfg
        ensure_libero()
        self.task = list_tasks(cfg.suite)[cfg.task_id]
        self._init_states = task_init_states(cfg.suite, cfg.task_id)
        self._check_init_state(cfg.init_state)

        # Lazy on purpose: importing libero before ensure_libero() wrote its config stops at a prompt.
        from libero.libero.envs import OffScreenRenderEnv

        t0 = time.perf_counter()
        self._env = OffScreenRenderEnv(
            bddl_file_name=self.task.bddl_file,
            camera_heights=cfg.image_size,
            camera_widths=cfg.image_size,
            camera_names=list(cfg.cameras),
            use_camera_obs=True,
        )
        log.debug("built %s task %d in %.1fs", cfg.suite, cfg.task_id, time.perf_counter() - t0)
        robo = self._env.env
        keep = cfg.reuse_render_context and RenderContextKeeper.supported(robo)
        self._contexts = RenderContextKeeper(robo) if keep else None
        self._raw: dict[str, Any] = {}
        self._want_images = True  # gate of the camera sensors (always open if render_every_step)
        self._fresh_images = False  # whether self._raw holds images of the current observation
        self._steps = 0
        self._done = True
        self._closed = False
        self.init_state = cfg.init_state
        self.init_source: str | None = None  # label of the current episode's start (after reset)
        self.initial_state: np.ndarray | None = None  # [S] its MuJoCo state after placement, before settling
        self.fresh_attempts = 0  # placements drawn for the last fresh start
        self.start_object_pos: dict[str, np.ndarray] = {}  # object -> [3] position at the episode's start
        self._reference: tuple[np.ndarray, np.ndarray] | None = None  # how benchmark state 0 settles

    # ---------------------------------------------------------------- episode
    def _check_init_state(self, index: int) -> None:
        n = len(self._init_states)
        if not 0 <= index < n:
            raise ValueError(
                f"init_state {index} does not exist for {self.cfg.suite} task {self.cfg.task_id}; "
                f"valid: 0..{n - 1}"
            )

    def reset(self, init_state: int | str | None = None) -> Observation:
        """Start an episode, settle, observe. ``init_state``: a benchmark index (0..49, default: the
        config's) or ``"fresh:<seed>"``: a new random object placement that LIBERO samples in the task's
        regions (with robosuite's default arm-joint noise, as in the benchmark states), drawn from the
        seed; a placement whose objects collide or come to rest elsewhere than in the benchmark scenes is
        redrawn (attempt k of the same seed, deterministic; ``self.fresh_attempts``). After the reset
        ``self.init_source`` is the label and ``self.initial_state`` the flattened MuJoCo state after
        placement, before settling (what a benchmark init state is)."""
        kind, index = parse_init(self.init_state if init_state is None else init_state)
        if kind == BENCHMARK:
            self._check_init_state(index)
            self.init_state = index
            self._start(self.episode_seed(index), 0.0, self._init_states[index])
        else:
            self.fresh_attempts = self._fresh_start(index)
        self.init_source = f"{kind}:{index}"
        self._fresh_images = True
        self._steps = 0
        self._done = False
        # where every object rests at the start (after settling): a take-over expert's reference heights
        self.start_object_pos = {name: self.object_pos(name) for name in self._env.env.obj_body_id}
        return self.observe()

    def _start(self, seed: int, joint_noise: float, state: np.ndarray | None) -> None:
        """Hard reset, set the initial state (None: the sampled placement), settle."""
        # The hard reset rebuilds the MuJoCo model, the sim, the robots (from their configs) and the camera
        # sensors. It samples the arm noise, the placement of the fixtures (static bodies that an init
        # state does not restore) and of the objects from NumPy's global RNG, so seed it per episode (and
        # leave the caller's RNG as it was): the same (seed, init state) always gives the same scene.
        self._env.env.robot_configs[0]["initialization_noise"] = {
            "magnitude": joint_noise,
            "type": "gaussian",
        }
        rng_state = np.random.get_state()
        np.random.seed(seed)
        self._want_images = False  # the reset's own observation is discarded: not rendered
        try:
            self._env.reset()
        finally:
            np.random.set_state(rng_state)
        self._gate_camera_sensors()
        self._want_images = self.cfg.settle_steps == 0
        self.initial_state = np.array(self._env.get_sim_state() if state is None else state, dtype=np.float64)
        self._raw = self._env.set_init_state(self.initial_state)
        restart_sampling_clocks(self._env.env)
        for i in range(self.cfg.settle_steps):
            self._want_images = i == self.cfg.settle_steps - 1  # images of the last settle step only
            self._raw, _, _, _ = self._env.step(SETTLE_ACTION)

    def _fresh_start(self, index: int) -> int:
        """Draw placements of fresh seed ``index`` until one is valid (producer/fresh_start.py); returns
        the number of draws."""
        reference = self._reference_settle() if self.cfg.settle_steps else None
        problem = None
        for attempt in range(FRESH_ATTEMPTS):
            self._start(self.fresh_seed(index, attempt), FRESH_JOINT_NOISE, None)
            if reference is None:
                return attempt + 1
            names = list(self._env.env.objects_dict)
            problem = placement_problem(self._placed_xyz(), self._object_xyz(), reference, names)
            if problem is None:
                return attempt + 1
            log.debug("fresh:%d attempt %d redrawn: %s", index, attempt, problem)
        raise RuntimeError(f"fresh:{index}: no valid placement in {FRESH_ATTEMPTS} draws ({problem})")

    def _reference_settle(self) -> tuple[np.ndarray, np.ndarray]:
        """How the objects settle in benchmark state 0 (once per task): (how far each slides [objects],
        the height each comes to rest at [objects]). A bowl placed on the ramekin slides 15 mm there."""
        if self._reference is None:
            self._start(self.episode_seed(0), 0.0, self._init_states[0])
            self._reference = settle_motion(self._placed_xyz(), self._object_xyz())
        return self._reference

    def _placed_xyz(self) -> np.ndarray:
        """[objects, 3] positions of the movable objects as placed (in the initial state, before settling)."""
        return self.initial_state[1 + self.object_qpos_index()].reshape(-1, 3)

    def _object_xyz(self) -> np.ndarray:
        """[objects, 3] positions of the movable objects now (qpos of their free joints)."""
        return self._env.env.sim.data.qpos[self.object_qpos_index()].reshape(-1, 3).copy()

    def step(
        self, action: np.ndarray, observe: bool = True
    ) -> tuple[Observation | None, float, bool, dict[str, Any]]:
        """Apply one action [7] (clipped to [-1, 1]). Renders the cameras only if ``observe``.

        Returns (observation or None, reward, done, info) where info has ``success`` (bool),
        ``step`` (policy steps so far) and ``truncated`` (the step limit ended the episode).
        """
        if self._done:
            raise RuntimeError("step() after the episode ended; call reset()")
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (ACTION_DIM,) or not np.all(np.isfinite(action)):
            raise ValueError(f"action must be {ACTION_DIM} finite numbers, got {action!r}")
        self._want_images = observe
        self._raw, reward, _, _ = self._env.step(np.clip(action, -1.0, 1.0))
        self._fresh_images = observe or self.cfg.render_every_step
        self._steps += 1
        success = bool(self._env.check_success())
        truncated = not success and self._steps >= self.cfg.max_steps
        self._done = success or truncated
        info = {"success": success, "step": self._steps, "truncated": truncated}
        return (self.observe() if observe else None), float(reward), self._done, info

    def episode_seed(self, init_state: int) -> int:
        """The seed of the scene randomness of one episode, from the config's seed and the init state."""
        return int(np.random.SeedSequence([self.cfg.seed, init_state]).generate_state(1)[0])

    def fresh_seed(self, seed: int, attempt: int = 0) -> int:
        """The seed of a fresh scene (placements, arm noise): per task, apart from the benchmark episodes'."""
        return fresh_seed(self.cfg.seed, self.cfg.task_id, seed, attempt)

    def object_qpos_index(self) -> np.ndarray:
        """qpos indices of the xyz of every movable object's free joint [3 x objects] (what places a scene)."""
        robo = self._env.env
        idx = [robo.sim.model.get_joint_qpos_addr(obj.joints[-1])[0] for obj in robo.objects_dict.values()]
        return np.array([i + k for i in idx for k in range(3)], dtype=np.int64)

    @property
    def render_context_reuses(self) -> int:
        """Hard resets that kept the render context (producer/render_context.py)."""
        return self._contexts.reuses if self._contexts is not None else 0

    def _gate_camera_sensors(self) -> None:
        """Camera sensors render only while ``self._want_images`` is set (producer/render_context.py)."""
        if not self.cfg.render_every_step:
            gate_camera_sensors(
                self._env.env, self.cfg.cameras, self.cfg.image_size, lambda: self._want_images
            )

    def snapshot(self) -> dict[str, Any]:
        """Everything a step depends on, to try actions from here and :meth:`restore` after (a DAgger
        label): the simulation's stepping state (producer/sim_state.py) and this wrapper's."""
        snap = snapshot_sim(self._env.env)
        snap["wrapper"] = (dict(self._raw), self._steps, self._done, self._fresh_images, self._want_images)
        return snap

    def restore(self, snap: dict[str, Any]) -> None:
        """Go back to a :meth:`snapshot` of this episode (stepping on from it is stepping on from there)."""
        restore_sim(self._env.env, snap)
        raw, self._steps, self._done, self._fresh_images, self._want_images = snap["wrapper"]
        self._raw = dict(raw)

    @property
    def done(self) -> bool:
        return self._done

    @property
    def num_steps(self) -> int:
        return self._steps

    # ---------------------------------------------------------------- observing
    def render(self) -> tuple[np.ndarray, np.ndarray]:
        """Both cameras as the policy sees them: ([h, w, 3] uint8, [h, w, 3] uint8), upright.

        After an observed step (or reset) these are robosuite's camera observations of that step;
        after ``step(observe=False)`` the cameras are rendered now, at the current sim state.
        """
        imgs = [upright(self.render_raw(cam)) for cam in self.cfg.cameras]
        return imgs[0], imgs[1]

    def render_raw(self, camera: str) -> np.ndarray:
        """One camera as robosuite renders it (bottom-up, OpenGL convention): [h, w, 3] uint8."""
        key = f"{camera}_image"
        if self._fresh_images and key in self._raw:
            return self._raw[key]
        size = self.cfg.image_size
        make_current(self._env.env)
        return self._env.sim.render(camera_name=camera, width=size, height=size, depth=False)

    def proprio(self) -> np.ndarray:
        """[8] float32: eef position (3), eef axis-angle (3), gripper finger qpos (2)."""
        r = self._raw
        return np.concatenate(
            [r["robot0_eef_pos"], quat2axisangle(r["robot0_eef_quat"]), r["robot0_gripper_qpos"]]
        ).astype(np.float32)

    def observe(self) -> Observation:
        agentview, wrist = self.render()
        return Observation(
            agentview=agentview, wrist=wrist, proprio=self.proprio(), instruction=self.task.instruction
        )

    def robot_state(self) -> dict[str, np.ndarray]:
        """Low-dim robot state in LIBERO's dataset conventions.

        ee_states [6] (pos, axis-angle), gripper_states [2], joint_states [7], eef_pos [3], eef_quat [4].
        """
        r = self._raw
        return {
            "ee_states": np.concatenate([r["robot0_eef_pos"], quat2axisangle(r["robot0_eef_quat"])]),
            "gripper_states": np.asarray(r["robot0_gripper_qpos"], dtype=np.float64),
            "joint_states": np.asarray(r["robot0_joint_pos"], dtype=np.float64),
            "eef_pos": np.asarray(r["robot0_eef_pos"], dtype=np.float64),
            "eef_quat": np.asarray(r["robot0_eef_quat"], dtype=np.float64),
        }

    # ---------------------------------------------------------------- low-dim state for the expert
    @property
    def goal_state(self) -> list[list[str]]:
        """The task's BDDL goal, e.g. ``[['on', 'akita_black_bowl_1', 'plate_1']]``."""
        return [list(p) for p in self._env.env.parsed_problem["goal_state"]]

    def object_pos(self, name: str) -> np.ndarray:
        """[3] world position of an object's body (the current sim; valid after every reset)."""
        ids = self._env.env.obj_body_id
        if name not in ids:
            raise ValueError(f"unknown object {name!r}; objects of this task: {sorted(ids)}")
        return np.array(self._env.env.sim.data.body_xpos[ids[name]], dtype=np.float64)

    def is_grasped(self, name: str) -> bool:
        """Whether both finger pads touch the object (robosuite's grasp check)."""
        robo = self._env.env
        return bool(robo._check_grasp(robo.robots[0].gripper, robo.objects_dict[name]))

    def success(self) -> bool:
        """Whether the task's goal holds in the current state."""
        return bool(self._env.check_success())

    def eef_pos(self) -> np.ndarray:
        """[3] world position of the grip site, the point the OSC controller drives."""
        return np.array(self._raw["robot0_eef_pos"], dtype=np.float64)

    def gripper_qpos(self) -> np.ndarray:
        return np.array(self._raw["robot0_gripper_qpos"], dtype=np.float64)

    def sim_state(self) -> np.ndarray:
        """The flattened MuJoCo state [S] (time, qpos, qvel), as in LIBERO's ``states`` datasets."""
        return np.asarray(self._env.get_sim_state(), dtype=np.float64)

    def env_args(self, tasks: Sequence[int] | None = None) -> dict[str, Any]:
        """JSON-safe description of how this environment was built (for dataset attributes).

        ``tasks``: the task ids of the file it describes (default: this env's task); ``bddl_files``
        names the bddl file of each (task id -> path under LIBERO's bddl_files/)."""
        ids = sorted(set(tasks)) if tasks else [self.cfg.task_id]
        infos = list_tasks(self.cfg.suite)
        bddl = {str(t): infos[t].bddl_file.split("bddl_files/")[-1] for t in ids}
        return {
            "env_name": self.task.name if ids == [self.cfg.task_id] else self.cfg.suite,
            "type": "libero",
            "env_kwargs": {
                "suite": self.cfg.suite,
                "bddl_files": bddl,
                "controller": "OSC_POSE",
                "control_freq": 20,
                "camera_names": list(self.cfg.cameras),
                "camera_heights": self.cfg.image_size,
                "camera_widths": self.cfg.image_size,
                "settle_steps": self.cfg.settle_steps,
                "max_steps": self.cfg.max_steps,
                "image_convention": "upright (robosuite image rotated 180 degrees)",
            },
        }

    # ---------------------------------------------------------------- lifetime
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._env.close()
            if self._contexts is not None:
                self._contexts.release()  # close() destroyed the sim: its render context goes with it

    def __enter__(self) -> LiberoEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to release
            pass
