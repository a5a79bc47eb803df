"""The relay bus: each accepted message goes on to a next hop over ESMTP or LMTP.

A ``250`` from this bus means the next hop answered ``250`` to the message (to every
recipient, with LMTP): the message is the next hop's responsibility then. Everything else is
mapped as :mod:`slimta_tx.bus.replies` describes. Per transaction, on a pooled connection::

    RSET (reused connections only), MAIL, RCPT..., DATA    <- one write when PIPELINING
    <message, streamed and dot-stuffed from the spool>     <- only if every RCPT was accepted
    one reply (SMTP) or one per recipient (LMTP)

A reused connection that turns out dead before its first reply is replaced once, transparently.
"""

from __future__ import annotations

import base64
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

from twisted.internet import defer
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from slimta_tx.bus import relay_transaction, replies
from slimta_tx.bus.outbound import NextHop
from slimta_tx.bus.pool import ConnectionPool, PoolClosed, PoolTimeout
from slimta_tx.bus.smtp_client import (
    Extensions,
    NextHopError,
    NextHopProtocolError,
    NextHopTimeout,
    SmtpClientProtocol,
)
from slimta_tx.envelope import Envelope
from slimta_tx.interfaces import IBus, IReadiness
from slimta_tx.reply import Reply
from slimta_tx.results import BusResult

__all__ = ["RelayBus", "TLSMode", "next_hop_endpoint", "parse_next_hop"]

TLSMode = Literal["none", "opportunistic", "required"]
TLS_MODES: tuple[TLSMode, ...] = ("none", "opportunistic", "required")


#: Seconds a readiness probe's answer is reused (see RelayBus.ready).
READY_PROBE_INTERVAL = 5.0


class NextHopUnavailable(Exception):
    """Setting up a connection failed; ``reply`` is what the client gets."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass(eq=False)
class NextHopConnection:
    """A connection set up (greeting, EHLO/LHLO, STARTTLS, AUTH) and ready for MAIL."""

    client: SmtpClientProtocol
    extensions: Extensions
    verified_tls: bool = False  # TLS with the certificate checked (tls="required")
    remote_name: str = "unknown"  # the name in its greeting (for Remote-MTA in notices)
    transactions: int = 0
    clean: bool = True

    @property
    def usable(self) -> bool:
        return self.clean and not self.client.closed

    def close(self) -> None:
        if self.clean:
            self.client.quit()
        else:
            self.client.abort()


def parse_next_hop(address: str) -> tuple[str, int] | str:
    """``HOST:PORT`` or ``[IPv6]:PORT`` -> ``(host, port)``; ``unix:/path`` -> the path.

    Raises ValueError with a one-line message for anything else.
    """
    if address.startswith("unix:"):
        path = address[5:]
        if not path:
            raise ValueError("unix: needs a socket path")
        return path
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"not HOST:PORT: {address!r}")
    host = host.removeprefix("[").removesuffix("]")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"not a port number: {port_text!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"port out of range: {port}")
    return host, port


def next_hop_endpoint(reactor: Any, address: str, timeout: float = 30.0) -> IStreamClientEndpoint:
    """A client endpoint for :func:`parse_next_hop`'s address forms."""
    target = parse_next_hop(address)
    if isinstance(target, str):
        return UNIXClientEndpoint(reactor, target, timeout=max(1, int(timeout)))
    return HostnameEndpoint(reactor, target[0], target[1], timeout=timeout)


class _ClientFactory(Factory):
    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        self.clock = clock
        self.timeout = timeout

    def buildProtocol(self, addr: Any) -> SmtpClientProtocol:
        return SmtpClientProtocol(self.clock, self.timeout)


