"""Envelope journals: where a Maildir message's envelope (sender, recipients, ...) is kept.

A Maildir file holds the message; what the headers cannot say lives in ``envelope/``, as
append-only *segments* of JSON lines (``envelope/<start>.M<usec>P<pid>Q<n>.<host>.jsonl``).
Each writer appends to a segment of its own; one ``write`` and one sync cover a whole batch.

Format (also for programs in other languages): every line that ends with ``\\n`` is one JSON
object (UTF-8) with at least ``maildir_name``, the message's file name in ``new/`` (in
``cur/`` the same name plus ``:2,<flags>``). A last line without ``\\n`` was cut short by a
crash: its message never reached ``new/``, skip it. A name is never reused, so a record is
found by scanning the segments for its ``maildir_name`` (:func:`read_envelopes`,
:func:`envelope_of`).

Older releases wrote one ``envelope/<name>.json`` per message; the readers here find those
too.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from itertools import count
from typing import Any

from slimta_tx.bus.maildir import fsops

__all__ = ["EnvelopeJournal", "envelope_of", "message_key", "read_envelopes"]

SEGMENT_SUFFIX = ".jsonl"
LEGACY_SUFFIX = ".json"
#: A segment is closed and a new one started after this many seconds or bytes.
MAX_SEGMENT_AGE = 3600.0
MAX_SEGMENT_BYTES = 16 * 1024 * 1024

_segments = count(1)


def message_key(name: str) -> str:
    """The name a record is filed under: a ``cur/`` name without its ``:2,flags`` info."""
    return name.split(":2,", 1)[0]


class EnvelopeJournal:
    """The segment a :class:`~slimta_tx.bus.maildir.store.MaildirStore` appends to.

    Used by the store's writer only (not thread-safe). ``clock`` gives the time.
    """

    def __init__(
        self,
        envelope_dir: int,
        hostname: str,
        sync: bool = True,
        clock: Callable[[], float] = time.time,
        max_age: float = MAX_SEGMENT_AGE,
        max_bytes: int = MAX_SEGMENT_BYTES,
    ) -> None:
        self._dir = envelope_dir
        self._hostname = hostname
        self._sync = sync
        self._clock = clock
        self.max_age = max_age
        self.max_bytes = max_bytes
        self.fd: int | None = None
        self.name: str | None = None
        self._opened_at = 0.0
        self._size = 0

    def prepare(self) -> int:
        """The segment to append to, starting a new one (durably named) when due."""
        now = self._clock()
        if self.fd is not None and (
            now - self._opened_at > self.max_age or self._size >= self.max_bytes
        ):
            self.close()
        if self.fd is None:
            usec = int((now % 1) * 1_000_000)
            name = (
                f"{int(now)}.M{usec}P{os.getpid()}Q{next(_segments)}.{self._hostname}"
                + SEGMENT_SUFFIX
            )
            fd = fsops.create_journal(self._dir, name)
            try:
                if self._sync:
                    fsops.sync_journal_dir(self._dir)
            except BaseException:
                os.close(fd)
                os.unlink(name, dir_fd=self._dir)
                raise
            self.fd, self.name, self._opened_at, self._size = fd, name, now, 0
        return self.fd

    def append(self, data: bytes) -> None:
        assert self.fd is not None
        fsops.append_journal(self.fd, data)
        self._size += len(data)

    def abandon(self) -> None:
        """After a failed batch: never append to this segment again (it may end in a partial
        line); the next batch starts a new one."""
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
        self.fd = self.name = None


def record_line(name: str, envelope_record: dict[str, Any]) -> bytes:
    """One journal line: ``maildir_name`` first, then the envelope (JSON, UTF-8)."""
    record = {"maildir_name": name, **envelope_record}
    return json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"


def iter_segment(path: str) -> Iterator[dict[str, Any]]:
    """The complete records of one segment (a cut-short last line is skipped)."""
    with open(path, "rb") as f:
        data = f.read()
    for line in data.split(b"\n")[:-1]:  # the part after the last \n is never complete
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a failed write, followed by later ones
        if isinstance(record, dict) and isinstance(record.get("maildir_name"), str):
            yield record


def _envelope_dir(maildir: str | os.PathLike[str]) -> str:
    return os.path.join(os.fspath(maildir), "envelope")


def read_envelopes(maildir: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Every envelope record under ``maildir``, by message name (see the module docstring).

    The record of a message in ``cur/`` is under :func:`message_key` of its name.
    """
    found: dict[str, dict[str, Any]] = {}
    directory = _envelope_dir(maildir)
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.name.endswith(SEGMENT_SUFFIX):
            for record in iter_segment(entry.path):
                found[record["maildir_name"]] = record
        elif entry.name.endswith(LEGACY_SUFFIX) and not entry.name.startswith("."):
            legacy = _read_legacy(entry.path)
            if legacy is not None:
                found[entry.name[: -len(LEGACY_SUFFIX)]] = legacy
    return found


def envelope_of(maildir: str | os.PathLike[str], name: str) -> dict[str, Any] | None:
    """The envelope record of the message called ``name`` (in ``new/`` or ``cur/``), or None.

    Reads the segments until found; to look up many messages, :func:`read_envelopes` once.
    """
    key = message_key(os.path.basename(name))
    directory = _envelope_dir(maildir)
    legacy = os.path.join(directory, key + LEGACY_SUFFIX)
    if os.path.exists(legacy):
        return _read_legacy(legacy)
    for entry in sorted(os.scandir(directory), key=lambda e: e.name, reverse=True):
        if entry.name.endswith(SEGMENT_SUFFIX):
            for record in iter_segment(entry.path):
                if record["maildir_name"] == key:
                    return record
    return None


def _read_legacy(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            record = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
