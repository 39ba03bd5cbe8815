"""The shipped embedded VLA: its weights load and act, they are the weights its record evaluated, and its
training record shows no benchmark initial state in the data of the VLA or the codec (issue 16)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from common.init_states import FRESH, parse_init
from common.policy import Observation
from common.vla import DEFAULT_CODEC_DIR, DEFAULT_EMBEDDED_DIR, load_policy
from tools import policy_record

RECORD = DEFAULT_EMBEDDED_DIR / "training_record.json"


@pytest.fixture(scope="module")
def record():
    return json.loads(RECORD.read_text())


def test_training_record_has_no_benchmark_state(record):
    starts = record["trained_on_starts"]
    assert record["fresh_only"] and record["trained_on_start_kinds"] == [FRESH]
    assert len(starts) == record["trained_on_episodes"] > 100
    assert all(parse_init(label)[0] == FRESH for label in starts.values())
    leak = record["leak_check_all_run_data"]
    assert leak["check"] == "passed"
    assert (
        leak["counts"]["benchmark"]
        == leak["counts"]["unrecorded"]
        == leak["counts"]["fresh_matching_benchmark"]
        == 0
    )
    assert leak["min_distance_m"] > 0.002  # nearest fresh scene to any benchmark scene (LEAK_TOL)
    # the VLA's and the codec's training files are among the leak-checked ones
    checked = set(leak["files"])
    assert set(record["trained_on_files"]) <= checked and set(record["codec_trained_on_files"]) <= checked
    cfg = json.loads((DEFAULT_EMBEDDED_DIR / "config.json").read_text())
    assert cfg["train"]["allow_benchmark_states"] is False
    assert sorted(p.rsplit("/", 1)[-1] for p in cfg["train"]["demos"]) == record["trained_on_files"]
    codec = json.loads((DEFAULT_CODEC_DIR / "codec.json").read_text())
    assert codec["train_config"]["allow_benchmark_states"] is False
    assert cfg["model"]["codec_sha256"] == codec["sha256"]


def test_new_weights_load_and_act(record):
    torch.set_num_threads(1)
    policy = load_policy("embedded")
    # the shipped weights are the ones the record's standard protocol ran
    evaluated = {b for p in record["protocol"] for arm in p["arms"].values() for b in arm.get("backbone", [])}
    assert policy.backbone_id in evaluated
    assert policy.decode_layers == 3 and policy.hidden_dim == record["train_config"]["hidden_size"]
    rng = np.random.default_rng(0)
    obs = Observation(
        agentview=rng.integers(0, 256, (128, 128, 3), dtype=np.uint8),
        wrist=rng.integers(0, 256, (128, 128, 3), dtype=np.uint8),
        proprio=np.array([-0.07, 0.06, 1.06, 2.6, 0.1, 0.0, 0.02, -0.02], np.float32),
        instruction="pick up the black bowl between the plate and the ramekin and place it on the plate",
    )
    a, b = policy.act([obs]), policy.act([obs])
    out = a[0]
    assert out.actions.shape == (8, 7) and np.isfinite(out.actions).all()
    assert np.abs(out.actions).max() <= 1.0 and set(np.unique(out.actions[:, -1])) <= {-1.0, 1.0}
    assert out.codes.shape == (8, 16, 8) and (out.codes[..., 3:] == 3).all()
    assert np.array_equal(out.codes, b[0].codes)  # deterministic


def test_policy_record_reads_a_pipeline_run(tmp_path, record):
    """tools.policy_record on a run folder laid out as scripts/policy_pipeline.sh leaves it."""
    run = tmp_path / "run"
    (run / "vla_b0").mkdir(parents=True)
    (run / "codec").mkdir()
    shutil.copy(DEFAULT_EMBEDDED_DIR / "config.json", run / "vla_b0" / "config.json")
    shutil.copy(DEFAULT_CODEC_DIR / "codec.json", run / "codec" / "codec.json")
    data = dict(record["leak_check_all_run_data"], sources=dict(record["trained_on_starts"], **{"dagger_b1.hdf5:demo_0": "fresh:2000"}))  # fmt: skip
    (run / "training_data.json").write_text(json.dumps(data))
    (run / "pick.json").write_text(json.dumps(record["size_pick"]))
    (run / "final_pick.json").write_text(json.dumps({"final": "vla_b0"}))
    rollout = {"config": {"init_states": "fresh:3000-3004"}, "policy": "p", "policy_success": {"overall": [3, 5], "per_task": {"0": [3, 5]}}}  # fmt: skip
    (run / "val_r0.json").write_text(json.dumps(rollout))
    (run / "pick_b.json").write_text(json.dumps(dict(rollout, config={"init_states": "fresh:2000-2004"})))
    report = {
        "date": "d",
        "protocol": {"standard": True},
        "arms": {"policy": {"successes": 1, "backbone": ["x"]}},
    }
    (run / "eval.json").write_text(json.dumps(report))
    paired = {"meta": {"decode_layers": 3}, "arms": {"open-loop": {}},
              "closed_loop": {"protocol": {"arms": {"baseline": {"successes": 2}, "relaxed": {"successes": 1}}}}}  # fmt: skip
    (run / "paired.json").write_text(json.dumps(paired))
    out = tmp_path / "record.json"
    policy_record.main(["--run", str(run), "--protocol", f"{run / 'eval.json'}=a note", str(run / "paired.json"),
                        "--out", str(out)])  # fmt: skip
    got = json.loads(out.read_text())
    assert got["final_weights"] == "vla_b0" and got["fresh_only"]
    assert got["trained_on_starts"] == record["trained_on_starts"]  # the DAgger file did not train vla_b0
    assert got["rounds"]["val_r0"]["overall"] == [3, 5]
    assert got["rounds"]["pick_b"]["init_states"] == "fresh:2000-2004"  # ROUNDS=0: the size pick's rollouts
    assert got["protocol"][0]["note"] == "a note" and got["protocol"][0]["arms"]["policy"]["successes"] == 1
    assert got["protocol"][1]["decode_layers"] == 3 and set(got["protocol"][1]["arms"]) == {
        "baseline",
        "relaxed",
    }
    (run / "training_data.json").unlink()
    with pytest.raises(SystemExit):
        policy_record.main(["--run", str(run), "--out", str(out)])
