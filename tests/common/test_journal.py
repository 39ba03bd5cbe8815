"""Rollback journal (common/journal.py): uncommitted writes are undone byte for byte, committed ones stay."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np

from common.journal import PAGE, JournaledFile, journal_path, rollback

REPO = Path(__file__).resolve().parents[2]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_uncommitted_writes_are_undone_and_appends_cut(tmp_path):
    path = tmp_path / "f.bin"
    original = os.urandom(3 * PAGE + 100)
    path.write_bytes(original)
    jf = JournaledFile(path)
    jf.seek(10)
    jf.write(b"x" * 5000)  # over two pages
    jf.seek(len(original) + 50)
    jf.write(b"tail")  # past the end: no copy needed, cut by the rollback
    jf.truncate(PAGE)  # shrinking: the cut part is saved first
    jf.close()  # not committed: a writer that died
    assert journal_path(path).exists()
    assert rollback(path) >= 2
    assert path.read_bytes() == original and not journal_path(path).exists()
    assert rollback(path) is None  # nothing left to undo


def test_committed_writes_stay(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 100)
    jf = JournaledFile(path)
    jf.seek(0)
    jf.write(b"b" * 10)
    jf.commit()
    assert not journal_path(path).exists()
    assert rollback(path) is None and path.read_bytes() == b"b" * 10 + b"a" * 90


def test_a_torn_last_record_is_ignored(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * (2 * PAGE))
    jf = JournaledFile(path)
    jf.seek(0)
    jf.write(b"b")
    jf.close()
    with open(journal_path(path), "ab") as fh:  # a second record the writer died while appending
        fh.write(b"\x00" * 7)
    rollback(path)
    assert path.read_bytes() == b"a" * (2 * PAGE)


def test_a_torn_header_means_nothing_was_written(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 10)
    journal_path(path).write_bytes(b"RSDJ")
    assert rollback(path) == 0 and path.read_bytes() == b"a" * 10


WRITER = textwrap.dedent(
    """
    import sys
    import h5py, numpy as np
    sys.path.insert(0, {repo!r})
    from common.journal import JournaledFile, rollback
    rollback({path!r})
    with h5py.File({path!r}, "r") as f:
        i = len(f)
    print("ready", flush=True)
    while True:
        jf = JournaledFile({path!r})
        with h5py.File(jf, "r+") as f:
            g = f.create_group(f"g{{i}}")
            g.create_dataset("x", data=np.full(5000, i, dtype=np.int64))
            g.attrs["done"] = True
        jf.commit()
        print(i, flush=True)
        i += 1
    """
)


def test_hdf5_writer_killed_anywhere_leaves_a_committed_state(tmp_path):
    """SIGKILL an HDF5 writer at several moments: after the rollback the file opens and holds exactly
    the committed groups, with their data."""
    path = tmp_path / "a.hdf5"
    with h5py.File(path, "w") as f:
        f.attrs["v"] = 1
    committed = -1
    grew: list[int] = []
    for delay in (0.3, 0.45, 0.6, 0.75):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER.format(repo=str(REPO), path=str(path))],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        for line in proc.stdout:
            committed = max(committed, int(line))
        before = _digest(path) if not journal_path(path).exists() else None
        rollback(path)
        if before is not None:  # killed between transactions: nothing to undo
            assert _digest(path) == before
        with h5py.File(path, "r") as f:
            names = sorted(f, key=lambda n: int(n[1:]))
            assert names == [f"g{i}" for i in range(len(names))]
            assert len(names) >= committed + 1  # every reported commit is there
            grew.append(len(names))
            for n in names:
                assert f[n].attrs["done"] and np.all(f[n]["x"][()] == int(n[1:]))
    assert grew == sorted(grew) and grew[-1] > grew[0]  # every writer went on where the last one stopped
