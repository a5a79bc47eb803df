"""The embedded default bus: each accepted message becomes one file in a Maildir.

Layout under ``path``::

    tmp/       message files being written
    new/       complete messages (Return-Path:, Received:, then the message bytes)
    cur/       for mail readers
    envelope/  <name>.json for each message in new/: sender, recipients and their
               parameters, client facts, received time, queue id

Order of a delivery (all of it in a worker thread, never on the reactor thread):

1. write ``tmp/<name>``, fsync it;
2. write ``envelope/.<name>.json.tmp``, fsync, rename to ``envelope/<name>.json``, fsync
   ``envelope/``;
3. rename ``tmp/<name>`` to ``new/<name>``, fsync ``new/``;
4. reply ``250 2.6.0 Message queued as <queue id>``.

A crash at any point leaves no partial file in ``new/`` (at worst a file in ``tmp/`` and an
envelope without a message, both of which :meth:`MaildirBus.clean` removes). Any OSError is a
4xx with nothing half-written visible (``452 4.3.1`` for a full disk or quota, ``451 4.3.0``
for anything else, such as permission denied or no descriptor left) and one log line: a
failure after step 3's rename (the fsync of ``new/``) takes the message back out of ``new/``,
since the client will send it again.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from itertools import count
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from slimta_tx.envelope import Envelope
from slimta_tx.interfaces import IBus
from slimta_tx.reply import Reply
from slimta_tx.spool import storage_failure_reply

__all__ = ["MaildirBus"]

T = TypeVar("T")
_deliveries = count(1)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _safe_hostname(name: str) -> str:
    return name.replace("/", "\\057").replace(":", "\\072")


@implementer(IBus)
class MaildirBus:
    """Deliver into the Maildir at ``path`` (created if missing).

    :param run_in_thread: ``f -> Deferred`` running ``f()`` off the reactor thread; by default
        the reactor's thread pool. Tests may pass a synchronous runner.
    :param fsync: False only for benchmarks on throwaway storage.
    """

    log = Logger()

    def __init__(
        self,
        path: str,
        reactor: Any = None,
        run_in_thread: Callable[[Callable[[], Any]], Deferred[Any]] | None = None,
        fsync: bool = True,
    ) -> None:
        self.path = os.path.abspath(path)
        self.fsync = fsync
        self._hostname = _safe_hostname(socket.gethostname())
        for sub in ("tmp", "new", "cur", "envelope"):
            os.makedirs(os.path.join(self.path, sub), mode=0o700, exist_ok=True)
        if run_in_thread is None:
            if reactor is None:
                from twisted.internet import reactor as global_reactor

                reactor = global_reactor

            def run_in_thread(f: Callable[[], Any]) -> Deferred[Any]:
                return deferToThreadPool(reactor, reactor.getThreadPool(), f)

        self._run = run_in_thread

    def send(self, envelope: Envelope) -> Deferred[Reply]:
        def failed(failure: Any) -> Reply:
            reply = storage_failure_reply(failure.value)
            if failure.check(OSError):
                # A disk problem, not a bug: one line, no traceback.
                self.log.error(
                    "maildir delivery of {queue_id} failed: {error}; answered {code} {esc}",
                    queue_id=envelope.queue_id,
                    error=failure.value,
                    code=reply.code,
                    esc=reply.enhanced_status_code,
                )
            else:
                self.log.failure(
                    "maildir delivery of {queue_id} failed", failure, queue_id=envelope.queue_id
                )
            return reply

        d: Deferred[Reply] = self._run(lambda: self.deliver(envelope))
        return d.addErrback(failed)

    def unique_name(self, envelope: Envelope) -> str:
        now = time.time()
        usec = int((now % 1) * 1_000_000)
        return (
            f"{int(now)}.M{usec}P{os.getpid()}Q{next(_deliveries)}"
            f"R{envelope.queue_id}.{self._hostname}"
        )

    def deliver(self, envelope: Envelope) -> Reply:
        """Blocking delivery (runs in a worker thread). Raises OSError on failure."""
        if envelope.message is None:
            raise ValueError("envelope has no message")
        name = self.unique_name(envelope)
        tmp_path = os.path.join(self.path, "tmp", name)
        env_dir = os.path.join(self.path, "envelope")
        env_tmp = os.path.join(env_dir, f".{name}.json.tmp")
        env_path = os.path.join(env_dir, f"{name}.json")
        delivered = False
        try:
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(envelope.return_path_header() + envelope.received_header())
                for chunk in envelope.message.chunks():
                    out.write(chunk)
                out.flush()
                if self.fsync:
                    os.fsync(out.fileno())
            record = envelope.to_json_dict()
            record["maildir_name"] = name
            fd = os.open(env_tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8"))
                out.flush()
                if self.fsync:
                    os.fsync(out.fileno())
            os.rename(env_tmp, env_path)
            if self.fsync:
                _fsync_dir(env_dir)
            new_dir = os.path.join(self.path, "new")
            new_path = os.path.join(new_dir, name)
            os.rename(tmp_path, new_path)
            if self.fsync:
                _fsync_dir(new_dir)
            delivered = True
        finally:
            if not delivered:
                # The client gets a 451 and retries: take back whatever became visible.
                for leftover in (
                    os.path.join(self.path, "new", name),
                    tmp_path,
                    env_tmp,
                    env_path,
                ):
                    try:
                        os.unlink(leftover)
                    except OSError:
                        pass
        return Reply("250", f"Message queued as {envelope.queue_id}", "2.6.0")

    def clean(self, older_than: float = 36 * 3600) -> int:
        """Remove leftovers of interrupted deliveries; returns how many files went.

        Old files in ``tmp/`` (the Maildir convention is 36 hours) and envelope records whose
        message is in neither ``new/`` nor ``cur/`` nor ``tmp/``.
        """
        removed = 0
        cutoff = time.time() - older_than
        tmp_dir = os.path.join(self.path, "tmp")
        for entry in os.scandir(tmp_dir):
            if entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
                removed += 1
        present = set(os.listdir(os.path.join(self.path, "new")))
        present |= {n.split(":2,", 1)[0] for n in os.listdir(os.path.join(self.path, "cur"))}
        present |= set(os.listdir(tmp_dir))
        env_dir = os.path.join(self.path, "envelope")
        for entry in os.scandir(env_dir):
            base = (
                entry.name[1:].removesuffix(".json.tmp")
                if entry.name.startswith(".")
                else entry.name.removesuffix(".json")
            )
            if base not in present and entry.stat().st_mtime < time.time() - 60:
                os.unlink(entry.path)
                removed += 1
        return removed
