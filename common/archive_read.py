"""Reading an RSD archive (docs/DESIGN.md §8.1): the checks, the readers and their retries.

Readers use :func:`open_archive` (no file locking, so they can read while the trainer writes) and retry
while a writer is inside a change (:func:`_read_retrying`): they wait while the writer's rollback journal
exists, and give up on a damaged file with no writer after a short patience. A reader never modifies the
file. The layout, the writer and the command line are in :mod:`common.archive`, which re-exports these
names (``from common.archive import iter_episodes`` keeps working).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from common.archive_format import ARCHIVE_SCHEMA_VERSION, SPLITS, ArchiveError, _index, attr_value
from common.journal import journal_path
from common.schedule import episode_schedule

log = logging.getLogger("common.archive")


def check_archive(path: str | Path) -> None:
    """Raise :class:`ArchiveError` with a clear message unless ``path`` is an RSD archive.

    A file that is no HDF5 file at all, or an HDF5 file without the archive's attributes, fails at once;
    a read error is retried for a few seconds first (a trainer may be writing the file)."""
    path = Path(path)
    if not path.is_file():
        raise ArchiveError(f"no archive at {path}")
    if not h5py.is_hdf5(path):
        raise ArchiveError(f"{path} is not an HDF5 file (damaged, or another format)")

    def read(f: h5py.File) -> dict[str, Any] | None:
        data = f.get("data")
        return {k: attr_value(v) for k, v in data.attrs.items()} if isinstance(data, h5py.Group) else None

    try:
        attrs = _read_retrying(path, read)
    except OSError as exc:
        raise ArchiveError(f"{path} is an HDF5 file but cannot be read, it may be damaged: {exc}") from None
    if attrs is None or not {"schema_version", "shape", "backbone_id", "hidden_dim"} <= set(attrs):
        raise ArchiveError(
            f"{path} is an HDF5 file but not an archive of `make train` (no data/ attributes schema_version, "
            "shape, backbone_id, hidden_dim); demonstration files go to `make train-codec` / `make train-vla`"
        )
    if attrs["schema_version"] != ARCHIVE_SCHEMA_VERSION:
        raise ArchiveError(
            f"{path} is an archive of schema {attrs['schema_version']}; this code reads {ARCHIVE_SCHEMA_VERSION}"
        )


def open_archive(path: str | Path) -> h5py.File:
    """Open an archive read-only, without file locking (safe while the trainer appends to it)."""
    return h5py.File(path, "r", locking=False)


# ---------------------------------------------------------------------- reading
@dataclass
class ArchiveEpisode:
    name: str
    attrs: dict[str, Any]
    hidden: np.ndarray  # [n, D] float32
    codes: np.ndarray  # [n, T, H, L] uint8
    actions: np.ndarray  # [n, T, A] float32
    seqs: np.ndarray  # [n] int64
    steps: np.ndarray | None = None  # [n] int32 env step of each query (None in archives without it)
    obs: dict[str, np.ndarray] | None = None  # agentview, wrist [n, h, w, 3] uint8, proprio [n, P] (with_obs)

    def producer_config(self, producers: dict[str, Any]) -> dict[str, Any]:
        """This episode's producer config from an archive's ``producers`` attribute ({} if unknown)."""
        cfg = producers.get(str(self.attrs.get("producer_id", "")), {})
        cfg = (
            cfg.get("producer", cfg) if isinstance(cfg, dict) else {}
        )  # the hello's {"producer": …, "env_args": …}
        return cfg if isinstance(cfg, dict) else {}

    def init_key(self, producers: dict[str, Any]) -> tuple[str, int, int] | None:
        """(suite, task, initial state) of this episode from its producer's recorded schedule, or None.

        The same initial state with the same (deterministic) policy replays the same trajectory, up to
        float-level drift in the simulator: one key is one trajectory whichever producer or archive
        ran it (used to keep held-out episodes out of training across archives)."""
        cfg = self.producer_config(producers)
        try:
            task, init = episode_schedule(cfg, int(self.attrs["episode_id"]))
        except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError):
            return None
        if task != int(self.attrs.get("task_id", -1)):
            return None  # the recorded schedule does not describe this episode
        return str(self.attrs.get("suite", "")), task, init

    def acting(self, producers: dict[str, Any]) -> np.ndarray:
        """[n] bool: the queries whose actions were executed (step a multiple of the producer's replan).

        All queries, unless the producer streamed observing queries in between (``--sample-every``)."""
        cfg = self.producer_config(producers)
        if not cfg.get("sample_every") or self.steps is None:
            return np.ones(len(self.hidden), bool)
        return self.steps % int(cfg.get("replan", 8)) == 0


_READ_PATIENCE_S = 10.0  # unreadable and unchanged this long, a journal present: its writer died
_READ_PATIENCE_IDLE_S = 2.0  # unreadable, no journal (no writer inside a change): damaged
_READ_MAX_S = 120.0


def _file_state(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _read_retrying(path: Path, read: Any) -> Any:
    """Run ``read(open file)``, retrying while a concurrent writer has the file mid-episode.

    The writer appends one whole episode per open/close; a reader that opens the file during those
    milliseconds can see half-updated HDF5 metadata (OSError, KeyError, RuntimeError or ValueError from
    h5py). Such a read is retried on a fresh open for as long as the file keeps changing (a writer
    throttled by a slow disk can take seconds over one episode), and given up once it has stayed
    unreadable and unchanged for ``_READ_PATIENCE_S`` while a writer's journal exists (the writer died
    inside a change), or for ``_READ_PATIENCE_IDLE_S`` without one (nobody is writing: the file is
    damaged); the error says how to repair it. A missing file is reported at once.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"no archive at {path}")
    start = last_change = time.monotonic()
    state = _file_state(path)
    while True:
        try:
            with open_archive(path) as f:
                return read(f)
        except (OSError, KeyError, RuntimeError, ValueError) as exc:  # h5py's mapping of HDF5 errors
            now = time.monotonic()
            new = _file_state(path)
            if new != state:
                state, last_change = new, now
            # a writer inside a change holds a journal: without one nobody is writing, so do not wait long
            writing = journal_path(path).exists()
            patience = _READ_PATIENCE_S if writing else _READ_PATIENCE_IDLE_S
            if now - last_change > patience or now - start > _READ_MAX_S:
                cause = (
                    "Its writer died inside a write (its journal is still there)"
                    if writing
                    else "If its writer was killed inside a write"
                )
                raise OSError(
                    f"{path}: unreadable for {now - start:.0f} s ({now - last_change:.0f} s without a change): "
                    f"{exc}. {cause}: `python -m common.archive repair {path}` (or reopening it with "
                    "`make train`) repairs it"
                ) from exc
            time.sleep(0.05)


