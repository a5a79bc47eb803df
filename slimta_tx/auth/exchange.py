"""The AUTH command and its ``334`` exchange (RFC 4954), and how AUTH plugs into an edge.

:func:`install` registers, on a :class:`~slimta_tx.factory.SmtpEdge`, the ``AUTH`` command, the
``AUTH ...`` EHLO keyword (per session: PLAIN and LOGIN only over TLS unless insecure AUTH is
allowed), the ``AUTH=`` MAIL parameter and the MAIL checks (``--require-auth``, RFC 4954 §5).

While an exchange runs, the protocol's ``line_handler`` is swapped for the exchange's and the
line limit is raised to 12288 octets (RFC 4954 §4); both are restored when it ends. No SASL
payload, password or checker exception text is ever logged or put into a reply.
"""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from slimta_tx.address import ArgumentError, MailArgument, parse_path, xtext_decode
from slimta_tx.auth.mechanisms import Challenge, Done, Malformed, Mechanism, Result, Verify
from slimta_tx.envelope import Session
from slimta_tx.lines import TOO_LONG, _TooLong
from slimta_tx.reply import Reply

if TYPE_CHECKING:  # pragma: no cover
    from slimta_tx.auth import Auth
    from slimta_tx.factory import SmtpEdge
    from slimta_tx.protocol import ESMTPServerProtocol

__all__ = ["AUTH_LINE_LIMIT", "AuthFeature", "install"]

# RFC 4954 §4: a server must accept response lines of at least 12288 octets.
AUTH_LINE_LIMIT = 12288


class _Continue(Reply):
    """``334 <base64>``: the space is part of the grammar even when the data is empty."""

    def render(self, with_enhanced: bool = True) -> bytes:
        return b"334 " + self.message.encode("ascii") + b"\r\n"


def _continue(data: bytes) -> _Continue:
    return _Continue("334", base64.b64encode(data).decode("ascii"))


def install(edge: SmtpEdge, auth: Auth) -> AuthFeature:
    """Register AUTH on ``edge``; called by ``SmtpEdge.enable_authentication``."""
    feature = AuthFeature(edge, auth)
    edge.extra_commands["AUTH"] = feature.command
    edge.ehlo_extensions.append(feature.ehlo_keyword)
    edge.extra_mail_params.add("AUTH")
    edge.mail_checks.append(feature.check_mail)
    return feature


class AuthFeature:
    """AUTH on one edge: per-connection failure counts live here, per-address ones in Auth."""

    log = Logger()

    def __init__(self, edge: SmtpEdge, auth: Auth) -> None:
        self.edge = edge
        self.auth = auth
        self.connection_failures: WeakKeyDictionary[ESMTPServerProtocol, int] = WeakKeyDictionary()

    def ehlo_keyword(self, session: Session) -> list[str]:
        names = self.auth.mechanisms_for(session)
        return [f"AUTH {' '.join(names)}"] if names else []

    def check_mail(self, session: Session, parsed: MailArgument) -> Reply | None:
        if self.auth.require_auth and not session.authed:
            return Reply("530", "Authentication required", "5.7.0")
        if "AUTH" not in parsed.params:
            return None
        value = parsed.params["AUTH"]
        try:
            mailbox = xtext_decode(value or "")
            if mailbox != "<>":
                parse_path(f"<{mailbox}>", "MAIL", utf8=True)
        except (ValueError, UnicodeDecodeError, ArgumentError):
            return Reply("501", "Syntax: AUTH=<mailbox as xtext> or AUTH=<>", "5.5.4")
        if not session.authed:
            # RFC 4954 §5: from an unauthenticated client the value is not trusted.
            parsed.params["AUTH"] = "<>"
        return None

    def command(self, proto: ESMTPServerProtocol, argument: str) -> None:
        AuthExchange(self, proto).begin(argument)


