"""Initial states: labels, the leak check against LIBERO's benchmark states, and fresh resets (sim)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from common.init_states import (
    LEAK_TOL,
    BenchmarkStateLeak,
    assert_no_benchmark_states,
    benchmark_init_states,
    check_demo_files,
    init_label,
    parse_init,
    parse_inits,
)
from tests.init_helpers import OBJECTS, SUITE, TASK


def test_labels():
    assert parse_init(7) == ("benchmark", 7) and parse_init("7") == ("benchmark", 7)
    assert parse_init("fresh:12") == ("fresh", 12) and init_label("benchmark:3") == "benchmark:3"
    assert parse_inits("fresh:0-2") == ["fresh:0", "fresh:1", "fresh:2"]
    assert parse_inits("5-7") == [5, 6, 7]
    with pytest.raises(ValueError, match=r"valid: 0\.\.49"):
        parse_init(50)
    with pytest.raises(ValueError, match="fresh:<seed>"):
        parse_init("stale:3")
    with pytest.raises(ValueError, match="fresh seed"):
        parse_inits("fresh:a-b")


def test_benchmark_states_are_detected_and_moved_scenes_are_not():
    bench = benchmark_init_states(SUITE, TASK)
    assert bench.shape == (50, 92)
    same_scene = bench[[3, 17]].copy()
    same_scene[:, 1:8] += 0.05  # another arm pose, the same object placement: still a benchmark scene
    same_scene[:, 50:] = 0.3  # and other velocities
    with pytest.raises(BenchmarkStateLeak, match=r"2 of 2 initial states are benchmark initial states"):
        assert_no_benchmark_states(same_scene, SUITE, TASK, OBJECTS)
    moved = bench[3].copy()
    moved[1 + 37] += 3 * LEAK_TOL  # the plate 6 mm away: another scene
    nearest = assert_no_benchmark_states(moved, SUITE, TASK, OBJECTS)
    assert nearest.shape == (1,) and nearest[0] >= 3 * LEAK_TOL - 1e-9


def _demo_file(path, demos: list[dict]) -> None:
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = '{"env_kwargs": {"suite": "libero_spatial"}}'
        for k, d in enumerate(demos):
            g = data.create_group(f"demo_{k}")
            g.create_dataset("actions", data=np.zeros((4, 7), np.float32))
            g.attrs["task_name"] = TASK
            if "source" in d:
                g.attrs["init_source"] = d["source"]
                g.attrs["init_object_qpos"] = OBJECTS
                g.create_dataset("init_sim_state", data=d["state"])


def test_check_demo_files_refuses_benchmark_and_legacy_data(tmp_path, caplog):
    bench = benchmark_init_states(SUITE, TASK)
    fresh = bench[0].copy()
    fresh[1 + OBJECTS] += 0.01  # every object 1 cm away from benchmark state 0
    _demo_file(tmp_path / "ok.hdf5", [{"source": "fresh:0", "state": fresh}])
    report = check_demo_files([tmp_path / "ok.hdf5"])
    assert report["check"] == "passed" and report["counts"]["fresh"] == 1
    assert report["sources"] == {"ok.hdf5:demo_0": "fresh:0"}

    _demo_file(tmp_path / "disguised.hdf5", [{"source": "fresh:1", "state": bench[9]}])
    with pytest.raises(BenchmarkStateLeak, match=r"disguised.hdf5:demo_0 \(= benchmark state 9\)"):
        check_demo_files([tmp_path / "ok.hdf5", tmp_path / "disguised.hdf5"])
    _demo_file(tmp_path / "labelled.hdf5", [{"source": "benchmark:4", "state": bench[4]}])
    with pytest.raises(BenchmarkStateLeak, match="--allow-benchmark-states"):
        check_demo_files([tmp_path / "labelled.hdf5"])
    _demo_file(tmp_path / "legacy.hdf5", [{}, {}])
    with pytest.raises(BenchmarkStateLeak, match="2 do not record their initial state"):
        check_demo_files([tmp_path / "legacy.hdf5"])
    report = check_demo_files([tmp_path / "legacy.hdf5"], allow_benchmark_states=True)
    assert report["check"].startswith("OVERRIDDEN") and report["counts"]["unrecorded"] == 2
    assert "TRAINING ON DATA THAT MAY CONTAIN EVALUATION STATES" in caplog.text


@pytest.mark.sim
def test_fresh_resets_are_new_reproducible_scenes():
    from producer.env import EnvConfig, LiberoEnv
    from producer.suites import task_init_states

    with LiberoEnv(EnvConfig(task_id=3, image_size=16, settle_steps=10)) as env:
        assert env.task.name == TASK
        np.testing.assert_array_equal(benchmark_init_states(SUITE, TASK), task_init_states(SUITE, 3))
        assert list(env.object_qpos_index()) == list(OBJECTS)
        env.reset(5)
        assert env.init_source == "benchmark:5"
        np.testing.assert_array_equal(env.initial_state, task_init_states(SUITE, 3)[5])
        states = []
        for seed in (0, 1, 0):
            env.reset(f"fresh:{seed}")
            assert env.init_source == f"fresh:{seed}" and env.fresh_attempts >= 1
            states.append(env.initial_state.copy())
        settled_bowl = env.object_pos("akita_black_bowl_1")
    np.testing.assert_array_equal(states[0], states[2])  # the same seed, the same scene
    assert np.abs(states[0][1 + OBJECTS] - states[1][1 + OBJECTS]).max() > LEAK_TOL
    assert np.abs(states[0][1:8] - states[1][1:8]).max() > 1e-3  # the arm joints carry fresh noise too
    nearest = assert_no_benchmark_states(np.stack(states), SUITE, TASK, OBJECTS)
    assert nearest.min() > LEAK_TOL
    assert settled_bowl[2] > 0.91  # on the cookie box, as in the benchmark scenes of this task


def _legacy_file(path, episodes=2, steps=6, side=16) -> None:
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        for e in range(episodes):
            g = f.create_group(f"data/demo_{e}")
            g.attrs["instruction"] = "pick up the black bowl"
            g["actions"] = rng.uniform(-1, 1, (steps, 7)).astype(np.float32)
            for cam in ("agentview_rgb", "eye_in_hand_rgb"):
                g[f"obs/{cam}"] = rng.integers(0, 256, (steps, side, side, 3), dtype=np.uint8)
            g["obs/ee_states"] = rng.normal(size=(steps, 6))
            g["obs/gripper_states"] = rng.normal(size=(steps, 2))


def test_trainers_refuse_legacy_data_without_the_override(tmp_path):
    from common.demos import read_demos
    from common.packed import pack
    from trainer import train_codec, train_vla

    _legacy_file(tmp_path / "legacy.hdf5")
    with pytest.raises(BenchmarkStateLeak, match="do not record their initial state"):
        read_demos([tmp_path / "legacy.hdf5"], 16)
    data = read_demos([tmp_path / "legacy.hdf5"], 16, allow_benchmark_states=True)
    assert str(data["init_check"]).startswith("OVERRIDDEN") and list(data["init_source_of_episode"]) == [
        "unrecorded",
        "unrecorded",
    ]
    pack(data, tmp_path / "legacy.npz", 0)
    with pytest.raises(BenchmarkStateLeak, match="--allow-benchmark-states"):  # the pack remembers
        train_vla.main(
            ["--packed", str(tmp_path / "legacy.npz"), "--image-size", "16", "--out-dir", str(tmp_path)]
        )
    with pytest.raises(
        BenchmarkStateLeak, match="benchmark initial states of every task are the evaluation set"
    ):
        train_codec.main(["--demos", str(tmp_path / "legacy.hdf5"), "--out-dir", str(tmp_path / "codec")])


@pytest.mark.sim
def test_fresh_start_where_the_benchmark_scene_itself_settles_with_a_slide():
    """Task 5 (bowl on the ramekin): the bowl slides ~15 mm while settling in every benchmark scene too,
    so a fresh placement is judged against that, not against a still scene (this once exhausted every draw)."""
    from producer.env import EnvConfig, LiberoEnv
    from producer.fresh_start import FRESH_MAX_SLIDE

    with LiberoEnv(EnvConfig(task_id=5, image_size=16)) as env:
        env.reset("fresh:0")
        assert env.fresh_attempts <= 3
        ref_slide, _ = env._reference_settle()
        assert ref_slide.max() > FRESH_MAX_SLIDE  # the reason a fixed threshold fails here


def test_benchmark_states_are_found_whatever_the_shared_config_says(tmp_path, monkeypatch):
    """Other checkouts rewrite the shared LIBERO config with their own paths (a removed worktree's venv
    once stopped the recorder): the installed package's own files come first."""
    (tmp_path / "config.yaml").write_text("init_states: /nonexistent/venv/libero/init_files\n")
    monkeypatch.setenv("LIBERO_CONFIG_PATH", str(tmp_path))
    benchmark_init_states.cache_clear()
    try:
        assert benchmark_init_states(SUITE, TASK).shape == (50, 92)
    finally:
        benchmark_init_states.cache_clear()
