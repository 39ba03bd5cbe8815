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
    ArchiveError,
    ArchiveWriter,
    EpisodeRecord,
    archive_meta,
    archived_seqs,
    iter_episodes,
    open_archive,
)
from common.archive_repair import repair_archive
from common.journal import journal_path
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
        os.kill(proc.pid, signal.SIGKILL)  # anywhere: between episodes or inside a write
        proc.wait()
    w = ArchiveWriter(path, SH)  # reopening for appending repairs what a kill inside a write left
    eps = list(iter_episodes(path))
    assert len(eps) >= written + 1  # every episode reported as written is there
    for ep in eps:
        assert ep.hidden.shape == (5, 512) and ep.attrs["complete"]
    assert w.num_episodes >= len(eps)
    w.write_episode(episode(w.num_episodes, 2))
    assert len(list(iter_episodes(path))) == len(eps) + 1


def test_kill_at_random_moments_loses_no_reported_episode(tmp_path):
    """tools.archive_killtest: a writer killed at random moments, the archive reopened after each kill;
    every episode reported finished is there with the data it was written with."""
    from tools.archive_killtest import main

    out = tmp_path / "kill.json"
    assert main(["--kills", "4", "--min-episodes", "2", "--dir", str(tmp_path), "--out", str(out)]) == 0
    summary = json.loads(out.read_text())["summary"]
    assert (
        summary["kills"] == 4 and summary["episodes_lost"] == 0 and summary["episodes_with_wrong_data"] == 0
    )
    assert summary["episodes_at_end"] >= 8


def _written(path, n):
    w = ArchiveWriter(path, SH)
    for i in range(n):
        w.write_episode(episode(i, 3, d=64))
    return [np.asarray(e.hidden) for e in iter_episodes(path)]


def test_a_file_cut_short_keeps_every_older_episode(tmp_path):
    """A superblock recording more than the file holds (what a kill inside the close left before the
    journal): the file is extended, and at most the newest episode (whose bytes may be the missing ones)
    is dropped; what the missing bytes damaged beyond that is salvaged."""
    path = tmp_path / "a.hdf5"
    before = _written(path, 6)
    size = path.stat().st_size
    os.truncate(path, size - 600)
    with pytest.raises(OSError):
        h5py.File(path, "r", locking=False).close()
    rep = repair_archive(path)
    assert rep["extended_by"] == 600
    after = [np.asarray(e.hidden) for e in iter_episodes(path)]
    assert len(after) >= 5
    for a, b in zip(after, before):
        np.testing.assert_array_equal(a, b)
    w = ArchiveWriter(path, SH)
    w.write_episode(episode(9, 1, d=64))
    assert len(list(iter_episodes(path))) == len(after) + 1


def test_data_past_the_recorded_end_is_taken_in(tmp_path):
    """Metadata written past the end the superblock records (a kill before the superblock was updated):
    the recorded end moves out to the file's end."""
    path = tmp_path / "a.hdf5"
    before = _written(path, 3)
    with open(path, "ab") as fh:
        fh.write(b"\0" * 4096)
    rep = repair_archive(path)
    assert rep["extended_by"] == -4096 and not rep["salvaged"]
    assert len(list(iter_episodes(path))) == len(before)
    assert repair_archive(path)["extended_by"] == 0  # now consistent


def test_after_a_killed_write_the_newest_data_is_checked(tmp_path):
    path = tmp_path / "a.hdf5"
    _written(path, 3)
    with h5py.File(path, "a") as f:
        f["data/demo_2/hidden"][0, 0] += 1  # data not as written, `complete` set
        f["data"].create_group("demo_3")  # and a partial group: the mark of a killed write
    rep = repair_archive(path)
    assert rep["removed_partial"] == ["demo_3", "demo_2"]
    assert [e.name for e in iter_episodes(path)] == ["demo_0", "demo_1"]


def test_damaged_metadata_is_salvaged_into_a_new_file(tmp_path, monkeypatch):
    import common.archive_repair as archive_repair

    path = tmp_path / "a.hdf5"
    before = _written(path, 4)
    real = archive_repair._rebuild_index
    calls = []

    def damaged_once(f):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("bad heap index (as a kill can leave the old variable-length masks)")
        return real(f)

    monkeypatch.setattr(archive_repair, "_rebuild_index", damaged_once)
    rep = repair_archive(path)
    assert rep["salvaged"]["kept"] == 4 and rep["salvaged"]["lost"] == []
    assert Path(rep["salvaged"]["damaged_copy"]).is_file()
    after = [np.asarray(e.hidden) for e in iter_episodes(path)]
    for a, b in zip(after, before, strict=True):
        np.testing.assert_array_equal(a, b)
    with h5py.File(path, "r") as f:
        assert [x.decode() for x in f["mask/train"][()]] == [f"demo_{i}" for i in range(4)]


def test_an_archive_with_variable_length_masks_is_converted_on_reopen(tmp_path):
    """Archives of earlier versions keep their episodes; their masks become fixed-length strings."""
    path = tmp_path / "a.hdf5"
    _written(path, 2)
    with h5py.File(path, "a") as f:
        del f["mask/train"]
        f["mask"].create_dataset(
            "train", data=["demo_0", "demo_1"], dtype=h5py.string_dtype(), maxshape=(None,)
        )
    w = ArchiveWriter(path, SH)
    w.write_episode(episode(2, 1, d=64))
    with h5py.File(path, "r") as f:
        assert f["mask/train"].dtype.kind == "S"
        assert [x.decode() for x in f["mask/train"][()]] == ["demo_0", "demo_1", "demo_2"]


def test_repair_command(tmp_path, capsys):
    from common.archive import main

    path = tmp_path / "a.hdf5"
    _written(path, 2)
    assert main(["repair", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["salvaged"] is None
    assert main(["repair", str(tmp_path / "missing.hdf5")]) == 2
    assert "no archive" in capsys.readouterr().out


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


def test_a_damaged_archive_fails_fast_when_nobody_writes_and_names_the_repair(tmp_path):
    path = tmp_path / "a.hdf5"
    _written(path, 3)
    os.truncate(path, path.stat().st_size - 600)
    t0 = time.monotonic()
    with pytest.raises((OSError, ArchiveError), match="common.archive repair"):
        list(iter_episodes(path))
    assert time.monotonic() - t0 < 6  # no journal: no writer inside a change, nothing to wait for
    journal_path(path).write_bytes(b"")  # a writer's journal: the reader waits for it (10 s unchanged)
    t0 = time.monotonic()
    with pytest.raises((OSError, ArchiveError), match="died inside a write"):
        list(iter_episodes(path))
    assert time.monotonic() - t0 >= 9
