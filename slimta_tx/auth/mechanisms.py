"""SASL mechanisms as small sans-I/O state machines.

A mechanism instance handles one exchange. :meth:`start` gets the initial response (None when
the client sent none) and every later client response goes to :meth:`step`; each returns one
of:

- :class:`Challenge`: send these bytes to the client (``334`` + base64) and wait;
- :class:`Verify`: the client has said all it will; check these ``twisted.cred`` credentials;
- :class:`Malformed`: the client broke the mechanism's syntax (the reason never holds payload);
- :class:`Done`: the exchange is over and the credentials were already verified (after a
  mechanism's server-final data was acknowledged).

After a successful :class:`Verify`, :meth:`server_final` may return data the client must see
before ``235`` (SCRAM's server signature); the client answers it with an empty line.

The mechanisms never do I/O and never log: credentials are checked by the caller through a
``twisted.cred`` portal. A mechanism that needs the stored secret (CRAM-MD5, SCRAM) produces
credentials providing ``IUsernameHashedPassword``: a checker holding the secret calls
``credentials.checkPassword(secret)``.
"""

from __future__ import annotations

import hashlib
import hmac
import stringprep
import unicodedata
from base64 import b64decode, b64encode
from binascii import Error as BinasciiError
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from zope.interface import Attribute, Interface, implementer

__all__ = [
    "CRAM_MD5",
    "LOGIN",
    "PLAIN",
    "SCRAM_SHA_256",
    "Challenge",
    "CramMD5",
    "CramMD5Credentials",
    "Done",
    "ISCRAMCredentials",
    "Login",
    "Malformed",
    "Mechanism",
    "MechanismContext",
    "MechanismSpec",
    "PasswordCredentials",
    "Plain",
    "Result",
    "ScramCredentials",
    "ScramSHA256",
    "Verify",
    "saslprep",
]


# -- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class Verify:
    """Check ``credentials``; ``authzid`` is the identity the client asked to act as
    (None or equal to the authenticated identity, or the attempt fails)."""

    credentials: object = field(repr=False)
    authzid: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Malformed:
    reason: str


@dataclass(frozen=True)
class Done:
    pass


Result = Challenge | Verify | Malformed | Done


class Mechanism(Protocol):
    """One exchange of one mechanism."""

    def start(self, initial_response: bytes | None) -> Result: ...

    def step(self, response: bytes) -> Result: ...

    def server_final(self) -> bytes | None: ...


@dataclass(frozen=True)
class MechanismContext:
    """What a mechanism may need from the server, injected so tests can pin it.

    :ivar hostname: the server's name (CRAM-MD5 puts it in the challenge).
    :ivar seconds: the clock (``reactor.seconds``).
    :ivar random_bytes: a source of unpredictable bytes (``secrets.token_bytes``).
    :ivar scram_salt: ``username -> (salt, iterations)`` for SCRAM.
    """

    hostname: str
    seconds: Callable[[], float]
    random_bytes: Callable[[int], bytes]
    scram_salt: Callable[[str], tuple[bytes, int]]


@dataclass(frozen=True)
class MechanismSpec:
    """A mechanism the server can offer.

    :ivar name: the SASL name, upper case (``"PLAIN"``).
    :ivar factory: ``context -> Mechanism`` for each exchange.
    :ivar requires_encryption: True when the password crosses the wire recoverably (PLAIN,
        LOGIN): never offered or accepted over plaintext unless insecure AUTH is allowed.
    :ivar credential_interfaces: the credentials it produces; it is offered only when some
        configured checker accepts one of them.
    """

    name: str
    factory: Callable[[MechanismContext], Mechanism]
    requires_encryption: bool
    credential_interfaces: tuple[type[Interface], ...]


# -- credentials ----------------------------------------------------------------------------


def _as_bytes(secret: str | bytes) -> bytes:
    return secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)


@implementer(IUsernamePassword)
class PasswordCredentials:
    """A user name and the password in clear (PLAIN and LOGIN).

    ``checkPassword`` accepts ``str`` or ``bytes`` (Twisted's checkers use either) and
    compares in constant time. The repr never shows the password.
    """

    def __init__(self, username: str, password: str) -> None:
        self.username = username
        self.password = password

    def checkPassword(self, password: str | bytes) -> bool:
        return hmac.compare_digest(_as_bytes(self.password), _as_bytes(password))

    def __repr__(self) -> str:
        return f"<PasswordCredentials username={self.username!r} password=<redacted>>"


