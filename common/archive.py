"""HDF5 archive of every accepted sample (docs/DESIGN.md §8.1), robomimic-style layout.

    data/                       attrs: schema_version, total, num_episodes, backbone_id, hidden_dim,
                                       codec_sha256, shape (JSON), env_args (JSON), producers (JSON),
                                       trainer_config (JSON)
    data/demo_N/                attrs: num_samples, suite, task_id, instruction-free task key, success,
                                       status, producer_id, producer_session, episode_id, first_seq,
                                       last_seq, split, complete
        hidden   [n, D]         float16 or float32 (as received)
        codes    [n, T, H, L]   uint8
        actions  [n, T, A]      float32
        steps    [n]            int32   env step of each policy query
        seqs     [n]            int64   wire sequence number of each sample
        sent_at, received_at [n] float64
        obs/agentview, obs/wrist [n, h, w, 3] uint8, obs/proprio [n, P] float32   (optional)
    mask/train, mask/valid      names of episodes ("demo_N") per split

Crash safety: the file is opened, one whole episode is written, ``complete`` is set last, and the file
is closed again. Between episodes the file is closed, so a reader (or a ``kill -9`` of the writer)
always finds a consistent file holding every episode written before. A group without ``complete``
(a kill inside the few milliseconds of a write) is removed when the archive is reopened.
Readers use :func:`open_archive` (no file locking, so they can read while the trainer writes).
Nothing here uses pickle, and nothing taken from a message becomes a path.

The writer (:class:`ArchiveWriter`, used by ``make train``) and the readers (:func:`iter_episodes`,
:func:`archive_meta`, :func:`episode_attrs`, used by the trainer, the evaluator and tools) live in this
one module. Training pairs assembled from several archives: :mod:`trainer.pairs`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from common.schedule import episode_schedule
from common.shapes import RFSQShape

log = logging.getLogger(__name__)

ARCHIVE_SCHEMA_VERSION = 1
SPLITS = ("train", "valid")


class ArchiveError(RuntimeError):
    """A file is not an archive this code can use (not HDF5, another layout, another schema or shape)."""


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


def open_archive(path: str | Path) -> h5py.File:
    """Open an archive read-only, without file locking (safe while the trainer appends to it)."""
    return h5py.File(path, "r", locking=False)


class ArchiveWriter:
    """Append-only writer; one open/write/close cycle per episode."""

    def __init__(self, path: str | Path, shape: RFSQShape, trainer_config: dict[str, Any] | None = None):
        self.path = Path(path)
        self.shape = shape
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.removed_partial: list[str] = []
        self.created = not self.path.exists()  # made by this writer (nothing of an earlier run in it)
        if self.path.exists():
            self._recover()
        else:
            with self._open("w") as f:
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
                    mask.create_dataset(split, shape=(0,), maxshape=(None,), dtype=h5py.string_dtype())
        with self._open("r") as f:
            self.meta = dict(f["data"].attrs)
            self.num_episodes = int(self.meta["num_episodes"])
            self.total = int(self.meta["total"])

    def _open(self, mode: str) -> h5py.File:
        return h5py.File(self.path, mode, locking=False)

    def _recover(self) -> None:
        """Reopen an existing archive: check it, drop partially written episode groups."""
        try:
            f = self._open("a")
        except OSError as exc:
            raise ArchiveError(
                f"archive {self.path} exists but cannot be opened ({exc}); move it away"
            ) from exc
        with f:
            if "data" not in f or f["data"].attrs.get("schema_version") != ARCHIVE_SCHEMA_VERSION:
                raise ArchiveError(
                    f"{self.path} is not an RSD archive of schema {ARCHIVE_SCHEMA_VERSION}; move it away"
                )
            have = json.loads(f["data"].attrs["shape"])
            if have != self.shape.to_dict():
                raise ArchiveError(f"{self.path} holds shape {have}, trainer expects {self.shape.to_dict()}")
            for name in list(f["data"]):
                if not f["data"][name].attrs.get("complete", False):
                    del f["data"][name]
                    self.removed_partial.append(name)
            if self.removed_partial:
                log.warning(
                    "removed %d partially written episode(s): %s",
                    len(self.removed_partial),
                    self.removed_partial,
                )
            # a kill between `complete` and the mask update: put such episodes into their split's mask
            masked = {attr_value(x) for split in SPLITS for x in f["mask"][split][()]}
            for name in sorted(set(f["data"]) - masked, key=lambda n: int(n.split("_")[1])):
                mask = f["mask"][attr_value(f["data"][name].attrs["split"])]
                mask.resize((mask.shape[0] + 1,))
                mask[-1] = name
            # recount from the groups themselves (the counters are written last)
            groups = [g for g in f["data"].values()]
            f["data"].attrs["num_episodes"] = max(
                [int(n.split("_")[1]) + 1 for n in f["data"]] + [int(f["data"].attrs["num_episodes"])]
            )
            f["data"].attrs["total"] = sum(int(g.attrs["num_samples"]) for g in groups)

    # ------------------------------------------------------------------ provenance
    def set_provenance(
        self, *, backbone_id: str, hidden_dim: int, codec_sha256: str, producer_id: str, producer_config: str
    ) -> str | None:
        """Record who feeds this archive. Returns an error text if it contradicts what is recorded."""
        with self._open("a") as f:
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
        with self._open("a") as f:
            f["data"].attrs[name] = value
            self.meta[name] = value

    # ------------------------------------------------------------------ writing
    def write_episode(self, ep: EpisodeRecord) -> str:
        """Write one episode, mark it complete, update totals and masks, close. Returns ``demo_N``."""
        if ep.split not in SPLITS:
            raise ValueError(f"split {ep.split!r} not in {SPLITS}")
        name = f"demo_{self.num_episodes}"
        n = ep.num_samples
        with self._open("a") as f:
            g = f["data"].create_group(name)
            if n:
                g.create_dataset("hidden", data=np.stack(ep.hidden))  # [n, D]
                g.create_dataset("codes", data=np.stack(ep.codes).astype(np.uint8))  # [n, T, H, L]
                g.create_dataset("actions", data=np.stack(ep.actions).astype(np.float32))  # [n, T, A]
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
            a["complete"] = True  # last: a group without it is a partial write
            mask = f["mask"][ep.split]
            mask.resize((mask.shape[0] + 1,))
            mask[-1] = name
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


def attr_value(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value (bytes decoded, numpy scalars unwrapped)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


_READ_ATTEMPTS = 60


def _read_retrying(path: Path, read: Any) -> Any:
    """Run ``read(open file)``, retrying while a concurrent writer has the file mid-episode.

    The writer appends one whole episode per open/close; a reader that opens the file during those
    milliseconds can see half-updated HDF5 metadata (OSError, KeyError, RuntimeError or ValueError from h5py). Such a read is
    retried on a fresh open; a missing file is reported at once.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"no archive at {path}")
    for attempt in range(_READ_ATTEMPTS):
        try:
            with open_archive(path) as f:
                return read(f)
        except (OSError, KeyError, RuntimeError, ValueError) as exc:  # h5py's mapping of HDF5 errors
            if attempt == _READ_ATTEMPTS - 1:
                waited = _READ_ATTEMPTS * 0.05
                raise OSError(f"{path}: unreadable (retried for {waited:.0f} s): {exc}") from exc
            time.sleep(0.05)


