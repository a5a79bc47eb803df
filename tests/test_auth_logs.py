"""Passwords and SASL payloads never reach a log event or a reply: every log event of many
AUTH sessions (successes, failures, malformed input, cancels, checkers and mechanisms that
raise with the password in their message) is captured and searched."""

from __future__ import annotations

import base64
import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_auth_helpers import CHEAP, Driver, ScramClient, b64
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.internet.defer import Deferred, fail
from twisted.logger import formatEvent
from zope.interface import implementer

from slimta_tx.auth import Auth, AuthLimits, MechanismSpec, PasswordFileChecker, from_strcred
from slimta_tx.auth.passwd import set_password
from tests.support.logs import captured_events

PASSWORD = "Tr0ub4dor&3-secret"
WRONG = "wrong-Tr0ub4dor"
SECRETS = [PASSWORD, WRONG]


def forbidden() -> list[str]:
    """The passwords and every base64 form a client could send them in."""
    words = list(SECRETS)
    for secret in SECRETS:
        for payload in (
            f"\0alice\0{secret}",
            secret,
            f"alice\0alice\0{secret}",
        ):
            words.append(b64(payload))
    return words


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    with captured_events() as captured:
        yield captured


def rendered(event: dict[str, Any]) -> str:
    text = [formatEvent(event), repr(event)]
    failure = event.get("log_failure")
    if failure is not None:
        text.append(failure.getTraceback())
    return "\n".join(text)


@implementer(ICredentialsChecker)
class LeakyChecker:
    """Raises with the password in the exception message (a badly written checker)."""

    credentialInterfaces = (IUsernamePassword,)

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        return fail(ValueError(f"lookup failed for {credentials.username}:{credentials.password}"))


class LeakyMechanism:
    def __init__(self, context: Any) -> None:
        pass

    def start(self, initial: bytes | None) -> Any:
        raise RuntimeError(f"cannot parse {initial!r}")

    def step(self, response: bytes) -> Any:
        raise RuntimeError(f"cannot parse {response!r}")

    def server_final(self) -> bytes | None:
        return None


def sessions(tmp_path: Path) -> list[Driver]:
    limits = AuthLimits(failure_delay=0, max_failures_per_connection=2)
    memory = from_strcred(f"memory:alice:{PASSWORD}")
    drivers = []

    # Success and failure with each mechanism, over TLS.
    auth = Auth([memory], limits=limits)
    for line in (
        f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + WRONG)}",
        f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + PASSWORD)}",
    ):
        d = Driver(auth)
        d.ehlo()
        d.cmd(line)
        drivers.append(d)
    d = Driver(auth)
    d.ehlo()
    for line in ("AUTH LOGIN", b64("alice"), b64(WRONG)):
        d.cmd(line)
    for line in ("AUTH LOGIN", b64("alice"), b64(PASSWORD)):
        d.cmd(line)
    drivers.append(d)
    for password in (WRONG, PASSWORD):
        d = Driver(auth, peer=("198.51.100.1", 1))
        d.ehlo()
        client = ScramClient("alice", password)
        _, text = d.cmd(f"AUTH SCRAM-SHA-256 {b64(client.first())}")[0]
        d.cmd(b64(client.final(base64.b64decode(text))))
        d.cmd("")
        drivers.append(d)

    # Malformed, cancelled, bad base64, too long, refused over plaintext, pipelined after 538.
    d = Driver(auth)
    d.ehlo()
    d.cmd(f"AUTH PLAIN {b64('alice' + PASSWORD)}")
    d.cmd("AUTH LOGIN")
    d.cmd(b64("alice"))
    d.cmd("*")
    d.cmd(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + PASSWORD)}!")
    d.cmd("AUTH LOGIN")
    d.cmd(b64(PASSWORD) * 1000)
    drivers.append(d)
    d = Driver(auth, tls=False)
    d.ehlo()
    d.send(
        f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + PASSWORD)}\r\n"
        f"AUTH LOGIN\r\n{b64('alice')}\r\n{b64(PASSWORD)}\r\n".encode()
    )
    drivers.append(d)

    # Checkers and mechanisms that raise with the secret in the message.
    d = Driver(Auth([LeakyChecker()]))
    d.ehlo()
    d.cmd(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + PASSWORD)}")
    drivers.append(d)

    def leaky_secret(user: str) -> str:
        raise KeyError(f"{user} with {PASSWORD}")

    d = Driver(Auth(secret_func=leaky_secret))
    d.ehlo()
    d.cmd(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + PASSWORD)}")
    drivers.append(d)
    leaky = Auth([memory])
    leaky.add_mechanism(MechanismSpec("X-LEAK", LeakyMechanism, False, (IUsernamePassword,)))
    d = Driver(leaky)
    d.ehlo()
    d.cmd(f"AUTH X-LEAK {b64(PASSWORD)}")
    drivers.append(d)

    # A password file with a corrupt entry, and one with a good entry.
    path = tmp_path / "passwd"
    set_password(str(path), "alice", PASSWORD, CHEAP)
    set_password(str(path), "mallory", PASSWORD, CHEAP)
    checker = PasswordFileChecker(str(path), hasher=CHEAP)
    # An entry that passes the format check but cannot be verified (damaged on disk).
    checker._entries["mallory"] = "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$AAAA"
    d = Driver(Auth([checker], limits=limits))
    d.ehlo()
    d.cmd(f"AUTH PLAIN {b64(chr(0) + 'mallory' + chr(0) + PASSWORD)}")
    d.cmd(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + PASSWORD)}")
    drivers.append(d)
    # A broken edit of the file is not loaded (and its contents are not logged).
    path.write_text(path.read_text() + f"eve:{PASSWORD}\n")
    d = Driver(Auth([checker], limits=limits))
    d.ehlo()
    d.cmd(f"AUTH PLAIN {b64(chr(0) + 'eve' + chr(0) + PASSWORD)}")
    drivers.append(d)
    return drivers


def test_passwords_never_reach_logs_or_replies(
    tmp_path: Path, events: list[dict[str, Any]]
) -> None:
    """No log event (text, fields, or failure traceback) and no reply holds a password or a
    SASL payload; yet the failures were logged (the test saw the events it searched)."""
    drivers = sessions(tmp_path)
    gc.collect()  # any unhandled Deferred error would be logged now
    words = forbidden()
    texts = [rendered(e) for e in events]
    assert any("AUTH PLAIN failed" in t for t in texts)
    assert any("credential checker failed with ValueError" in t for t in texts)
    assert any("credential checker failed with KeyError" in t for t in texts)
    assert any("mechanism raised RuntimeError" in t for t in texts)
    assert any("authenticated as alice with SCRAM-SHA-256" in t for t in texts)
    assert any("not a valid hash" in t for t in texts)
    assert any("password file not reloaded" in t for t in texts)
    for text in texts:
        for word in words:
            assert word not in text, text
    for d in drivers:
        wire = d.transport.value().decode("utf-8", "replace")
        for word in words:
            assert word not in wire
    replies = [code for d in drivers for code in d.banner]
    assert replies
