"""HDF5 archive: layout, masks, readable while written, intact after kill -9 of the writer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from common.archive import (
    ArchiveWriter,
    EpisodeRecord,
    archive_meta,
    archived_seqs,
    iter_episodes,
    open_archive,
)
from common.shapes import DEFAULT_SHAPE
from trainer.pairs import load_split

SH = DEFAULT_SHAPE
REPO = Path(__file__).resolve().parents[2]


def episode(i: int, n: int, split: str = "train", d: int = 16, status: str = "success") -> EpisodeRecord:
    rng = np.random.default_rng(i)
    ep = EpisodeRecord("p0", "s0", "libero_spatial", i % 10, i, split, status=status, num_steps=8 * n)
    for j in range(n):
        ep.hidden.append(rng.standard_normal(d).astype(np.float16))
        ep.codes.append(rng.integers(0, 7, SH.codes_shape, dtype=np.uint8))
        ep.actions.append(rng.uniform(-1, 1, SH.chunk_shape).astype(np.float32))
        ep.steps.append(8 * j)
        ep.seqs.append(100 * i + j)
        ep.sent_at.append(time.time())
        ep.received_at.append(time.time())
    ep.end_seq = 100 * i + n
    return ep


def test_layout_and_round_trip(tmp_path):
    path = tmp_path / "a.hdf5"
    w = ArchiveWriter(path, SH, trainer_config={"x": 1})
    assert (
        w.set_provenance(
            backbone_id="b@1",
            hidden_dim=16,
            codec_sha256="c" * 64,
            producer_id="p0",
            producer_config=json.dumps({"env_args": {"env_name": "t"}}),
        )
        is None
    )
    assert "backbone" in w.set_provenance(
        backbone_id="other", hidden_dim=16, codec_sha256="", producer_id="p1", producer_config="{}"
    )
    eps = [episode(0, 3, "valid"), episode(1, 2), episode(2, 0, status="errored"), episode(3, 4)]
    for ep in eps:
        w.write_episode(ep)
    with open_archive(path) as f:
        a = f["data"].attrs
        assert a["schema_version"] == 1 and a["total"] == 9 and a["num_episodes"] == 4
        assert a["backbone_id"] == "b@1" and a["codec_sha256"] == "c" * 64
        assert json.loads(a["env_args"]) == {"env_name": "t"}
        assert json.loads(a["shape"]) == SH.to_dict()
        g = f["data/demo_3"]
        assert g["hidden"].shape == (4, 16) and g["codes"].shape == (4, *SH.codes_shape)
        assert g["actions"].shape == (4, *SH.chunk_shape) and g.attrs["num_samples"] == 4
        assert bool(g.attrs["success"]) and g.attrs["status"] == "success"
        assert [x.decode() for x in f["mask/valid"][()]] == ["demo_0"]
        assert [x.decode() for x in f["mask/train"][()]] == ["demo_1", "demo_2", "demo_3"]
    got = list(iter_episodes(path))
    np.testing.assert_array_equal(got[3].codes, np.stack(eps[3].codes))
    np.testing.assert_allclose(got[0].hidden, np.stack(eps[0].hidden).astype(np.float32))
    assert got[2].attrs["status"] == "errored" and got[2].attrs["num_samples"] == 0
    h, c, keys = load_split([path], "train")
    assert h.shape == (6, 16) and c.shape == (6, *SH.codes_shape) and len(keys) == 2  # empty episode skipped
    assert archived_seqs(path) == {("p0", "s0"): 304}
    assert archive_meta(path)["total"] == 9


def test_reopen_appends_and_drops_partial_groups(tmp_path):
    path = tmp_path / "a.hdf5"
    w = ArchiveWriter(path, SH)
    w.write_episode(episode(0, 2))
    with h5py.File(path, "a") as f:  # what a kill inside a write leaves: a group without `complete`
        f["data"].create_group("demo_1").create_dataset("hidden", data=np.zeros((1, 16)))
    w2 = ArchiveWriter(path, SH)
    assert w2.removed_partial == ["demo_1"] and w2.total == 2
    w2.write_episode(episode(1, 1))
    assert [e.name for e in iter_episodes(path)] == ["demo_0", "demo_1"]
    assert [e.attrs["num_samples"] for e in iter_episodes(path, "train")] == [2, 1]


WRITER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {repo!r})
    from tests.common.test_archive import episode
    from common.archive import ArchiveWriter
    from common.shapes import DEFAULT_SHAPE
    w = ArchiveWriter({path!r}, DEFAULT_SHAPE)
    i = 0
    while True:
        w.write_episode(episode(i, 5, d=512))
        print(i, flush=True)
        i += 1
    """
)


def test_readable_while_written_and_intact_after_kill9(tmp_path):
    path = tmp_path / "a.hdf5"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER.format(repo=str(REPO), path=str(path))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        written = -1
        reads = 0
        deadline = time.time() + 60
        while written < 30 and time.time() < deadline:
            written = int(proc.stdout.readline())
            if written % 5 == 0:  # read while the writer keeps going
                n = sum(1 for _ in iter_episodes(path))
                assert n >= written + 1
                reads += 1
        assert reads >= 5
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    eps = list(iter_episodes(path))
    assert len(eps) >= written + 1  # every episode reported as written is there
    for ep in eps:
        assert ep.hidden.shape == (5, 512) and ep.attrs["complete"]
    w = ArchiveWriter(path, SH)  # reopens for appending
    assert w.num_episodes >= len(eps)


def test_refuses_wrong_shape(tmp_path):
    path = tmp_path / "a.hdf5"
    ArchiveWriter(path, SH)
    from common.shapes import RFSQShape

    with pytest.raises(RuntimeError, match="shape"):
        ArchiveWriter(path, RFSQShape(num_layers=6))


def test_episode_schedule_names_task_and_initial_state():
    """The producer's schedule, as recorded in archives: task-major, --repeat moves to the next states."""
    from common.schedule import episode_schedule

    cfg = {"tasks": [3, 7], "episodes_per_task": 2, "first_init_state": 5}
    got = [episode_schedule(cfg, e) for e in range(8)]
    assert got == [(3, 5), (3, 6), (7, 5), (7, 6), (3, 7), (3, 8), (7, 7), (7, 8)]
    assert episode_schedule({**cfg, "first_init_state": 48}, 4) == (3, 0)  # wraps at the suite's 50
