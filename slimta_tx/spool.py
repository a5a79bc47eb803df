"""Where a message body goes while it arrives: memory up to a threshold, then a file.

A connection holds at most ``memory_limit`` bytes of message in memory; past that the body
streams to an unlinked temporary file in ``directory``. Writes to that file go to the page
cache (no fsync: durability is the bus's job), so they are cheap enough for the reactor thread.

A write that fails (a full disk, no descriptor left, an I/O error) does not raise: the spool
remembers the error, drops what it holds and ignores further writes, so the session reads the
body to its end and answers :func:`storage_failure_reply` after it (``452 4.3.1`` for a full
disk, else ``451 4.3.0``); the client keeps the message and tries again.
"""

from __future__ import annotations

import errno
import io
import os
import tempfile
from collections.abc import Iterator
from typing import Any, BinaryIO

from twisted.logger import Logger

from slimta_tx.reply import Reply

__all__ = ["Spool", "SpoolFactory", "not_stored", "storage_failure_reply"]

log = Logger()

DEFAULT_MEMORY_LIMIT = 256 * 1024
READ_SIZE = 256 * 1024
# Errors that mean "no room": RFC 5321 4.3.2 lists 452 (insufficient system storage) after the
# data, and RFC 3463 X.3.1 is "mail system full".
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT})


def storage_failure_reply(error: BaseException) -> Reply:
    """The reply to a message that could not be stored because of ``error``."""
    if isinstance(error, OSError) and error.errno in _NO_ROOM:
        return Reply("452", "Insufficient system storage; try again later", "4.3.1")
    return Reply("451", "Local error in processing; try again later", "4.3.0")


def not_stored(spool: Spool, peer: object) -> Reply:
    """The reply to a body ``spool`` could not store, and the one log line saying why."""
    error = spool.error or OSError("unknown error")
    reply = storage_failure_reply(error)
    log.error(
        "{peer} message not stored: spool write failed: {error} ({size} bytes); "
        "answered {code} {esc}",
        peer=peer,
        error=error,
        size=spool.size,
        code=reply.code,
        esc=reply.enhanced_status_code,
    )
    return reply


