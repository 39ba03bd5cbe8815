"""A lightweight env and policy for the fleet tests, injected through the fleet API (no LIBERO, no torch model).

The env succeeds once the summed x-actions reach ``1 + (task + init) % 4`` within ``max_steps`` steps;
an arm's policy pushes by ``params["gain"]`` per step, so arms differ in success on known episodes.
:class:`TrapEnv` raises in one episode (``raise_on``) or kills its worker process in the first attempt
of one (``exit_on``, remembered through a file in ``marker_dir``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from common.policy import Observation
from evaluator.protocol import ArmSpec

BUILDER = "tests.fleet_fakes:build_fake_act"


class FakeEnv:
    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.task_id = cfg["task_id"]
        self.max_steps = cfg.get("max_steps") or 4

    def _obs(self) -> Observation:
        img = np.zeros((4, 4, 3), np.uint8)
        return Observation(img, img, np.full(8, self.x, np.float32), "push")

    def reset(self, init_state: int | None = None) -> Observation:
        self.x, self.steps, self.goal = 0.0, 0, 1 + (self.task_id + init_state) % 4
        return self._obs()

    def step(self, action, observe=True):
        self.x += float(action[0])
        self.steps += 1
        success = self.x >= self.goal
        done = success or self.steps >= self.max_steps
        return (self._obs() if observe else None), 0.0, done, {"success": success}

    def close(self) -> None:
        pass


def make_fake_env(cfg: dict) -> FakeEnv:
    return FakeEnv(cfg)


def expected_success(gain: float, task: int, init: int, max_steps: int = 4) -> bool:
    return gain * max_steps >= 1 + (task + init) % 4


class FakeAct:
    def __init__(self, spec: ArmSpec) -> None:
        self.p = spec.params
        self.backbone_id = f"fake-{spec.name}"
        self.draws: list[float] = []

    def __call__(self, obs: Observation) -> np.ndarray:
        self.draws.append(float(torch.rand(()).item()) + float(np.random.random()))
        return np.tile(np.array([[self.p.get("gain", 1.0), 0, 0, 0, 0, 0, -1]], np.float32), (2, 1))

    def episode_extra(self) -> dict:
        out = {"first_draw": self.draws[0] if self.draws else None, "pid": os.getpid()}
        self.draws = []
        return out


def build_fake_act(spec: ArmSpec) -> FakeAct:
    if spec.params.get("fail_build"):
        raise RuntimeError("cannot build this policy")
    return FakeAct(spec)


class TrapEnv(FakeEnv):
    """FakeEnv that raises in reset (``raise_on``) or kills its process once (``exit_on`` + marker)."""

    def reset(self, init_state: int | None = None) -> Observation:
        key = [self.task_id, init_state]
        if self.cfg.get("raise_on") == key:
            raise RuntimeError(f"simulated simulator crash at {key}")
        if self.cfg.get("exit_on") == key:
            marker = Path(self.cfg["marker_dir"]) / f"exit-{key[0]}-{key[1]}"
            try:  # atomic: of two workers reaching this episode at once (two arms), exactly one dies
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                os._exit(3)
        return super().reset(init_state)


def make_trap_env(cfg: dict, **trap) -> TrapEnv:
    """``functools.partial(make_trap_env, raise_on=[t, i], exit_on=[t, i], marker_dir=...)`` is picklable."""
    return TrapEnv({**cfg, **trap})