def iter_episodes(
    path: str | Path, split: str | None = None, with_obs: bool = False, names: list[str] | None = None
) -> Iterator[ArchiveEpisode]:
    """Complete episodes of an archive, in write order, optionally only one split (``with_obs``: also
    the streamed observations of episodes that have them, producer ``--send-obs``; ``names``: only these
    episodes, those of them that are complete).

    Safe to call while the trainer is writing the file (see :func:`_read_retrying`).
    """
    check_archive(path)
    if split is not None and split not in SPLITS:
        raise ValueError(f"split {split!r} not in {SPLITS}")

    wanted = None if names is None else set(names)

    def list_names(f: h5py.File) -> list[str]:
        out = []
        for n in f["data"] if wanted is None else sorted(wanted & set(f["data"])):
            a = f["data"][n].attrs
            if a.get("complete", False) and (split is None or attr_value(a["split"]) == split):
                out.append(n)
        return sorted(out, key=_index)

    def read_episode(f: h5py.File, name: str) -> ArchiveEpisode:
        g = f["data"][name]
        return ArchiveEpisode(
            name=name,
            attrs={k: attr_value(v) for k, v in g.attrs.items()},
            hidden=g["hidden"][()].astype(np.float32),
            codes=g["codes"][()],
            actions=g["actions"][()],
            seqs=g["seqs"][()],
            steps=g["steps"][()] if "steps" in g else None,
            obs={k: g["obs"][k][()] for k in g["obs"]} if with_obs and "obs" in g else None,
        )

    for name in _read_retrying(Path(path), list_names):
        yield _read_retrying(Path(path), lambda f, name=name: read_episode(f, name))


def archive_meta(path: str | Path) -> dict[str, Any]:
    check_archive(path)
    return _read_retrying(Path(path), lambda f: {k: attr_value(v) for k, v in f["data"].attrs.items()})


def summarize(path: str | Path) -> dict[str, Any]:
    """Counts per split, status and producer (for logs and docs)."""
    out: dict[str, Any] = {"episodes": 0, "samples": 0, "by_status": {}, "by_split": {}, "by_producer": {}}
    for ep in iter_episodes(path):
        a = ep.attrs
        out["episodes"] += 1
        out["samples"] += a["num_samples"]
        for key, val in (
            ("by_status", a["status"]),
            ("by_split", a["split"]),
            ("by_producer", a["producer_id"]),
        ):
            out[key][val] = out[key].get(val, 0) + a["num_samples"]
    return out


def episode_attrs(path: str | Path) -> list[dict[str, Any]]:
    """Attributes of every complete episode (no arrays read), with ``name`` added."""

    def read(f: h5py.File) -> list[dict[str, Any]]:
        out = []
        for name, g in f["data"].items():
            if g.attrs.get("complete", False):
                out.append({"name": name, **{k: attr_value(v) for k, v in g.attrs.items()}})
        return sorted(out, key=lambda a: _index(a["name"]))

    return _read_retrying(Path(path), read)


def archived_seqs(path: str | Path) -> dict[tuple[str, str], int]:
    """Highest archived sequence number per (producer id, producer session)."""
    out: dict[tuple[str, str], int] = {}
    for a in episode_attrs(path):
        key = (a["producer_id"], a["producer_session"])
        out[key] = max(out.get(key, -1), int(a["last_seq"]))
    return out