class AuthExchange:
    """One AUTH command, from the command line to ``235``/``535``."""

    log = Logger()

    def __init__(self, feature: AuthFeature, proto: ESMTPServerProtocol) -> None:
        self.feature = feature
        self.auth = feature.auth
        self.proto = proto
        self.name = ""
        self.mechanism: Mechanism | None = None
        self.authzid: str | None = None
        self.identity: str | None = None
        self._saved: tuple[Any, int] | None = None

    @property
    def peer(self) -> str:
        return self.proto.session.address[0]

    # -- the command line ----------------------------------------------------------------

    def begin(self, argument: str) -> None:
        proto, session, auth = self.proto, self.proto.session, self.auth
        available = auth.available()
        if not available:
            proto.refuse(Reply("502", "Command not implemented", "5.5.1"))
            return
        if not session.extended_smtp:
            proto.refuse(Reply("503", "Send EHLO first", "5.5.1"))
            return
        if session.authed:
            proto.refuse(Reply("503", "Already authenticated", "5.5.1"))
            return
        if session.envelope is not None:
            proto.refuse(Reply("503", "AUTH not allowed during a transaction", "5.5.1"))
            return
        tls_required = getattr(proto.edge, "tls_required", None)
        if tls_required is not None and tls_required(session):
            proto.send(Reply("530", "Must issue a STARTTLS command first", "5.7.0"))
            return
        if auth.failures.blocked(self.peer, proto.clock.seconds()):
            self.log.info("{peer} AUTH refused: too many recent failures", peer=self.peer)
            proto.send(self._too_many())
            return
        words = argument.split(" ")
        if not words[0] or len(words) > 2:
            proto.refuse(Reply("501", "Syntax: AUTH mechanism [initial-response]", "5.5.4"))
            return
        self.name = words[0].upper()
        spec = next((s for s in available if s.name == self.name), None)
        if spec is None:
            proto.refuse(Reply("504", "Unrecognized authentication type", "5.5.4"))
            return
        if spec.requires_encryption and not (auth.allow_insecure or auth.encrypted(session)):
            proto.send(
                Reply(
                    "538", "Encryption required for requested authentication mechanism", "5.7.11"
                )
            )
            return
        initial: bytes | None = None
        if len(words) == 2:
            initial = b"" if words[1] == "=" else self._decode(words[1].encode("ascii", "replace"))
            if initial is None:
                proto.refuse(Reply("501", "Invalid base64 data", "5.5.2"))
                return
        self.mechanism = spec.factory(auth.context(proto.policy.hostname, proto.clock.seconds))
        mechanism = self.mechanism
        self._handle(self._call(lambda: mechanism.start(initial)))

    @staticmethod
    def _decode(data: bytes) -> bytes | None:
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            return None

    def _call(self, step: Any) -> Result:
        try:
            result: Result = step()
        except Exception as e:  # a custom mechanism's bug must not leak the payload
            self.log.error(
                "{peer} AUTH {mechanism}: mechanism raised {error}",
                peer=self.peer,
                mechanism=self.name,
                error=type(e).__name__,
            )
            return Malformed("mechanism error")
        return result

    # -- results ----------------------------------------------------------------------------

    def _handle(self, result: Result) -> None:
        if isinstance(result, Challenge):
            self._challenge(_continue(result.data))
        elif isinstance(result, Verify):
            self._verify(result)
        elif isinstance(result, Done):
            self.proto.run_step(self._accept(), self._after_check)
        else:
            reason = result.reason if isinstance(result, Malformed) else "unexpected result"
            self.log.info(
                "{peer} AUTH {mechanism}: malformed exchange ({reason})",
                peer=self.peer,
                mechanism=self.name,
                reason=reason,
            )
            self._end()
            self.proto.refuse(Reply("501", "Malformed authentication response", "5.5.2"))

    def _challenge(self, reply: Reply) -> None:
        proto = self.proto
        if self._saved is None:
            self._saved = (proto.line_handler, proto.reader.max_length)
            proto.line_handler = self._line
            proto.reader.max_length = max(proto.reader.max_length, AUTH_LINE_LIMIT)
        proto.send(reply, enhanced=False)

    def _end(self) -> None:
        if self._saved is not None:
            self.proto.line_handler, self.proto.reader.max_length = self._saved
            self._saved = None

    def _line(self, line: bytes | _TooLong) -> None:
        proto = self.proto
        proto.restart_timer(proto.policy.command_timeout)
        if line is TOO_LONG:
            self._end()
            proto.refuse(Reply("500", "Authentication line too long", "5.5.6"))
            return
        assert isinstance(line, bytes)
        if line == b"*":
            self._end()
            self.log.info("{peer} AUTH {mechanism} cancelled", peer=self.peer, mechanism=self.name)
            proto.send(Reply("501", "Authentication cancelled", "5.7.0"))
            return
        data = self._decode(line)
        if data is None:
            self._end()
            proto.refuse(Reply("501", "Invalid base64 data", "5.5.2"))
            return
        mechanism = self.mechanism
        assert mechanism is not None
        self._handle(self._call(lambda: mechanism.step(data)))

    # -- checking credentials ------------------------------------------------------------------

    def _verify(self, verify: Verify) -> None:
        self.authzid = verify.authzid
        d: Deferred[Any] = maybeDeferred(self.auth.login, verify.credentials)
        d.addCallbacks(self._checked, self._check_failed)
        d.addErrback(self._unexpected)
        self.proto.run_step(d, self._after_check)

    def _checked(self, identity: str) -> Reply | Deferred[Reply]:
        if self.authzid and self.authzid != identity:
            # Acting as another identity (proxy authorization) is not supported.
            return self._failed()
        self.identity = identity
        assert self.mechanism is not None
        final = self.mechanism.server_final()
        if final is not None:
            return _continue(final)
        return self._accept()

    def _accept(self) -> Deferred[Reply] | Reply:
        reply = Reply("235", "Authentication successful", "2.7.0")
        return self.proto.call_hook("AUTH", reply, self.identity, self.name)

    def _check_failed(self, failure: Failure) -> Reply | Deferred[Reply]:
        if failure.check(UnauthorizedLogin, UnhandledCredentials):
            return self._failed()
        # Only the exception's type: its text or traceback may hold what the client sent.
        self.log.error(
            "{peer} AUTH {mechanism}: credential checker failed with {error}",
            peer=self.peer,
            mechanism=self.name,
            error=failure.type.__name__ if failure.type else "an error",
        )
        return Reply("454", "Temporary authentication failure", "4.7.0")

    def _unexpected(self, failure: Failure) -> Reply:
        self.log.error(
            "{peer} AUTH {mechanism}: internal error {error}",
            peer=self.peer,
            mechanism=self.name,
            error=failure.type.__name__ if failure.type else "an error",
        )
        return Reply("454", "Temporary authentication failure", "4.7.0")

    def _too_many(self) -> Reply:
        hostname = self.proto.policy.hostname
        return Reply("421", f"{hostname} Too many authentication failures", "4.7.0")

    def _failed(self) -> Reply | Deferred[Reply]:
        proto, limits = self.proto, self.auth.limits
        now = proto.clock.seconds()
        failures = self.feature.connection_failures
        here = failures[proto] = failures.get(proto, 0) + 1
        from_address = self.auth.failures.record(self.peer, now)
        proto.edge.events.auth_failed(proto.session, self.name, here, from_address)
        if (
            here >= limits.max_failures_per_connection
            or from_address >= limits.max_failures_per_address
        ):
            reply = self._too_many()
        else:
            reply = Reply("535", "Authentication credentials invalid", "5.7.8")
        delay = limits.delay(max(here, from_address))
        if not delay:
            return reply
        return deferLater(proto.clock, delay, lambda: reply)

    def _after_check(self, reply: Reply) -> None:
        proto, session = self.proto, self.proto.session
        if isinstance(reply, _Continue):
            self._challenge(reply)
            return
        self._end()
        if reply.code.startswith("2") and self.identity is not None:
            session.authed = self.identity
            session.auth_mechanism = self.name
            proto.edge.events.authenticated(session, self.name)
            self.log.info(
                "{peer} authenticated as {identity} with {mechanism}",
                peer=self.peer,
                identity=self.identity,
                mechanism=self.name,
            )
        proto.send(reply)
