"""Listeners behind a load balancer: the PROXY protocol header names the client.

Behind HAProxy every connection comes from the proxy; the client it relays is named by a PROXY
header (v1 or v2, :mod:`slimta_tx.proxy_header`) before any SMTP. On a listener that expects one
(``haproxy:`` in ``--listen``/``--tls-listen``, :class:`ProxyFactory`, ``edge.listen(endpoint,
proxy_protocol=True)``), each connection is held until its header is in:

- only peers in ``Policy.trusted_proxies`` (``--proxy-from``) may send one; a connection from
  anywhere else is closed at once, unread;
- nothing reaches the SMTP session (so no banner, no hook, no policy) before the header; a
  connection that sends none within ``Policy.proxy_timeout`` seconds is closed, and so is one
  whose header is malformed (both logged);
- then the session starts as if the client had connected itself: its address (``getPeer``)
  is the header's source everywhere (relay and trust, per-IP limits, DNSBL, reverse DNS, the
  greeting delay, ``Received:``, logs, the envelope). A header that names no client (v2
  ``LOCAL``, as HAProxy's health checks send; v1 ``UNKNOWN``) makes it the proxy's own
  connection, served with the proxy's address.

Twisted's own ``haproxy:`` endpoint calls the session before the header has arrived and never
times out. A session that finds Twisted's wrapper beneath it (``strports.service("haproxy:...",
edge)``, ``serverFromString(reactor, "haproxy:...").listen(edge)``) hands the wrapper's input
to the rules above (:func:`hold_for_header`) and starts only after the header; if that cannot
be done, the connection is closed and the reason logged. It is never served unsafely.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from twisted.application import strports
from twisted.application.service import IService
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress, IDelayedCall, IHandshakeListener, IProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import alsoProvides, directlyProvides, implementer, providedBy

from slimta_tx.proxy_header import ProxyHeader, ProxyHeaderError, ProxyHeaderParser

if TYPE_CHECKING:  # pragma: no cover
    from slimta_tx.factory import SmtpEdge
    from slimta_tx.protocol import ESMTPServerProtocol

__all__ = [
    "ProxyFactory",
    "ProxyProtocol",
    "check_endpoint",
    "hold_for_header",
    "listener_service",
    "proxied_description",
]

log = Logger(namespace="slimta_tx.proxy")

PREFIX = "haproxy:"
# Endpoint types whose bytes are TLS from the first one: a PROXY header inside them is not what
# a load balancer sends (HAProxy's header comes in clear, before the ClientHello).
_TLS_ENDPOINTS = ("ssl", "tls", "txsni")
# How deep a session looks for Twisted's haproxy wrapper beneath it (TLS, other wrappers).
_MAX_DEPTH = 8


def _host(address: IAddress) -> str:
    """The peer's IP address; a UNIX socket peer counts as local (127.0.0.1)."""
    if isinstance(address, UNIXAddress):
        return "127.0.0.1"
    return str(getattr(address, "host", ""))


def _describe(address: IAddress) -> str:
    host, port = _host(address), getattr(address, "port", None)
    return host if port is None else f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _address(endpoint: tuple[str, int]) -> IPv4Address | IPv6Address:
    host, port = endpoint
    if ":" in host:
        return IPv6Address("TCP", host, port)
    return IPv4Address("TCP", host, port)


