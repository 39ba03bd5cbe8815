"""read_demos: reading files in worker processes gives exactly what one process reads."""

from __future__ import annotations

import h5py
import numpy as np

from common.demos import read_demos
from tests.init_helpers import record_fresh_start


def _fresh_file(path, first: int, episodes: int, side: int = 16) -> None:
    rng = np.random.default_rng(first)
    with h5py.File(path, "w") as f:
        for e in range(episodes):
            steps = (
                5 + e
            )  # episodes of different lengths: the frame stride offsets depend on the global index
            g = f.create_group(f"data/demo_{e}")
            g.attrs["instruction"] = "pick up the black bowl"
            g.attrs["task_id"] = 3
            g["actions"] = rng.uniform(-1, 1, (steps, 7)).astype(np.float32)
            for cam in ("agentview_rgb", "eye_in_hand_rgb"):
                g[f"obs/{cam}"] = rng.integers(0, 256, (steps, side, side, 3), dtype=np.uint8)
            g["obs/ee_states"] = rng.normal(size=(steps, 6))
            g["obs/gripper_states"] = rng.normal(size=(steps, 2))
            if e == 1:
                g["expert_chunks"] = rng.uniform(-1, 1, (steps, 8, 7)).astype(np.float32)
            record_fresh_start(g, first + e)


def test_parallel_read_equals_serial_read(tmp_path):
    paths = []
    for i, n in enumerate((3, 2, 4)):
        paths.append(tmp_path / f"shard-{i}.hdf5")
        _fresh_file(paths[-1], 10 * i, n)
    serial = read_demos(paths, 8, frame_stride=2, workers=1)
    parallel = read_demos(paths, 8, frame_stride=2, workers=3)
    assert serial.keys() == parallel.keys()
    for key in serial:
        a, b = np.asarray(serial[key]), np.asarray(parallel[key])
        assert a.dtype == b.dtype and a.shape == b.shape, key
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), key
    # 9 episodes in file order; the stride offset alternates with the global episode index
    assert list(serial["episode_names"][:4]) == [
        "shard-0.hdf5:demo_0",
        "shard-0.hdf5:demo_1",
        "shard-0.hdf5:demo_2",
        "shard-1.hdf5:demo_0",
    ]
    first_steps = [int(serial["step"][serial["episode"] == e][0]) for e in range(9)]
    assert first_steps == [0, 1] * 4 + [0]
    labelled = ~np.isnan(serial["label_chunks"][:, 0, 0])
    assert labelled.any() and not labelled.all()
