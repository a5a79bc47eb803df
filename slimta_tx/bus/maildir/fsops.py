"""The file-system steps of a Maildir commit, one function each.

:class:`~slimta_tx.bus.maildir.store.MaildirStore` calls these through the module (``fsops.x``),
never by a name imported elsewhere, so that the tests' fault injector
(``tests/support/faults.py``) can put a labelled hook before each step: an ``OSError`` there
must become a 451 for the whole batch, a SIGKILL there must leave nothing partial in ``new/``.

Every function raises ``OSError`` on failure and leaves closing to its caller.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from slimta_tx.bus.maildir import _linux
from slimta_tx.spool import Spool

__all__ = [
    "append_journal",
    "create_journal",
    "create_message",
    "publish_message",
    "start_writeback",
    "sync_data",
    "sync_journal_dir",
    "sync_new",
    "write_message",
]

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_APPEND = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
# Without O_EXCL: a file made with O_TMPFILE may then be linked into a directory.
_TMPFILE = os.O_WRONLY | getattr(os, "O_TMPFILE", 0) | os.O_CLOEXEC


def tmpfile_supported(tmp_dir: int) -> bool:
    """Whether files can be made nameless in ``tmp/`` and linked into place later (Linux
    O_TMPFILE and /proc, on a file system that supports them)."""
    if not getattr(os, "O_TMPFILE", 0):
        return False
    probe = f".tmpfile-probe.{os.getpid()}"
    try:
        fd = os.open(".", _TMPFILE, 0o600, dir_fd=tmp_dir)
        try:
            os.link(f"/proc/self/fd/{fd}", probe, dst_dir_fd=tmp_dir, follow_symlinks=True)
            os.unlink(probe, dir_fd=tmp_dir)
        finally:
            os.close(fd)
    except OSError:
        return False
    return True


def create_message(tmp_dir: int, name: str, nameless: bool) -> int:
    """A new, empty message file in ``tmp/``: without a name (O_TMPFILE: nothing is left
    behind if the process dies before :func:`publish_message`), or as ``tmp/<name>``."""
    if nameless:
        return os.open(".", _TMPFILE, 0o600, dir_fd=tmp_dir)
    return os.open(name, _CREATE, 0o600, dir_fd=tmp_dir)


def write_message(fd: int, head: bytes, body: Spool) -> None:
    """The trace headers, then the body (in-kernel copy when the body is a spool file)."""
    body.write_to(fd, head)


def start_writeback(fd: int) -> None:
    """Start writing the file's data to the device now, without waiting (Linux only)."""
    if _linux.sync_file_range_available():
        _linux.sync_file_range(fd, _linux.SYNC_FILE_RANGE_WRITE)


def create_journal(envelope_dir: int, name: str) -> int:
    """A new envelope journal segment, opened for appending."""
    return os.open(name, _APPEND, 0o600, dir_fd=envelope_dir)


def sync_journal_dir(envelope_dir: int) -> None:
    """Make a new segment's name durable (once per segment)."""
    os.fsync(envelope_dir)


def append_journal(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def sync_data(strategy: DataSync, fds: Sequence[int]) -> None:
    """Make the data (and what is needed to read it back) of every file durable."""
    strategy.sync(fds)


def publish_message(fd: int, tmp_dir: int, new_dir: int, name: str, nameless: bool) -> None:
    """Give the complete file its name in ``new/`` (link a nameless file, or rename
    ``tmp/<name>``): from now on readers see it."""
    if nameless:
        os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=new_dir, follow_symlinks=True)
    else:
        os.rename(name, name, src_dir_fd=tmp_dir, dst_dir_fd=new_dir)


def sync_new(new_dir: int) -> None:
    """Make the batch's names in ``new/`` durable."""
    os.fsync(new_dir)


class DataSync:
    """How :func:`sync_data` makes a batch's file data durable; see docs/maildir.md.

    - ``per-file``: ``fdatasync`` of every file (concurrently through Linux AIO when
      available, so the device's cache flushes merge). Right on any POSIX file system.
    - ``journal``: wait for each file's data writeback (``sync_file_range``); the ``fsync`` of
      ``new/`` that follows commits the ext4 journal, which carries every file's size and
      block map with the renames. Right only on ext4 with a journal in ``data=ordered`` or
      ``data=writeback`` mode (:func:`slimta_tx.bus.maildir.durability.detect` checks).
    """

    def __init__(self, mode: str) -> None:
        if mode not in ("per-file", "journal"):
            raise ValueError(f"unknown sync mode {mode!r}")
        if mode == "journal" and not _linux.sync_file_range_available():
            raise ValueError("the journal sync mode needs Linux (sync_file_range)")
        self.mode = mode
        self._parallel = _linux.ParallelSync.create() if mode == "per-file" else None

    def sync(self, fds: Sequence[int]) -> None:
        if self.mode == "journal":
            for fd in fds:
                _linux.sync_file_range(fd, _linux.SYNC_FILE_RANGE_WAIT)
        elif self._parallel is not None and len(fds) > 1:
            self._parallel.fdatasync(fds)
        else:
            for fd in fds:
                os.fdatasync(fd)

    def close(self) -> None:
        if self._parallel is not None:
            self._parallel.close()
            self._parallel = None
