"""The default arm builder: policy / baseline / strict / relaxed decodings from an ArmSpec, through the fleet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.policy import Observation
from evaluator.fleet import run_protocol
from evaluator.fleet_arms import build_act
from evaluator.protocol import ArmSpec
from tests.fleet_fakes import make_fake_env


def obs(seed: int) -> Observation:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return Observation(img, img, rng.standard_normal(8).astype(np.float32), "put the bowl on the plate")


def test_strict_arm_is_lossless_and_counts_acceptance(draft_ckpt: Path) -> None:
    torch.set_num_threads(1)
    spec = {"backend": "twin-tiny", "draft": str(draft_ckpt)}
    base = build_act(ArmSpec("b", decoding="baseline", **spec))
    strict = build_act(ArmSpec("s", decoding="strict", **spec))
    relaxed = build_act(ArmSpec("r", decoding="substitution", **spec))
    for i in range(3):
        np.testing.assert_array_equal(strict(obs(i)), base(obs(i)))  # strict RSD = ordinary decoding
        assert relaxed(obs(i)).shape == base(obs(i)).shape
    ex = relaxed.episode_extra()
    assert (
        ex["chunks"] == 3 and ex["mean_accepted"] == ex["mean_proposed"] > 0
    )  # substitution accepts every layer unchecked
    assert relaxed.episode_extra()["chunks"] == 0  # reset per episode
    with pytest.raises(ValueError, match="unknown decoding params"):
        build_act(ArmSpec("x", decoding="relaxed", params={"tua": 0.5}, **spec))
    with pytest.raises(ValueError, match="needs a draft"):
        build_act(ArmSpec("x", backend="twin-tiny", decoding="strict"))
    with pytest.raises(ValueError, match="decoding must be one of"):
        build_act(ArmSpec("x", decoding="greedy", **spec))


def test_rsd_arms_through_the_fleet(draft_ckpt: Path, tmp_path: Path) -> None:
    spec = {"backend": "twin-tiny", "draft": str(draft_ckpt)}
    arms = [
        ArmSpec("baseline", decoding="baseline", **spec),
        ArmSpec("rsd_strict", decoding="strict", **spec),
    ]
    res = run_protocol(arms, tasks=[0], init_states=[0, 1], workers=1, max_steps=4,
                       results_path=tmp_path / "r.jsonl", env_factory=make_fake_env, progress=False)  # fmt: skip
    s = res.summary()
    assert res.complete and s["comparisons"]["rsd_strict"]["pairs"] == 2
    assert all(r["extra"]["chunks"] >= 1 for r in res.records)
