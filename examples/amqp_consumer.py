"""The other side of the AMQP bus: take messages off a RabbitMQ queue into a Maildir.

Each message is stored the way the edge's Maildir bus stores mail
(:class:`slimta_tx.bus.maildir.MaildirStore`, see docs/maildir.md): written to ``MAILDIR/tmp``
and synced with its envelope record (a line of ``MAILDIR/envelope/*.jsonl``), renamed into
``MAILDIR/new``, the directory synced; only then is it acknowledged (``basic.ack``). A crash
before the ack makes RabbitMQ deliver the message again (at-least-once): a consumer that must
not keep duplicates skips a ``message_id`` (the edge's queue id) it has already stored.

Run it::

    python examples/amqp_consumer.py --url amqp://guest:guest@127.0.0.1:5672/%2F \\
        --queue mail --maildir ./var/consumed

The message format it reads (see ``docs/bus-amqp.md``): the body is the ``Received:`` header
and the message as received; the ``slimta-envelope`` header is the envelope as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from slimta_tx.bus.maildir import MaildirStore, StoredMessage
from slimta_tx.spool import Spool

log = Logger()
_stores: dict[str, MaildirStore] = {}


def envelope_of(properties: Any) -> dict[str, Any]:
    """The envelope the edge put in the ``slimta-envelope`` header (JSON)."""
    headers = properties.headers or {}
    raw = headers.get("slimta-envelope")
    if raw is None:
        raise ValueError("no slimta-envelope header: not a message from slimta_tx")
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    envelope: dict[str, Any] = json.loads(raw)
    return envelope


def store(maildir: str, envelope: dict[str, Any], body: bytes) -> str:
    """Write one message durably into ``maildir``; returns its file name (blocking).

    ``Return-Path:`` then the body as published (the edge's ``Received:`` and the message);
    the envelope record goes to the Maildir's envelope journal (``read_envelopes``).
    """
    target = _stores.get(maildir)
    if target is None:
        target = _stores.setdefault(maildir, MaildirStore(maildir))
    spool = Spool(memory_limit=len(body))
    spool.write(body)
    head = f"Return-Path: <{envelope['sender']}>\r\n".encode()
    [name] = target.commit_messages([StoredMessage(envelope["queue_id"], head, spool, envelope)])
    return name


class Consumer:
    """Consumes ``queue`` into ``maildir``; :meth:`stop` cancels and closes.

    :param on_stored: called with ``(envelope, file name)`` after each ack (tests use it).
    """

    def __init__(
        self,
        reactor: Any,
        maildir: str,
        queue: str,
        prefetch: int = 50,
        declare: bool = True,
        on_stored: Callable[[dict[str, Any], str], None] | None = None,
    ) -> None:
        self.reactor = reactor
        self.maildir = maildir
        self.queue = queue
        self.prefetch = prefetch
        self.declare = declare
        self.on_stored = on_stored
        self.stored = 0
        self.connection: Any = None
        self.channel: Any = None
        self.done: Deferred[None] = Deferred()

    async def run(self, url: str) -> None:
        import pika
        from pika.adapters.twisted_connection import TwistedProtocolConnection

        params = pika.URLParameters(url)
        endpoint = HostnameEndpoint(self.reactor, params.host, params.port, timeout=10)
        self.connection = TwistedProtocolConnection(params, custom_reactor=self.reactor)
        await connectProtocol(endpoint, self.connection)
        await self.connection.ready
        self.channel = await self.connection.channel()
        if self.declare:  # the same declaration as the edge's, so either may start first
            await self.channel.queue_declare(
                queue=self.queue, durable=True, arguments={"x-queue-type": "quorum"}
            )
        await self.channel.basic_qos(prefetch_count=self.prefetch)
        queue, _tag = await self.channel.basic_consume(queue=self.queue, auto_ack=False)
        log.info("consuming {queue} into {maildir}", queue=self.queue, maildir=self.maildir)
        while True:
            try:
                channel, method, properties, body = await queue.get()
            except Exception:  # the channel or connection closed
                break
            await self.handle(channel, method, properties, body)
        if not self.done.called:
            self.done.callback(None)

    async def handle(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        try:
            envelope = envelope_of(properties)
        except ValueError as e:
            log.error("rejecting a message: {error}", error=e)
            channel.basic_reject(delivery_tag=method.delivery_tag, requeue=False)
            return
        pool = self.reactor.getThreadPool()
        try:
            name = await deferToThreadPool(self.reactor, pool, store, self.maildir, envelope, body)
        except OSError:
            log.failure("cannot store {queue_id}; requeued", queue_id=envelope.get("queue_id"))
            channel.basic_nack(delivery_tag=method.delivery_tag, requeue=True)
            return
        channel.basic_ack(delivery_tag=method.delivery_tag)
        self.stored += 1
        if self.on_stored is not None:
            self.on_stored(envelope, name)

    def stop(self) -> Deferred[Any] | None:
        if self.connection is not None and self.connection.is_open:
            result: Deferred[Any] | None = self.connection.close()
            return result
        return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    parser.add_argument("--queue", required=True)
    parser.add_argument("--maildir", required=True)
    parser.add_argument("--prefetch", type=int, default=50)
    args = parser.parse_args(argv)

    from twisted.internet import task
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])

    def run(reactor: Any) -> Deferred[None]:
        consumer = Consumer(reactor, args.maildir, args.queue, args.prefetch)
        return ensureDeferred(consumer.run(args.url))

    task.react(run)


if __name__ == "__main__":
    main()
