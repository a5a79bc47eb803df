"""``twisted.cred`` credential checkers for SMTP AUTH, and the realm that names the identity.

- :class:`PasswordFileChecker`: ``user:$argon2id$...`` lines (salted, memory-hard Argon2id
  hashes made by ``python -m slimta_tx.auth.passwd``); checks PLAIN and LOGIN.
- :class:`SecretChecker`: python-slimta's ``secret_func(user) -> secret`` style; the secret
  lets it check every mechanism, CRAM-MD5 and SCRAM included.
- :func:`from_strcred`: Twisted's ``--auth`` strings (``memory:user:pass``, ``file:PATH``,
  ``unix``) through :mod:`twisted.cred.strcred`.
- :class:`ChainedChecker`: several checkers for one credentials interface, tried in order.

No checker here logs a password or a SASL payload; failures are ``UnauthorizedLogin``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from argon2 import PasswordHasher, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from twisted.cred.checkers import ANONYMOUS, FilePasswordDB, ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, DeferredSemaphore, fail, maybeDeferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, alsoProvides, implementer

__all__ = [
    "ChainedChecker",
    "IAuthenticatedIdentity",
    "IdentityRealm",
    "PasswordFileChecker",
    "PasswordFileError",
    "SecretChecker",
    "from_strcred",
    "read_password_file",
]

SecretFunc = Callable[[str], Any]


class IAuthenticatedIdentity(Interface):
    """The avatar interface SMTP AUTH asks a realm for: the avatar is the identity (str)."""


@implementer(IRealm)
class IdentityRealm:
    """Turns a checker's avatar ID into the identity recorded as ``session.authed``."""

    def requestAvatar(
        self, avatarId: Any, mind: object, *interfaces: Any
    ) -> tuple[Any, str, Callable[[], None]]:
        if IAuthenticatedIdentity not in interfaces:
            raise NotImplementedError("only IAuthenticatedIdentity is provided")
        if avatarId is ANONYMOUS or not avatarId:
            raise UnauthorizedLogin()
        identity = avatarId.decode("utf-8") if isinstance(avatarId, bytes) else str(avatarId)
        return IAuthenticatedIdentity, identity, lambda: None


@implementer(ICredentialsChecker)
class ChainedChecker:
    """Tries each checker in turn; the first that accepts wins, errors other than
    ``UnauthorizedLogin`` stop the chain (fail closed)."""

    def __init__(self, checkers: Sequence[Any], interface: type[Interface]) -> None:
        self.checkers = list(checkers)
        self.credentialInterfaces = (interface,)

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        remaining = list(self.checkers)

        def attempt(failure: Failure | None) -> Deferred[Any]:
            if failure is not None and not failure.check(UnauthorizedLogin):
                return fail(failure)
            if not remaining:
                return fail(UnauthorizedLogin())
            checker = remaining.pop(0)
            d: Deferred[Any] = maybeDeferred(checker.requestAvatarId, credentials)
            return d.addErrback(attempt)

        return attempt(None)


@implementer(ICredentialsChecker)
class SecretChecker:
    """``secret_func(username)`` returns the user's secret (str or bytes), None for no such
    user, or a Deferred/coroutine of either. Any mechanism can be checked against it."""

    credentialInterfaces = (IUsernamePassword, IUsernameHashedPassword)

    def __init__(self, secret_func: SecretFunc) -> None:
        self.secret_func = secret_func

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        username = credentials.username
        d: Deferred[Any] = maybeDeferred(self.secret_func, username)

        def check(secret: str | bytes | None) -> Any:
            if secret is None:
                raise UnauthorizedLogin()
            if not credentials.checkPassword(secret):
                raise UnauthorizedLogin()
            return username

        return d.addCallback(check)


class PasswordFileError(ValueError):
    """The password file cannot be used; the message says where and why (never a hash)."""


