"""`make demos` end to end (one short episode in the real simulator) and the dataset summary."""

from __future__ import annotations

import io
import json

import h5py
import numpy as np
import pytest

from common.init_states import check_demo_files
from producer import dataset_info, demos

SIZE = 32


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("demos") / "tiny.hdf5"
    # Two planned episodes cut at 6 steps (failures, kept so that the layout can be inspected); the
    # time limit stops the run after the first one and the file is still finalized.
    argv = ["--out", str(out), "--tasks", "3", "--init-states", "fresh:7-8", "--workers", "1",
            "--image-size", str(SIZE), "--max-steps", "6", "--keep-failures", "--max-minutes", "0.001",
            "--action-noise", "0.1"]  # fmt: skip
    assert demos.main(argv) == 0
    return out


@pytest.mark.sim
def test_demo_file_layout(demo_file):
    assert not demo_file.with_name(demo_file.name + ".partial").exists()
    with h5py.File(demo_file, "r") as f:
        data = f["data"]
        assert data.attrs["total"] == 6 and data.attrs["num_demos"] == 1
        assert data.attrs["num_failures"] == 1
        assert data.attrs["num_episodes"] == 1 and not data.attrs["complete"]
        assert json.loads(data.attrs["failures"]) == [{"task_id": 3, "init_state": "fresh:7"}]
        env_args = json.loads(data.attrs["env_args"])
        assert env_args["type"] == "libero" and env_args["env_kwargs"]["camera_heights"] == SIZE
        demo = data["demo_0"]
        assert demo.attrs["num_samples"] == 6 and demo.attrs["task_id"] == 3
        assert demo.attrs["init_state"] == -1 and not demo.attrs["success"]
        assert demo.attrs["action_noise"] == 0.1 and demo.attrs["expert_recoveries"] == 0
        # the initial state: its source, the MuJoCo state after placement, and where the objects sit in it
        assert demo.attrs["init_source"] == "fresh:7" and demo["init_sim_state"].shape == (92,)
        assert list(demo.attrs["init_object_qpos"][:3]) == [9, 10, 11]
        assert json.loads(data.attrs["init_check"])["nearest_benchmark_m"] > 0.002
        assert "black bowl" in demo.attrs["instruction"]
        shapes = {
            "actions": ((6, 7), np.float32),
            "obs/agentview_rgb": ((6, SIZE, SIZE, 3), np.uint8),
            "obs/eye_in_hand_rgb": ((6, SIZE, SIZE, 3), np.uint8),
            "obs/ee_states": ((6, 6), np.float64),
            "obs/gripper_states": ((6, 2), np.float64),
            "obs/joint_states": ((6, 7), np.float64),
            "rewards": ((6,), np.float32),
            "dones": ((6,), np.uint8),
            "init_sim_state": ((92,), np.float64),
        }
        for key, (shape, dtype) in shapes.items():
            assert demo[key].shape == shape and demo[key].dtype == dtype, key
        assert demo["obs/agentview_rgb"].compression == "gzip"
        assert demo["obs/agentview_rgb"].chunks == (1, SIZE, SIZE, 3)
        assert demo["obs/agentview_rgb"][0].std() > 5
        assert list(demo["dones"][()]) == [0, 0, 0, 0, 0, 1]
        assert np.all(np.abs(demo["actions"][()]) <= 1.0)
        assert demo["actions"][0, 6] == -1.0  # gripper open while approaching
        assert [n.decode() for n in f["mask/train"][()]] == ["demo_0"]


@pytest.mark.sim
def test_dataset_info_prints_summary(demo_file):
    buf = io.StringIO()
    summary = dataset_info.summarize(demo_file, out=buf)
    text = buf.getvalue()
    assert summary["num_demos"] == 1 and summary["total_samples"] == 6
    assert "total demos: 1" in text and "obs/agentview_rgb: shape (6, 32, 32, 3), dtype uint8" in text
    assert "task 3:" in text and "filter keys" in text
    assert dataset_info.main([str(demo_file)]) == 0


