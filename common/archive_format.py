"""What the archive's writer (common/archive.py) and its repair (common/archive_repair.py) share: the
schema constants, the error, attribute decoding, the episode checksum, and one journaled change."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from common.journal import JournaledFile, rollback

ARCHIVE_SCHEMA_VERSION = 1
SPLITS = ("train", "valid")
MASK_DTYPE = "S32"  # fixed-length names: no global heap, which a killed writer can leave damaged


class ArchiveError(RuntimeError):
    """A file is not an archive this code can use (not HDF5, another layout, another schema or shape)."""


@contextmanager
def _transaction(path: Path) -> Iterator[h5py.File]:
    """``path`` open for writing through a rollback journal; committed when the block ends cleanly."""
    jf = JournaledFile(path)
    try:
        f = h5py.File(jf, "r+")
        try:
            yield f
        finally:
            f.close()
    except BaseException:
        jf.close()
        rollback(path)
        raise
    jf.commit()


def attr_value(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value (bytes decoded, numpy scalars unwrapped)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _index(name: str) -> int:
    return int(name.split("_")[1])


def _crc(arrays: tuple[np.ndarray, ...]) -> int:
    crc = 0
    for arr in arrays:
        crc = zlib.crc32(np.ascontiguousarray(arr).tobytes(), crc)
    return crc