class _HeaderWait:
    """One connection's wait for its header: who may send one, for how long, and what it says.

    ``transport`` is the connection beneath (its peer is the proxy); ``on_header(header,
    rest)`` is called once, when a valid header is in. Any failure closes ``transport``.
    """

    def __init__(
        self,
        transport: Any,
        edge: SmtpEdge,
        on_header: Callable[[ProxyHeader, bytes], None],
    ) -> None:
        self.transport = transport
        self.policy = edge.policy
        self.clock = edge.reactor
        self.on_header = on_header
        self.parser = ProxyHeaderParser()
        self.peer = _describe(transport.getPeer())
        self.timer: IDelayedCall | None = None
        self.closed = False

    def start(self) -> None:
        if not self.policy.is_trusted_proxy(_host(self.transport.getPeer())):
            log.info(
                "{proxy}: not a trusted proxy (--proxy-from); PROXY listener closed the "
                "connection",
                proxy=self.peer,
            )
            self.close()
            return
        self.timer = self.clock.callLater(self.policy.proxy_timeout, self._timed_out)

    def feed(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            found = self.parser.feed(data)
        except ProxyHeaderError as e:
            log.warn(
                "{proxy}: malformed PROXY header ({error}); connection closed",
                proxy=self.peer,
                error=str(e),
            )
            self.close()
            return
        if found is None:
            return
        self.cancel()
        header, rest = found
        log.debug(
            "{proxy}: PROXY v{version} {command} {family} client={client}",
            proxy=self.peer,
            version=header.version,
            command=header.command,
            family=header.family,
            client=header.source,
        )
        self.on_header(header, rest)

    def _timed_out(self) -> None:
        self.timer = None
        log.info(
            "{proxy}: no PROXY header within {seconds} s; connection closed",
            proxy=self.peer,
            seconds=self.policy.proxy_timeout,
        )
        self.close()

    def close(self) -> None:
        self.closed = True
        self.cancel()
        self.transport.loseConnection()

    def cancel(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


@implementer(IHandshakeListener)
class ProxyProtocol(ProtocolWrapper):
    """Reads the PROXY header, then connects the wrapped protocol with itself as transport.

    Its ``getPeer``/``getHost`` are the header's source and destination (the real ones when the
    header names no client). Until the header is in, the wrapped protocol knows nothing of the
    connection. Everything else (``write``, ``startTLS``, ``setTcpNoDelay``, ...) goes to the
    connection beneath.
    """

    factory: ProxyFactory
    #: ``write`` goes straight to the connection beneath: fastwrite may use that connection's
    #: socket directly (write-through and coalescing, as without a proxy).
    passes_writes_through = True

    def __init__(self, factory: ProxyFactory, wrappedProtocol: IProtocol) -> None:
        super().__init__(cast(Any, factory), wrappedProtocol)
        self.header: ProxyHeader | None = None
        self._wait: _HeaderWait | None = None
        self._paused = False
        self._held = b""
        self._delivery: IDelayedCall | None = None

    def makeConnection(self, transport: Any) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)  # not ProtocolWrapper's: no session yet

    def connectionMade(self) -> None:
        self.factory.registerProtocol(self)
        self._wait = _HeaderWait(self.transport, self.factory.edge, self._header_received)
        self._wait.start()

    def _header_received(self, header: ProxyHeader, rest: bytes) -> None:
        self.header = header
        self.wrappedProtocol.makeConnection(cast(Any, self))
        if rest:
            below = getattr(self.transport, "protocol", self)
            if below is not self and below is not None:
                # The session started TLS on the connection (TLS from the first byte): what
                # followed the header is its ClientHello, for the TLS layer now beneath us.
                below.dataReceived(rest)
            else:
                self._deliver(rest)

    def dataReceived(self, data: bytes) -> None:
        if self.header is None:
            if self._wait is not None:
                self._wait.feed(data)
        elif self._paused or self._held:
            self._deliver(data)
        else:
            self.wrappedProtocol.dataReceived(data)  # the usual case, one call less

    def _deliver(self, data: bytes) -> None:
        if self._paused or self._held:
            self._held += data  # the session paused (e.g. waiting for accept()): keep it
        elif self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)

    def pauseProducing(self) -> None:
        self._paused = True
        cast(Any, self.transport).pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        if self._held and self._delivery is None:
            # On a later turn, as a transport would: never inside the caller's own call.
            self._delivery = self.factory.edge.reactor.callLater(0, self._deliver_held)
        cast(Any, self.transport).resumeProducing()

    def _deliver_held(self) -> None:
        self._delivery = None
        if self._paused or self.wrappedProtocol is None:
            return
        data, self._held = self._held, b""
        self.wrappedProtocol.dataReceived(data)

    def getPeer(self) -> IAddress:
        header = self.header
        if header is not None and header.source is not None:
            return _address(header.source)
        return cast(IAddress, cast(Any, self.transport).getPeer())

    def getHost(self) -> IAddress:
        header = self.header
        if header is not None and header.destination is not None:
            return _address(header.destination)
        return cast(IAddress, cast(Any, self.transport).getHost())

    def handshakeCompleted(self) -> None:
        """TLS started beneath us (STARTTLS): tell the session."""
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            cast(Any, self.wrappedProtocol).handshakeCompleted()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.factory.unregisterProtocol(self)
        if self._wait is not None:
            self._wait.cancel()
        if self._delivery is not None and self._delivery.active():
            self._delivery.cancel()
        if self.header is not None and self.wrappedProtocol is not None:
            self.wrappedProtocol.connectionLost(reason)
        self.wrappedProtocol = cast(IProtocol, None)  # no cycle


