"""``SmtpEdge``: the factory that holds policy, validators, the bus and the seed API."""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IListeningPort, IReactorTime, IStreamServerEndpoint
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger

from slimta_tx.accept import AcceptQueue, HeldConnection, adopt_socket
from slimta_tx.address import MailArgument
from slimta_tx.envelope import Envelope, Session
from slimta_tx.events import EdgeEvents
from slimta_tx.extensions import ehlo_keywords
from slimta_tx.interfaces import IBus
from slimta_tx.milter import Milter, Milters, parse_milter
from slimta_tx.policy import Policy
from slimta_tx.protocol import ESMTPServerProtocol
from slimta_tx.reply import Reply
from slimta_tx.spool import SpoolFactory
from slimta_tx.validators import SmtpValidators, Validator, Validators, install_validators

if TYPE_CHECKING:  # pragma: no cover
    from twisted.internet.interfaces import IAddress

    from slimta_tx.auth import Auth
    from slimta_tx.capacity import ConnectionGate

__all__ = ["SmtpEdge"]

CommandHandler = Callable[[ESMTPServerProtocol, str], None]


class SmtpEdge(ServerFactory):
    """An SMTP edge listener: policy plus a bus, ready to serve on any Twisted endpoint.

    :param bus: an :class:`~slimta_tx.interfaces.IBus` provider; each accepted message goes
        there and its reply goes to the client.
    :param policy: limits and relay rules (:class:`~slimta_tx.policy.Policy`).
    :param reactor: the reactor (and clock) to use; the global reactor when None.
    :param lmtp: speak LMTP (RFC 2033: LHLO, one reply per recipient) instead of ESMTP; see
        :mod:`slimta_tx.lmtp`, which also serves LMTP beside SMTP listeners of one edge.
    :param milters: mail filters (:class:`slimta_tx.milter.Milter`, or their text form
        ``"inet:HOST:PORT"``/``"unix:PATH"``), told about each session in this order (see
        docs/filtering.md).
    """

    log = Logger()

    def __init__(
        self,
        bus: IBus,
        policy: Policy | None = None,
        reactor: IReactorTime | None = None,
        milters: Sequence[Milter | str] = (),
        lmtp: bool = False,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        if not IBus.providedBy(bus) and not callable(getattr(bus, "send", None)):
            raise TypeError(f"{bus!r} is not a bus: it needs a send(envelope) method")
        self.bus = bus
        self.lmtp = lmtp
        self.policy = policy if policy is not None else Policy()
        self.reactor: IReactorTime = reactor
        self.validators = Validators()
        self.milters = Milters(
            [m if isinstance(m, Milter) else parse_milter(m) for m in milters], reactor
        )
        self.spool_factory = SpoolFactory(
            self.policy.spool_directory, self.policy.spool_memory_limit
        )
        self.banner_code = "220"
        self.banner_message: str | None = None
        self._banner_key: tuple[str, str | None, str] | None = None  # what _banner_wire is of
        self._banner_wire: bytes | None = None
        self._bye_host: str | None = None  # what _bye_wire is of
        self._bye_wire = b""
        # What features (TLS, AUTH, ...) add when enabled: commands, MAIL parameters, EHLO
        # keywords (a function of the session) and checks on MAIL (returning a refusal).
        self.extra_commands: dict[str, CommandHandler] = {}
        self.extra_mail_params: set[str] = set()
        self.ehlo_extensions: list[Callable[[Session], list[str]]] = []
        self.mail_checks: list[Callable[[Session, MailArgument], Reply | None]] = []
        # TLS (see enable_tls): the server context, TLS from the first byte, require TLS.
        self.tls_context: Any = None
        self.tls_immediately = False
        self.require_tls = False
        # The MAIL check that require_tls adds (530 5.7.0 before STARTTLS): once per edge.
        self.tls_mail_check: Callable[[Session, MailArgument], Reply | None] | None = None
        # AUTH (see enable_authentication): its configuration, None until enabled.
        self.auth: Auth | None = None
        self.connections: set[ESMTPServerProtocol] = set()
        # Called with each session when its connection ends (policies keep counts with it).
        self.disconnect_hooks: list[Callable[[Session], None]] = []
        self._accept_queue: AcceptQueue | None = None
        # Turns connections away past a connection or descriptor limit (slimta_tx.capacity).
        self.connection_gate: ConnectionGate | None = None
        self.ports: list[IListeningPort] = []
        self._closing: Deferred[None] | None = None
        self._drained: list[Deferred[None]] = []
        #: Every log event of the edge's sessions (and the points metrics hang off).
        self.events = EdgeEvents(self)

    # -- the seed API ----------------------------------------------------------------------

    def set_banner_message(self, code: str | int, message: str) -> None:
        """The greeting every client gets first (the ``BANNER`` validator may change it)."""
        self.banner_code = str(code)
        self.banner_message = message

    def set_max_message_size(self, size: int | None) -> None:
        """Largest message accepted, in bytes (advertised with SIZE; None or 0: no limit)."""
        self.policy = self.policy.evolve(max_message_size=int(size or 0))

    def set_validator(self, command: str, func: Validator | None) -> None:
        """Call ``func(session, reply, *extra)`` at ``command``.

        See :mod:`slimta_tx.validators` for the hooks and what each receives.
        """
        self.validators.set(command, func)

    def set_validators(self, validators: SmtpValidators | type[SmtpValidators]) -> None:
        """Use the ``handle_*`` methods of a :class:`~slimta_tx.validators.SmtpValidators`
        subclass (one instance per session) or instance as validators."""
        install_validators(self.validators, validators)

    def adopt(self, sock: socket.socket, proxy_protocol: bool = False) -> IListeningPort:
        """Serve an already-listening socket (the seed's ``new(socket, bus)``).

        ``proxy_protocol``: each connection starts with a PROXY header from a trusted proxy
        (see :mod:`slimta_tx.proxy`).
        """
        return adopt_socket(self, sock, self._proxied() if proxy_protocol else None)

    def accept(self) -> Deferred[HeldConnection]:
        """Fire with the next connection, as a callable that runs the whole session and
        returns a Deferred of its end. From the first call on, connections wait for it."""
        if self._accept_queue is None:
            self._accept_queue = AcceptQueue(self)
            if self._closing is not None:
                self._accept_queue.close()
        return self._accept_queue.accept()

    def enable_tls(
        self, context: Any, immediately: bool = False, require_tls: bool = False
    ) -> None:
        """Offer TLS with ``context`` (a :class:`slimta_tx.ServerTLS` or Twisted
        ``CertificateOptions``): STARTTLS on plaintext connections, or, ``immediately``, TLS
        from the first byte on every connection (port 465). ``require_tls``: MAIL and AUTH
        get ``530 5.7.0`` until TLS is up (for submission ports; never on a public MX)."""
        from slimta_tx import starttls

        starttls.enable(self, context, immediately, require_tls)

    def tls_required(self, session: Session) -> bool:
        """True when this session must start TLS before MAIL or AUTH (530 5.7.0)."""
        return self.require_tls and session.security is None

    def enable_authentication(self, auth: Auth) -> None:
        """Offer SMTP AUTH (RFC 4954) as configured by ``auth``, a :class:`slimta_tx.auth.Auth`.

        Fails closed: without a credential checker nothing is offered; PLAIN and LOGIN need
        TLS unless ``auth.allow_insecure``. A session's identity is ``session.authed``.
        """
        from slimta_tx.auth.exchange import install

        self.auth = auth
        install(self, auth)

    def listen(
        self, endpoint: IStreamServerEndpoint, proxy_protocol: bool = False
    ) -> Deferred[IListeningPort]:
        """Start listening on ``endpoint``; :meth:`close` stops it.

        ``proxy_protocol``: each connection starts with a PROXY header from a trusted proxy
        (see :mod:`slimta_tx.proxy`; Twisted's ``haproxy:`` endpoints are made safe too).
        """
        from slimta_tx import proxy

        proxy.check_endpoint(endpoint, proxy_protocol)
        d: Deferred[IListeningPort] = endpoint.listen(self._proxied() if proxy_protocol else self)

        def record(port: IListeningPort) -> IListeningPort:
            self.ports.append(port)
            return port

        return d.addCallback(record)

    def close(self) -> Deferred[None]:
        """Stop listening now; let sessions finish their current transaction; fire when all
        are gone. After ``policy.shutdown_grace`` seconds the rest get ``421 4.3.2``."""
        if self._closing is not None:
            return self._closing
        stops = [Deferred.fromCoroutine(_stop(port)) for port in self.ports]
        self.ports = []
        if self._accept_queue is not None:
            self._accept_queue.close()
        drained: Deferred[None] = Deferred()
        self._drained.append(drained)
        for proto in list(self.connections):
            proto.shutdown()
        grace = self.reactor.callLater(self.policy.shutdown_grace, self._force_close)
        self._check_drained()

        def cancel_grace(result: object) -> None:
            if grace.active():
                grace.cancel()

        closing: Deferred[Any] = DeferredList([*stops, drained], consumeErrors=True)
        self._closing = closing.addCallback(cancel_grace)
        return self._closing

    def _proxied(self) -> Any:
        from slimta_tx.proxy import ProxyFactory

        return ProxyFactory(self)

    # -- used by the protocol ----------------------------------------------------------------

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        gate = self.connection_gate
        if gate is not None:
            refusal = gate.check(self)
            if refusal is not None:
                return gate.turn_away(self, refusal)
        if self._accept_queue is not None:
            return HeldConnection(self, self._accept_queue)
        return self.build_session_protocol()

    def held_connections(self) -> int:
        """Connections waiting for :meth:`accept` (each holds a descriptor)."""
        return len(self._accept_queue.held) if self._accept_queue is not None else 0

    def build_session_protocol(self) -> ESMTPServerProtocol:
        if self.lmtp:
            from slimta_tx.lmtp import LMTPServerProtocol

            proto: ESMTPServerProtocol = LMTPServerProtocol(self)
            proto.factory = self
            return proto
        proto = ESMTPServerProtocol(self)
        proto.factory = self
        return proto

    def banner_reply(self) -> Reply:
        message = self.banner_message or f"{self.policy.hostname} ESMTP slimta_tx"
        return Reply(self.banner_code, message)

    def bye_wire(self) -> bytes:
        """QUIT's ``221 2.0.0 <hostname> Bye`` as sent, rendered once per host name."""
        hostname = self.policy.hostname
        if hostname != self._bye_host:
            self._bye_wire = Reply("221", f"{hostname} Bye", "2.0.0").render()
            self._bye_host = hostname
        return self._bye_wire

    def banner_wire(self) -> bytes | None:
        """The usual greeting as sent (a 220 banner, rendered once and kept while the banner
        and the host name stay the same); None for any other code, whose reply takes the full
        way (a 554 greeting changes the session's state, a 421 or 221 closes it)."""
        key = (self.banner_code, self.banner_message, self.policy.hostname)
        if key != self._banner_key:
            reply = self.banner_reply()
            self._banner_wire = reply.render(with_enhanced=False) if reply.code == "220" else None
            self._banner_key = key
        return self._banner_wire

    def ehlo_keywords(self, session: Session) -> list[str]:
        keywords = ehlo_keywords(self.policy, session)
        for extension in self.ehlo_extensions:
            keywords += extension(session)
        return keywords

    def check_mail(self, session: Session, argument: MailArgument) -> Reply | None:
        """Policy checks on MAIL beyond syntax (TLS or AUTH requirements); None: fine."""
        for mail_check in self.mail_checks:
            refusal = mail_check(session, argument)
            if refusal is not None:
                return refusal
        return None

    def connection_made(self, proto: ESMTPServerProtocol) -> None:
        self.connections.add(proto)
        if self._closing is not None:
            proto.shutdown()

    def connection_lost(self, proto: ESMTPServerProtocol) -> None:
        self.connections.discard(proto)
        for hook in self.disconnect_hooks:
            try:
                hook(proto.session)
            except Exception:
                self.log.failure("disconnect hook {hook!r} failed", hook=hook)
        self._check_drained()

    def log_transaction(self, session: Session, envelope: Envelope, reply: Reply) -> None:
        """One summary event per transaction, at info level (see :mod:`slimta_tx.events`)."""
        self.events.transaction(session, envelope, reply)

    def _force_close(self) -> None:
        for proto in list(self.connections):
            proto.force_close()

    def _check_drained(self) -> None:
        if self.connections:
            return
        drained, self._drained = self._drained, []
        for d in drained:
            d.callback(None)


async def _stop(port: IListeningPort) -> None:
    result = port.stopListening()
    if isinstance(result, Deferred):
        await result
    else:
        await succeed(None)
