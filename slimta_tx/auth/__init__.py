"""SMTP AUTH (RFC 4954): SASL mechanisms checked through ``twisted.cred``.

:class:`Auth` is the configuration handed to ``SmtpEdge.enable_authentication``: which
mechanisms exist and are offered, which credential checkers decide, whether PLAIN and LOGIN may
run without TLS, whether MAIL needs AUTH, and the brute-force limits. It fails closed: with no
checker nothing is offered, and a mechanism is offered only when some checker can verify the
credentials it produces.

Example::

    from slimta_tx.auth import Auth, PasswordFileChecker

    auth = Auth([PasswordFileChecker("/etc/slimta/passwd", reactor)], require_auth=True)
    edge.enable_authentication(auth)
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from typing import Any

from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from zope.interface import Interface

from slimta_tx.auth.checkers import (
    ChainedChecker,
    IAuthenticatedIdentity,
    IdentityRealm,
    PasswordFileChecker,
    SecretChecker,
    SecretFunc,
    from_strcred,
    interfaces_of,
)
from slimta_tx.auth.mechanisms import (
    CRAM_MD5,
    LOGIN,
    PLAIN,
    SCRAM_SHA_256,
    Challenge,
    Done,
    Malformed,
    MechanismContext,
    MechanismSpec,
    Verify,
)
from slimta_tx.auth.throttle import AuthLimits, FailureTracker
from slimta_tx.envelope import Session

__all__ = [
    "BUILTIN_MECHANISMS",
    "Auth",
    "AuthLimits",
    "Challenge",
    "Done",
    "IAuthenticatedIdentity",
    "Malformed",
    "MechanismContext",
    "MechanismSpec",
    "PasswordFileChecker",
    "SecretChecker",
    "Verify",
    "from_strcred",
]

BUILTIN_MECHANISMS: tuple[MechanismSpec, ...] = (SCRAM_SHA_256, CRAM_MD5, PLAIN, LOGIN)


class Auth:
    """SASL configuration for one or more edges.

    :param checkers: ``twisted.cred`` credential checkers (tried in order per interface).
    :param secret_func: ``func(username) -> secret | None`` (or a Deferred), python-slimta's
        style; it can check every mechanism, CRAM-MD5 and SCRAM included.
    :param mechanisms: names to offer, in order (default: all built-in ones:
        SCRAM-SHA-256, CRAM-MD5, PLAIN, LOGIN).
    :param allow_insecure: offer and accept PLAIN/LOGIN without TLS (tests, loopback only).
    :param require_auth: MAIL without a successful AUTH gets ``530 5.7.0``.
    :param limits: brute-force limits (:class:`AuthLimits`).
    :param portal: a ready ``Portal`` whose realm answers ``IAuthenticatedIdentity`` with the
        identity string; replaces ``checkers`` and ``secret_func``.
    """

    def __init__(
        self,
        checkers: Iterable[Any] = (),
        *,
        secret_func: SecretFunc | None = None,
        mechanisms: Iterable[str] | None = None,
        allow_insecure: bool = False,
        require_auth: bool = False,
        limits: AuthLimits | None = None,
        portal: Portal | None = None,
    ) -> None:
        self.checkers: list[Any] = list(checkers)
        if secret_func is not None:
            self.checkers.append(SecretChecker(secret_func))
        self.allow_insecure = allow_insecure
        self.require_auth = require_auth
        self.limits = limits or AuthLimits()
        self.failures = FailureTracker(self.limits)
        self._portal = portal
        self._built_portal: Portal | None = None
        self._mechanisms: dict[str, MechanismSpec] = {m.name: m for m in BUILTIN_MECHANISMS}
        self._offered: list[str] = [m.name for m in BUILTIN_MECHANISMS]
        if mechanisms is not None:
            self.offer(mechanisms)
        self._salt_key = secrets.token_bytes(32)

    # -- configuration ------------------------------------------------------------------------

    def add_checker(self, checker: Any) -> None:
        """Add a ``twisted.cred`` checker (after those already configured)."""
        self.checkers.append(checker)
        self._built_portal = None

    def add_mechanism(self, spec: MechanismSpec, offer: bool = True) -> None:
        """Make a mechanism known (replacing a built-in one of the same name) and, unless
        ``offer`` is False, offer it after the others."""
        name = spec.name.upper()
        self._mechanisms[name] = spec
        if offer and name not in self._offered:
            self._offered.append(name)

    def offer(self, names: Iterable[str]) -> None:
        """Offer exactly these mechanisms, in this order; raises ValueError for unknown ones."""
        wanted = [n.strip().upper() for n in names if n.strip()]
        unknown = [n for n in wanted if n not in self._mechanisms]
        if unknown:
            raise ValueError(
                f"unknown SASL mechanism {', '.join(unknown)}; known: "
                f"{', '.join(sorted(self._mechanisms))}"
            )
        self._offered = list(dict.fromkeys(wanted))

    @property
    def offered(self) -> tuple[str, ...]:
        return tuple(self._offered)

    @property
    def known(self) -> tuple[str, ...]:
        return tuple(self._mechanisms)

    # -- the portal ----------------------------------------------------------------------------

    @property
    def portal(self) -> Portal:
        if self._portal is not None:
            return self._portal
        if self._built_portal is None:
            chains = [
                ChainedChecker(
                    [c for c in self.checkers if interface in c.credentialInterfaces], interface
                )
                for interface in interfaces_of(self.checkers)
            ]
            self._built_portal = Portal(IdentityRealm(), chains)
        return self._built_portal

    def credential_interfaces(self) -> list[type[Interface]]:
        return list(self.portal.listCredentialsInterfaces())

    def login(self, credentials: object) -> Deferred[str]:
        """Fire with the identity, or fail (``UnauthorizedLogin`` for bad credentials)."""
        d: Deferred[Any] = self.portal.login(
            credentials,  # type: ignore[arg-type]
            None,
            IAuthenticatedIdentity,
        )
        return d.addCallback(lambda result: str(result[1]))

    # -- what a session gets ------------------------------------------------------------------

    def available(self) -> list[MechanismSpec]:
        """Offered mechanisms some checker can verify (empty: AUTH is not offered at all)."""
        interfaces = set(self.credential_interfaces())
        return [
            spec
            for spec in (self._mechanisms[name] for name in self._offered)
            if interfaces.intersection(spec.credential_interfaces)
        ]

    def encrypted(self, session: Session) -> bool:
        return session.security == "TLS"

    def mechanisms_for(self, session: Session) -> list[str]:
        """The names for this session's ``AUTH`` EHLO keyword."""
        insecure_ok = self.allow_insecure or self.encrypted(session)
        return [s.name for s in self.available() if insecure_ok or not s.requires_encryption]

    def context(self, hostname: str, seconds: Any) -> MechanismContext:
        return MechanismContext(hostname, seconds, secrets.token_bytes, self.scram_salt)

    def scram_salt(self, username: str) -> tuple[bytes, int]:
        """A stable per-process salt for each name (known or not) and 4096 iterations.

        Checkers that hold plain secrets derive SCRAM keys from them with this salt; a
        deployment storing SCRAM keys replaces this method to return the stored salt.
        """
        digest = hmac.new(self._salt_key, username.encode("utf-8"), hashlib.sha256).digest()
        return digest[:16], 4096
