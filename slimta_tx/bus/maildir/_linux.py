"""Two Linux system calls Python's ``os`` module lacks, through ctypes.

- :func:`sync_file_range`: start (or start and wait for) the writeback of a file's data.
  Nothing about the file's metadata: it is no substitute for ``fdatasync`` on its own (see
  docs/maildir.md for when it is enough).
- :class:`ParallelSync`: ``fdatasync`` of many files at once through Linux AIO
  (``IOCB_CMD_FDSYNC``, Linux 4.18+). The kernel runs the syncs concurrently, so their cache
  flushes merge in the block layer instead of being paid one after another; one thread makes
  two system calls for the whole set.

Both return None (unavailable) where the platform lacks them: callers fall back to
``os.fdatasync`` one file at a time. ctypes releases the GIL during each call.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys
from collections.abc import Sequence

__all__ = ["SYNC_FILE_RANGE_WAIT", "SYNC_FILE_RANGE_WRITE", "ParallelSync", "sync_file_range"]

SYNC_FILE_RANGE_WAIT_BEFORE = 1
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_WAIT_AFTER = 4
#: Write out every dirty page of the range and wait until all of it is on the device.
SYNC_FILE_RANGE_WAIT = (
    SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER
)

_libc: ctypes.CDLL | None = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.sync_file_range.argtypes = [
            ctypes.c_int,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_uint,
        ]
        _libc.sync_file_range.restype = ctypes.c_int
        _libc.syscall.restype = ctypes.c_long
    except (OSError, AttributeError):  # pragma: no cover - a libc without them
        _libc = None


def _raise_errno(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def sync_file_range_available() -> bool:
    return _libc is not None


def sync_file_range(fd: int, flags: int, offset: int = 0, nbytes: int = 0) -> None:
    """``sync_file_range(2)`` on ``fd`` (the whole file by default); raises OSError."""
    assert _libc is not None
    if _libc.sync_file_range(fd, offset, nbytes, flags) != 0:
        _raise_errno("sync_file_range")


# Linux AIO: io_setup / io_submit / io_getevents. System call numbers per architecture
# (include/uapi/asm-generic/unistd.h for arm64, arch/x86/entry/syscalls for x86_64).
_AIO_SYSCALLS = {
    "x86_64": {"io_setup": 206, "io_destroy": 207, "io_getevents": 208, "io_submit": 209},
    "aarch64": {"io_setup": 0, "io_destroy": 1, "io_submit": 2, "io_getevents": 4},
}
_IOCB_CMD_FDSYNC = 3


class _Iocb(ctypes.Structure):
    # struct iocb (include/uapi/linux/aio_abi.h), little-endian layout.
    _fields_ = [
        ("aio_data", ctypes.c_uint64),
        ("aio_key", ctypes.c_uint32),
        ("aio_rw_flags", ctypes.c_int32),
        ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16),
        ("aio_fildes", ctypes.c_uint32),
        ("aio_buf", ctypes.c_uint64),
        ("aio_nbytes", ctypes.c_uint64),
        ("aio_offset", ctypes.c_int64),
        ("aio_reserved2", ctypes.c_uint64),
        ("aio_flags", ctypes.c_uint32),
        ("aio_resfd", ctypes.c_uint32),
    ]


class _IoEvent(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    ]


class ParallelSync:
    """``fdatasync`` of a set of files in one go (Linux AIO); see the module docstring.

    Use :meth:`create`, which returns None where AIO is missing or refused. Not thread-safe:
    one writer thread owns it.
    """

    def __init__(self, libc: ctypes.CDLL, numbers: dict[str, int], capacity: int) -> None:
        self._libc = libc
        self._numbers = numbers
        self.capacity = capacity
        self._ctx = ctypes.c_ulong(0)
        if libc.syscall(numbers["io_setup"], ctypes.c_uint(capacity), ctypes.byref(self._ctx)):
            _raise_errno("io_setup")
        # Built once: a call only fills in the file descriptors.
        self._blocks = (_Iocb * capacity)()
        self._pointers = (ctypes.POINTER(_Iocb) * capacity)()
        for i in range(capacity):
            self._blocks[i].aio_lio_opcode = _IOCB_CMD_FDSYNC
            self._blocks[i].aio_data = i
            self._pointers[i] = ctypes.pointer(self._blocks[i])
        self._events = (_IoEvent * capacity)()

    @classmethod
    def create(cls, capacity: int = 128) -> ParallelSync | None:
        numbers = _AIO_SYSCALLS.get(platform.machine())
        if _libc is None or numbers is None or sys.byteorder != "little":
            return None
        try:
            return cls(_libc, numbers, capacity)
        except OSError:  # ENOSYS (no CONFIG_AIO), EAGAIN (aio-max-nr reached), seccomp
            return None

    def fdatasync(self, fds: Sequence[int]) -> None:
        """``fdatasync`` every fd, concurrently; raises the first failure as OSError."""
        for start in range(0, len(fds), self.capacity):
            self._batch(fds[start : start + self.capacity])

    def _batch(self, fds: Sequence[int]) -> None:
        count = len(fds)
        blocks, events = self._blocks, self._events
        for i, fd in enumerate(fds):
            blocks[i].aio_fildes = fd
        syscall, numbers, ctx = self._libc.syscall, self._numbers, self._ctx
        submitted = syscall(numbers["io_submit"], ctx, count, self._pointers)
        if submitted < 0:
            _raise_errno("io_submit")
        done = 0
        while done < submitted:
            got = syscall(
                numbers["io_getevents"],
                ctx,
                submitted - done,
                submitted - done,
                ctypes.byref(events, done * ctypes.sizeof(_IoEvent)),
                None,
            )
            if got < 0:
                if ctypes.get_errno() == errno.EINTR:  # a signal arrived; keep waiting
                    continue
                _raise_errno("io_getevents")
            done += got
        failures = [-events[i].res for i in range(submitted) if events[i].res < 0]
        # What io_submit did not take (it may take fewer than asked), synced one by one.
        for fd in fds[submitted:]:
            os.fdatasync(fd)
        if failures:
            raise OSError(failures[0], f"fdatasync: {os.strerror(failures[0])}")

    def close(self) -> None:
        if self._ctx.value:
            self._libc.syscall(self._numbers["io_destroy"], self._ctx)
            self._ctx = ctypes.c_ulong(0)
