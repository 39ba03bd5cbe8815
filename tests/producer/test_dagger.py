"""DAgger data: policy rollouts from fresh states, labelled by the expert from every visited state."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from common.init_states import check_demo_files
from producer import dagger
from tests.common.test_embedded_vla import _write_demos


def test_dagger_config_validation(tmp_path):
    with pytest.raises(ValueError, match="fresh states only"):
        dagger.DaggerConfig(out=tmp_path / "x.hdf5", init_states="5-9")
    with pytest.raises(ValueError, match="label_every must be >= 1"):
        dagger.DaggerConfig(out=tmp_path / "x.hdf5", label_every=0)
    cfg = dagger.DaggerConfig(out=tmp_path / "x.hdf5", tasks="1", init_states="fresh:7-8")
    assert cfg.init_ids == ["fresh:7", "fresh:8"]


def test_success_table():
    R = dagger.EpisodeResult
    table = dagger.success_table(
        [R(0, "fresh:1", True, 90, 1.0), R(0, "fresh:2", False, 220, 1.0), R(3, "fresh:1", True, 80, 1.0)]
    )
    assert table == {"overall": [2, 3], "per_task": {"0": [1, 2], "3": [1, 1]}}


@pytest.mark.sim
def test_dagger_round_labels_visited_states_and_trains(tmp_path):
    from common.demos import read_demos
    from common.vla import load_policy
    from producer.env import EnvConfig, LiberoEnv
    from producer.expert import ScriptedExpert
    from trainer.vla_data import frame_chunks

    out = tmp_path / "round2.hdf5"
    argv = ["--out", str(out), "--tasks", "0", "--init-states", "fresh:0", "--workers", "1", "--max-steps", "5",
            "--replan", "3", "--round", "2"]  # fmt: skip
    assert dagger.main(argv) == 0
    with h5py.File(out, "r") as f:
        data = f["data"]
        assert data.attrs["round"] == 2 and data.attrs["num_demos"] == 1
        assert json.loads(data.attrs["policy_success"]) == {"overall": [0, 1], "per_task": {"0": [0, 1]}}
        demo = data["demo_0"]
        assert demo.attrs["round"] == 2 and demo.attrs["init_source"] == "fresh:0"
        assert demo.attrs["policy"].startswith("embedded-vla@")
        labels, executed = demo["expert_chunks"][()], demo["policy_actions"][()]
        assert (
            labels.shape == (5, 8, 7) and executed.shape == (5, 7) and demo["obs/agentview_rgb"].shape[0] == 5
        )
        np.testing.assert_array_equal(demo["actions"][()], labels[:, 0])
        final_state = demo["states"][-1]
    # the rollout is the policy's own, unchanged by the labelling: replay it without labels
    policy = load_policy("embedded")
    with LiberoEnv(EnvConfig(task_id=0)) as env:
        obs = env.reset("fresh:0")
        expert = ScriptedExpert(env)
        expert.replan()
        snap = env.snapshot()
        from_start = []
        for _ in range(8):
            from_start.append(expert.act())
            env.step(from_start[-1], observe=False)
        env.restore(snap)
        plain = []
        while len(plain) < 5:
            for action in policy.act([obs])[0].actions[:3]:
                plain.append(action)
                if len(plain) == 5:
                    state_before_last = env.sim_state()
                    break
                obs, _, _, _ = env.step(action)
    np.testing.assert_array_equal(labels[0], np.stack(from_start))  # the expert's chunk from the start state
    assert len({a.tobytes() for a in labels[-1]}) > 1  # the last label runs past the 5-step limit, unpadded
    np.testing.assert_array_equal(executed, np.stack(plain[:5]))
    np.testing.assert_array_equal(final_state, state_before_last)
    # rounds aggregate by passing several files; the labels become the chunk targets
    _write_demos(tmp_path / "demos.hdf5", episodes=2, steps=6, side=128)
    assert check_demo_files([out, tmp_path / "demos.hdf5"])["check"] == "passed"
    frames = read_demos([tmp_path / "demos.hdf5", out], 64)
    assert len(frames["episode_names"]) == 3 and list(frames["init_source_of_episode"]) == [
        "fresh:0",
        "fresh:1",
        "fresh:0",
    ]
    chunks = frame_chunks(frames, 8)
    np.testing.assert_array_equal(chunks[frames["episode"] == 2], labels)


@pytest.mark.slow
@pytest.mark.sim
def test_dagger_full_episode_records_the_policy_success(tmp_path):
    out = tmp_path / "r1.hdf5"
    assert dagger.main(["--out", str(out), "--tasks", "1", "--init-states", "fresh:3", "--workers", "1",
                        "--label-every", "8"]) == 0  # fmt: skip
    summary = json.loads(out.with_suffix(".json").read_text())
    with h5py.File(out, "r") as f:
        demo = f["data/demo_0"]
        assert bool(demo.attrs["success"]) == bool(summary["episodes"][0]["success"])
        steps = summary["episodes"][0]["steps"]
        assert demo["expert_chunks"].shape == ((steps + 7) // 8, 8, 7)  # states 0, 8, 16, ... labelled