def read_password_file(path: str) -> dict[str, str]:
    """``{user: hash}`` from ``user:hash`` lines; ``#`` comments and blank lines are skipped."""
    entries: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PasswordFileError(f"cannot read password file {path}: {e}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user or not _is_argon2(hashed):
            raise PasswordFileError(f"{path} line {number}: expected 'user:$argon2id$...'")
        entries[user] = hashed
    return entries


def _is_argon2(hashed: str) -> bool:
    try:
        extract_parameters(hashed)
    except (InvalidHashError, ValueError):
        return False
    return hashed.startswith("$argon2")


@implementer(ICredentialsChecker)
class PasswordFileChecker:
    """Checks PLAIN/LOGIN passwords against Argon2id hashes in a file.

    The file is re-read when it changes (its mtime or size), so entries added by
    ``python -m slimta_tx.auth.passwd`` apply without a restart. Hash checks are slow on
    purpose; they run in the reactor's thread pool (at most ``max_concurrent`` at once, each
    takes the hash's memory cost) when ``reactor`` has threads, else inline. An unknown user
    costs as much as a wrong password, so timing does not tell which names exist.
    """

    credentialInterfaces = (IUsernamePassword,)
    log = Logger()

    def __init__(
        self,
        path: str,
        reactor: Any = None,
        max_concurrent: int = 4,
        hasher: PasswordHasher | None = None,
    ) -> None:
        self.path = path
        self.reactor = reactor
        self._entries = read_password_file(path)
        self._stamp = self._file_stamp()
        self._hasher = hasher or PasswordHasher()
        self._dummy: str | None = None
        self._semaphore = DeferredSemaphore(max_concurrent)

    def _file_stamp(self) -> tuple[int, int]:
        try:
            st = os.stat(self.path)
        except OSError:
            return (0, 0)
        return (st.st_mtime_ns, st.st_size)

    def _current_entries(self) -> dict[str, str]:
        stamp = self._file_stamp()
        if stamp != self._stamp:
            try:
                self._entries = read_password_file(self.path)
            except PasswordFileError as e:
                # Keep serving the last good file; a half-written edit must not lock users out.
                self.log.error("password file not reloaded: {why}", why=str(e))
            self._stamp = stamp
        return self._entries

    def _verify(self, hashed: str | None, password: str) -> bool:
        if hashed is None:
            if self._dummy is None:
                self._dummy = self._hasher.hash("slimta_tx unknown user")
            hashed = self._dummy
            password = password + "\0"  # never matches the dummy
        try:
            return bool(self._hasher.verify(hashed, password))
        except VerifyMismatchError:
            return False
        except (InvalidHashError, VerificationError):
            self.log.error("password file {path}: an entry is not a valid hash", path=self.path)
            return False

    def _run(self, func: Callable[..., bool], *args: Any) -> Deferred[bool]:
        if IReactorThreads.providedBy(self.reactor):
            pool = self.reactor.getThreadPool()
            return deferToThreadPool(self.reactor, pool, func, *args)
        return maybeDeferred(func, *args)

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        username = credentials.username
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        hashed = self._current_entries().get(username)
        password = credentials.password
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        d = self._semaphore.run(self._run, self._verify, hashed, password)

        def result(ok: bool) -> str:
            if not ok or hashed is None:
                raise UnauthorizedLogin()
            return str(username)

        return d.addCallback(result)


class _BytesNameCredentials:
    """Shows a bytes user name to checkers that key on bytes (Twisted's FilePasswordDB)."""

    def __init__(self, credentials: Any) -> None:
        self._credentials = credentials
        self.username = credentials.username.encode("utf-8")

    @property
    def password(self) -> Any:
        return self._credentials.password

    def checkPassword(self, password: str | bytes) -> bool:
        return bool(self._credentials.checkPassword(password))


@implementer(ICredentialsChecker)
class _BytesNames:
    def __init__(self, checker: Any) -> None:
        self.checker = checker
        self.credentialInterfaces = checker.credentialInterfaces

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        proxy = _BytesNameCredentials(credentials)
        for interface in self.credentialInterfaces:
            if interface.providedBy(credentials):
                alsoProvides(proxy, interface)
        return maybeDeferred(self.checker.requestAvatarId, proxy)


def from_strcred(description: str) -> Any:
    """A checker from a Twisted ``--auth`` string; raises ValueError with a readable reason."""
    from twisted.cred import strcred

    try:
        checker = strcred.makeChecker(description)
    except strcred.InvalidAuthType:
        kinds = sorted(f.authType for f in strcred.findCheckerFactories())
        raise ValueError(f"unknown auth type in {_kind(description)!r}; known: {kinds}") from None
    except Exception as e:  # strcred factories raise assorted errors on bad arguments
        raise ValueError(f"bad --auth {_kind(description)!r}: {type(e).__name__}") from None
    if isinstance(checker, FilePasswordDB):
        return _BytesNames(checker)
    return checker


def _kind(description: str) -> str:
    """Only the type of an ``--auth`` string: ``memory:user:pass`` must not reach a message."""
    return description.split(":", 1)[0]


def interfaces_of(checkers: Iterable[Any]) -> list[type[Interface]]:
    seen: list[type[Interface]] = []
    for checker in checkers:
        for interface in checker.credentialInterfaces:
            if interface not in seen:
                seen.append(interface)
    return seen
