"""make eval: open-loop recording over episodes, summaries, eval.json + report + plots."""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from common.draft import RFSQDraftModelWithProjection, save_checkpoint
from common.policy import Observation
from evaluator import closed_loop
from evaluator import eval as ev
from evaluator.fleet_arms import build_act, rsd_config
from evaluator.frontier import _success
from evaluator.protocol import ProtocolMismatch
from evaluator.report import _closed_loop as _closed_loop_lines
from evaluator.rsd import RSDEngine
from tests.fleet_fakes import make_fake_env
from tests.init_helpers import record_fresh_start


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


def make_cfg(draft: Path, out: Path, **kw) -> ev.EvalConfig:
    base = dict(
        closed_loop=False,
        policy="twin-tiny",
        sweep_tau=[1.0],
        sweep_confidence=[0.5],
        sweep_max_proposals=[2],
        warmup=1,
    )
    return ev.EvalConfig(draft=draft, out_dir=out, **{**base, **kw})


def test_open_loop_eval_writes_json_report_and_plots(draft_ckpt, tmp_path):
    torch.set_num_threads(1)
    cfg = make_cfg(draft_ckpt, tmp_path, decode_layers=4)
    policy = ev.load_eval_policy("twin-tiny", decode_layers=4)
    proposer, info = ev.load_draft(draft_ckpt, policy)
    rec = ev.OpenLoopRecorder(policy, proposer, cfg.arms(proposer.num_layers, 8, 4), cfg.warmup)
    episodes = ev.run_open_loop(rec, [(0, 0), (1, 0)], lambda t, i: FakeEnv(t))
    assert len(episodes) == 2 and rec.chunks == 2 * 3 - cfg.warmup  # 20 steps / 8 per chunk = 3 queries each
    result = ev.build_result(cfg, policy, info, rec, episodes, wall_s=1.0)
    ev.write_outputs(result, tmp_path)

    loaded = json.loads((tmp_path / "eval.json").read_text())
    n = loaded["chunks"]
    assert loaded["meta"]["decode_layers"] == 4
    for name, arm in loaded["arms"].items():
        assert sum(arm["j_histogram"]) == n, name  # the j histogram sums to the number of chunks
        assert len(loaded["per_chunk"][name]["latency_ms"]) == n
    strict = loaded["arms"]["strict"]
    assert strict["identical_fraction"] == 1.0  # strict decoding reproduces the baseline's codes
    assert strict["action_deviation"]["max_abs_max"] == 0.0 and strict["lossless"]
    assert len(strict["j_histogram"]) == 4  # j = 0..min(K, D - 1) with K = 3, D = 4
    assert len(loaded["arms"]["strict-k2"]["j_histogram"]) == 3  # at most 2 proposed layers
    # relaxed with tau = 1 accepts exactly what strict accepts, chunk by chunk
    assert loaded["per_chunk"]["relaxed-tau1"]["accepted"] == loaded["per_chunk"]["strict"]["accepted"]
    assert loaded["arms"]["relaxed-tau1"]["identical_fraction"] == 1.0
    # truncated decoding at every k; k = D is the baseline's own decoding, k = L the full one
    assert [f"truncate-k{k}" in loaded["arms"] for k in range(1, 9)] == [True] * 8
    assert loaded["arms"]["truncate-k4"]["identical_fraction"] == 1.0
    assert loaded["arms"]["truncate-k8"]["vs_full_decoding"]["mean_abs"] == 0.0
    assert (
        loaded["arms"]["truncate-k2"]["mean_passes"] == 3 and loaded["arms"]["baseline"]["mean_passes"] == 5
    )
    assert len(loaded["draft_accuracy"]["token_per_layer"]) == 3
    assert len(loaded["tree_verification"]["ranks"]) == n
    for f in ("report.md", "latency.png", "acceptance.png", "accuracy.png", "frontier.png"):
        assert (tmp_path / f).stat().st_size > 0, f
    md = (tmp_path / "report.md").read_text()
    assert "random weights" in md and "`strict`" in md and "Lossless (strict) RSD" in md
    # every arm has a frontier verdict; references have none
    verdicts = {r["arm"]: r for r in loaded["frontier"]}
    assert verdicts["truncate-k2"]["win"] is None and isinstance(verdicts["relaxed"]["win"], bool)


