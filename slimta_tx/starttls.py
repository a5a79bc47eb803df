"""STARTTLS (RFC 3207) and implicit TLS (RFC 8314): the command, the keyword, the handshake.

:func:`enable` is what :meth:`SmtpEdge.enable_tls <slimta_tx.factory.SmtpEdge.enable_tls>`
does: it registers the ``STARTTLS`` command, the EHLO keyword (only on plaintext
connections) and the ``require_tls`` check on MAIL.

Safe by construction: after ``220 2.0.0 Ready to start TLS`` every byte the client sent after
the STARTTLS line is thrown away (CVE-2011-0411: ``STARTTLS\\r\\nNOOP\\r\\n`` in one packet never
gets the NOOP answered), and everything learned in plaintext is forgotten (EHLO name,
transaction, authentication): the client must EHLO again. On an implicit-TLS connection (a
listener wrapped in TLS, or ``enable_tls(ctx, immediately=True)``) the banner waits for the
handshake, so it is sent inside TLS and the ``BANNER`` validator already sees the TLS facts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from twisted.internet.interfaces import (
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
    ISSLTransport,
    ITLSTransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from slimta_tx.reply import Reply
from slimta_tx.state import State
from slimta_tx.tls import tls_info

if TYPE_CHECKING:  # pragma: no cover
    from slimta_tx.address import MailArgument
    from slimta_tx.envelope import Session
    from slimta_tx.factory import SmtpEdge
    from slimta_tx.protocol import ESMTPServerProtocol

__all__ = [
    "MUST_STARTTLS",
    "READY_TO_START_TLS",
    "enable",
    "handle_starttls",
    "wrap_implicit",
]

log = Logger(namespace="slimta_tx.starttls")

READY_TO_START_TLS = Reply("220", "Ready to start TLS", "2.0.0")
MUST_STARTTLS = Reply("530", "Must issue a STARTTLS command first", "5.7.0")
_ALREADY = Reply("503", "TLS already active", "5.5.1")
_SYNTAX = Reply("501", "Syntax: STARTTLS (no parameters)", "5.5.4")
_UNAVAILABLE = Reply("454", "TLS not available due to temporary reason", "4.7.0")


def enable(edge: SmtpEdge, context: Any, immediately: bool, require_tls: bool) -> None:
    """Register STARTTLS on ``edge`` (see ``SmtpEdge.enable_tls``)."""
    if not (
        IOpenSSLServerConnectionCreator.providedBy(context)
        or IOpenSSLContextFactory.providedBy(context)
        or callable(getattr(context, "getContext", None))
    ):
        raise TypeError(
            f"{context!r} is not a TLS server context: use slimta_tx.ServerTLS, or Twisted's "
            "CertificateOptions"
        )
    edge.tls_context = context
    edge.tls_immediately = immediately
    edge.require_tls = require_tls
    edge.extra_commands["STARTTLS"] = handle_starttls
    if _advertise not in edge.ehlo_extensions:
        edge.ehlo_extensions.append(_advertise)
    if edge.tls_mail_check is None:

        def check(session: Session, argument: MailArgument) -> Reply | None:
            return MUST_STARTTLS.copy() if edge.tls_required(session) else None

        edge.tls_mail_check = check
        edge.mail_checks.append(check)


def wrap_implicit(edge: SmtpEdge, context: Any = None) -> Any:
    """A factory for a listener that speaks TLS from the first byte (port 465).

    ``strports.service(description, wrap_implicit(edge), ...)`` or
    ``endpoint.listen(wrap_implicit(edge))``. Uses the edge's TLS context unless given one.
    """
    from twisted.protocols.tls import TLSMemoryBIOFactory

    context = context if context is not None else edge.tls_context
    if context is None:
        raise ValueError("no TLS context: call enable_tls first or pass one")
    return TLSMemoryBIOFactory(context, False, edge)


def _advertise(session: Session) -> list[str]:
    return ["STARTTLS"] if session.security is None else []


# -- the command -----------------------------------------------------------------------------


def handle_starttls(proto: ESMTPServerProtocol, argument: str) -> None:
    if argument.strip():
        proto.refuse(_SYNTAX.copy())
        return
    if proto.tls_started:
        proto.refuse(_ALREADY.copy())
        return
    if not ITLSTransport.providedBy(proto.transport):
        proto.finish_command("STARTTLS", _UNAVAILABLE.copy())
        return
    proto.run_step(proto.call_hook("STARTTLS", READY_TO_START_TLS.copy()), proto_start_tls(proto))


def proto_start_tls(proto: ESMTPServerProtocol) -> Any:
    def done(reply: Reply) -> None:
        if not reply.code.startswith("2"):
            proto.finish_command("STARTTLS", reply)
            return
        proto.send(reply)
        proto.flush_now()  # the 220 must be on the wire, in plaintext, before the handshake
        # Nothing the client sent after STARTTLS in plaintext may be acted upon.
        proto.reader.clear()
        if proto.state is State.CLOSED or getattr(proto, "_closing", False):
            return  # the 220 went out with a 421 (shutting down): no handshake
        proto.reset_transaction()
        proto.session.forget_for_starttls()
        proto.state = State.CONNECTED
        proto.tls_started = True
        log.debug("{peer} STARTTLS", peer=proto.session.address)
        cast(Any, proto.transport).startTLS(proto.edge.tls_context)

    return done


# -- called by the protocol --------------------------------------------------------------------


def begin_implicit(proto: ESMTPServerProtocol) -> bool:
    """At connection: True when this connection is TLS from the first byte.

    Either the listener already wraps it in TLS, or the edge says ``immediately``: then TLS
    starts now. The caller holds the banner until :func:`handshake_completed`.
    """
    transport = proto.transport
    if ISSLTransport.providedBy(transport):
        proto.tls_started = True
        return True
    edge = proto.edge
    if edge.tls_immediately and edge.tls_context is not None:
        if not ITLSTransport.providedBy(transport):
            raise TypeError(f"{transport!r} cannot start TLS")
        proto.tls_started = True
        cast(Any, transport).startTLS(edge.tls_context)
        return True
    return False


def handshake_completed(proto: ESMTPServerProtocol) -> None:
    """Record the TLS facts; on an implicit-TLS connection, greet the client now."""
    handle = cast(Any, proto.transport).getHandle()
    info = tls_info(handle)
    proto.session.tls = info
    proto.session.security = "TLS"
    if info.client_certificate:
        # For validators that check more than the subject (names, fingerprint).
        proto.session.extra["tls_peer_certificate"] = handle.get_peer_certificate(
            as_cryptography=True
        )
    proto.edge.events.tls_handshake(proto.session, info)
    if proto.state is State.GREETING:
        proto.greet()


def connection_lost(proto: ESMTPServerProtocol, reason: Failure | None) -> None:
    """Log a handshake that never completed, with the reason."""
    if proto.tls_started and proto.session.tls is None:
        why = reason.getErrorMessage() if reason is not None else "connection closed"
        proto.edge.events.tls_failed(proto.session, why)
