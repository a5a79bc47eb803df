"""The Maildir bus's two threads: a writer and a syncer, each draining its own queue.

- The reactor thread puts each message in the writer's queue (:meth:`Pipeline.submit`).
- The writer takes everything queued as one batch and writes it
  (:meth:`MaildirStore.write <slimta_tx.bus.maildir.store.MaildirStore.write>`: files,
  envelopes, one data sync, names in ``new/``). If more messages are waiting, it hands the
  written batch to the syncer and writes the next one; if not, it syncs the batch itself (there
  is nothing to overlap, and two hand-overs between threads are saved).
- The syncer takes every batch handed to it as one group and makes their names durable with
  one ``fsync`` of ``new/`` (:meth:`~slimta_tx.bus.maildir.store.MaildirStore.sync_names`).
- Each finished group goes back to the reactor thread in one ``callFromThread``.

The stages talk to each other directly, so a batch never waits for the reactor between them
(a busy reactor finishes its pass over the ready sockets first). Both threads are daemons:
the process may exit with them idle.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from slimta_tx.bus.maildir.store import MaildirStore
from slimta_tx.envelope import Envelope
from slimta_tx.reply import Reply

__all__ = ["Batch", "Finish", "Pipeline"]

# Messages of a batch: envelope, the Deferred of its reply, its name in new/ once written.
Batch = list[tuple[Envelope, "Deferred[Reply]", str]]
# Called in the reactor thread with batches that are done, and the failure if they failed.
Finish = Callable[[list[Batch], Failure | None], None]


class _Job:
    """A function for the writer thread to run between batches (cleaning up)."""

    def __init__(self, function: Callable[[], Any], d: Deferred[Any]) -> None:
        self.function = function
        self.d = d


_WriterItem = tuple[Envelope, "Deferred[Reply]"] | _Job | None


class Pipeline:
    """The writer and syncer threads of one :class:`MaildirBus`; see the module docstring.

    :param reactor: called for the reactor (its ``callFromThread``) when a result is ready.
    """

    def __init__(
        self, store: MaildirStore, reactor: Callable[[], Any], finish: Finish, name: str
    ) -> None:
        self.store = store
        self._reactor = reactor
        self._finish = finish
        self._name = name
        self._writer_queue: queue.SimpleQueue[_WriterItem] | None = None
        self._syncer_queue: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self._stopped: Deferred[None] | None = None

    def _start(self) -> queue.SimpleQueue[_WriterItem]:
        if self._writer_queue is None:
            self._writer_queue = queue.SimpleQueue()
            self._syncer_queue = queue.SimpleQueue()
            for target, role, args in (
                (self._write_loop, "writer", (self._writer_queue, self._syncer_queue)),
                (self._sync_loop, "syncer", (self._syncer_queue,)),
            ):
                threading.Thread(
                    target=target, args=args, name=f"{self._name} {role}", daemon=True
                ).start()
        return self._writer_queue

    def submit(self, envelope: Envelope, d: Deferred[Reply]) -> None:
        """Queue a message (reactor thread); ``d`` fires once its batch is done."""
        self._start().put((envelope, d))

    def run(self, function: Callable[[], Any]) -> Deferred[Any]:
        """Run ``function`` in the writer thread, between batches; fires with its result."""
        d: Deferred[Any] = Deferred()
        self._start().put(_Job(function, d))
        return d

    def stop(self) -> Deferred[None]:
        """Finish what is queued, then end both threads; fires when they have."""
        done: Deferred[None] = Deferred()
        jobs, self._writer_queue = self._writer_queue, None
        if jobs is None:
            done.callback(None)
        else:
            self._stopped = done
            jobs.put(None)
        return done

    # -- in the threads -------------------------------------------------------------------

    def _call(self, function: Callable[..., Any], *args: Any) -> None:
        self._reactor().callFromThread(function, *args)

    def _write_loop(
        self, jobs: queue.SimpleQueue[_WriterItem], syncer: queue.SimpleQueue[Batch | None]
    ) -> None:
        held: list[_WriterItem] = []  # an item taken while gathering a batch, not a message
        while True:
            item = held.pop() if held else jobs.get()
            if item is None:
                syncer.put(None)  # the syncer ends after what it has
                return
            if isinstance(item, _Job):
                self._run_job(item)
                continue
            gathered = [item]
            while not held:
                try:
                    more = jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None or isinstance(more, _Job):
                    held.append(more)
                else:
                    gathered.append(more)
            batch = self._write(gathered)
            if batch is None:
                continue
            if not held and jobs.empty():
                self._sync([batch])  # nothing else to write: no reason to hand it over
            else:
                syncer.put(batch)

    def _write(self, gathered: list[tuple[Envelope, Deferred[Reply]]]) -> Batch | None:
        try:
            names = self.store.write_envelopes([envelope for envelope, _ in gathered])
        except BaseException:
            batch: Batch = [(envelope, d, "") for envelope, d in gathered]
            self._call(self._finish, [batch], _failure())
            return None
        return [(envelope, d, name) for (envelope, d), name in zip(gathered, names, strict=True)]

    def _sync_loop(self, batches: queue.SimpleQueue[Batch | None]) -> None:
        while True:
            first = batches.get()
            group = [] if first is None else [first]
            ending = first is None
            while not ending:
                try:
                    more = batches.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    ending = True
                else:
                    group.append(more)
            if group:
                self._sync(group)
            if ending:
                if self._stopped is not None:
                    self._call(self._stopped.callback, None)
                return

    def _sync(self, group: list[Batch]) -> None:
        try:
            self.store.sync_names([[name for _, _, name in batch] for batch in group])
        except BaseException:
            self._call(self._finish, group, _failure())
        else:
            self._call(self._finish, group, None)

    def _run_job(self, job: _Job) -> None:
        try:
            result = job.function()
        except BaseException:
            self._call(job.d.errback, _failure())
        else:
            self._call(job.d.callback, result)


def _failure() -> Failure:
    failure = Failure()
    failure.cleanFailure()
    return failure
