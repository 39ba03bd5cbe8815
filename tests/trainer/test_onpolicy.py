"""On-policy observations: packing streamed frames, splitting by initial state, VLA fine-tuning on them
and relabeling them for a draft (trainer.pack_onpolicy, load_keyed(val_inits), train_vla --onpolicy,
fit_draft --observations)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.archive import ArchiveWriter
from common.init_states import BenchmarkStateLeak
from common.schedule import INIT_STATES, parse_range
from tests.stream_helpers import streamed_episode
from trainer.pairs import load_keyed

SIDE = 64  # the embedded VLA's input size: packing keeps these frames as they are


def _write_archive(path, policy, episodes, with_obs=True, pid="p0"):
    """episodes: (episode_id, split, n) under a schedule of tasks [0, 1] x 3 initial states from 5."""
    rng = np.random.default_rng(len(str(path)))
    w = ArchiveWriter(path, policy.shape)
    cfg = {"tasks": [0, 1], "episodes_per_task": 3, "first_init_state": 5, "replan": 8, "sample_every": 0}
    w.set_provenance(backbone_id=policy.backbone_id, hidden_dim=policy.hidden_dim, codec_sha256="",
                     producer_id=pid, producer_config=json.dumps({"producer": cfg}))  # fmt: skip
    for i, split, n in episodes:  # task i // 3
        steps = [8 * j for j in range(n)]
        w.write_episode(
            streamed_episode(policy, pid, i // 3, i, split, steps, rng, obs_side=SIDE if with_obs else 0)
        )
    del w


@pytest.fixture(scope="module")
def policy():
    from evaluator.eval import load_eval_policy

    return load_eval_policy("embedded")


def test_initial_state_ranges():
    assert parse_range("40-42", INIT_STATES, "initial state") == [40, 41, 42]
    assert parse_range("3, 7,10-11", INIT_STATES, "initial state") == [3, 7, 10, 11]
    for bad in ("", "x", "5-3", "-1", "45-50"):
        with pytest.raises(ValueError):
            parse_range(bad, INIT_STATES, "initial state")


def test_load_keyed_splits_by_initial_state(tmp_path, policy):
    # episodes 0-2: task 0 init 5-7; 3-5: task 1 init 5-7; the trainer held out episode 1
    _write_archive(
        tmp_path / "a.hdf5", policy, [(i, "valid" if i == 1 else "train", 2) for i in range(6)], False
    )
    sp = load_keyed([tmp_path / "a.hdf5"])
    assert (sp.train_episodes, sp.valid_episodes) == (5, 1)
    sp = load_keyed([tmp_path / "a.hdf5"], val_inits={7})  # init 7 of both tasks, whatever the trainer said
    assert (sp.train_episodes, sp.valid_episodes) == (4, 2) and len(sp.valid_hidden) == 4
    own_h, own_c = sp.per_archive_valid[str(tmp_path / "a.hdf5")]  # the archive's own held-out acting queries
    np.testing.assert_array_equal(own_h, sp.valid_hidden)
    assert len(own_c) == 4


def test_pack_onpolicy_keeps_frames_codes_and_keys(tmp_path, policy):
    from common.archive import iter_episodes
    from common.packed import unpack
    from trainer.pack_onpolicy import main

    _write_archive(tmp_path / "a.hdf5", policy, [(0, "train", 3), (4, "valid", 2)])
    _write_archive(
        tmp_path / "b.hdf5", policy, [(0, "train", 3)], pid="p1"
    )  # a second copy of one trajectory
    _write_archive(
        tmp_path / "c.hdf5", policy, [(1, "train", 2)], with_obs=False, pid="p2"
    )  # nothing to pack
    out = tmp_path / "onp.npz"
    main(["--archives", str(tmp_path / "a.hdf5"), str(tmp_path / "b.hdf5"), str(tmp_path / "c.hdf5"),
          "--out", str(out)])  # fmt: skip
    d = unpack(out)
    assert d["images"].shape == (5, 2, SIDE, SIDE, 3) and d["codes"].shape == (5, *policy.shape.codes_shape)
    assert d["init_of_episode"].tolist() == [5, 6] and d["task_of_episode"].tolist() == [0, 1]
    assert str(d["backbone"]) == policy.backbone_id
    eps = list(iter_episodes(tmp_path / "a.hdf5", with_obs=True))
    np.testing.assert_array_equal(d["codes"][:3], eps[0].codes)
    np.testing.assert_array_equal(d["images"][:3, 0], eps[0].obs["agentview"])  # lossless, same size
    np.testing.assert_array_equal(d["images"][3:, 1], eps[1].obs["wrist"])
    np.testing.assert_allclose(d["proprio"][3:], eps[1].obs["proprio"])
    assert "bowl" in str(d["instruction_of_episode"][0])  # the task's instruction from LIBERO
    with pytest.raises(ValueError, match="--send-obs"):
        main(["--archives", str(tmp_path / "c.hdf5"), "--out", str(tmp_path / "none.npz")])


def test_fit_draft_relabels_observations_and_validates_on_held_out_initial_states(tmp_path, policy):
    from tests.evaluator.test_eval import _write_demos
    from trainer.fit_draft import main

    _write_demos(tmp_path / "d.hdf5", (4, 3, 5))
    _write_archive(tmp_path / "a.hdf5", policy, [(0, "train", 3), (1, "train", 2), (3, "train", 4)])
    from trainer.pack_onpolicy import main as pack_main

    pack_main(["--archives", str(tmp_path / "a.hdf5"), "--out", str(tmp_path / "onp.npz")])
    out = tmp_path / "draft.pt"
    args = ["--demos", str(tmp_path / "d.hdf5"), "--out", str(out), "--epochs", "1", "--batch-size", "4",
            "--draft-hidden-dim", "32", "--observations", str(tmp_path / "onp.npz")]  # fmt: skip
    with pytest.raises(ValueError, match="--val-inits"):
        main(args)
    main([*args, "--val-inits", "6"])
    s = json.loads(out.with_suffix(".json").read_text())
    # init 5 of tasks 0 and 1 (3 + 4 frames) trained on, init 6 (2 frames) is the validation set
    assert s["observed_train_pairs"] == 7 and s["valid_frames"] == 2
    assert s["validation"] == "held-out on-policy frames" and "demo_val_acc_per_layer" in s["history"][0]
    # with archives the on-policy validation comes from them, split the same way
    main([*args, "--val-inits", "6", "--archives", str(tmp_path / "a.hdf5")])
    s = json.loads(out.with_suffix(".json").read_text())
    assert s["streamed_train_pairs"] == 7 and s["valid_frames"] == 2 and s["observed_train_pairs"] == 7


def test_train_vla_onpolicy_term(tmp_path, policy):
    """A few fine-tuning steps from the shipped weights with an on-policy batch per step; the held-out
    on-policy figures (readout agreement, same codes as streamed, action change) are reported."""
    from common.demos import read_demos
    from common.packed import pack
    from tests.evaluator.test_eval import _write_demos
    from trainer.pack_onpolicy import main as pack_main
    from trainer.train_vla import main

    _write_demos(tmp_path / "d.hdf5", (4, 3, 5, 4))
    pack(read_demos([tmp_path / "d.hdf5"], SIDE), tmp_path / "d.npz", 0)
    _write_archive(tmp_path / "a.hdf5", policy, [(0, "train", 3), (1, "train", 2), (3, "train", 4)])
    pack_main(["--archives", str(tmp_path / "a.hdf5"), "--out", str(tmp_path / "onp.npz")])
    out = tmp_path / "vla"
    base = ["--packed", str(tmp_path / "d.npz"), "--out-dir", str(out), "--init-from", "assets/embedded_vla",
            "--steps", "2", "--eval-interval", "2", "--batch-size", "4", "--val-every", "2",
            "--free-running-samples", "4", "--consistency-weight", "4", "--onpolicy", str(tmp_path / "onp.npz")]  # fmt: skip
    # the producer's episodes start from benchmark initial states: refused unless explicitly allowed
    with pytest.raises(BenchmarkStateLeak, match="on-policy frames"):
        main([*base, "--onpolicy-val-inits", "6"])
    base.append("--allow-benchmark-states")
    with pytest.raises(ValueError, match="held-out initial state"):
        main([*base, "--onpolicy-val-inits", "5-6"])
    main([*base, "--onpolicy-val-inits", "6"])
    metrics = json.loads((out / "metrics.json").read_text())
    ev = metrics["shipped_held_out"]
    assert ev["onpolicy_frames"] == 2 and len(ev["onpolicy_aux_agreement"]) == 3
    assert len(ev["onpolicy_same_codes"]) == policy.shape.num_layers and ev["onpolicy_arm_change"] >= 0