class Spool:
    """One message body, written once then read any number of times."""

    #: Spool files open in this process (each holds a descriptor; see slimta_tx.capacity).
    files_open = 0

    def __init__(self, directory: str | None = None, memory_limit: int = DEFAULT_MEMORY_LIMIT):
        self._directory = directory
        self._memory_limit = memory_limit
        self._memory: bytearray | None = bytearray()
        self._file: BinaryIO | None = None
        self.size = 0
        self.closed = False
        #: The first write error (the body is then dropped and later writes ignored).
        self.error: OSError | None = None

    @property
    def in_memory(self) -> bool:
        return self._file is None

    def _check_readable(self) -> None:
        if self.closed:
            raise ValueError("spool is closed")
        if self.error is not None:
            raise OSError(self.error.errno, f"the message was not stored: {self.error}")

    def write(self, data: bytes) -> None:
        if self.closed:
            raise ValueError("spool is closed")
        self.size += len(data)
        if self._memory is not None:
            if len(self._memory) + len(data) <= self._memory_limit:
                self._memory += data
                return
            try:
                # Unbuffered: each chunk is one write(2), with no copy into a Python buffer.
                self._file = tempfile.TemporaryFile(
                    dir=self._directory, prefix="slimta-spool-", buffering=0
                )
                Spool.files_open += 1
                self._write_all(self._memory)
            except OSError as e:
                self._failed(e)
                return
            self._memory = None
        elif self.error is not None:
            return
        try:
            self._write_all(data)
        except OSError as e:
            self._failed(e)

    def _failed(self, error: OSError) -> None:
        """Keep the error, release the memory and the file (and its blocks on disk)."""
        self.error = error
        self._memory = None
        self._close_file()

    def _close_file(self) -> None:
        if self._file is not None:
            Spool.files_open -= 1
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None

    def _write_all(self, data: bytes | bytearray) -> None:
        assert self._file is not None
        view = memoryview(data)
        while view:
            written = self._file.write(view)
            view = view[written or 0 :]

    def open(self) -> BinaryIO:
        """A new binary reader positioned at the start of the body."""
        self._check_readable()
        if self._memory is not None:
            return io.BytesIO(bytes(self._memory))
        assert self._file is not None
        self._file.flush()
        # Not os.fdopen(os.dup(fd)): a dup shares the file offset, which sits at the end.
        return io.BufferedReader(_FileReader(self._file.fileno(), self.size))

    def chunks(self, size: int = READ_SIZE) -> Iterator[bytes]:
        """The body in chunks of at most ``size`` bytes (reads with ``pread``: position-safe)."""
        self._check_readable()
        if self._memory is not None:
            view = bytes(self._memory)
            for start in range(0, len(view), size):
                yield view[start : start + size]
            return
        assert self._file is not None
        self._file.flush()
        fd = self._file.fileno()
        offset = 0
        while offset < self.size:
            chunk = os.pread(fd, min(size, self.size - offset), offset)
            if not chunk:
                break
            offset += len(chunk)
            yield chunk

    def write_to(self, fd: int, prefix: bytes = b"") -> None:
        """Write ``prefix`` then the whole body to the file descriptor ``fd`` (blocking).

        A body in memory goes out with ``prefix`` in one ``writev``; a body in a file is copied
        by the kernel (``copy_file_range``, else ``sendfile``), never through Python buffers.
        Raises OSError (a full disk: ENOSPC) after a partial write; the caller removes the file.
        """
        if self.closed:
            raise ValueError("spool is closed")
        if self._memory is not None:
            _write_all(fd, [prefix, self._memory])
            return
        assert self._file is not None
        if prefix:
            _write_all(fd, [prefix])
        _copy_file(self._file.fileno(), fd, self.size)

    def head(self, limit: int = 64 * 1024) -> bytes:
        """Up to ``limit`` bytes from the start (enough for the header section, usually)."""
        out = bytearray()
        for chunk in self.chunks(min(limit, READ_SIZE)):
            out += chunk
            if len(out) >= limit:
                break
        return bytes(out[:limit])

    def read(self) -> bytes:
        """The whole body in memory: for tests and small messages only."""
        return b"".join(self.chunks())

    def close(self) -> None:
        self._close_file()
        self._memory = None
        self.closed = True


def _write_all(fd: int, parts: list[bytes | bytearray]) -> None:
    views = [memoryview(part) for part in parts if part]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def _copy_file(src: int, dst: int, size: int) -> None:
    """Copy the first ``size`` bytes of ``src`` to the current end of ``dst`` in the kernel."""
    offset = 0
    copy: Any = getattr(os, "copy_file_range", None)
    while offset < size:
        count = min(size - offset, 1 << 30)
        copied = 0
        if copy is not None:
            try:
                copied = copy(src, dst, count, offset)
            except OSError as e:
                # Across file systems (EXDEV) or where unsupported: sendfile, then plain I/O.
                if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                copy = None
                continue
        else:
            try:
                copied = os.sendfile(dst, src, offset, count)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOSYS):
                    raise
                chunk = os.pread(src, min(count, READ_SIZE), offset)
                _write_all(dst, [chunk])
                copied = len(chunk)
        if copied <= 0:
            raise OSError(errno.EIO, "the spool file ended before its recorded size")
        offset += copied


class _FileReader(io.RawIOBase):
    """A reader of the first ``size`` bytes of ``fd`` with its own position (``pread``)."""

    def __init__(self, fd: int, size: int) -> None:
        super().__init__()
        self._fd = os.dup(fd)
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = os.pread(self._fd, min(len(view), max(self._size - self._pos, 0)), self._pos)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class SpoolFactory:
    """Makes :class:`Spool` objects with one directory and memory threshold."""

    def __init__(self, directory: str | None = None, memory_limit: int = DEFAULT_MEMORY_LIMIT):
        self.directory = directory
        self.memory_limit = memory_limit

    def __call__(self) -> Spool:
        return Spool(self.directory, self.memory_limit)
