"""One closed-loop episode (chunk execution, rendering only at query steps) and the make eval-vla CLI.

Worker processes, crashes and resuming: tests/evaluator/test_fleet.py."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from common.policy import Observation
from evaluator.episode import make_libero_env, run_episode


class ScriptedEnv:
    """A stand-in env: success once the summed x-actions reach ``goal`` (0 = never)."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.max_steps = cfg.get("max_steps") or 20
        self.goal = cfg.get("goal", 0.0)
        self.observed: list[bool] = []

    def _obs(self) -> Observation:
        img = np.zeros((8, 8, 3), np.uint8)
        return Observation(img, img, np.full(8, self.x, np.float32), "push right")

    def reset(self, init_state: int | None = None) -> Observation:
        self.x, self.steps, self.observed = 0.0, 0, []
        if self.cfg.get("crash_on_init") == init_state:
            raise RuntimeError("simulated env crash")
        return self._obs()

    def step(self, action, observe=True):
        self.x += float(action[0])
        self.steps += 1
        self.observed.append(observe)
        success = self.goal > 0 and self.x >= self.goal
        done = success or self.steps >= self.max_steps
        return (self._obs() if observe else None), 0.0, done, {"success": success}


def push_right() -> callable:
    return lambda obs: np.tile(np.array([[1, 0, 0, 0, 0, 0, -1]], np.float32), (4, 1))


def test_run_episode_chunks_render_only_at_query_steps() -> None:
    env = ScriptedEnv({"goal": 10, "max_steps": 50})
    seen = []

    def act(obs: Observation) -> np.ndarray:
        seen.append(obs.proprio[0])
        return push_right()(obs)

    res = run_episode(env, act, init_state=3)
    assert res.success and res.steps == 10 and res.queries == 3  # 4 + 4 + 2 (stops on success)
    assert env.observed == [False, False, False, True] * 2 + [False, False]
    assert seen == [0.0, 4.0, 8.0]  # each query sees the state after the whole previous chunk


def test_run_episode_failure_and_bad_chunk() -> None:
    res = run_episode(ScriptedEnv({"goal": 0, "max_steps": 7}), push_right(), init_state=0)
    assert not res.success and res.steps == 7 and res.queries == 2
    with pytest.raises(ValueError, match="finite"):
        run_episode(ScriptedEnv({}), lambda obs: np.full((4, 7), np.nan), init_state=0)


def test_execute_k_replans_after_k_actions_of_every_chunk() -> None:
    from evaluator.fleet_arms import FirstActions

    env = ScriptedEnv({"goal": 10, "max_steps": 50})
    seen = []

    def act(obs: Observation) -> np.ndarray:
        seen.append(obs.proprio[0])
        return push_right()(obs)

    act.backbone_id = "b"
    wrapped = FirstActions(act, 2)
    res = run_episode(env, wrapped, init_state=0)
    assert res.success and res.steps == 10 and res.queries == 5  # 2 of every 4 actions, 5 queries
    assert seen == [0.0, 2.0, 4.0, 6.0, 8.0] and wrapped.backbone_id == "b"
    assert env.observed == [False, True] * 5


def test_execute_is_an_arm_parameter_checked_in_the_worker() -> None:
    from common.cli import parse_config
    from evaluator.fleet_arms import build_act
    from evaluator.protocol import ArmSpec
    from evaluator.rollout import RolloutConfig

    with pytest.raises(SystemExit) as exc:  # a usage error
        parse_config(RolloutConfig, ["--execute", "0"])
    assert exc.value.code == 2
    assert parse_config(RolloutConfig, ["--execute", "4"]).execute == 4
    with pytest.raises(ValueError, match="must be an int >= 1"):
        build_act(ArmSpec(name="policy", params={"execute": 0}))


@pytest.mark.slow
@pytest.mark.sim
def test_real_libero_episode_random_policy() -> None:
    """One short real LIBERO episode with a random-weight embedded VLA (plumbing, not success)."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    env = make_libero_env({"suite": "libero_spatial", "task_id": 0, "init_state": 0, "max_steps": 16})
    try:
        from common.vla import load_policy
        from common.vla.embedded import EmbeddedVLAPolicy

        policy = load_policy(
            "embedded", weights_dir="/nonexistent", codec_dir="/nonexistent", allow_random=True
        )
        assert isinstance(policy, EmbeddedVLAPolicy)
        res = run_episode(env, lambda obs: policy.act([obs])[0].actions, init_state=0, task_id=0)
        assert res.steps == 16 and res.queries == 2
    finally:
        env.close()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--tasks", "0-10"], "task id [10] out of range; valid: 0..9"),
        (["--init-states", "0,50"], "initial state [50] out of range; valid: 0..49"),
        (["--suite", "libero_nope"], "unknown suite"),
        (["--tasks", "a-b"], "bad task id range"),
    ],
)
def test_eval_vla_unknown_tasks_and_init_states_are_usage_errors(argv, message, capsys) -> None:
    from evaluator.rollout import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_eval_vla_defaults_to_the_standard_protocol() -> None:
    from common.cli import parse_config
    from evaluator.rollout import RolloutConfig

    cfg = parse_config(RolloutConfig, [])
    assert cfg.task_ids == list(range(10)) and cfg.init_state_ids == list(range(50))
    assert cfg.results == Path("runs/eval_vla/rollout.jsonl")


@pytest.mark.parametrize("module", ["evaluator.rollout", "trainer.train_vla"])
def test_commands_have_help(module: str) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "--" in out.stdout and "usage" in out.stdout
