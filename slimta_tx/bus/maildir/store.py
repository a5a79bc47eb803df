"""The Maildir's writer: commits a batch of messages with one set of syncs (blocking).

A batch, in order (each step is a function of :mod:`~slimta_tx.bus.maildir.fsops`); steps
1-4 are :meth:`MaildirStore.write`, step 5 is :meth:`MaildirStore.sync_names`, which may cover
several written batches at once (the bus runs it beside the next batch's writing):

1. every message: create a file in ``tmp/`` (nameless, O_TMPFILE, where the system allows;
   else ``tmp/<name>``), write ``Return-Path:``, ``Received:`` and the body, start its
   writeback (see ``EARLY_WRITEBACK``);
2. one ``write`` of the batch's envelope records to the envelope journal (a new segment's
   name is made durable first);
3. one data sync for the batch (the messages' files and the journal segment);
4. every message: link it into ``new/<name>`` (or rename ``tmp/<name>`` there);
5. one ``fsync`` of ``new/``.

Only then does the bus answer 250. A message is in ``new/`` only after its bytes and its
envelope are durable; any failure takes the whole batch back out (451 for each message). See
docs/maildir.md for the crash story and why step 3 suffices on each file system.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import count
from typing import Any

from slimta_tx.bus.maildir import fsops
from slimta_tx.bus.maildir.durability import MODES, detect
from slimta_tx.bus.maildir.journal import EnvelopeJournal, record_line
from slimta_tx.envelope import Envelope
from slimta_tx.spool import Spool

__all__ = ["CommitStats", "MaildirStore", "StoredMessage"]

SUBDIRS = ("tmp", "new", "cur", "envelope")
# In per-file mode, files at least this big start their writeback as soon as they are written
# (so it overlaps the writing of the next ones); the data sync starts it for smaller ones. In
# journal mode every file's writeback starts at once: the data sync only waits for it.
EARLY_WRITEBACK = 64 * 1024
_deliveries = count(1)


def safe_hostname(name: str) -> str:
    """The host name as a Maildir name part (``/`` and ``:`` escaped as the spec says)."""
    return name.replace("/", "\\057").replace(":", "\\072")


@dataclass
class StoredMessage:
    """One message for :meth:`MaildirStore.commit_messages`.

    :ivar queue_id: goes into the file name (``...R<queue_id>.<host>``).
    :ivar head: bytes written before the body (the trace headers).
    :ivar body: the message.
    :ivar record: its envelope record (``maildir_name`` is added in front).
    """

    queue_id: str
    head: bytes
    body: Spool
    record: dict[str, Any]

    @classmethod
    def of(cls, envelope: Envelope) -> StoredMessage:
        """What the edge stores: ``Return-Path:``, ``Received:``, the message as received."""
        if envelope.message is None:
            raise ValueError(f"envelope {envelope.queue_id} has no message")
        head = envelope.return_path_header() + envelope.received_header()
        return cls(envelope.queue_id, head, envelope.message, envelope.to_json_dict())


@dataclass
class CommitStats:
    """What the store has done: batches and messages committed, syncs issued."""

    batches: int = 0
    messages: int = 0
    failed_batches: int = 0
    failed_syncs: int = 0
    data_syncs: int = 0  # calls of fsops.sync_data (each covers a whole batch)
    dir_syncs: int = 0  # fsyncs of new/ (each covers one batch or more)


class MaildirStore:
    """Writes batches of messages into the Maildir at ``path`` (created if missing).

    :param fsync: False only for benchmarks on throwaway storage (no sync at all).
    :param sync_mode: ``auto`` (detect), ``per-file`` or ``journal``; see
        :class:`~slimta_tx.bus.maildir.fsops.DataSync`. ``journal`` is only right on ext4
        with a journal; ``auto`` picks it only there.

    Every method blocks. :meth:`write` is serialised by a lock; :meth:`sync_names` may run
    beside it in another thread.
    """

    def __init__(self, path: str, fsync: bool = True, sync_mode: str = "auto") -> None:
        if sync_mode not in MODES:
            raise ValueError(f"sync_mode must be one of {MODES}, not {sync_mode!r}")
        self.path = os.path.abspath(path)
        for sub in SUBDIRS:
            os.makedirs(os.path.join(self.path, sub), mode=0o700, exist_ok=True)
        self.fsync = fsync
        self.sync_mode = detect(self.path) if sync_mode == "auto" else sync_mode
        self.hostname = safe_hostname(socket.gethostname())
        self.stats = CommitStats()
        self._lock = threading.Lock()
        self._dirs: dict[str, int] = {}
        self._dirs_lock = threading.Lock()
        self._data_sync: fsops.DataSync | None = None
        self.journal: EnvelopeJournal | None = None
        #: Messages are written as nameless files (O_TMPFILE) and linked into new/, rather
        #: than written as tmp/<name> and renamed; None until the first commit finds out.
        self.nameless: bool | None = None

    def _dir(self, sub: str) -> int:
        fd = self._dirs.get(sub)
        if fd is None:
            with self._dirs_lock:
                fd = self._dirs.get(sub)
                if fd is None:
                    fd = os.open(os.path.join(self.path, sub), os.O_RDONLY | os.O_DIRECTORY)
                    self._dirs[sub] = fd
        return fd

    def unique_name(self, queue_id: str) -> str:
        now = time.time()
        usec = int((now % 1) * 1_000_000)
        return f"{int(now)}.M{usec}P{os.getpid()}Q{next(_deliveries)}R{queue_id}.{self.hostname}"

    def commit(self, envelopes: Sequence[Envelope]) -> list[str]:
        """Store every envelope's message durably; their names in ``new/``, in order.

        Raises (OSError, usually) when any step fails; then none of them is in ``new/``.
        """
        return self.commit_messages([StoredMessage.of(envelope) for envelope in envelopes])

    def commit_messages(self, messages: Sequence[StoredMessage]) -> list[str]:
        """:meth:`commit` for messages that did not come from the edge (e.g. a consumer)."""
        names = self.write(messages)
        self.sync_names([names])
        return names

    def write_envelopes(self, envelopes: Sequence[Envelope]) -> list[str]:
        return self.write([StoredMessage.of(envelope) for envelope in envelopes])

    def write(self, messages: Sequence[StoredMessage]) -> list[str]:
        """Steps 1-4: the messages' data and envelopes durable, their names in ``new/``.

        Not yet acknowledged: their names become durable with :meth:`sync_names`. Raises when
        any step fails; then none of them is in ``new/``.
        """
        with self._lock:
            try:
                names = self._write(messages)
            except BaseException:
                self.stats.failed_batches += 1
                raise
            self.stats.batches += 1
            self.stats.messages += len(names)
            return names

    def sync_names(self, batches: Sequence[Sequence[str]]) -> None:
        """Step 5: the names :meth:`write` gave these batches are durable (one ``fsync`` of
        ``new/`` for all of them). On failure they are taken back out of ``new/``."""
        if not self.fsync:
            return
        new = self._dir("new")
        try:
            fsops.sync_new(new)
        except BaseException:
            self.stats.failed_syncs += 1
            for name in (name for batch in batches for name in batch):
                try:
                    os.unlink(name, dir_fd=new)
                except OSError:
                    pass
            raise
        self.stats.dir_syncs += 1

    def _write(self, messages: Sequence[StoredMessage]) -> list[str]:
        tmp, new = self._dir("tmp"), self._dir("new")
        if self.nameless is None:
            self.nameless = fsops.tmpfile_supported(tmp)
        nameless = self.nameless
        journal_mode = self.sync_mode == "journal"
        if self.journal is None:
            self.journal = EnvelopeJournal(self._dir("envelope"), self.hostname, self.fsync)
        journal = self.journal
        if self._data_sync is None and self.fsync:
            self._data_sync = fsops.DataSync(self.sync_mode)
        names: list[str] = []
        fds: list[int] = []
        published = 0
        try:
            lines = []
            for message in messages:
                name = self.unique_name(message.queue_id)
                fd = fsops.create_message(tmp, name, nameless)
                names.append(name)
                fds.append(fd)
                fsops.write_message(fd, message.head, message.body)
                if self.fsync and (journal_mode or message.body.size >= EARLY_WRITEBACK):
                    fsops.start_writeback(fd)
                lines.append(record_line(name, message.record))
            segment = journal.prepare()
            journal.append(b"".join(lines))
            if self.fsync and journal_mode:
                fsops.start_writeback(segment)  # in flight with the messages' data
            if self._data_sync is not None:
                fsops.sync_data(self._data_sync, [*fds, segment])
                self.stats.data_syncs += 1
            for fd, name in zip(fds, names, strict=True):
                fsops.publish_message(fd, tmp, new, name, nameless)
                published += 1
        except BaseException:
            journal.abandon()
            self._take_back(names, published, nameless)
            raise
        finally:
            for fd in fds:
                os.close(fd)
        return names

    def _take_back(self, names: list[str], published: int, nameless: bool) -> None:
        """After a failure: nothing of the batch may stay where readers look, nor in tmp/.

        The client is told 451 and sends the message again, so a copy that did reach ``new/``
        goes; should even that removal not last (the disk is failing), the copy is complete
        and has its envelope: the worst case is one duplicate, never a partial message.
        """
        for i, name in enumerate(names):
            if i >= published and nameless:
                continue  # no name anywhere: gone with its descriptor
            directory = self._dirs["new"] if i < published else self._dirs["tmp"]
            try:
                os.unlink(name, dir_fd=directory)
            except OSError:
                pass
        if published and self.fsync:
            try:
                os.fsync(self._dirs["new"])
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            if self.journal is not None:
                self.journal.close()
                self.journal = None
            if self._data_sync is not None:
                self._data_sync.close()
                self._data_sync = None
            for fd in self._dirs.values():
                os.close(fd)
            self._dirs.clear()