def iter_episodes(
    path: str | Path, split: str | None = None, with_obs: bool = False
) -> Iterator[ArchiveEpisode]:
    """Complete episodes of an archive, in write order, optionally only one split (``with_obs``: also
    the streamed observations of episodes that have them, producer ``--send-obs``).

    Safe to call while the trainer is writing the file (see :func:`_read_retrying`).
    """
    check_archive(path)
    if split is not None and split not in SPLITS:
        raise ValueError(f"split {split!r} not in {SPLITS}")

    def list_names(f: h5py.File) -> list[str]:
        names = [n for n in f["data"] if f["data"][n].attrs.get("complete", False)]
        names.sort(key=lambda n: int(n.split("_")[1]))
        if split is not None:
            keep = {attr_value(x) for x in f["mask"][split][()]}
            names = [n for n in names if n in keep]
        return names

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
    out = []
    with open_archive(path) as f:
        for name, g in f["data"].items():
            if g.attrs.get("complete", False):
                out.append({"name": name, **{k: attr_value(v) for k, v in g.attrs.items()}})
    out.sort(key=lambda a: int(a["name"].split("_")[1]))
    return out


def archived_seqs(path: str | Path) -> dict[tuple[str, str], int]:
    """Highest archived sequence number per (producer id, producer session)."""
    out: dict[tuple[str, str], int] = {}
    for a in episode_attrs(path):
        key = (a["producer_id"], a["producer_session"])
        out[key] = max(out.get(key, -1), int(a["last_seq"]))
    return out