@implementer(IUsernameHashedPassword)
class CramMD5Credentials:
    """RFC 2195: proves knowledge of the secret by HMAC-MD5 over the server's challenge."""

    def __init__(self, username: str, challenge: bytes, response: bytes) -> None:
        self.username = username
        self.challenge = challenge
        self.response = response

    def checkPassword(self, password: str | bytes) -> bool:
        digest = hmac.new(_as_bytes(password), self.challenge, hashlib.md5).hexdigest()
        return hmac.compare_digest(digest.encode("ascii"), self.response.lower())

    def __repr__(self) -> str:
        return f"<CramMD5Credentials username={self.username!r}>"


class ISCRAMCredentials(Interface):
    """SCRAM credentials a checker can verify from stored keys, without the password."""

    username = Attribute("the authentication identity (str)")
    salt = Attribute("the salt sent to the client (bytes)")
    iterations = Attribute("the iteration count sent to the client (int)")

    def check_keys(stored_key: bytes, server_key: bytes) -> bool:
        """True if the client's proof matches ``stored_key``; remembers the signature."""


def _hmac256(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def scram_keys(password: str | bytes, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """``(StoredKey, ServerKey)`` for a password (RFC 5802 section 3)."""
    if isinstance(password, bytes):
        password = password.decode("utf-8")
    salted = hashlib.pbkdf2_hmac("sha256", saslprep(password).encode("utf-8"), salt, iterations)
    client_key = _hmac256(salted, b"Client Key")
    return hashlib.sha256(client_key).digest(), _hmac256(salted, b"Server Key")


@implementer(IUsernameHashedPassword, ISCRAMCredentials)
class ScramCredentials:
    """SCRAM-SHA-256's client proof, checkable from the password or from stored keys."""

    def __init__(
        self, username: str, salt: bytes, iterations: int, auth_message: bytes, proof: bytes
    ) -> None:
        self.username = username
        self.salt = salt
        self.iterations = iterations
        self.auth_message = auth_message
        self.proof = proof
        self.server_signature: bytes | None = None

    def checkPassword(self, password: str | bytes) -> bool:
        try:
            stored_key, server_key = scram_keys(password, self.salt, self.iterations)
        except (UnicodeDecodeError, ValueError):
            return False
        return self.check_keys(stored_key, server_key)

    def check_keys(self, stored_key: bytes, server_key: bytes) -> bool:
        signature = _hmac256(stored_key, self.auth_message)
        if len(self.proof) != len(signature):
            return False
        client_key = bytes(a ^ b for a, b in zip(self.proof, signature, strict=True))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), stored_key):
            return False
        self.server_signature = _hmac256(server_key, self.auth_message)
        return True

    def __repr__(self) -> str:
        return f"<ScramCredentials username={self.username!r}>"


# -- SASLprep (RFC 4013) ---------------------------------------------------------------------

_PROHIBITED = (
    stringprep.in_table_c12,
    stringprep.in_table_c21_c22,
    stringprep.in_table_c3,
    stringprep.in_table_c4,
    stringprep.in_table_c5,
    stringprep.in_table_c6,
    stringprep.in_table_c7,
    stringprep.in_table_c8,
    stringprep.in_table_c9,
)


def saslprep(text: str) -> str:
    """Normalize a user name or password (RFC 4013); raises ValueError when prohibited."""
    if text.isascii():
        if any(ord(c) < 32 or ord(c) == 127 for c in text):
            raise ValueError("control character")
        return text
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in text if not stringprep.in_table_b1(c)
    )
    normalized = unicodedata.normalize("NFKC", mapped)
    if any(check(c) for c in normalized for check in _PROHIBITED):
        raise ValueError("prohibited character")
    if any(stringprep.in_table_d1(c) for c in normalized):
        if any(stringprep.in_table_d2(c) for c in normalized):
            raise ValueError("mixed bidirectional text")
        if not (stringprep.in_table_d1(normalized[0]) and stringprep.in_table_d1(normalized[-1])):
            raise ValueError("bidirectional text must start and end with RandALCat")
    return normalized


