"""The AMQP bus: each accepted message is published to RabbitMQ, and 250 means *confirmed*.

Every message is published persistently (``delivery_mode=2``) with ``mandatory=True`` on a
channel in publisher-confirm mode, to a durable quorum queue (declared with
``x-queue-type: quorum`` if missing) or to an exchange. The client's reply follows the broker:

- ``basic.ack`` (and no ``basic.return``): ``250 2.6.0 Message queued as <queue id>``;
- ``basic.nack``, ``basic.return`` (unroutable), a lost connection, no confirm within
  ``timeout`` seconds, or no connection to the broker: ``451 4.3.0`` (the client retries).

The message format (see ``docs/bus-amqp.md``): the body is the ``Received:`` header followed
by the message bytes as received; the ``slimta-envelope`` header holds the envelope as JSON
(:meth:`Envelope.to_json_dict`), ``message_id`` is the queue id and ``content_type`` is
``message/rfc822``.

Connection handling: :meth:`AmqpBus.start` connects (``send`` starts it if nobody did). When
the connection fails or drops, the bus reconnects after ``0.5, 1, 2, 4, ...`` seconds (capped
by ``max_backoff``, with jitter). While a first connection attempt is in progress a message
waits for it (within its timeout); while the broker is known to be down (an attempt failed, and
the next is in progress or scheduled), messages get 451 at once.

A silent partition (no RST, no answers) leaves the connection open and confirms never come.
Once the broker has confirmed nothing for ``stall_timeout`` seconds while publishes wait, the
link counts as stalled: new messages get 451 at once instead of waiting for the confirm
timeout, and once a publish has waited ``timeout`` seconds the connection is dropped and
reopened (which fails fast, or finds the broker again).

Per recipient (``per_recipient=True``, ``--amqp-per-recipient``): one message per recipient,
each with the envelope JSON of that recipient alone, ``message_id`` ``<queue id>.<n>`` (n from
1, in RCPT order) and, to an exchange, the routing key with ``{domain}`` and ``{recipient}``
filled in; each is confirmed (or returned, or refused) on its own and the bus answers one reply
per recipient (see :mod:`slimta_tx.results`: an LMTP client hears each, an SMTP client their
fold). So a topic exchange can route by domain and an unroutable domain fails only its
recipients.

AMQP carries a message in one frame set, so the body is read from the spool into memory for
the publish. ``max_message_size`` rejects larger messages with 552 5.3.4 (keep it at or under
the broker's own ``max_message_size``), and ``max_inflight_bytes`` caps the memory held by
publishes in flight: further messages wait (on disk, in their spool) for room.
"""

from __future__ import annotations

import importlib
import json
import random
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from twisted.internet.defer import Deferred, DeferredList, TimeoutError, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from slimta_tx.bus.amqp_link import AmqpLink, PublishFailed, Target, describe_error, open_link
from slimta_tx.envelope import Envelope
from slimta_tx.interfaces import IBus, IReadiness
from slimta_tx.reply import Reply
from slimta_tx.results import BusResult

__all__ = ["DEFAULT_URL", "AmqpBus", "PublishFailed", "Target", "message_properties"]

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
FORMAT_VERSION = 1


class BrokerUnavailable(Exception):
    """No usable connection to the broker right now."""


def message_properties(envelope: Envelope, message_id: str | None = None) -> Any:
    """The AMQP properties of ``envelope``'s message (see the module docstring)."""
    import pika

    return pika.BasicProperties(
        content_type="message/rfc822",
        delivery_mode=2,
        message_id=message_id or envelope.queue_id,
        timestamp=int(envelope.received_at),
        app_id="slimta_tx",
        headers={
            "slimta-format": FORMAT_VERSION,
            "slimta-envelope": json.dumps(
                envelope.to_json_dict(), ensure_ascii=False, sort_keys=True
            ),
        },
    )


