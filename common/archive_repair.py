"""Repair of an archive on reopen (:class:`common.archive.ArchiveWriter`, ``python -m common.archive
repair PATH``): what a writer killed inside a write left, and the derived parts rebuilt.

* an unfinished transaction: rolled back from its journal (:mod:`common.journal`), the file byte for byte
  as before it;
* archives written before the journal (``tools/archive_killtest.py --no-journal`` measures what a kill
  left them): a group without ``complete`` (removed), a file shorter or longer than the end its
  superblock records (extended with zeros / the end moved out), newest data that fails its checksum
  (removed), damaged metadata (every readable complete episode copied into a new file, the original kept
  as ``.damaged-*``);
* masks and counters: derived data, rebuilt from every episode's ``split`` attribute on each reopen, as
  fixed-length strings (no global heap).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from common.archive_format import (
    ARCHIVE_SCHEMA_VERSION,
    MASK_DTYPE,
    SPLITS,
    ArchiveError,
    _crc,
    _index,
    _transaction,
    attr_value,
)
from common.journal import rollback
from common.shapes import RFSQShape

log = logging.getLogger("common.archive")

_CHECK_NEWEST = 4  # episodes whose data a repair checks against their checksum
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _superblock_eof(path: Path) -> tuple[int, int, int, int, int] | None:
    """(superblock version, address width, base address, end-of-file address, byte offset of that
    address) from the HDF5 superblock at offset 0; None for anything else (another format, a user
    block, an unknown superblock version)."""
    with open(path, "rb") as fh:
        head = fh.read(64)
    if len(head) < 64 or head[:8] != _HDF5_SIGNATURE:
        return None
    version = head[8]
    if version in (0, 1):  # sizes at 13/14; base, free-space, EOF addresses after 24 (+4 in v1) bytes
        size = head[13]
        at = 24 + (4 if version == 1 else 0)
    elif version in (2, 3):  # sizes at 9/10; base, superblock extension, EOF addresses after 12 bytes
        size = head[9]
        at = 12
    else:
        return None
    if size not in (2, 4, 8):
        return None
    base = int.from_bytes(head[at : at + size], "little")
    eof_at = at + 2 * size
    return version, size, base, int.from_bytes(head[eof_at : eof_at + size], "little"), eof_at


def _match_superblock_eof(path: Path) -> int:
    """Make the file and its superblock agree on where the file ends. Returns the bytes added (> 0: the
    file was extended to the recorded end) or the bytes the recorded end moved (< 0: it was moved out
    to the file's real end). A writer killed inside a write leaves either: a superblock that records
    more than was written (extended with zeros, as its close would have), or metadata and data written
    past the end the superblock records (the end is moved out, as ``h5clear --increment`` does). The
    second needs a superblock without a checksum (versions 0 and 1, what ``h5py`` writes by default)."""
    sb = _superblock_eof(path)
    if sb is None:
        return 0
    version, width, base, eof, eof_at = sb
    size = path.stat().st_size
    recorded = base + eof
    if size < recorded <= size + (1 << 30):
        os.truncate(path, recorded)  # zero-fills the tail
        return recorded - size
    if recorded < size and version in (0, 1):
        with open(path, "r+b") as fh:
            fh.seek(eof_at)
            fh.write((size - base).to_bytes(width, "little"))
        return recorded - size
    return 0


def _check_layout(f: h5py.File, path: Path, shape: RFSQShape | None) -> None:
    if "data" not in f or f["data"].attrs.get("schema_version") != ARCHIVE_SCHEMA_VERSION:
        raise ArchiveError(f"{path} is not an RSD archive of schema {ARCHIVE_SCHEMA_VERSION}; move it away")
    if shape is not None:
        have = json.loads(f["data"].attrs["shape"])
        if have != shape.to_dict():
            raise ArchiveError(f"{path} holds shape {have}, trainer expects {shape.to_dict()}")


def _rebuild_index(f: h5py.File) -> None:
    """Masks and counters from the episode groups themselves (the source of truth)."""
    data = f["data"]
    groups = {name: data[name] for name in data}
    names = sorted(groups, key=_index)
    mask = f.require_group("mask")
    for split in SPLITS:
        if split in mask:
            del mask[split]
        keep = [n for n in names if attr_value(groups[n].attrs["split"]) == split]
        mask.create_dataset(split, data=np.array(keep, dtype=MASK_DTYPE), maxshape=(None,), chunks=(256,))
    data.attrs["num_episodes"] = max([_index(n) + 1 for n in names] + [int(data.attrs["num_episodes"])])
    data.attrs["total"] = sum(int(g.attrs["num_samples"]) for g in groups.values())


def _data_intact(g: h5py.Group) -> bool:
    """The episode's arrays match the checksum written with them (episodes written before the checksum
    existed, and empty ones, count as intact)."""
    if "crc32" not in g.attrs or int(g.attrs["num_samples"]) == 0:
        return True
    return _crc(tuple(g[k][()] for k in ("hidden", "codes", "actions"))) == int(g.attrs["crc32"])


def _read_all(g: h5py.Group) -> None:
    """Read every dataset of an episode group (raises if any part of it is damaged)."""
    for item in g.values():
        if isinstance(item, h5py.Group):
            _read_all(item)
        else:
            item[()]


def repair_archive(path: str | Path, shape: RFSQShape | None = None) -> dict[str, Any]:
    """Repair what a writer killed inside a write left (module doc); a no-op on a sound archive.

    Returns what was done: ``rolled_back`` (None, or the pages an unfinished write's journal put back),
    ``extended_by`` (see :func:`_match_superblock_eof`),
    ``removed_partial`` (groups without ``complete``, and, after a killed write, any of the newest
    episodes whose data does not match its checksum), ``salvaged`` (None, or the kept/lost episode
    counts and the path the damaged original was moved to). Raises :class:`ArchiveError` for a file
    that is not an archive (or not of ``shape``), or that cannot be opened at all.
    """
    path = Path(path)
    report: dict[str, Any] = {"rolled_back": None, "extended_by": 0, "removed_partial": [], "salvaged": None}
    if not path.is_file():
        raise ArchiveError(f"no archive at {path}")
    report["rolled_back"] = rollback(path)  # a write that never committed: undone, page by page
    if report["rolled_back"] is not None:
        log.warning("%s: undid a write that never finished (%d pages restored)", path, report["rolled_back"])
    report["extended_by"] = _match_superblock_eof(path)  # damage left by versions without the journal
    if report["extended_by"] > 0:
        log.warning("%s: extended by %d bytes to the end its superblock records", path, report["extended_by"])
    elif report["extended_by"] < 0:
        log.warning(
            "%s: superblock's end moved out by %d bytes to the file's end", path, -report["extended_by"]
        )
    try:
        h5py.File(path, "r", locking=False).close()
    except OSError as exc:
        raise ArchiveError(f"archive {path} exists but cannot be opened ({exc}); move it away") from exc
    try:
        with _transaction(path) as f:
            _check_layout(f, path, shape)
            for name in list(f["data"]):
                if not f["data"][name].attrs.get("complete", False):
                    del f["data"][name]
                    report["removed_partial"].append(name)
            if report["extended_by"] or report["removed_partial"]:  # a killed write: check the newest data
                for name in sorted(f["data"], key=_index)[-_CHECK_NEWEST:]:
                    if not _data_intact(f["data"][name]):
                        del f["data"][name]
                        report["removed_partial"].append(name)
            _rebuild_index(f)
    except ArchiveError:
        raise
    except Exception as exc:  # damaged HDF5 metadata: copy out what is readable
        report["salvaged"] = _salvage(path, exc)
    if report["removed_partial"]:
        log.warning(
            "removed %d partially written episode(s): %s",
            len(report["removed_partial"]),
            report["removed_partial"],
        )
    return report


def _salvage(path: Path, cause: Exception) -> dict[str, Any]:
    tmp = path.with_name(path.name + ".salvage")
    kept: list[str] = []
    lost: list[str] = []
    try:
        with h5py.File(path, "r", locking=False) as src, h5py.File(tmp, "w") as dst:
            sdata = src["data"]
            ddata = dst.create_group("data")
            for key, value in sdata.attrs.items():
                ddata.attrs[key] = value
            for name in sorted(sdata, key=_index):
                try:
                    g = sdata[name]
                    if not g.attrs.get("complete", False):
                        continue
                    _read_all(g)
                    if not _data_intact(g):
                        raise ValueError("checksum mismatch")
                    src.copy(g, ddata, name=name)
                    kept.append(name)
                except Exception:  # one damaged episode: lost, the others kept
                    lost.append(name)
                    if name in ddata:
                        del ddata[name]
            _rebuild_index(dst)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise ArchiveError(
            f"archive {path} is damaged ({cause}) and cannot be salvaged ({exc}); move it away"
        ) from exc
    backup = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, backup)
    os.replace(tmp, path)
    log.warning(
        "%s was damaged (%s): salvaged %d complete episode(s), lost %d; the original is kept as %s",
        path,
        cause,
        len(kept),
        len(lost),
        backup,
    )
    return {"kept": len(kept), "lost": lost, "damaged_copy": str(backup), "cause": str(cause)}