class ProxyFactory(WrappingFactory):
    """Serve ``edge`` (or ``wrapped``, a factory in front of it, e.g. TLS) behind a proxy.

    The rules (trusted proxies, header timeout) are ``edge.policy``'s, read per connection.
    """

    protocol = ProxyProtocol

    def __init__(self, edge: SmtpEdge, wrapped: Any = None) -> None:
        super().__init__(wrapped if wrapped is not None else edge)
        self.edge = edge

    def logPrefix(self) -> str:
        inner = self.wrappedFactory
        prefix = inner.logPrefix() if hasattr(inner, "logPrefix") else type(inner).__name__
        return f"{prefix} (PROXY)"


# -- listener descriptions -----------------------------------------------------------------------


class ProxyConfigError(ValueError):
    """A listener that cannot carry the PROXY protocol safely."""


def proxied_description(description: str) -> str | None:
    """``"haproxy:tcp:25"`` -> ``"tcp:25"`` (what to listen on); None without ``haproxy:``.

    Raises :class:`ProxyConfigError` for a description that cannot work behind a proxy.
    """
    if not description.lower().startswith(PREFIX):
        return None
    inner = description[len(PREFIX) :]
    kind = inner.split(":", 1)[0].lower()
    if kind in _TLS_ENDPOINTS:
        raise ProxyConfigError(
            f"{description}: the PROXY header comes in clear, before TLS; for TLS from the "
            "first byte use --tls-listen haproxy:tcp:PORT"
        )
    if kind == "haproxy":
        raise ProxyConfigError(f"{description}: 'haproxy:' twice")
    if not kind:
        raise ProxyConfigError(f"{description}: nothing to listen on after 'haproxy:'")
    return inner


def listener_service(
    description: str, edge: SmtpEdge, reactor: Any, factory: Any = None
) -> IService:
    """``strports.service(description, factory or edge)``, with slimta_tx's PROXY layer for a
    ``haproxy:`` description (not Twisted's) and a listen backlog of
    :data:`slimta_tx.capacity.DEFAULT_LISTEN_BACKLOG` where none is named. Binding still fails
    fast at start-up."""
    from slimta_tx.capacity import with_backlog  # a large listen backlog unless one is named

    factory = factory if factory is not None else edge
    inner = proxied_description(description)
    if inner is None:
        return strports.service(with_backlog(description), factory, reactor=reactor)
    return strports.service(with_backlog(inner), ProxyFactory(edge, factory), reactor=reactor)


# -- Twisted's own haproxy wrapper ------------------------------------------------------------


def _twisted_wrapper_class() -> type | None:
    try:
        from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper
    except ImportError:  # pragma: no cover - a Twisted without it (see check_endpoint)
        return None
    return HAProxyProtocolWrapper


def _is_twisted_haproxy(thing: object) -> bool:
    """An instance of (or a class from) Twisted's haproxy package."""
    kind = thing if isinstance(thing, type) else type(thing)
    return kind.__module__.startswith("twisted.protocols.haproxy")


def check_endpoint(endpoint: object, proxy_protocol: bool = False) -> None:
    """Refuse at start-up an endpoint that cannot be served safely.

    That is one built with Twisted's ``haproxy:`` wrapper when this Twisted's wrapper is not
    the one :func:`hold_for_header` knows how to take over, or when a PROXY layer is asked for
    on top of it (``proxy_protocol``: two layers would each expect a header).
    """
    wrapper_factory = getattr(endpoint, "_wrapperFactory", None)
    if not isinstance(wrapper_factory, type) or not _is_twisted_haproxy(wrapper_factory):
        return
    if proxy_protocol:
        raise ProxyConfigError(
            "this endpoint reads a PROXY header already (Twisted's haproxy:); do not ask for "
            "another with proxy_protocol=True"
        )
    known = _twisted_wrapper_class()
    if known is None or getattr(wrapper_factory, "protocol", None) is not known:
        raise ProxyConfigError(
            "this Twisted's haproxy: endpoint is not one slimta_tx can make safe; use "
            "edge.listen(endpoint, proxy_protocol=True) with the endpoint beneath it"
        )