class _ByteBudget:
    """FIFO admission by size: at most ``limit`` bytes at once (one oversize item alone)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiting: deque[tuple[int, Deferred[None]]] = deque()

    def acquire(self, size: int) -> Deferred[None]:
        if not self._waiting and self._fits(size):
            self.used += size
            return succeed(None)
        d: Deferred[None] = Deferred(lambda d: self._forget(d))
        self._waiting.append((size, d))
        return d

    def release(self, size: int) -> None:
        self.used -= size
        while self._waiting and self._fits(self._waiting[0][0]):
            size, d = self._waiting.popleft()
            self.used += size
            d.callback(None)

    def _fits(self, size: int) -> bool:
        return self.limit <= 0 or self.used == 0 or self.used + size <= self.limit

    def _forget(self, d: Deferred[None]) -> None:
        self._waiting = deque(entry for entry in self._waiting if entry[1] is not d)


Connector = Callable[[], Deferred[AmqpLink]]


@implementer(IBus, IReadiness)
class AmqpBus:
    """Publish accepted mail to RabbitMQ with publisher confirms.

    :param url: ``amqp://user:password@host:port/vhost`` (``amqps://`` for TLS); query
        parameters such as ``heartbeat`` and ``frame_max`` are pika's.
    :param queue: a durable quorum queue, declared if missing (or only checked when
        ``declare`` is False); messages go through the default exchange.
    :param exchange: publish to this existing exchange with ``routing_key`` instead.
    :param timeout: seconds from ``send`` to the broker's confirm; past it, 451.
    :param stall_timeout: seconds without any confirm, while publishes wait, after which the
        link is known to be stalled and new messages get 451 at once (default: a third of
        ``timeout``).
    :param connect_timeout: seconds for one connection attempt (TCP, AMQP handshake, declare).
    :param max_message_size: larger messages get 552 5.3.4; 0: no limit of the bus's own.
    :param max_inflight_bytes: memory budget for message bodies being published.
    :param initial_backoff: seconds before the first reconnection attempt; doubles after each
        failure up to ``max_backoff``; ``jitter`` adds up to that fraction at random.
    :param reactor: reactor and clock (the global reactor when None).
    :param connect: ``() -> Deferred[AmqpLink]``; replaces the real connection (tests).
    :param run_in_thread: ``f -> Deferred`` to read file-spooled bodies off the reactor thread;
        by default the reactor's thread pool when it has one, else inline.
    :param per_recipient: publish one message per recipient and answer one reply each (see
        the module docstring); ``{domain}`` and ``{recipient}`` in ``routing_key`` are filled.
    """

    log = Logger()

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        queue: str | None = None,
        exchange: str | None = None,
        routing_key: str = "",
        declare: bool = True,
        timeout: float = 30.0,
        stall_timeout: float | None = None,
        connect_timeout: float = 10.0,
        max_message_size: int = 0,
        max_inflight_bytes: int = 256 * 1024 * 1024,
        initial_backoff: float = 0.5,
        max_backoff: float = 30.0,
        jitter: float = 0.2,
        reactor: Any = None,
        connect: Connector | None = None,
        run_in_thread: Callable[[Callable[[], Any]], Deferred[Any]] | None = None,
        rng: random.Random | None = None,
        per_recipient: bool = False,
    ) -> None:
        if (queue is None) == (exchange is None):
            raise ValueError("AmqpBus needs exactly one of queue= or exchange=")
        if queue is not None:
            if not queue:
                raise ValueError("the queue name must not be empty")
            self.target = Target.for_queue(queue, declare)
        else:
            assert exchange is not None
            self.target = Target.for_exchange(exchange, routing_key)
        if timeout <= 0 or connect_timeout <= 0:
            raise ValueError("timeouts must be more than 0 seconds")
        if connect is None:  # without the extra, say so now rather than at each reconnection
            try:
                importlib.import_module("pika")
            except ImportError:
                raise ImportError("AmqpBus needs pika: pip install 'slimta_tx[amqp]'") from None
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.url = url
        self.reactor = reactor
        self.timeout = timeout
        self.stall_timeout = timeout / 3 if stall_timeout is None else stall_timeout
        self.connect_timeout = connect_timeout
        self.max_message_size = max_message_size
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.jitter = jitter
        self._rng = rng or random.Random()
        self.per_recipient = per_recipient
        self._connect: Connector = connect or self._open_link
        if run_in_thread is None and hasattr(reactor, "getThreadPool"):

            def run_in_thread(f: Callable[[], Any]) -> Deferred[Any]:
                return deferToThreadPool(reactor, reactor.getThreadPool(), f)

        self._run_in_thread = run_in_thread
        self._budget = _ByteBudget(max_inflight_bytes)
        self.link: AmqpLink | None = None
        self._attempt: Deferred[AmqpLink] | None = None
        self._waiters: list[Deferred[AmqpLink]] = []
        self._retry: IDelayedCall | None = None
        self._failures = 0
        self._started = False
        self._stopped = False
        self._inflight: set[Deferred[BusResult]] = set()
        self.last_error: str | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Connect now (and keep reconnecting) rather than at the first message."""
        if self._started or self._stopped:
            return
        self._started = True
        self._connect_now()

    def stop(self) -> Deferred[None]:
        """Refuse new messages, wait for publishes in flight (bounded by ``timeout``), close."""
        self._stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        for d in list(self._inflight):
            await _settled(d)
        if self._attempt is not None:
            self._attempt.cancel()
        if self.link is not None:
            link, self.link = self.link, None
            closing = link.close().addTimeout(self.connect_timeout, self.reactor)
            await _settled(closing.addErrback(lambda _: None))

    @property
    def connected(self) -> bool:
        return self.link is not None and self.link.is_open

    def ready(self) -> str | None:
        """IReadiness: None while connected to the broker, else why not."""
        if self.connected:
            return None
        return (
            f"broker not connected: {self.last_error}"[:200]
            if self.last_error
            else ("broker not connected")
        )

    # -- IBus ------------------------------------------------------------------------------

    def send(self, envelope: Envelope) -> Deferred[BusResult]:
        if envelope.message is None:
            raise ValueError("envelope has no message")
        size = envelope.message.size
        if self.max_message_size and size > self.max_message_size:
            return succeed(
                Reply("552", "Message too big for the message queue", "5.3.4"),
            )
        if self._stopped:
            return succeed(self._refusal(envelope, "shutting down"))
        self.start()
        d = Deferred.fromCoroutine(self._publish(envelope, size))
        d.addTimeout(self.timeout, self.reactor)
        d.addErrback(self._failed, envelope)
        self._inflight.add(d)
        d.addBoth(self._done, d)
        return d

    def _done(self, result: BusResult, d: Deferred[BusResult]) -> BusResult:
        self._inflight.discard(d)
        return result

    async def _publish(self, envelope: Envelope, size: int) -> BusResult:
        link = await self._ready_link()
        await self._budget.acquire(size)
        try:
            body = await self._read_body(envelope)
            if not link.is_open:  # it went while the body was read
                link = await self._ready_link()
            if self.per_recipient:
                return await self._publish_each(link, envelope, body)
            await link.publish(
                self.target.exchange, self.target.routing_key, body, message_properties(envelope)
            )
        finally:
            self._budget.release(size)
        return Reply("250", f"Message queued as {envelope.queue_id}", "2.6.0")

    async def _publish_each(self, link: AmqpLink, envelope: Envelope, body: bytes) -> BusResult:
        """One message per recipient, confirmed each on its own: one reply each."""
        sends = []
        for index, rcpt in enumerate(envelope.recipients):
            properties = message_properties(
                envelope.subset([index]), message_id=f"{envelope.queue_id}.{index + 1}"
            )
            key = self.target.routing_key
            if self.target.queue is None:  # an exchange: route by the recipient
                domain = rcpt.rpartition("@")[2].lower()
                key = key.replace("{domain}", domain).replace("{recipient}", rcpt)
            sends.append(maybeDeferred(link.publish, self.target.exchange, key, body, properties))
        results = await DeferredList(sends, consumeErrors=True)
        replies: list[Reply] = []
        for rcpt, (ok, value) in zip(envelope.recipients, results, strict=True):
            if ok:
                replies.append(Reply("250", f"Message queued as {envelope.queue_id}", "2.6.0"))
                continue
            failure = cast(Failure, value)
            if failure.check(PublishFailed):
                replies.append(self._refusal(envelope, f"<{rcpt}>: {failure.value}"))
            else:
                self.log.failure(
                    "AMQP publish of {queue_id} failed", failure, queue_id=envelope.queue_id
                )
                replies.append(self._refusal(envelope, "internal error"))
        return replies

    def _failed(self, failure: Failure, envelope: Envelope) -> Reply:
        if failure.check(BrokerUnavailable, PublishFailed):
            reason = str(failure.value)
        elif failure.check(TimeoutError):
            reason = f"no confirm from the broker within {self.timeout:g}s"
        else:
            self.log.failure(
                "AMQP publish of {queue_id} failed", failure, queue_id=envelope.queue_id
            )
            reason = "internal error"
        return self._refusal(envelope, reason)

    def _refusal(self, envelope: Envelope, reason: str) -> Reply:
        self.log.warn(
            "AMQP: {queue_id} not queued: {reason} (last broker error: {error})",
            queue_id=envelope.queue_id,
            reason=reason,
            error=self.last_error,
        )
        return Reply("451", f"Message queue unavailable ({reason}); try again later", "4.3.0")

    async def _read_body(self, envelope: Envelope) -> bytes:
        spool = envelope.message
        assert spool is not None
        head = envelope.received_header()
        if spool.in_memory or self._run_in_thread is None:
            return head + spool.read()
        body: bytes = await self._run_in_thread(lambda: head + spool.read())
        return body

    # -- connection ------------------------------------------------------------------------

    async def _ready_link(self) -> AmqpLink:
        link = self.link
        if link is not None and link.is_open:
            if link.blocked is not None:
                raise BrokerUnavailable("broker blocked publishing (resource alarm)")
            stalled = link.unconfirmed_for()
            if stalled >= self.stall_timeout:
                if stalled >= self.timeout:
                    self._drop_stalled(link, stalled)
                raise BrokerUnavailable(f"broker silent: no confirm for {stalled:.0f}s")
            return link
        if self._attempt is None:
            raise BrokerUnavailable("broker unreachable")
        if self._failures:
            raise BrokerUnavailable("broker unreachable, reconnecting")
        waiter: Deferred[AmqpLink] = Deferred(lambda d: self._forget_waiter(d))
        self._waiters.append(waiter)
        return await waiter

    def _drop_stalled(self, link: AmqpLink, stalled: float) -> None:
        """Confirms have not come for longer than the confirm timeout: stop trusting this
        connection and reconnect (a failure: new messages do not wait for the attempt)."""
        self.log.warn(
            "AMQP: no confirm from the broker for {seconds:.0f}s; dropping the connection",
            seconds=stalled,
        )
        self._failures = max(self._failures, 1)
        link.abort(f"no confirm for {stalled:.0f}s")

    def _forget_waiter(self, d: Deferred[AmqpLink]) -> None:
        if d in self._waiters:
            self._waiters.remove(d)

    def _open_link(self) -> Deferred[AmqpLink]:
        return Deferred.fromCoroutine(
            open_link(self.reactor, self.url, self.target, self.connect_timeout)
        ).addTimeout(self.connect_timeout, self.reactor)

    def _connect_now(self) -> None:
        self._retry = None
        if self._stopped or self._attempt is not None:
            return
        attempt = self._connect()
        self._attempt = attempt
        attempt.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, link: AmqpLink) -> None:
        self._attempt = None
        if self._stopped:
            link.close()
            return
        self.link = link
        self._failures = 0
        self.last_error = None
        self.log.info("AMQP: connected, publishing to {target}", target=self.target.describe())
        link.closed.addBoth(self._lost, link)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(link)

    def _connect_failed(self, failure: Failure) -> None:
        self._attempt = None
        self._failures += 1
        self.last_error = _describe(failure)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(BrokerUnavailable("broker unreachable"))
        if self._stopped:
            return
        delay = self._schedule_retry()
        self.log.warn(
            "AMQP: cannot connect to {target} ({error}); retry in {delay:.1f}s",
            target=self.target.describe(),
            error=self.last_error,
            delay=delay,
        )

    def _lost(self, reason: Any, link: AmqpLink) -> None:
        if self.link is not link:
            return
        self.link = None
        self.last_error = _describe(reason if isinstance(reason, Failure) else Failure(reason))
        if self._stopped:
            return
        delay = self._schedule_retry()
        self.log.warn(
            "AMQP: connection lost ({error}); reconnecting in {delay:.1f}s",
            error=self.last_error,
            delay=delay,
        )

    def _schedule_retry(self) -> float:
        delay = self.next_delay()
        if self._retry is None or not self._retry.active():
            self._retry = self.reactor.callLater(delay, self._connect_now)
        return delay

    def next_delay(self) -> float:
        """Seconds before the next attempt, after ``self._failures`` failures in a row."""
        base = min(self.max_backoff, self.initial_backoff * 2 ** max(self._failures - 1, 0))
        return float(base * (1 + self.jitter * self._rng.random()))


async def _settled(d: Deferred[Any]) -> None:
    """Wait for ``d`` whatever its outcome (without consuming it for other listeners)."""
    done: Deferred[None] = Deferred()

    def fire(result: Any) -> Any:
        done.callback(None)
        return result

    d.addBoth(fire)
    await done


def _describe(failure: Failure) -> str:
    if isinstance(failure.value, TimeoutError):
        return "connection attempt timed out"
    return describe_error(failure.value) if failure.value is not None else "unknown error"