@implementer(IBus, IReadiness)
class RelayBus:
    """Forward each message to the next hop at ``endpoint``.

    :param endpoint: an ``IStreamClientEndpoint`` (see :func:`next_hop_endpoint`).
    :param reactor: an ``IReactorTime`` provider for timeouts; usually the reactor.
    :param hostname: our name in EHLO/LHLO.
    :param lmtp: speak LMTP (LHLO; one reply per recipient after the data).
    :param tls: ``"none"``, ``"opportunistic"`` (STARTTLS when offered, certificate not
        checked) or ``"required"`` (STARTTLS or no delivery, certificate checked).
    :param tls_options: the TLS client options for STARTTLS, e.g.
        ``optionsForClientTLS("mx.example.com", trustRoot=...)``; needed for ``"required"``.
    :param credentials: ``(user, password)`` for AUTH PLAIN or LOGIN to the next hop.
    :param allow_plaintext_auth: send credentials without TLS (a loopback next hop).
    :param pool_size: connections at most; ``idle_timeout``: seconds an unused one stays.
    :param timeout: seconds of silence allowed from the next hop (connect, each reply, while
        sending the data); also the longest wait for a free connection.
    """

    log = Logger()

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        reactor: Any,
        hostname: str | None = None,
        lmtp: bool = False,
        tls: TLSMode = "opportunistic",
        tls_options: Any = None,
        credentials: tuple[str, str] | None = None,
        allow_plaintext_auth: bool = False,
        pool_size: int = 10,
        idle_timeout: float = 30.0,
        timeout: float = 120.0,
        name: str | None = None,
    ) -> None:
        if tls not in TLS_MODES:
            raise ValueError(f"tls must be one of {', '.join(TLS_MODES)}")
        if tls == "required" and tls_options is None:
            raise ValueError("tls='required' needs tls_options (whose certificate to trust)")
        if tls == "opportunistic" and tls_options is None:
            from twisted.internet.ssl import CertificateOptions

            tls_options = CertificateOptions()  # encrypts; checks nothing (RFC 7435)
        self.endpoint = endpoint
        self.clock = reactor
        self.hostname = hostname or socket.gethostname()
        self.lmtp = lmtp
        self.tls = tls
        self.tls_options = tls_options
        self.credentials = credentials
        self.allow_plaintext_auth = allow_plaintext_auth
        self.timeout = timeout
        self.name = name or repr(endpoint)
        self._factory = _ClientFactory(reactor, timeout)
        self._last_probe: tuple[float, str | None] | None = None  # (when, answer) of ready()
        self.pool: ConnectionPool[NextHopConnection] = ConnectionPool(
            self._open,
            reactor,
            max_size=pool_size,
            idle_timeout=idle_timeout,
            wait_timeout=timeout,
        )

    def send(self, envelope: Envelope) -> Deferred[BusResult]:
        """One reply, or one per recipient for an LMTP listener's envelope (see
        :mod:`slimta_tx.bus.relay_transaction`)."""
        return Deferred.fromCoroutine(self._send(envelope))

    def ready(self) -> Deferred[str | None]:
        """IReadiness: None when a connection to the next hop is open or can be opened now
        (a TCP connection, closed at once), else why not. A probe's answer is kept for
        :data:`READY_PROBE_INTERVAL` seconds: a load balancer asking every second costs the
        next hop one connection every few seconds at most."""
        if self.pool.size > 0:
            return succeed(None)
        now = self.clock.seconds()
        last = self._last_probe
        if last is not None and now - last[0] < READY_PROBE_INTERVAL:
            return succeed(last[1])
        probe = self.endpoint.connect(Factory.forProtocol(Protocol))

        def opened(protocol: Protocol) -> None:
            if protocol.transport is not None:
                protocol.transport.loseConnection()

        def failed(failure: Failure) -> str:
            return f"next hop {self.name} unreachable: {failure.getErrorMessage()}"[:200]

        def remember(reason: str | None) -> str | None:
            self._last_probe = (now, reason)
            return reason

        d: Deferred[Any] = probe.addTimeout(self.timeout, self.clock)
        return d.addCallbacks(opened, failed).addCallback(remember)

    def close(self) -> None:
        """QUIT idle connections; busy ones close when their transaction ends."""
        self.pool.close()

    def stop(self) -> Deferred[None]:
        """Called by the service after the edge drained (see ``BusService``)."""
        self.close()
        return succeed(None)

    # -- one message ------------------------------------------------------------------------

    async def _send(self, envelope: Envelope) -> BusResult:
        for attempt in (1, 2):
            try:
                conn = await self.pool.acquire()
            except NextHopUnavailable as e:
                return self._done(envelope, e.reply.copy(), str(e))
            except PoolTimeout:
                return self._done(envelope, replies.CONGESTED.copy(), "pool")
            except PoolClosed:
                return self._done(envelope, Reply("451", "Shutting down", "4.3.2"), "closed")
            reused = conn.transactions > 0
            conn.transactions += 1
            conn.clean = False
            hop = NextHop(conn.extensions, conn.verified_tls)
            try:
                reply, conn.clean = await relay_transaction.run(
                    conn.client, hop, envelope, reused, self.lmtp, self.hostname, conn.remote_name
                )
            except relay_transaction.RetryOnFresh:
                self.pool.release(conn, reusable=False)
                if attempt == 1:
                    continue
                return self._done(envelope, replies.CONNECTION_LOST.copy(), "reused conn dead")
            except NextHopError as e:
                self.pool.release(conn, reusable=False)
                return self._done(envelope, _error_reply(e), str(e))
            except BaseException:
                self.pool.release(conn, reusable=False)
                raise
            self.pool.release(conn, reusable=conn.clean)
            return self._done(envelope, reply, "")
        raise AssertionError("unreachable")  # pragma: no cover

    def _done(self, envelope: Envelope, reply: BusResult, why: str) -> BusResult:
        self.log.info(
            "relay {queue_id} to {hop}: {reply}{why}",
            queue_id=envelope.queue_id,
            hop=self.name,
            reply=str(reply) if isinstance(reply, Reply) else " | ".join(map(str, reply)),
            why=f" ({why})" if why else "",
        )
        return reply

    # -- setting up a connection ------------------------------------------------------------

    def _open(self) -> Deferred[NextHopConnection]:
        return Deferred.fromCoroutine(self._setup())

    async def _setup(self) -> NextHopConnection:
        connecting = self.endpoint.connect(self._factory)
        connecting.addTimeout(self.timeout, self.clock)
        try:
            client = cast(SmtpClientProtocol, await connecting)
        except (ConnectError, DNSLookupError, defer.TimeoutError, OSError) as e:
            raise NextHopUnavailable(replies.CONNECT_FAILED.copy()) from e
        try:
            return await self._handshake(client)
        except NextHopUnavailable:
            client.abort()
            raise
        except NextHopError as e:
            client.abort()
            raise NextHopUnavailable(_error_reply(e, setup=True)) from e
        except BaseException:
            client.abort()
            raise

    async def _handshake(self, client: SmtpClientProtocol) -> NextHopConnection:
        greeting = await client.expect()
        if not greeting.code.startswith("2"):
            raise NextHopUnavailable(_setup_refusal("greeting", greeting))
        ext = await self._hello(client)
        if self.tls != "none":
            if "STARTTLS" in ext:
                answer = await client.command(b"STARTTLS")
                if answer.code == "220":
                    client.start_tls(self.tls_options)
                    ext = await self._hello(client)
                elif self.tls == "required":
                    raise NextHopUnavailable(_setup_refusal("STARTTLS", answer, "7.0"))
            elif self.tls == "required":
                raise NextHopUnavailable(
                    Reply("451", "Next hop does not offer STARTTLS, which is required", "4.7.0")
                )
        if self.credentials is not None:
            await self._authenticate(client, ext)
        return NextHopConnection(
            client,
            ext,
            verified_tls=client.tls and self.tls == "required",
            remote_name=(greeting.message.split() or ["unknown"])[0],
        )

    async def _hello(self, client: SmtpClientProtocol) -> Extensions:
        verb = b"LHLO " if self.lmtp else b"EHLO "
        answer = await client.command(verb + self.hostname.encode("idna"))
        if answer.code.startswith("2"):
            return Extensions.parse(answer)
        if not self.lmtp and answer.code.startswith("5"):
            helo = await client.command(b"HELO " + self.hostname.encode("idna"))
            if helo.code.startswith("2"):
                return Extensions()
            answer = helo
        raise NextHopUnavailable(_setup_refusal(verb.decode().strip(), answer))

    async def _authenticate(self, client: SmtpClientProtocol, ext: Extensions) -> None:
        assert self.credentials is not None
        if not client.tls and not self.allow_plaintext_auth:
            raise NextHopUnavailable(
                Reply("451", "Not sending credentials to the next hop without TLS", "4.7.0")
            )
        user, password = (part.encode("utf-8") for part in self.credentials)
        mechanisms = ext.auth_mechanisms
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + user + b"\0" + password)
            answer = await client.command(b"AUTH PLAIN " + token)
        elif "LOGIN" in mechanisms:
            answer = await client.command(b"AUTH LOGIN")
            for secret in (user, password):
                if answer.code != "334":
                    break
                answer = await client.command(base64.b64encode(secret))
        else:
            raise NextHopUnavailable(
                Reply("451", "Next hop offers no AUTH PLAIN or LOGIN", "4.7.0")
            )
        if answer.code != "235":
            raise NextHopUnavailable(_setup_refusal("AUTH", answer, "7.0"))


def _setup_refusal(stage: str, answer: Reply, detail: str = "4.1") -> Reply:
    """A refusal while setting up the connection: never the client's fault, so 451."""
    text = answer.message.replace("\n", " ")
    return Reply("451", f"Next hop refused {stage}: {answer.code} {text}", f"4.{detail}")


def _error_reply(error: Exception, setup: bool = False) -> Reply:
    if isinstance(error, NextHopTimeout):
        return replies.TIMED_OUT.copy()
    if isinstance(error, NextHopProtocolError):
        return replies.PROTOCOL_ERROR.copy()
    if setup:
        return replies.CONNECT_FAILED.copy()
    return replies.CONNECTION_LOST.copy()


RelayBusFactory = Callable[..., RelayBus]