def test_unverified_arm_is_labelled_in_eval_json_and_report(draft_ckpt, tmp_path):
    """Draft substitution (the old tau = 0) is never presented as speculative decoding."""
    cfg = make_cfg(draft_ckpt, tmp_path)
    policy = ev.load_eval_policy("twin-tiny")
    proposer, info = ev.load_draft(draft_ckpt, policy)
    rec = ev.OpenLoopRecorder(policy, proposer, cfg.arms(proposer.num_layers), cfg.warmup)
    ev.run_open_loop(rec, [(0, 0)], lambda t, i: FakeEnv(t))
    ev.write_outputs(ev.build_result(cfg, policy, info, rec, [], wall_s=1.0), tmp_path)
    loaded = json.loads((tmp_path / "eval.json").read_text())
    sub = loaded["arms"]["draft-substitution"]
    assert sub["kind"] == "substitution" and sub["verified"] is False and sub["speculative_decoding"] is False
    assert "UNVERIFIED" in sub["label"] and "not speculative decoding" in sub["label"]
    assert sub["mean_j"] == sub["mean_proposed"] == 3  # every drafted layer taken
    assert loaded["meta"]["arms"]["draft-substitution"]["verified"] is False
    for name, arm in loaded["arms"].items():
        if arm["speculative_decoding"]:
            assert arm["verified"] is True and arm["kind"] in ("strict", "relaxed"), name
        if arm["kind"] == "relaxed":
            assert arm["rsd"]["acceptance"]["tau"] > 0, name
    md = (tmp_path / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| `draft-substitution` | substitution"))
    assert "UNVERIFIED" in row
    assert "`draft-substitution` is **unverified**" in md and "not speculative decoding" in md


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
    with pytest.raises(ValueError, match="draft substitution"):  # tau = 0 verifies nothing
        make_cfg(draft_ckpt, tmp_path, tau=0.0)
    with pytest.raises(ValueError, match="draft substitution"):
        make_cfg(draft_ckpt, tmp_path, sweep_tau=[0.0])
    with pytest.raises(ValueError, match="closed_loop_arms"):
        make_cfg(draft_ckpt, tmp_path, closed_loop_arms=["rsd_relaxed"])
    assert make_cfg(draft_ckpt, tmp_path, closed_loop_arms=["truncate-k2", "draft-substitution"])


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
    assert result["arms"]["strict"]["identical_fraction"] == 1.0


def _write_demos(path, lengths, size=64):
    import h5py

    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        for i, n in enumerate(lengths):
            g = f.create_group(f"data/demo_{i}")
            g.attrs["num_samples"] = n
            g.attrs["instruction"] = "pick up the bowl" if i % 2 else "put the black bowl on the plate now"
            g["actions"] = rng.uniform(-1, 1, (n, 7)).astype(np.float32)
            g["obs/agentview_rgb"] = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
            g["obs/eye_in_hand_rgb"] = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
            g["obs/ee_states"] = rng.normal(size=(n, 6))
            g["obs/gripper_states"] = rng.normal(size=(n, 2)) * 0.02
            record_fresh_start(g, i)


def test_fit_draft_batched_extraction_equals_run_time_decoding(tmp_path):
    """Distillation pairs are exactly what the policy computes at run time, one observation at a time."""
    import torch

    from common.demos import read_demos
    from common.policy import Observation
    from evaluator.eval import load_eval_policy
    from trainer.distill_pairs import extract

    _write_demos(tmp_path / "d.hdf5", (3, 4))
    policy = load_eval_policy("embedded")
    data = read_demos([tmp_path / "d.hdf5"], policy.model.config.image_size)
    rows = np.arange(len(data["episode"]))[::-1].copy()  # any order, instructions interleaved
    hidden, codes, probs = extract(policy, data, rows, batch=3, soft_layers=2)
    # the soft targets are the policy's own distributions: their argmax is its code
    assert probs.shape == (len(rows), 2, 128, 7) and np.allclose(
        probs.astype(np.float32).sum(-1), 1, atol=1e-2
    )
    first = codes[..., :2].transpose(0, 3, 1, 2).reshape(len(rows), 2, 128, 1).astype(np.int64)
    assert np.array_equal(np.take_along_axis(probs, first, -1)[..., 0], probs.max(-1))  # float16 ties allowed
    for k, r in enumerate(rows):
        e = data["episode"][r]
        obs = Observation(agentview=data["images"][r, 0], wrist=data["images"][r, 1], proprio=data["proprio"][r],
                          instruction=str(data["instruction_of_episode"][e]))  # fmt: skip
        state = policy.prefix([obs])
        ref = policy.decode_sequential(state)[0].to(torch.uint8).numpy()
        assert np.array_equal(codes[k], ref)
        assert np.allclose(hidden[k], state.hidden[0].float().numpy(), atol=1e-4)


def test_fit_draft_end_to_end_with_augmented_views(tmp_path):
    import torch

    from common.draft import load_checkpoint
    from trainer.fit_draft import main

    _write_demos(tmp_path / "d.hdf5", (4, 3, 5, 2))
    out = tmp_path / "draft.pt"
    main(["--demos", str(tmp_path / "d.hdf5"), "--out", str(out), "--augment", "2", "--epochs", "2",
          "--val-fraction", "0.25", "--batch-size", "4", "--draft-hidden-dim", "32", "--cache", str(tmp_path / "c.npz")])  # fmt: skip
    summary = json.loads(out.with_suffix(".json").read_text())
    held_out = summary["valid_frames"]
    assert summary["train_pairs"] == 3 * (14 - held_out)  # every training frame + 2 shifted views
    model, ckpt = load_checkpoint(out)
    assert ckpt["val_accuracy"] == summary["best_val_accuracy"] and model.num_coarse_layers == 3
    z = np.load(tmp_path / "c.npz")
    assert (z["view"] > 0).sum() == 2 * (14 - held_out) and z["hidden"].dtype == np.float32
    # the shifted views are new inputs: their codes or hidden states differ from the unshifted frame's
    assert not np.allclose(z["hidden"][z["view"] == 1], z["hidden"][z["view"] == 0][: (z["view"] == 1).sum()])
    # reuse of the cache with fewer views
    main(["--demos", str(tmp_path / "d.hdf5"), "--out", str(out), "--augment", "1", "--epochs", "1",
          "--val-fraction", "0.25", "--batch-size", "4", "--draft-hidden-dim", "32", "--cache", str(tmp_path / "c.npz")])  # fmt: skip
    assert json.loads(out.with_suffix(".json").read_text())["train_pairs"] == 2 * (14 - held_out)
    assert torch.load(out, weights_only=True)["config"]["run"]["augment"] == 1
    with pytest.raises(ValueError, match="no policy probabilities"):  # cache made without soft targets
        main(["--demos", str(tmp_path / "d.hdf5"), "--out", str(out), "--soft-weight", "0.5", "--cache", str(tmp_path / "c.npz")])  # fmt: skip
    # knowledge distillation from the policy's probabilities, slim checkpoint, then scoring on this machine
    main(["--demos", str(tmp_path / "d.hdf5"), "--out", str(out), "--augment", "1", "--epochs", "1", "--soft-weight", "0.5",
          "--slim", "--val-fraction", "0.25", "--batch-size", "4", "--draft-hidden-dim", "32"])  # fmt: skip
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["optimizer_state_dict"] == {} and ckpt["config"]["run"]["soft_weight"] == 0.5
    main(["--demos", str(tmp_path / "d.hdf5"), "--evaluate", str(out), "--out", str(tmp_path / "score.json")])
    score = json.loads((tmp_path / "score.json").read_text())
    assert score["valid_frames"] == held_out
    assert score["val_accuracy"] == pytest.approx(ckpt["val_accuracy"], abs=1e-6)  # same machine, same figure


def test_fit_draft_rejects_bad_inputs(tmp_path):
    from trainer.fit_draft import FitDraftConfig

    with pytest.raises(ValueError, match="either --demos"):
        FitDraftConfig(out=tmp_path / "x.pt")
    with pytest.raises(ValueError, match="does not exist"):
        FitDraftConfig(out=tmp_path / "x.pt", demos=[tmp_path / "missing.hdf5"])
    with pytest.raises(ValueError, match="augment"):
        FitDraftConfig(out=tmp_path / "x.pt", packed=tmp_path / "missing.npz", augment=-1)
    (tmp_path / "d.hdf5").touch()
    with pytest.raises(ValueError, match="draft checkpoint .* does not exist"):
        FitDraftConfig(out=tmp_path / "s.json", demos=[tmp_path / "d.hdf5"], evaluate=tmp_path / "none.pt")


def test_fit_draft_trains_on_streamed_archives_and_validates_on_their_held_out_episodes(tmp_path):
    """Streamed (on-policy) pairs join the distillation pairs; the archive's held-out episodes are the
    validation set; an archive of another backbone is refused."""
    from common.archive import ArchiveWriter
    from evaluator.eval import load_eval_policy
    from tests.stream_helpers import streamed_episode
    from trainer.fit_draft import main

    _write_demos(tmp_path / "d.hdf5", (4, 3, 5))
    policy = load_eval_policy("embedded")

    def write_archive(path, backbone):
        w = ArchiveWriter(path, policy.shape)
        w.set_provenance(backbone_id=backbone, hidden_dim=policy.hidden_dim, codec_sha256="",
                         producer_id="p0", producer_config="{}")  # fmt: skip
        rng = np.random.default_rng(0)
        for i, (split, n) in enumerate((("train", 3), ("valid", 2), ("train", 4))):
            w.write_episode(streamed_episode(policy, "p0", 0, i, split, [8 * j for j in range(n)], rng))
        del w

    write_archive(tmp_path / "a.hdf5", policy.backbone_id)
    out = tmp_path / "draft.pt"
    args = ["--demos", str(tmp_path / "d.hdf5"), "--out", str(out), "--epochs", "2", "--val-fraction", "0.34",
            "--batch-size", "4", "--draft-hidden-dim", "32", "--soft-weight", "0.5"]  # fmt: skip
    main([*args, "--archives", str(tmp_path / "a.hdf5")])
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["validation"] == "held-out streamed episodes" and summary["valid_frames"] == 2
    assert summary["streamed_train_pairs"] == 7
    assert summary["train_pairs"] - 7 in (12 - 3, 12 - 4, 12 - 5)  # the demonstrations less one held out
    assert len(summary["history"][0]["demo_val_acc_per_layer"]) == 3
    write_archive(tmp_path / "b.hdf5", "embedded-vla@another")
    with pytest.raises(ValueError, match="holds embedded-vla@another"):
        main([*args, "--archives", str(tmp_path / "b.hdf5")])


def test_fit_draft_keys_trajectories_across_archives(tmp_path):
    """Archives of one policy share trajectories (deterministic sim and policy): a trajectory held out in
    one archive is never trained on from another, the copy with the most queries is used, and the
    validation set holds the acting queries only (observing queries of --sample-every tracked aside)."""
    from common.archive import ArchiveWriter
    from evaluator.eval import load_eval_policy
    from tests.stream_helpers import streamed_episode
    from trainer.fit_draft import main
    from trainer.pairs import load_keyed

    _write_demos(tmp_path / "d.hdf5", (4, 3, 5))
    policy = load_eval_policy("embedded")
    rng = np.random.default_rng(0)

    def write_archive(path, pid, sample_every, episodes):
        w = ArchiveWriter(path, policy.shape)
        cfg = {
            "tasks": [0],
            "episodes_per_task": 3,
            "first_init_state": 5,
            "replan": 8,
            "sample_every": sample_every,
        }
        w.set_provenance(backbone_id=policy.backbone_id, hidden_dim=policy.hidden_dim, codec_sha256="",
                         producer_id=pid, producer_config=json.dumps({"producer": cfg}))  # fmt: skip
        for i, split, steps in episodes:
            w.write_episode(streamed_episode(policy, pid, 0, i, split, steps, rng, num_steps=16))
        del w

    # archive a (acting queries only): init states 5 (train), 6 (held out), 7 (train)
    write_archive(
        tmp_path / "a.hdf5",
        "p0",
        0,
        [(0, "train", [0, 8, 16]), (1, "valid", [0, 8]), (2, "train", [0, 8, 16, 24])],
    )
    # archive b (observing queries every 4 steps) streamed init 6 as a training episode and init 7 denser
    write_archive(
        tmp_path / "b.hdf5", "p1", 4, [(1, "train", [0, 4, 8, 12]), (2, "train", [0, 4, 8, 12, 16, 20])]
    )
    sp = load_keyed([tmp_path / "a.hdf5", tmp_path / "b.hdf5"])
    assert (sp.train_episodes, sp.valid_episodes, sp.dropped_duplicates) == (2, 1, 2)
    assert len(sp.train_hidden) == 3 + 6  # init 5 from a, the denser init 7 from b; init 6 never trained on
    assert len(sp.valid_hidden) == 2 and len(sp.valid_all_hidden) == 4  # b's copy: steps 0, 8 act
    out = tmp_path / "draft.pt"
    main(["--demos", str(tmp_path / "d.hdf5"), "--out", str(out), "--epochs", "1", "--batch-size", "4",
          "--draft-hidden-dim", "32", "--archives", str(tmp_path / "a.hdf5"), str(tmp_path / "b.hdf5")])  # fmt: skip
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["streamed_train_pairs"] == 9 and summary["valid_frames"] == 2
    assert len(summary["history"][0]["val_all_queries_acc_per_layer"]) == 3
    per_archive = summary["history"][0]["val_per_archive_acc_per_layer"]
    assert set(per_archive) == {str(tmp_path / "a.hdf5")}  # b holds nothing out


def test_closed_loop_worker_recipe_rebuilds_every_kind_of_arm(draft_ckpt):
    """The fleet's picklable recipe of each closed-loop arm decodes exactly as the open loop's arm does."""
    cfg = make_cfg(draft_ckpt, Path("unused"), closed_loop_arms=["relaxed", "baseline"])
    policy = ev.load_eval_policy("twin-tiny", decode_layers=4)
    proposer, _ = ev.load_draft(draft_ckpt, policy)
    arms = cfg.arms(proposer.num_layers, 8, 4)
    assert [s.name for s in ev.closed_loop_specs(cfg, arms, 4)] == ["baseline", "relaxed"]  # baseline first
    obs = FakeEnv(3).reset()
    for name in ("baseline", "truncate-k2", "strict", "relaxed", "draft-substitution"):
        arm = arms[name]
        spec = closed_loop.arm_spec(arm, policy="twin-tiny", draft=draft_ckpt, decode_layers=4,
                                    draft_forward=cfg.draft_forward)  # fmt: skip
        spec = pickle.loads(pickle.dumps(spec))
        assert spec.decoding == arm.kind and (spec.draft is not None) == arm.drafted, name
        rebuilt = rsd_config(spec)
        assert rebuilt == (None if arm.rsd is None else replace(arm.rsd, stage_timing=False)), name
        act = build_act(spec)
        ref = arm.decode(RSDEngine(policy, proposer if arm.drafted else None, arm.rsd), [obs])
        np.testing.assert_array_equal(act(obs), ref.actions[0].float().numpy(), err_msg=name)
    # --execute K: every arm hands the episode the first K actions of the same chunk
    cfg = make_cfg(draft_ckpt, Path("unused"), closed_loop_arms=["relaxed", "baseline"], execute=3)
    for spec in ev.closed_loop_specs(cfg, arms, 4):
        assert spec.params["execute"] == 3
        full = build_act(replace(spec, params={k: v for k, v in spec.params.items() if k != "execute"}))
        np.testing.assert_array_equal(build_act(spec)(obs), full(obs)[:3], err_msg=spec.name)


def test_closed_loop_runs_paired_resumable_and_reported_in_the_fleet(draft_ckpt, tmp_path):
    """make eval's closed loop: every arm on the same episodes in the fleet, the baseline first; strict
    (lossless) has the baseline's outcome on every pair; a rerun resumes; eval.json and report.md carry
    Wilson intervals, McNemar and the note that a small run is not the standard protocol."""
    cfg = make_cfg(draft_ckpt, tmp_path, decode_layers=4, tasks=[0, 1], closed_loop_init_states=[0, 1],
                   closed_loop_arms=["strict", "baseline", "truncate-k2"], max_steps=4, workers=1)  # fmt: skip
    policy = ev.load_eval_policy("twin-tiny", decode_layers=4)
    proposer, _ = ev.load_draft(draft_ckpt, policy)
    arms = cfg.arms(proposer.num_layers, 8, 4)
    cl, res = ev.run_closed_loop(cfg, arms, 4, env_factory=make_fake_env)
    assert res.complete and res.episodes_run == 12 and res.arm_names == ["baseline", "strict", "truncate-k2"]
    assert cl["episodes"] == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert cl["strict"]["success"] == cl["baseline"]["success"]  # lossless, paired on the same seeds
    cmp = cl["strict"]["vs_baseline"]
    assert cmp["pairs"] == 4 and cmp["baseline_only"] == cmp["arm_only"] == 0 and cmp["mcnemar_p"] == 1.0
    assert (
        cl["strict"]["mean_accepted"] <= cl["strict"]["mean_proposed"] and cl["baseline"]["mean_passes"] == 5
    )
    assert cl["truncate-k2"]["mean_passes"] == 3 and len(cl["baseline"]["wilson95"]) == 2
    assert not cl["protocol"]["protocol"]["standard"]
    again, res2 = ev.run_closed_loop(cfg, arms, 4, env_factory=make_fake_env)  # resumes: nothing to run
    assert res2.episodes_run == 0 and again["baseline"]["success"] == cl["baseline"]["success"]
    assert _success(cl, "strict") == cl["strict"]["success_rate"]  # what the frontier reads
    md = "\n".join(_closed_loop_lines({"closed_loop": cl}))
    assert "**Not the standard protocol**" in md and "McNemar p" in md and "Wilson 95 %" in md
    other = make_cfg(draft_ckpt, tmp_path, decode_layers=4, tasks=[0, 1], closed_loop_init_states=[0, 1],
                     closed_loop_arms=["baseline", "relaxed"], max_steps=4, workers=1)  # fmt: skip
    with pytest.raises(ProtocolMismatch, match="another results path"):  # other arms: refused, nothing lost
        ev.run_closed_loop(other, arms, 4, env_factory=make_fake_env)


def test_closed_loop_defaults_to_the_standard_protocol(draft_ckpt, tmp_path):
    cfg = ev.EvalConfig(draft=draft_ckpt, out_dir=tmp_path)
    assert cfg.tasks == list(range(10)) and cfg.closed_loop_init_states == list(range(50))
    with pytest.raises(ValueError, match="unknown initial states"):
        ev.EvalConfig(draft=draft_ckpt, out_dir=tmp_path, closed_loop_init_states=[50])
    with pytest.raises(ValueError, match="unknown task ids"):
        ev.EvalConfig(draft=draft_ckpt, out_dir=tmp_path, tasks=[10])


def test_execute_below_one_is_refused(draft_ckpt):
    with pytest.raises(ValueError, match="execute must be >= 1"):
        make_cfg(draft_ckpt, Path("unused"), execute=0)
