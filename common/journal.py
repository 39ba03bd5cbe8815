"""A rollback journal that makes a sequence of writes to one file atomic (SQLite's rollback journal).

HDF5 updates its metadata in place (B-trees, heaps, object headers, the superblock). A writer killed
while the library flushes them can leave a file that no longer opens, or whose groups no longer list
(measured: ``tools/archive_killtest.py``). :class:`JournaledFile` is the file object that ``h5py`` writes
through (``h5py.File(journaled_file, mode)``): before a byte that existed when the transaction began is
overwritten, its 4 KiB page is copied into ``<file>-journal`` and the journal is flushed to disk. Bytes
past the original end need no copy. :meth:`JournaledFile.commit` makes the file durable and deletes the
journal; a journal found later belongs to a transaction that never committed, and :func:`rollback`
puts the saved pages back and cuts the file to its original length, leaving the file exactly as it was
before that transaction.

Journal layout: header ``MAGIC | original size (u64) | crc32 (u32)``, then records
``offset (u64) | length (u32) | crc32 of data (u32) | data``. The header and every record reach the disk
before the write they protect; a torn last record (the writer died while appending it) protected a
write that never happened and is ignored.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

MAGIC = b"RSDJRNL1"
PAGE = 4096
_HEADER = struct.Struct("<8sQI")
_RECORD = struct.Struct("<QII")


def journal_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + "-journal")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rollback(path: str | Path) -> int | None:
    """Undo an uncommitted transaction on ``path`` if its journal exists. Returns the number of pages put
    back (None: there was no journal)."""
    path = Path(path)
    jpath = journal_path(path)
    if not jpath.exists():
        return None
    data = jpath.read_bytes()
    restored = 0
    if len(data) >= _HEADER.size:
        magic, size0, crc = _HEADER.unpack_from(data, 0)
        if magic == MAGIC and zlib.crc32(data[:16]) == crc:
            at = _HEADER.size
            with open(path, "r+b") as fh:
                while at + _RECORD.size <= len(data):
                    offset, length, rcrc = _RECORD.unpack_from(data, at)
                    body = data[at + _RECORD.size : at + _RECORD.size + length]
                    if len(body) != length or zlib.crc32(body) != rcrc:
                        break  # torn last record: its write never happened
                    fh.seek(offset)
                    fh.write(body)
                    restored += 1
                    at += _RECORD.size + length
                fh.truncate(size0)
                fh.flush()
                os.fsync(fh.fileno())
        # a header that never reached the disk whole: nothing was written under it
    jpath.unlink()
    _fsync_dir(jpath)
    return restored


class JournaledFile(io.RawIOBase):
    """A binary file whose writes since opening are undone by :func:`rollback` unless :meth:`commit` ran."""

    def __init__(self, path: str | Path, durable: bool = True):
        super().__init__()
        self.path = Path(path)
        self.durable = durable  # fsync the journal before each protected write (power loss, not only kill -9)
        rollback(self.path)  # an earlier transaction that never committed
        self._fh = open(self.path, "r+b")
        self.size0 = os.fstat(self._fh.fileno()).st_size
        self._jpath = journal_path(self.path)
        self._journal = open(self._jpath, "wb")
        head = struct.pack("<8sQ", MAGIC, self.size0)
        self._journal.write(head + struct.pack("<I", zlib.crc32(head)))
        self._sync_journal()
        _fsync_dir(self._jpath)
        self._saved: set[int] = set()
        self.pages_saved = 0

    # io.RawIOBase
    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def readinto(self, buffer) -> int:  # noqa: ANN001 (a writable buffer)
        return self._fh.readinto(buffer)

    def write(self, data) -> int:  # noqa: ANN001 (bytes-like)
        start = self._fh.tell()
        self._protect(start, start + len(memoryview(data).cast("B")))
        return self._fh.write(data)

    def truncate(self, size: int | None = None) -> int:
        size = self._fh.tell() if size is None else size
        self._protect(size, self.size0)
        return self._fh.truncate(size)

    def flush(self) -> None:
        if not self._fh.closed:
            self._fh.flush()

    def _protect(self, start: int, end: int) -> None:
        """Copy the pages of [start, end) that existed at the start into the journal, once each."""
        end = min(end, self.size0)
        if start >= end:
            return
        wrote = False
        pos = self._fh.tell()
        for page in range(start // PAGE, (end - 1) // PAGE + 1):
            if page in self._saved:
                continue
            offset = page * PAGE
            length = min(PAGE, self.size0 - offset)
            self._fh.seek(offset)
            body = self._fh.read(length)
            self._journal.write(_RECORD.pack(offset, len(body), zlib.crc32(body)) + body)
            self._saved.add(page)
            self.pages_saved += 1
            wrote = True
        self._fh.seek(pos)
        if wrote:
            self._sync_journal()

    def _sync_journal(self) -> None:
        self._journal.flush()
        if self.durable:
            os.fsync(self._journal.fileno())

    def commit(self) -> None:
        """Make the writes durable and drop the journal: from here on they stay."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._journal.close()
        self._jpath.unlink()
        if self.durable:
            _fsync_dir(self._jpath)

    def close(self) -> None:
        """Close without committing (the journal stays: the next open or :func:`rollback` undoes the writes)."""
        if not self._fh.closed:
            self._fh.close()
        if not self._journal.closed:
            self._journal.close()
        super().close()
