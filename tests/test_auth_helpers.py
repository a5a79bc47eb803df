"""Shared helpers for the AUTH tests: a session driver over a StringTransport with a Clock,
a SCRAM-SHA-256 client, cheap Argon2 parameters. (No tests here.)"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

from argon2 import PasswordHasher
from twisted.internet.task import Clock

from slimta_tx import Policy, SmtpEdge
from slimta_tx.auth import Auth
from slimta_tx.auth.checkers import from_strcred
from slimta_tx.protocol import ESMTPServerProtocol
from slimta_tx.testing import RecordingBus, connect, parse_replies

# Fast enough for tests; production entries use argon2-cffi's defaults.
CHEAP = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


def b64(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode()
    return base64.b64encode(data).decode()


def memory_auth(**kw: Any) -> Auth:
    return Auth([from_strcred("memory:alice:s3cret-pw:bob:other-pw")], **kw)


class Driver:
    """One session against an edge with AUTH; ``cmd`` returns the replies it got."""

    def __init__(
        self,
        auth: Auth | None,
        tls: bool = True,
        peer: tuple[str, int] = ("192.0.2.7", 40000),
        edge: SmtpEdge | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.clock = clock or Clock()
        self.bus = RecordingBus()
        if edge is None:
            edge = SmtpEdge(self.bus, Policy(hostname="mx.test"), reactor=self.clock)
            if auth is not None:
                edge.enable_authentication(auth)
        self.edge = edge
        proto, self.transport = connect(edge, peer)
        assert isinstance(proto, ESMTPServerProtocol)
        self.proto = proto
        if tls:
            proto.session.security = "TLS"
        self.banner = self.take()

    def take(self) -> list[tuple[str, str]]:
        out = self.transport.value()
        self.transport.clear()
        return parse_replies(out)

    def send(self, data: bytes) -> list[tuple[str, str]]:
        self.proto.dataReceived(data)
        return self.take()

    def cmd(self, line: str | bytes) -> list[tuple[str, str]]:
        if isinstance(line, str):
            line = line.encode()
        return self.send(line + b"\r\n")

    def one(self, line: str | bytes) -> tuple[str, str]:
        replies = self.cmd(line)
        assert len(replies) == 1, replies
        return replies[0]

    def ehlo(self) -> list[str]:
        replies = self.cmd("EHLO client.test")
        assert replies[0][0] == "250", replies
        return replies[0][1].split("\n")[1:]

    def auth_keyword(self) -> str | None:
        return next((k for k in self.ehlo() if k.startswith("AUTH")), None)

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


class ScramClient:
    """A minimal SCRAM-SHA-256 client (RFC 5802), to drive the server mechanism."""

    def __init__(self, user: str, password: str, nonce: str = "fyko+d2lbbFgONRv9qkxdawL") -> None:
        self.user, self.password, self.nonce = user, password, nonce
        self.client_first_bare = f"n={user},r={nonce}"
        self.server_signature = b""

    def first(self) -> bytes:
        return ("n,," + self.client_first_bare).encode()

    def final(self, server_first: bytes) -> bytes:
        attrs = dict(a.split("=", 1) for a in server_first.decode().split(","))
        salt, iterations = base64.b64decode(attrs["s"]), int(attrs["i"])
        salted = hashlib.pbkdf2_hmac("sha256", self.password.encode(), salt, iterations)
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c=biws,r={attrs['r']}"
        auth_message = f"{self.client_first_bare},{server_first.decode()},{without_proof}"
        signature = hmac.new(stored_key, auth_message.encode(), hashlib.sha256).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
        self.server_signature = hmac.new(
            server_key, auth_message.encode(), hashlib.sha256
        ).digest()
        return f"{without_proof},p={b64(proof)}".encode()