def hold_for_header(proto: ESMTPServerProtocol, start: Callable[[], None]) -> bool:
    """At connection: True when the session must wait for a PROXY header still to come.

    That is when Twisted's haproxy wrapper is beneath the session (directly, or under TLS):
    it would only learn the client's address later, and without a timeout or a list of trusted
    proxies. Its input is taken over by the rules of this module, and ``start`` is called once
    the header is in (the connection closes instead if it is not). Beneath slimta_tx's own
    :class:`ProxyProtocol` the header is always in already: False.
    """
    layer: Any = proto.transport
    for _ in range(_MAX_DEPTH):
        if isinstance(layer, ProxyProtocol):
            return False
        if _is_twisted_haproxy(layer):
            _TakeOver(layer, proto.edge, start).install()
            return True
        if not isinstance(layer, ProtocolWrapper):
            return False
        layer = layer.transport
    return False


def _can_take_over(wrapper: object) -> bool:
    """Twisted's wrapper as this code knows it, before it has read anything."""
    known = _twisted_wrapper_class()
    fresh = getattr(wrapper, "_parser", None) is None and (
        getattr(wrapper, "_proxyInfo", None) is None
    )
    return known is not None and type(wrapper) is known and fresh


class _TakeOver:
    """Twisted's haproxy wrapper, with our parser and rules instead of its own.

    Its ``dataReceived``, ``getPeer``, ``getHost`` and ``connectionLost`` (public methods of a
    ``ProtocolWrapper``) are replaced on this one instance, and it gets ``handshakeCompleted``;
    ``wrappedProtocol`` and ``transport`` are its public attributes.
    tests/test_proxy_twisted.py pins this.
    """

    def __init__(self, wrapper: Any, edge: SmtpEdge, start: Callable[[], None]) -> None:
        self.wrapper = wrapper
        self.edge = edge
        self.start = start
        self.header: ProxyHeader | None = None
        self.wait: _HeaderWait | None = None

    def install(self) -> None:
        wrapper: Any = self.wrapper
        if not _can_take_over(wrapper):
            log.error(
                "{proxy}: Twisted's haproxy wrapper ({kind}) cannot be made safe here; "
                "connection closed (listen with slimta_tx.proxy.ProxyFactory instead)",
                proxy=_describe(wrapper.transport.getPeer()),
                kind=type(wrapper).__qualname__,
            )
            wrapper.transport.loseConnection()
            return
        wrapper.dataReceived = self.dataReceived
        wrapper.getPeer = self.getPeer
        wrapper.getHost = self.getHost
        wrapper.connectionLost = self.connectionLost
        # STARTTLS puts TLS beneath the wrapper, which would not pass the handshake on.
        wrapper.handshakeCompleted = self.handshakeCompleted
        alsoProvides(wrapper, IHandshakeListener)
        self.wait = _HeaderWait(wrapper.transport, self.edge, self._header_received)
        self.wait.start()

    def _header_received(self, header: ProxyHeader, rest: bytes) -> None:
        self.header = header
        self.start()
        if rest:
            real = self.wrapper.transport
            below = getattr(real, "protocol", self.wrapper)
            if below is not self.wrapper and below is not None:
                below.dataReceived(rest)  # TLS was started beneath (see ProxyProtocol)
            elif self.wrapper.wrappedProtocol is not None:
                self.wrapper.wrappedProtocol.dataReceived(rest)

    def dataReceived(self, data: bytes) -> None:
        if self.header is None:
            if self.wait is not None:
                self.wait.feed(data)
        elif self.wrapper.wrappedProtocol is not None:
            self.wrapper.wrappedProtocol.dataReceived(data)

    def getPeer(self) -> IAddress:
        if self.header is not None and self.header.source is not None:
            return _address(self.header.source)
        return cast(IAddress, self.wrapper.transport.getPeer())

    def getHost(self) -> IAddress:
        if self.header is not None and self.header.destination is not None:
            return _address(self.header.destination)
        return cast(IAddress, self.wrapper.transport.getHost())

    def handshakeCompleted(self) -> None:
        inner = self.wrapper.wrappedProtocol
        if IHandshakeListener.providedBy(inner):
            inner.handshakeCompleted()

    def connectionLost(self, reason: Failure) -> None:
        if self.wait is not None:
            self.wait.cancel()
        type(self.wrapper).connectionLost(self.wrapper, reason)
