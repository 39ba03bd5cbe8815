"""make eval: open-loop recording over episodes, summaries, eval.json + report + plots."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from common.draft import RFSQDraftModelWithProjection, save_checkpoint
from common.policy import Observation
from evaluator import eval as ev


class FakeEnv:
    """A stand-in episode env: random images, finishes after ``length`` steps (no simulator)."""

    def __init__(self, task_id: int, length: int = 20):
        self.rng = np.random.default_rng(task_id)
        self.length, self.t = length, 0

    def _obs(self) -> Observation:
        return Observation(
            agentview=self.rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
            wrist=self.rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
            proprio=self.rng.standard_normal(8).astype(np.float32),
            instruction="put the bowl on the plate",
        )

    def reset(self, init_state: int | None = None) -> Observation:
        self.t = 0
        return self._obs()

    def step(self, action: np.ndarray, observe: bool = True):
        assert action.shape == (7,) and np.isfinite(action).all()
        self.t += 1
        done = self.t >= self.length
        return (self._obs() if observe else None), 0.0, done, {"success": done}

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def draft_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = RFSQDraftModelWithProjection(input_dim=64, hidden_dim=64, num_coarse_layers=3)
    path = tmp_path_factory.mktemp("draft") / "draft.pt"
    return save_checkpoint(
        path, model, None, epoch=0, val_accuracy=0.0, config={"note": "untrained test draft"}
    )


def make_cfg(draft: Path, out: Path, **kw) -> ev.EvalConfig:
    return ev.EvalConfig(
        draft=draft,
        out_dir=out,
        closed_loop=False,
        policy="twin-tiny",
        sweep_tau=[1.0],
        sweep_confidence=[0.5],
        sweep_max_proposals=[2],
        warmup=1,
        **kw,
    )


def test_open_loop_eval_writes_json_report_and_plots(draft_ckpt, tmp_path):
    torch.set_num_threads(1)
    cfg = make_cfg(draft_ckpt, tmp_path)
    policy = ev.load_eval_policy("twin-tiny")
    proposer, info = ev.load_draft(draft_ckpt, policy)
    rec = ev.OpenLoopRecorder(policy, proposer, cfg.arms(proposer.num_layers), cfg.warmup)
    episodes = ev.run_open_loop(rec, [(0, 0), (1, 0)], lambda t, i: FakeEnv(t))
    assert len(episodes) == 2 and rec.chunks == 2 * 3 - cfg.warmup  # 20 steps / 8 per chunk = 3 queries each
    result = ev.build_result(cfg, policy, info, rec, episodes, wall_s=1.0)
    ev.write_outputs(result, tmp_path)

    loaded = json.loads((tmp_path / "eval.json").read_text())
    n = loaded["chunks"]
    for name, arm in loaded["arms"].items():
        assert sum(arm["j_histogram"]) == n, name  # the j histogram sums to the number of chunks
        assert len(loaded["per_chunk"][name]["latency_ms"]) == n
    strict = loaded["rsd"]["strict"]
    assert strict["identical_fraction"] == 1.0  # strict decoding reproduces the baseline's codes
    assert strict["action_deviation"]["max_abs_max"] == 0.0
    assert len(strict["j_histogram"]) == 4  # j = 0..K with K = 3
    assert len(loaded["arms"]["strict_k2"]["j_histogram"]) == 3  # at most 2 proposed layers
    # relaxed with tau = 1 accepts exactly what strict accepts, chunk by chunk
    assert loaded["per_chunk"]["relaxed_tau1"]["accepted"] == loaded["per_chunk"]["rsd_strict"]["accepted"]
    assert loaded["arms"]["relaxed_tau1"]["identical_fraction"] == 1.0
    assert len(loaded["draft_accuracy"]["token_per_layer"]) == 3
    for f in ("report.md", "latency.png", "acceptance.png", "accuracy.png", "tradeoff.png"):
        assert (tmp_path / f).stat().st_size > 0, f
    md = (tmp_path / "report.md").read_text()
    assert "random weights" in md and "rsd_strict" in md


def test_summarize_arm_histogram_and_speedup():
    base = ev.ArmLog(latency_ms=[10.0, 10.0, 10.0, 10.0], accepted=[0] * 4, proposed=[0] * 4, passes=[9] * 4)
    arm = ev.ArmLog(
        latency_ms=[5.0, 5.0, 10.0, 5.0], accepted=[3, 3, 0, 2], proposed=[3] * 4, passes=[6, 6, 9, 7]
    )
    for lg in (base, arm):
        lg.dev_max, lg.dev_mean, lg.identical = [0.0] * 4, [0.0] * 4, [True] * 4
    s = ev.summarize_arm(arm, base, max_j=3)
    assert s["j_histogram"] == [1, 0, 1, 2] and sum(s["j_histogram"]) == 4
    assert s["speedup_median"] == pytest.approx(2.0)
    assert s["mean_passes"] == pytest.approx(7.0)


def test_config_validation(draft_ckpt, tmp_path):
    with pytest.raises(ValueError, match="closed-loop"):
        ev.EvalConfig(draft=draft_ckpt, out_dir=tmp_path, policy="twin-tiny")
    with pytest.raises(ValueError, match="tau"):
        make_cfg(draft_ckpt, tmp_path, tau=1.5)


def test_draft_shape_mismatch_is_rejected(tmp_path):
    model = RFSQDraftModelWithProjection(input_dim=32, hidden_dim=64)
    path = save_checkpoint(tmp_path / "d.pt", model, None, epoch=0, val_accuracy=0.0, config={})
    with pytest.raises(ValueError, match="hidden states of size 32"):
        ev.load_draft(path, ev.load_eval_policy("twin-tiny"))


@pytest.mark.slow
@pytest.mark.sim
def test_eval_on_libero_with_random_embedded_vla(tmp_path):
    """A few real LIBERO chunks through the whole command (random-weight policy: plumbing only)."""
    pytest.importorskip("libero")
    os.environ.setdefault("MUJOCO_GL", "egl")
    from common.vla import load_policy

    policy = load_policy("embedded", allow_random=True)
    model = RFSQDraftModelWithProjection(input_dim=policy.hidden_dim, hidden_dim=64, num_coarse_layers=3)
    ckpt = save_checkpoint(tmp_path / "d.pt", model, None, epoch=0, val_accuracy=0.0, config={})
    ev.main(
        [
            "--draft", str(ckpt), "--out-dir", str(tmp_path / "out"), "--no-closed-loop", "--allow-random",
            "--tasks", "0", "--max-chunks", "4", "--warmup", "1", "--max-steps", "40",
        ]
    )  # fmt: skip
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert result["chunks"] == 4
    assert result["rsd"]["strict"]["identical_fraction"] == 1.0


def test_fit_draft_reads_demonstration_frames(tmp_path):
    import h5py

    from evaluator.fit_draft import demo_observations

    path = tmp_path / "demos.hdf5"
    with h5py.File(path, "w") as f:
        for i, n in enumerate((5, 3)):
            g = f.create_group(f"data/demo_{i}")
            g.attrs["num_samples"], g.attrs["instruction"] = n, f"task {i}"
            g["obs/agentview_rgb"] = np.full((n, 16, 16, 3), i, np.uint8)
            g["obs/eye_in_hand_rgb"] = np.zeros((n, 16, 16, 3), np.uint8)
            g["obs/ee_states"] = np.arange(n * 6, dtype=np.float64).reshape(n, 6)
            g["obs/gripper_states"] = np.ones((n, 2))
    episodes = demo_observations(path, stride=2)
    assert [len(frames) for _, frames in episodes] == [3, 2]
    obs = episodes[0][1][1]  # demo_0, frame 2
    assert obs.instruction == "task 0" and obs.proprio.dtype == np.float32
    assert np.allclose(obs.proprio, [12, 13, 14, 15, 16, 17, 1, 1])
