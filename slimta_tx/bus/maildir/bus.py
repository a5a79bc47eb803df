"""The embedded default bus: each accepted message becomes one file in a Maildir.

Group commit, in two stages (see :mod:`slimta_tx.bus.maildir.pipeline`):

- the *writer* takes every queued message as one batch (:meth:`MaildirStore.write
  <slimta_tx.bus.maildir.store.MaildirStore.write>`: files, envelopes, one data sync, names
  in ``new/``); messages that reach their final dot meanwhile wait and form the next batch;
- the *syncer* makes the names of every written batch durable with one ``fsync`` of ``new/``
  (:meth:`~slimta_tx.bus.maildir.store.MaildirStore.sync_names`), while the writer already
  writes the next batch; then each of their messages gets ``250 2.6.0``.

A batch costs one data sync and at most one directory sync whatever its size, so under load
the syncs per message fall well below one; a message alone (one client) pays one of each, both
in the writer (nothing could overlap). The two stages are threads of the bus's own (not the
reactor's thread pool, which other buses and name resolution share) and hand batches to each
other directly; one hand-over per batch and stage, not per message or per system call. Any
failure answers ``451 4.3.0`` (``452 4.3.1`` for a full disk) to every message it concerns
(see docs/maildir.md).

With a ``run_in_thread`` runner (tests, or an application that wants its own threads) the
same two stages are scheduled from the reactor thread instead, each through the runner.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from slimta_tx.bus.maildir.clean import DEFAULT_TMP_AGE, clean
from slimta_tx.bus.maildir.pipeline import Batch, Pipeline
from slimta_tx.bus.maildir.store import MaildirStore
from slimta_tx.envelope import Envelope
from slimta_tx.interfaces import IBus, IReadiness
from slimta_tx.reply import Reply
from slimta_tx.spool import storage_failure_reply

__all__ = ["MaildirBus"]

#: How often a started bus runs :meth:`MaildirBus.clean` (seconds).
CLEAN_INTERVAL = 3600.0

Runner = Callable[[Callable[[], Any]], "Deferred[Any]"]


@implementer(IBus, IReadiness)
class MaildirBus:
    """Deliver into the Maildir at ``path`` (created if missing), with group commit.

    :param reactor: provides ``callFromThread`` and the clock for periodic cleaning; the
        global reactor if None.
    :param run_in_thread: ``f -> Deferred`` running ``f()`` off the reactor thread, once per
        batch and stage (and for cleaning); by default the bus's own writer and syncer
        threads. Tests pass a synchronous runner (each message its own batch) or one they step
        by hand.
    :param fsync: False only for benchmarks on throwaway storage.
    :param sync_mode: ``auto`` (the default: ``journal`` on ext4 with a journal, else
        ``per-file``), ``per-file`` or ``journal``; see docs/maildir.md.
    :param clean_interval: seconds between :meth:`clean` runs once :meth:`start` was called
        (``twistd slimta`` calls it); 0 for only the one at start-up.
    """

    log = Logger()

    def __init__(
        self,
        path: str,
        reactor: Any = None,
        run_in_thread: Runner | None = None,
        fsync: bool = True,
        sync_mode: str = "auto",
        clean_interval: float = CLEAN_INTERVAL,
    ) -> None:
        self.store = MaildirStore(path, fsync=fsync, sync_mode=sync_mode)
        self.path = self.store.path
        self._reactor = reactor
        self._pipeline: Pipeline | None = None
        self._run: Runner | None = run_in_thread
        if run_in_thread is None:
            self._pipeline = Pipeline(
                self.store, lambda: self.reactor, self._finish, f"maildir {self.path}"
            )
        self.clean_interval = clean_interval
        self._queue: Batch = []
        self._writing = False
        self._written: list[Batch] = []  # written, waiting for the syncer
        self._syncing = False
        self._cleaner: LoopingCall | None = None

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    @property
    def fsync(self) -> bool:
        return self.store.fsync

    @fsync.setter
    def fsync(self, value: bool) -> None:
        self.store.fsync = value

    @property
    def sync_mode(self) -> str:
        """``per-file`` or ``journal``: how this Maildir's batches are made durable."""
        return self.store.sync_mode

    def send(self, envelope: Envelope) -> Deferred[Reply]:
        d: Deferred[Reply] = Deferred()
        if self._pipeline is not None:
            self._pipeline.submit(envelope, d)
            return d
        self._queue.append((envelope, d, ""))
        if not self._writing:
            self._write_queued()
        return d

    def _finish(self, batches: list[Batch], failure: Failure | None) -> None:
        """In the reactor thread: these batches are done (durable, or failed)."""
        if failure is not None:
            self._fail(failure, batches)
            return
        for batch in batches:
            for envelope, d, _ in batch:
                d.callback(Reply("250", f"Message queued as {envelope.queue_id}", "2.6.0"))

    # -- the two stages scheduled from the reactor thread, through run_in_thread ---------

    def _write_queued(self) -> None:
        batch, self._queue = self._queue, []
        self._writing = True
        envelopes = [envelope for envelope, _, _ in batch]
        assert self._run is not None
        if len(batch) == 1 and not self._syncing and not self._written:
            # A message alone (light load): the writer syncs new/ itself right after, which
            # saves two hand-overs between threads; nothing would overlap anyway.
            self._syncing = True
            d = self._run(partial(self.store.commit, envelopes))
            d.addBoth(self._committed_alone, batch)
            return
        d = self._run(partial(self.store.write_envelopes, envelopes))
        d.addBoth(self._wrote, batch)

    def _committed_alone(self, result: object, batch: Batch) -> None:
        self._synced(result, [batch])
        self._writing = False
        if self._queue:
            self._write_queued()

    def _wrote(self, result: object, batch: Batch) -> None:
        if isinstance(result, Failure):
            self._fail(result, [batch])
        else:
            assert isinstance(result, list)
            self._written.append(
                [(envelope, d, name) for (envelope, d, _), name in zip(batch, result, strict=True)]
            )
            if not self._syncing:
                self._sync_written()
        self._writing = False
        if self._queue:
            self._write_queued()

    def _sync_written(self) -> None:
        batches, self._written = self._written, []
        self._syncing = True
        names = [[name for _, _, name in batch] for batch in batches]
        assert self._run is not None
        d = self._run(partial(self.store.sync_names, names))
        d.addBoth(self._synced, batches)

    def _synced(self, result: object, batches: list[Batch]) -> None:
        self._finish(batches, result if isinstance(result, Failure) else None)
        # Replies may make clients send again at once (send() queues meanwhile): the next
        # stages start only now, with everything that arrived.
        self._syncing = False
        if self._written:
            self._sync_written()

    def _fail(self, failure: Failure, batches: list[Batch]) -> None:
        reply = storage_failure_reply(failure.value or Exception())
        queue_ids = " ".join(envelope.queue_id for batch in batches for envelope, _, _ in batch)
        if failure.check(OSError):
            # A disk problem, not a bug: one line, no traceback (452 4.3.1 for a full disk).
            self.log.error(
                "maildir delivery of {queue_ids} failed: {error}; answered {code} {esc}",
                queue_ids=queue_ids,
                error=failure.value,
                code=reply.code,
                esc=reply.enhanced_status_code,
            )
        else:
            self.log.failure(
                "maildir delivery of {queue_ids} failed", failure, queue_ids=queue_ids
            )
        for batch in batches:
            for _, d, _ in batch:
                d.callback(reply.copy())

    def deliver(self, envelope: Envelope) -> Reply:
        """Blocking delivery of one message, in the calling thread (raises OSError)."""
        self.store.commit([envelope])
        return Reply("250", f"Message queued as {envelope.queue_id}", "2.6.0")

    def unique_name(self, envelope: Envelope) -> str:
        return self.store.unique_name(envelope.queue_id)

    # -- housekeeping -------------------------------------------------------------------

    def clean(self, older_than: float = DEFAULT_TMP_AGE) -> int:
        """Remove leftovers of interrupted or failed deliveries (blocking); returns how many
        files went. See :mod:`slimta_tx.bus.maildir.clean` for what counts."""
        return len(self._clean(older_than))

    def _clean(self, older_than: float = DEFAULT_TMP_AGE) -> list[str]:
        journal = self.store.journal
        return clean(self.path, older_than, keep_segment=journal.name if journal else None)

    def _clean_and_log(self) -> Deferred[None]:
        def report(removed: list[str]) -> None:
            if removed:
                shown = ", ".join(removed[:10]) + (" ..." if len(removed) > 10 else "")
                self.log.info(
                    "maildir {path}: removed {count} leftover files: {files}",
                    path=self.path,
                    count=len(removed),
                    files=shown,
                    removed=removed,
                )

        def failed(failure: Failure) -> None:
            self.log.failure("maildir {path}: cleaning failed", failure, path=self.path)

        run = self._pipeline.run if self._pipeline is not None else self._run
        assert run is not None
        d: Deferred[None] = run(self._clean).addCallbacks(report, failed)
        return d

    def ready(self) -> str | None:
        """IReadiness: None while the Maildir's ``tmp/`` exists and this process may write
        there (``access(2)``: permissions, a read-only mount), else why not. Nothing is
        written: a probe file would race the cleaner's scan of ``tmp/``."""
        tmp = os.path.join(self.path, "tmp")
        try:
            os.stat(tmp)
        except OSError as e:
            return f"maildir not writable: {e.strerror}"
        if not os.access(tmp, os.W_OK | os.X_OK):
            return "maildir not writable: tmp/ is read-only for this process"
        return None

    def start(self) -> Deferred[None]:
        """Clean up now (start-up recovery), then every ``clean_interval`` seconds."""
        d = self._clean_and_log()
        if self.clean_interval > 0 and self._cleaner is None:
            self._cleaner = LoopingCall(self._clean_and_log)
            self._cleaner.clock = self.reactor
            self._cleaner.start(self.clean_interval, now=False)
        return d

    def stop(self) -> Deferred[None]:
        """Stop cleaning; let the writer and the syncer finish what they have, then close the
        files (``twistd slimta`` calls it once the edge has drained its sessions)."""
        if self._cleaner is not None and self._cleaner.running:
            self._cleaner.stop()
        self._cleaner = None
        if self._pipeline is not None:
            done = self._pipeline.stop()
        else:
            done = Deferred()
            done.callback(None)

        def close(_: object) -> None:
            self.store.close()

        return done.addCallback(close)