def _text(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


# -- PLAIN (RFC 4616) ------------------------------------------------------------------------


class Plain:
    """``[authzid] NUL authcid NUL passwd``; with or without an initial response."""

    def __init__(self, context: MechanismContext) -> None:
        self._started = False

    def start(self, initial_response: bytes | None) -> Result:
        if initial_response is None:
            return Challenge(b"")
        return self.step(initial_response)

    def step(self, response: bytes) -> Result:
        if self._started:
            return Malformed("PLAIN takes one response")
        self._started = True
        parts = response.split(b"\0")
        if len(parts) != 3:
            return Malformed("PLAIN needs authzid NUL authcid NUL password")
        authzid, authcid, password = (_text(p) for p in parts)
        if authzid is None or authcid is None or password is None:
            return Malformed("PLAIN fields must be UTF-8")
        if not authcid or not password:
            return Malformed("PLAIN needs a user name and a password")
        return Verify(PasswordCredentials(authcid, password), authzid or None)

    def server_final(self) -> bytes | None:
        return None


# -- LOGIN (draft-murchison-sasl-login) -------------------------------------------------------


class Login:
    """``Username:`` then ``Password:``; the user name may come as the initial response."""

    def __init__(self, context: MechanismContext) -> None:
        self._username: str | None = None
        self._done = False

    def start(self, initial_response: bytes | None) -> Result:
        if initial_response is None:
            return Challenge(b"Username:")
        return self.step(initial_response)

    def step(self, response: bytes) -> Result:
        if self._done:
            return Malformed("LOGIN is over")
        text = _text(response)
        if text is None:
            return Malformed("LOGIN responses must be UTF-8")
        if self._username is None:
            if not text:
                return Malformed("LOGIN needs a user name")
            self._username = text
            return Challenge(b"Password:")
        self._done = True
        if not text:
            return Malformed("LOGIN needs a password")
        return Verify(PasswordCredentials(self._username, text))

    def server_final(self) -> bytes | None:
        return None


# -- CRAM-MD5 (RFC 2195) ------------------------------------------------------------------------


class CramMD5:
    """The server speaks first: a unique challenge; the client answers ``user hexdigest``."""

    def __init__(self, context: MechanismContext) -> None:
        self._context = context
        self._challenge: bytes | None = None

    def start(self, initial_response: bytes | None) -> Result:
        if initial_response is not None:
            return Malformed("CRAM-MD5 takes no initial response")
        unique = int.from_bytes(self._context.random_bytes(8), "big")
        stamp = int(self._context.seconds())
        self._challenge = f"<{unique}.{stamp}@{self._context.hostname}>".encode()
        return Challenge(self._challenge)

    def step(self, response: bytes) -> Result:
        challenge, self._challenge = self._challenge, None
        if challenge is None:
            return Malformed("CRAM-MD5 takes one response")
        username, _, digest = response.rpartition(b" ")
        name = _text(username)
        if not name or len(digest) != 32 or not digest.isalnum():
            return Malformed("CRAM-MD5 needs 'user hexdigest'")
        return Verify(CramMD5Credentials(name, challenge, digest))

    def server_final(self) -> bytes | None:
        return None


# -- SCRAM-SHA-256 (RFC 5802, RFC 7677) -------------------------------------------------------


def _saslname(text: str) -> str | None:
    """Decode ``=2C``/``=3D``; None when another ``=`` escape or a bare ``,`` appears."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "=":
            escape = text[i : i + 3]
            if escape == "=2C":
                out.append(",")
            elif escape == "=3D":
                out.append("=")
            else:
                return None
            i += 3
        elif text[i] == ",":
            return None
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _printable_nonce(nonce: str) -> bool:
    return bool(nonce) and all(0x21 <= ord(c) <= 0x7E and c != "," for c in nonce)


class ScramSHA256:
    """SCRAM-SHA-256 without channel binding (``-PLUS`` is not offered)."""

    iterations = 4096

    def __init__(self, context: MechanismContext) -> None:
        self._context = context
        self._state = "start"
        self._gs2_header = b""
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""
        self._username = ""
        self._authzid: str | None = None
        self._salt = b""
        self._iterations = 0
        self._credentials: ScramCredentials | None = None

    def start(self, initial_response: bytes | None) -> Result:
        if initial_response is None:
            self._state = "first"
            return Challenge(b"")
        self._state = "first"
        return self.step(initial_response)

    def step(self, response: bytes) -> Result:
        state, self._state = self._state, "over"
        if state == "first":
            return self._client_first(response)
        if state == "final":
            return self._client_final(response)
        if state == "ack":
            return Done() if response == b"" else Malformed("SCRAM expects an empty response")
        return Malformed("SCRAM exchange is over")

    def _client_first(self, response: bytes) -> Result:
        text = _text(response)
        if text is None:
            return Malformed("SCRAM messages must be UTF-8")
        parts = text.split(",", 2)
        if len(parts) != 3:
            return Malformed("SCRAM client-first-message expected")
        flag, authz, bare = parts
        if flag.startswith("p="):
            return Malformed("channel binding is not supported")
        if flag not in ("n", "y"):
            return Malformed("bad gs2 channel binding flag")
        authzid: str | None = None
        if authz:
            if not authz.startswith("a="):
                return Malformed("bad gs2 authzid")
            authzid = _saslname(authz[2:])
            if authzid is None:
                return Malformed("bad saslname")
        attributes = bare.split(",")
        if len(attributes) < 2 or attributes[0].startswith("m="):
            return Malformed("unsupported SCRAM extension")
        if not attributes[0].startswith("n=") or not attributes[1].startswith("r="):
            return Malformed("SCRAM needs n= and r=")
        username = _saslname(attributes[0][2:])
        if not username:
            return Malformed("bad saslname")
        try:
            username = saslprep(username)
        except ValueError:
            return Malformed("user name refused by SASLprep")
        client_nonce = attributes[1][2:]
        if not _printable_nonce(client_nonce):
            return Malformed("bad nonce")
        server_nonce = b64encode(self._context.random_bytes(18)).decode("ascii")
        self._nonce = client_nonce + server_nonce
        self._username = username
        self._authzid = authzid
        self._gs2_header = f"{flag},{authz},".encode()
        self._client_first_bare = bare
        self._salt, self._iterations = self._context.scram_salt(username)
        self._server_first = (
            f"r={self._nonce},s={b64encode(self._salt).decode('ascii')},i={self._iterations}"
        )
        self._state = "final"
        return Challenge(self._server_first.encode("ascii"))

    def _client_final(self, response: bytes) -> Result:
        text = _text(response)
        if text is None:
            return Malformed("SCRAM messages must be UTF-8")
        without_proof, sep, proof_attr = text.rpartition(",p=")
        if not sep:
            return Malformed("SCRAM client-final-message needs a proof")
        attributes = without_proof.split(",")
        if len(attributes) < 2 or not attributes[0].startswith("c="):
            return Malformed("SCRAM client-final-message needs c= and r=")
        try:
            binding = b64decode(attributes[0][2:], validate=True)
            proof = b64decode(proof_attr, validate=True)
        except BinasciiError:
            return Malformed("bad base64 in SCRAM message")
        if not hmac.compare_digest(binding, self._gs2_header):
            return Malformed("channel binding data does not match")
        if attributes[1] != f"r={self._nonce}":
            return Malformed("nonce does not match")
        auth_message = ",".join((self._client_first_bare, self._server_first, without_proof))
        self._credentials = ScramCredentials(
            self._username, self._salt, self._iterations, auth_message.encode("utf-8"), proof
        )
        self._state = "verified"
        return Verify(self._credentials, self._authzid)

    def server_final(self) -> bytes | None:
        credentials = self._credentials
        if self._state != "verified" or credentials is None:
            return None
        if credentials.server_signature is None:
            return None
        self._state = "ack"
        return b"v=" + b64encode(credentials.server_signature)


PLAIN = MechanismSpec("PLAIN", Plain, True, (IUsernamePassword,))
LOGIN = MechanismSpec("LOGIN", Login, True, (IUsernamePassword,))
CRAM_MD5 = MechanismSpec("CRAM-MD5", CramMD5, False, (IUsernameHashedPassword,))
SCRAM_SHA_256 = MechanismSpec(
    "SCRAM-SHA-256", ScramSHA256, False, (IUsernameHashedPassword, ISCRAMCredentials)
)
