"""tools.strict_check: strict RSD against the baseline on recorded frames, counted per draft kind."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from common.vla import load_policy
from tools.strict_check import check, main


def tiny_demo(path: Path, frames: int = 2) -> Path:
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        g = f.create_group("data/demo_0")
        g.attrs["instruction"] = "pick up the black bowl next to the ramekin and place it on the plate"
        g["actions"] = np.zeros((frames, 7), np.float32)
        o = g.create_group("obs")
        o["agentview_rgb"] = rng.integers(0, 256, (frames, 128, 128, 3), dtype=np.uint8)
        o["eye_in_hand_rgb"] = rng.integers(0, 256, (frames, 128, 128, 3), dtype=np.uint8)
        o["ee_states"] = np.tile([-0.07, 0.06, 1.06, 2.6, 0.1, 0.0], (frames, 1))
        o["gripper_states"] = np.tile([0.02, -0.02], (frames, 1))
    return path


def test_strict_matches_the_baseline_at_every_accepted_depth(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    report = check([tiny_demo(tmp_path / "d.hdf5")], None, policy=load_policy("embedded"))
    assert report["decodes"] == {"draft": 0, "oracle": 8}  # 2 frames x good = 0..3
    assert report["mismatches"] == {"draft": 0, "oracle": 0} and report["examples"] == []


def test_missing_files_are_clear_errors(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--demos", str(tmp_path / "none.hdf5")])
    assert exc.value.code == 2
    assert "not found" in capsys.readouterr().err