def test_dataset_info_rejects_missing_file(tmp_path, capsys):
    assert dataset_info.main([str(tmp_path / "missing.hdf5")]) == 1
    assert "no such file" in capsys.readouterr().err


@pytest.mark.sim
def test_demo_file_passes_the_leak_check(demo_file):
    report = check_demo_files([demo_file])
    assert report["check"] == "passed" and report["sources"] == {"tiny.hdf5:demo_0": "fresh:7"}


@pytest.mark.sim
def test_shards_resume_where_a_run_stopped(tmp_path):
    out = tmp_path / "s.hdf5"
    argv = ["--out", str(out), "--tasks", "3", "--init-states", "fresh:4-5", "--workers", "1", "--image-size",
            str(SIZE), "--max-steps", "3", "--keep-failures", "--shard-episodes", "1"]  # fmt: skip
    assert demos.main(argv) == 0
    first, second = tmp_path / "s-000.hdf5", tmp_path / "s-001.hdf5"
    assert demos.shard_complete(first) and demos.shard_complete(second)
    with h5py.File(second, "r") as f:
        expected = f["data/demo_0/init_sim_state"][()]
    second.unlink()  # as if the run had been killed while writing it
    stamp = first.stat().st_mtime_ns
    with pytest.raises(SystemExit):  # existing shards: --resume or --overwrite
        demos.main(argv)
    assert demos.main([*argv, "--resume"]) == 0
    assert first.stat().st_mtime_ns == stamp  # kept, not recorded again
    with h5py.File(second, "r") as f:
        assert f["data/demo_0"].attrs["init_source"] == "fresh:5"
        np.testing.assert_array_equal(f["data/demo_0/init_sim_state"][()], expected)


def test_demos_config_validation(tmp_path):
    with pytest.raises(ValueError, match=r"valid: 0\.\.49"):
        demos.DemosConfig(out=tmp_path / "x.hdf5", init_states="45-55", allow_benchmark_states=True)
    with pytest.raises(ValueError, match="benchmark initial states, the evaluation set"):
        demos.DemosConfig(out=tmp_path / "x.hdf5", init_states="5-24")
    assert demos.DemosConfig(
        out=tmp_path / "x.hdf5", init_states="5-6", allow_benchmark_states=True
    ).init_ids == [5, 6]
    with pytest.raises(ValueError, match="--resume needs --shard-episodes"):
        demos.DemosConfig(out=tmp_path / "x.hdf5", resume=True)
    existing = tmp_path / "exists.hdf5"
    existing.write_bytes(b"")
    with pytest.raises(ValueError, match="--overwrite"):
        demos.DemosConfig(out=existing)
    assert demos.DemosConfig(out=tmp_path / "y.hdf5").keep_failures is False


def test_a_crashing_episode_is_counted_and_the_run_goes_on(tmp_path, monkeypatch):
    def broken(cfg, init_state, action_noise=0.0):
        raise RuntimeError(f"simulator fell over at {init_state}")

    monkeypatch.setattr(demos, "record_episode", broken)
    out = tmp_path / "e.hdf5"
    argv = ["--out", str(out), "--tasks", "3", "--init-states", "fresh:0-1", "--workers", "1"]
    assert demos.main(argv) == 0
    with h5py.File(out, "r") as f:
        data = f["data"]
        assert data.attrs["num_errors"] == 2 and data.attrs["num_demos"] == 0
        assert not data.attrs["complete"]  # so that --resume records it again
        errors = json.loads(data.attrs["errors"])
        assert errors[1] == {
            "task_id": 3,
            "init_state": "fresh:1",
            "error": "RuntimeError: simulator fell over at fresh:1",
        }


def test_action_noise_is_checked_and_reaches_every_job(tmp_path):
    with pytest.raises(ValueError, match="action_noise"):
        demos.DemosConfig(out=tmp_path / "n.hdf5", action_noise=1.5)
    cfg = demos.DemosConfig(out=tmp_path / "n.hdf5", tasks="0-1", init_states="fresh:0-2", action_noise=0.1)
    jobs = demos.plan_jobs(cfg)
    assert len(jobs) == 6 and {noise for _, _, noise in jobs} == {0.1}
