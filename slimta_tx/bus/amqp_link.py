"""One AMQP connection and one confirm-mode channel, on pika's Twisted adapter.

:class:`AmqpLink` publishes with ``mandatory=True`` and tracks publisher confirms itself
rather than through ``pika``'s ``TwistedChannel``: that wrapper keeps a single slot for a
returned message and hands it to whichever delivery the next ack covers, which under
concurrent publishing (an ack with ``multiple=True``) can blame the wrong message and, worse,
report a returned one as confirmed. Here a ``basic.return`` is matched to its delivery by
``message_id`` (RabbitMQ always sends the return before the ack of the same message), and each
delivery tag resolves on its own.

:func:`open_link` connects (TCP or TLS for ``amqps://``), opens the channel, turns confirms
on and declares the target; any failure closes the connection and raises.

Two pika internals are used (``tests/test_amqp_internals.py`` pins them; pika is held below 2):
``TwistedChannel._channel``, the raw channel under the Twisted wrapper, for the confirms and
returns above; there is no public way to it, and the wrapper's own confirms are the unsafe path
this module avoids, so without it :func:`open_link` refuses with :class:`PikaIncompatible`
rather than fall back. ``TwistedProtocolConnection._impl``, the pika connection, for the
broker's connection.blocked notices; without it one warning says so and the link goes without
them (a blocked broker is then noticed as unconfirmed publishes, the stall check of the bus).
And why an opening connection was refused, which pika's adapter drops: the broker's
``connection.close`` (``_impl._error`` before the TCP close) or pika's guess (given to the
private ``_on_connection_failed``) becomes :class:`BrokerRefused` (``authentication failed:
403 ACCESS_REFUSED - ...``); without them the failure is pika's bare ``AMQPConnectionError``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

__all__ = [
    "AmqpLink",
    "BrokerRefused",
    "PikaIncompatible",
    "PublishFailed",
    "Target",
    "close_quietly",
    "describe_error",
    "open_link",
    "raw_channel",
]


class PikaIncompatible(Exception):
    """The installed pika lacks an internal this module needs (the message names it)."""


def raw_channel(twisted_channel: Any) -> Any:
    """The ``pika.channel.Channel`` under a ``TwistedChannel`` (pika's private ``_channel``)."""
    channel = getattr(twisted_channel, "_channel", None)
    if channel is None or not callable(getattr(channel, "confirm_delivery", None)):
        raise PikaIncompatible(
            "this pika's TwistedChannel has no _channel (a raw pika channel); "
            "slimta_tx's AMQP bus needs pika>=1.2,<2"
        )
    return channel


_warned_no_impl = False


def watch_blocked(protocol: Any, link: AmqpLink) -> bool:
    """Hand ``link`` the broker's connection.blocked/unblocked notices, through pika's private
    ``TwistedProtocolConnection._impl``; without it, warn once and return False."""
    global _warned_no_impl
    impl = getattr(protocol, "_impl", None)
    on_blocked = getattr(impl, "add_on_connection_blocked_callback", None)
    on_unblocked = getattr(impl, "add_on_connection_unblocked_callback", None)
    if on_blocked is None or on_unblocked is None:
        if not _warned_no_impl:
            _warned_no_impl = True
            AmqpLink.log.warn(
                "this pika's TwistedProtocolConnection has no _impl with blocked callbacks: "
                "a blocked broker shows as unconfirmed publishes"
            )
        return False
    on_blocked(link.on_blocked)
    on_unblocked(link.on_unblocked)
    return True


class PublishFailed(Exception):
    """The broker did not take the message; ``reason`` says why, in a few words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Target:
    """Where messages go: a queue (through the default exchange) or an exchange.

    :ivar exchange: the exchange name; ``""`` is the default exchange.
    :ivar routing_key: the routing key (the queue name when publishing to a queue).
    :ivar queue: the queue to declare (durable, quorum) or check, or None.
    :ivar declare: declare the queue if missing; False only checks that it exists.
    """

    exchange: str
    routing_key: str
    queue: str | None = None
    declare: bool = True

    @classmethod
    def for_queue(cls, queue: str, declare: bool = True) -> Target:
        return cls(exchange="", routing_key=queue, queue=queue, declare=declare)

    @classmethod
    def for_exchange(cls, exchange: str, routing_key: str = "") -> Target:
        return cls(exchange=exchange, routing_key=routing_key)

    def describe(self) -> str:
        if self.queue is not None:
            return f"queue {self.queue!r}"
        return f"exchange {self.exchange!r} key {self.routing_key!r}"


@dataclass
class _Pending:
    deferred: Deferred[None]
    message_id: str | None
    published_at: float = 0.0
    returned: str | None = None


class AmqpLink:
    """A channel in confirm mode over one connection.

    :param connection: the ``TwistedProtocolConnection`` (after its handshake), or anything
        with ``close()``; None in tests.
    :param channel: the raw ``pika.channel.Channel`` (confirms already on), or a fake.
    :param clock: to tell how long publishes have waited (:meth:`unconfirmed_for`); None:
        never stalled.
    """

    log = Logger()

    def __init__(self, connection: Any, channel: Any, clock: IReactorTime | None = None) -> None:
        self.connection = connection
        self.channel = channel
        self.clock = clock
        # When the broker last confirmed anything (ack or nack), or the link opened.
        self._last_confirm = clock.seconds() if clock is not None else 0.0
        self.blocked: str | None = None
        self.closed: Deferred[BaseException] = Deferred()
        self._open = True
        self._next_tag = 0
        self._pending: dict[int, _Pending] = {}
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)

    @property
    def is_open(self) -> bool:
        return self._open

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def unconfirmed_for(self) -> float:
        """Seconds the broker has gone without confirming anything while a publish waits
        (0 when none waits). A broker behind a silent partition (no RST, no answers) never
        confirms; a slow but working one keeps confirming something."""
        if not self._pending or self.clock is None:
            return 0.0
        oldest = next(iter(self._pending.values())).published_at
        return self.clock.seconds() - max(oldest, self._last_confirm)

    def abort(self, reason: str) -> None:
        """Give up on this connection now: pending publishes fail, ``closed`` fires and the
        TCP connection is dropped without waiting for the broker to agree."""
        transport = getattr(self.connection, "transport", None)
        self._on_channel_closed(self.channel, ConnectionError(reason))
        if transport is not None:
            transport.abortConnection()

    def publish(
        self, exchange: str, routing_key: str, body: bytes, properties: Any
    ) -> Deferred[None]:
        """Publish; the Deferred fires when the broker confirms, or fails with
        :class:`PublishFailed` on a nack, a return or a closed channel."""
        if not self._open:
            raise PublishFailed("connection lost")
        self.channel.basic_publish(
            exchange=exchange,
            routing_key=routing_key,
            body=body,
            properties=properties,
            mandatory=True,
        )
        self._next_tag += 1
        d: Deferred[None] = Deferred()
        now = self.clock.seconds() if self.clock is not None else 0.0
        self._pending[self._next_tag] = _Pending(d, getattr(properties, "message_id", None), now)
        return d

    def close(self) -> Deferred[Any]:
        """Close the connection (pending confirms fail); fires when it is closed."""
        result = close_quietly(self.connection)
        if isinstance(result, Deferred):
            return result
        return Deferred.fromCoroutine(_nothing())

    # -- callbacks from pika ---------------------------------------------------------------

    def on_confirm(self, frame: Any) -> None:
        """``basic.ack`` or ``basic.nack`` for one delivery tag, or every tag up to it."""
        method = frame.method
        ack = type(method).__name__ == "Ack"
        if self.clock is not None:
            self._last_confirm = self.clock.seconds()
        if method.multiple:
            tags = [tag for tag in self._pending if tag <= method.delivery_tag]
        else:
            tags = [method.delivery_tag] if method.delivery_tag in self._pending else []
        for tag in tags:
            pending = self._pending.pop(tag)
            if pending.deferred.called:  # timed out and cancelled already
                continue
            if not ack:
                pending.deferred.errback(PublishFailed("broker refused it (nack)"))
            elif pending.returned is not None:
                pending.deferred.errback(PublishFailed(f"unroutable ({pending.returned})"))
            else:
                pending.deferred.callback(None)

    def _on_return(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        message_id = getattr(properties, "message_id", None)
        for pending in self._pending.values():
            if pending.message_id == message_id and pending.returned is None:
                pending.returned = f"{method.reply_code} {method.reply_text}"
                return
        self.log.warn("basic.return for an unknown message {message_id}", message_id=message_id)

    def _on_channel_closed(self, channel: Any, reason: Exception) -> None:
        if not self._open:
            return
        self._open = False
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            if not entry.deferred.called:
                entry.deferred.errback(PublishFailed(f"connection lost ({reason})"))
        self.closed.callback(reason)
        # The channel went (e.g. 404 on a deleted exchange): drop the connection too so the
        # bus reconnects and declares again.
        close_quietly(self.connection)

    def on_blocked(self, connection: Any, frame: Any) -> None:
        self.blocked = str(getattr(frame.method, "reason", "") or "resource alarm")
        self.log.warn("broker blocked publishing: {reason}", reason=self.blocked)

    def on_unblocked(self, connection: Any, frame: Any) -> None:
        self.blocked = None
        self.log.info("broker unblocked publishing")


async def _nothing() -> None:
    return None


def close_quietly(connection: Any) -> Any:
    """Close a pika connection that may be opening, open, closing or closed."""
    if connection is None or not getattr(connection, "is_open", False):
        return None
    try:
        return connection.close()
    except Exception:  # closing already: nothing to do
        return None


class BrokerRefused(Exception):
    """The broker closed the connection while it was being opened; the message says why
    (``authentication failed: 403 ACCESS_REFUSED - ...``)."""

    def __init__(self, reason: BaseException) -> None:
        super().__init__(_opening_refusal(reason))
        self.reason = reason


#: What the broker's reply code means when it closes a connection being opened.
OPENING_CODES = {
    403: "authentication failed",  # RabbitMQ: ACCESS_REFUSED - Login was refused ...
    530: "access refused",  # NOT_ALLOWED - vhost ... not found / access to vhost refused
}


def _opening_refusal(reason: BaseException) -> str:
    code = getattr(reason, "reply_code", None)
    text = getattr(reason, "reply_text", None)
    if code is not None and text is not None:
        label = OPENING_CODES.get(code, "the broker refused the connection")
        return f"{label}: {code} {text}"
    return describe_error(reason)


#: What pika's errors while opening a connection mean, by class name (pika guesses them from
#: the step at which the broker closed the connection).
REFUSALS = {
    "ProbableAuthenticationError": "authentication failed (the broker refused the user or "
    "password)",
    "AuthenticationError": "authentication failed (no login mechanism the broker accepts)",
    "ProbableAccessDeniedError": "access refused (no such virtual host, or the user may not "
    "use it)",
    "IncompatibleProtocolError": "the broker refused the protocol (not AMQP 0-9-1?)",
}
_REPLY = re.compile(r"\((\d{3})\)\s*'([^']*)'|\((\d{3}), '([^']*)'\)")


def describe_error(error: BaseException) -> str:
    """A one-line description, with the AMQP reply code and text when there is one; pika's
    guesses at why an opening connection was closed are named (:data:`REFUSALS`), with the
    broker's own reply when it sent one, e.g. ``authentication failed (...): 403
    ACCESS_REFUSED - Login was refused ...``."""
    code = getattr(error, "reply_code", None)
    text = getattr(error, "reply_text", None)
    if code is not None and text is not None:
        return f"{code} {text}"
    line = (str(error) or type(error).__name__).splitlines()[0][:200]
    for kind in type(error).__mro__:
        label = REFUSALS.get(kind.__name__)
        if label is not None:
            reply = _REPLY.search(str(error))
            if reply is None:
                return label
            code_text = [part for part in reply.groups() if part is not None]
            return f"{label}: {' '.join(code_text)}"[:300]
    return line


def _callback_deferred() -> tuple[Deferred[Any], Any]:
    d: Deferred[Any] = Deferred()

    def fire(*args: Any) -> None:
        if not d.called:
            d.callback(args[0] if len(args) == 1 else args)

    return d, fire


_connection_classes: dict[type, type] = {}


def _connection_class(base: type) -> type:
    """``TwistedProtocolConnection`` keeping the reason a connection could not be opened.

    pika's adapter passes its private ``_on_connection_failed`` to the connection as the
    open-error callback and drops the error it is given; the override keeps it as
    ``open_error`` first (``tests/test_amqp_internals.py`` pins the method). Without that
    method in pika, the override is never called and failures say only
    ``AMQPConnectionError``, as before.
    """
    cls = _connection_classes.get(base)
    if cls is None:
        from twisted.internet.error import ConnectionDone

        def connectionLost(self: Any, reason: Any = None) -> None:
            # The broker's connection.close (e.g. 403 ACCESS_REFUSED) is pika's pending
            # error until the TCP close replaces it with ConnectionDone: keep it first.
            pending = getattr(getattr(self, "_impl", None), "_error", None)
            if self.ready is not None and getattr(pending, "reply_code", None) is not None:
                self.open_error = pending
            base.connectionLost(self, reason)  # type: ignore[attr-defined]

        def _on_connection_failed(self: Any, connection: Any, error: Any = None) -> None:
            if self.open_error is None and not isinstance(error, ConnectionDone):
                self.open_error = error
            base._on_connection_failed(self, connection, error)  # type: ignore[attr-defined]

        cls = type(
            "ReasonKeepingConnection",
            (base,),
            {
                "open_error": None,
                "connectionLost": connectionLost,
                "_on_connection_failed": _on_connection_failed,
            },
        )
        _connection_classes[base] = cls
    return cls


async def open_link(reactor: Any, url: str, target: Target, connect_timeout: float) -> AmqpLink:
    """Connect, open a confirm-mode channel, declare or check the target."""
    import pika
    from pika.adapters.twisted_connection import TwistedProtocolConnection

    params = pika.URLParameters(url)
    endpoint: Any = HostnameEndpoint(reactor, params.host, params.port, timeout=connect_timeout)
    if url.lower().startswith("amqps:"):
        from twisted.internet.ssl import optionsForClientTLS

        endpoint = wrapClientTLS(optionsForClientTLS(params.host), endpoint)
    protocol = _connection_class(TwistedProtocolConnection)(params, custom_reactor=reactor)
    await connectProtocol(endpoint, protocol)
    try:
        try:
            await protocol.ready
        except Exception as e:
            # pika's Twisted adapter fails `ready` with AMQPConnectionError(attempts), dropping
            # why; the reason is kept by the subclass below.
            reason = getattr(protocol, "open_error", None)
            if isinstance(reason, Exception) and reason is not e:
                raise BrokerRefused(reason) from e
            raise
        twisted_channel = await protocol.channel()
        channel = raw_channel(twisted_channel)  # see the module docstring
        if target.queue is not None:
            await twisted_channel.queue_declare(
                queue=target.queue,
                durable=True,
                passive=not target.declare,
                arguments={"x-queue-type": "quorum"} if target.declare else None,
            )
        elif target.exchange:
            await twisted_channel.exchange_declare(exchange=target.exchange, passive=True)
        selected, fire = _callback_deferred()
        link = AmqpLink(protocol, channel, clock=reactor)
        channel.confirm_delivery(ack_nack_callback=link.on_confirm, callback=fire)
        await selected
        watch_blocked(protocol, link)
        return link
    except BaseException as e:
        if isinstance(e, CancelledError) and protocol.transport is not None:
            protocol.transport.abortConnection()
        else:
            close_quietly(protocol)
        raise
