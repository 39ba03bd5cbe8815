"""HDF5 archive of every accepted sample (docs/DESIGN.md §8.1), robomimic-style layout.

    data/                       attrs: schema_version, total, num_episodes, backbone_id, hidden_dim,
                                       codec_sha256, shape (JSON), env_args (JSON), producers (JSON),
                                       trainer_config (JSON)
    data/demo_N/                attrs: num_samples, suite, task_id, instruction-free task key, success,
                                       status, producer_id, producer_session, episode_id, first_seq,
                                       last_seq, split, crc32 (of hidden, codes, actions), complete
        hidden   [n, D]         float16 or float32 (as received)
        codes    [n, T, H, L]   uint8
        actions  [n, T, A]      float32
        steps    [n]            int32   env step of each policy query
        seqs     [n]            int64   wire sequence number of each sample
        sent_at, received_at [n] float64
        obs/agentview, obs/wrist [n, h, w, 3] uint8, obs/proprio [n, P] float32   (optional)
    mask/train, mask/valid      names of episodes ("demo_N") per split

Crash safety: every change (one whole episode, with ``complete`` set last; provenance; a repair) is
one transaction through a rollback journal (:mod:`common.journal`): HDF5 writes through
:class:`~common.journal.JournaledFile`, which copies each page it overwrites into ``<archive>-journal``
first; the journal is deleted when the change is complete and on disk. A writer killed inside a change
leaves the journal, and the next :class:`ArchiveWriter` (or ``python -m common.archive repair PATH``)
puts the pages back: the file is exactly what it was before that change. What else a reopen repairs
(archives written before the journal, derived masks and counters): :mod:`common.archive_repair`.

Readers use :func:`open_archive` (no file locking, so they can read while the trainer writes) and
retry while a writer is mid-episode; a reader never modifies the file.
Nothing here uses pickle, and nothing taken from a message becomes a path.

The writer (:class:`ArchiveWriter`, used by ``make train``) lives here; the readers (:func:`iter_episodes`,
:func:`archive_meta`, :func:`episode_attrs`, used by the trainer, the evaluator and tools) live in
:mod:`common.archive_read` and are re-exported here. Training pairs assembled from several archives:
:mod:`trainer.pairs`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from common.archive_format import (  # noqa: F401 (re-exported: the archive's public names)
    ARCHIVE_SCHEMA_VERSION,
    MASK_DTYPE,
    SPLITS,
    ArchiveError,
    _crc,
    _index,
    _transaction,
    attr_value,
)
from common.archive_read import (  # noqa: F401 (re-exported: the archive's public names)
    ArchiveEpisode,
    archive_meta,
    archived_seqs,
    check_archive,
    episode_attrs,
    iter_episodes,
    open_archive,
    summarize,
)
from common.archive_repair import repair_archive
from common.shapes import RFSQShape

log = logging.getLogger(__name__)


@dataclass
class EpisodeRecord:
    """One episode as the trainer assembled it from the wire."""

    producer_id: str
    producer_session: str
    suite: str
    task_id: int
    episode_id: int
    split: str
    status: str = "incomplete"
    num_steps: int = 0
    end_seq: int = -1  # sequence number of the episode_end message (-1: none)
    hidden: list[np.ndarray] = field(default_factory=list)  # [D] each
    codes: list[np.ndarray] = field(default_factory=list)  # [T, H, L] each
    actions: list[np.ndarray] = field(default_factory=list)  # [T, A] each
    steps: list[int] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)
    sent_at: list[float] = field(default_factory=list)
    received_at: list[float] = field(default_factory=list)
    obs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return len(self.seqs)

    @property
    def last_seq(self) -> int:
        return max([self.end_seq, *self.seqs])


class ArchiveWriter:
    """Append-only writer; one open/write/close cycle per episode."""

    def __init__(
        self,
        path: str | Path,
        shape: RFSQShape,
        trainer_config: dict[str, Any] | None = None,
        journal: bool = True,
    ):
        self.path = Path(path)
        self.shape = shape
        self.journal = journal  # False: plain in-place HDF5 writes (the measured baseline of the journal)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.removed_partial: list[str] = []
        self.created = not self.path.exists()  # made by this writer (nothing of an earlier run in it)
        if self.path.exists():
            self._recover()
        else:
            tmp = self.path.with_name(self.path.name + ".new")
            with h5py.File(tmp, "w", locking=False) as f:  # made aside, renamed into place whole
                data = f.create_group("data")
                data.attrs["schema_version"] = ARCHIVE_SCHEMA_VERSION
                data.attrs["total"] = 0
                data.attrs["num_episodes"] = 0
                data.attrs["shape"] = json.dumps(shape.to_dict(), sort_keys=True)
                data.attrs["backbone_id"] = ""
                data.attrs["hidden_dim"] = 0
                data.attrs["codec_sha256"] = ""
                data.attrs["env_args"] = "{}"
                data.attrs["producers"] = "{}"
                data.attrs["trainer_config"] = json.dumps(trainer_config or {}, sort_keys=True)
                data.attrs["created_at"] = time.time()
                mask = f.create_group("mask")
                for split in SPLITS:
                    mask.create_dataset(split, shape=(0,), maxshape=(None,), dtype=MASK_DTYPE)
            os.replace(tmp, self.path)
        with open_archive(self.path) as f:
            self.meta = dict(f["data"].attrs)
            self.num_episodes = int(self.meta["num_episodes"])
            self.total = int(self.meta["total"])

    @contextmanager
    def _open(self) -> Iterator[h5py.File]:
        """The archive open for one atomic change (:mod:`common.journal`): the change is kept only if
        the block ends without an exception; a kill or an exception inside it leaves the file as before."""
        if not self.journal:
            with h5py.File(self.path, "a", locking=False) as f:
                yield f
            return
        with _transaction(self.path) as f:
            yield f

    def _recover(self) -> None:
        """Reopen an existing archive: check it, repair what a killed writer left (common/archive_repair.py)."""
        self.repair = repair_archive(self.path, self.shape)
        self.removed_partial = self.repair["removed_partial"]

    # ------------------------------------------------------------------ provenance
    def set_provenance(
        self, *, backbone_id: str, hidden_dim: int, codec_sha256: str, producer_id: str, producer_config: str
    ) -> str | None:
        """Record who feeds this archive. Returns an error text if it contradicts what is recorded."""
        with self._open() as f:
            a = f["data"].attrs
            if a["backbone_id"] and (a["backbone_id"] != backbone_id or int(a["hidden_dim"]) != hidden_dim):
                return (
                    f"archive holds backbone {a['backbone_id']} (D={int(a['hidden_dim'])}), "
                    f"producer {producer_id} sends {backbone_id} (D={hidden_dim})"
                )
            if a["codec_sha256"] and codec_sha256 and a["codec_sha256"] != codec_sha256:
                return f"archive codec {a['codec_sha256'][:12]} != producer {producer_id} codec {codec_sha256[:12]}"
            a["backbone_id"] = backbone_id
            a["hidden_dim"] = hidden_dim
            if codec_sha256:
                a["codec_sha256"] = codec_sha256
            producers = json.loads(a["producers"])
            try:
                cfg = json.loads(producer_config)
            except (ValueError, RecursionError):  # not JSON, or nested deeper than json can parse
                cfg = {"raw": producer_config[:4096]}
            producers[producer_id] = cfg
            a["producers"] = json.dumps(producers, sort_keys=True)
            if isinstance(cfg, dict) and isinstance(cfg.get("env_args"), dict):
                a["env_args"] = json.dumps(
                    merge_env_args(json.loads(a["env_args"]), cfg["env_args"]), sort_keys=True
                )
            self.meta = dict(a)
        return None

    def set_attr(self, name: str, value: str) -> None:
        """Set one ``data`` attribute (e.g. a JSON report that grows with the archive)."""
        with self._open() as f:
            f["data"].attrs[name] = value
            self.meta[name] = value

    # ------------------------------------------------------------------ writing
    def write_episode(self, ep: EpisodeRecord) -> str:
        """Write one episode, mark it complete, update totals and masks, close. Returns ``demo_N``."""
        if ep.split not in SPLITS:
            raise ValueError(f"split {ep.split!r} not in {SPLITS}")
        name = f"demo_{self.num_episodes}"
        n = ep.num_samples
        crc = 0
        with self._open() as f:
            g = f["data"].create_group(name)
            if n:
                arrays = (
                    np.stack(ep.hidden),  # [n, D]
                    np.stack(ep.codes).astype(np.uint8),  # [n, T, H, L]
                    np.stack(ep.actions).astype(np.float32),  # [n, T, A]
                )
                for key, arr in zip(("hidden", "codes", "actions"), arrays):
                    g.create_dataset(key, data=arr)
                crc = _crc(arrays)
            else:
                s = self.shape
                g.create_dataset(
                    "hidden", shape=(0, int(self.meta.get("hidden_dim", 0)) or 1), dtype=np.float32
                )
                g.create_dataset("codes", shape=(0, *s.codes_shape), dtype=np.uint8)
                g.create_dataset("actions", shape=(0, *s.chunk_shape), dtype=np.float32)
            g.create_dataset("steps", data=np.asarray(ep.steps, dtype=np.int32))
            g.create_dataset("seqs", data=np.asarray(ep.seqs, dtype=np.int64))
            g.create_dataset("sent_at", data=np.asarray(ep.sent_at, dtype=np.float64))
            g.create_dataset("received_at", data=np.asarray(ep.received_at, dtype=np.float64))
            if ep.obs and len(ep.obs) == n:
                og = g.create_group("obs")
                og.create_dataset("agentview", data=np.stack([o[0] for o in ep.obs]), compression="lzf")
                og.create_dataset("wrist", data=np.stack([o[1] for o in ep.obs]), compression="lzf")
                og.create_dataset("proprio", data=np.stack([o[2] for o in ep.obs]))
            a = g.attrs
            a["num_samples"] = n
            a["suite"] = ep.suite
            a["task_id"] = ep.task_id
            a["success"] = ep.status == "success"
            a["status"] = ep.status
            a["num_steps"] = ep.num_steps
            a["producer_id"] = ep.producer_id
            a["producer_session"] = ep.producer_session
            a["episode_id"] = ep.episode_id
            a["first_seq"] = min(ep.seqs) if ep.seqs else ep.end_seq
            a["last_seq"] = ep.last_seq
            a["split"] = ep.split
            a["crc32"] = crc  # of hidden, codes, actions: a repair checks the newest episodes' data
            a["complete"] = True  # last: a group without it is a partial write
            mask = f["mask"][ep.split]
            mask.resize((mask.shape[0] + 1,))
            mask[-1] = name.encode()
            self.num_episodes += 1
            self.total += n
            f["data"].attrs["num_episodes"] = self.num_episodes
            f["data"].attrs["total"] = self.total
        return name


def merge_env_args(have: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The archive's env args after one more producer: the first producer's, with the bddl files of
    every producer's tasks (``env_kwargs.bddl_files``, task id -> file) merged in."""
    if not have:
        return new
    kwargs = have.get("env_kwargs", {})
    files = {**kwargs.get("bddl_files", {}), **new.get("env_kwargs", {}).get("bddl_files", {})}
    return {**have, "env_kwargs": {**kwargs, "bddl_files": files}} if files else have


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m common.archive",
        description="Inspect or repair an RSD archive (the HDF5 file `make train` writes).",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    rp = sub.add_parser(
        "repair", help="repair what a writer killed inside a write left (see common/archive.py)"
    )
    rp.add_argument("path")
    sp = sub.add_parser("summary", help="episodes and samples per split, status and producer")
    sp.add_argument("path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.cmd == "repair":
            out = repair_archive(args.path)
        else:
            out = summarize(args.path)
    except (ArchiveError, OSError) as exc:
        print(f"error: {exc}")
        return 2
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
