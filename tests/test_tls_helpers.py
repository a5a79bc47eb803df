"""Shared helpers for the TLS tests: trustme certificates on disk, a StringTransport that
can start TLS, and a session driver over it. (No tests here.)"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme
from smtp_driver import ReplyReader
from twisted.internet import defer, reactor, threads
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from slimta_tx import Policy, SmtpEdge
from slimta_tx.protocol import ESMTPServerProtocol
from slimta_tx.testing import RecordingBus, parse_replies


@dataclass
class Certs:
    """A CA and PEM files for leaf certificates it issued."""

    ca: trustme.CA
    directory: Path
    ca_file: Path

    def leaf(self, *names: str, combined: bool = True, stem: str | None = None) -> Path:
        """Write a certificate for ``names``; combined: key + cert in one PEM, else two files
        (``stem.crt``/``stem.key``). Returns the certificate path."""
        issued = self.ca.issue_cert(*names)
        stem = stem or names[0].replace("*", "_")
        if combined:
            path = self.directory / f"{stem}.pem"
            path.write_bytes(
                issued.private_key_pem.bytes()
                + b"".join(blob.bytes() for blob in issued.cert_chain_pems)
            )
            return path
        cert = self.directory / f"{stem}.crt"
        key = self.directory / f"{stem}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
        key.write_bytes(issued.private_key_pem.bytes())
        os.chmod(key, 0o600)
        return cert


def make_certs(directory: Path) -> Certs:
    ca = trustme.CA()
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return Certs(ca, directory, ca_file)


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport whose ``startTLS`` records the call: what was written before it
    (in plaintext) moves to :attr:`plaintext`; later writes stand for encrypted ones."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.tls_context: Any = None
        self.plaintext = b""
        self.handle: Any = None

    def startTLS(self, contextFactory: Any, normal: bool = True) -> None:
        assert self.tls_context is None, "startTLS called twice"
        self.tls_context = contextFactory
        self.plaintext = self.value()
        self.clear()

    def getHandle(self) -> Any:
        return self.handle

    # ITLSTransport extends ITCPTransport:
    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled

    def getTcpNoDelay(self) -> bool:
        return getattr(self, "no_delay", False)


class FakeTLSConnection:
    """What ``transport.getHandle()`` returns after a handshake: the facts tls_info reads."""

    def __init__(
        self,
        version: str = "TLSv1.3",
        cipher: str = "TLS_AES_256_GCM_SHA384",
        peer: Any = None,
        server_name: bytes | None = None,
    ) -> None:
        self.version, self.cipher, self.peer, self.server_name = version, cipher, peer, server_name

    def get_protocol_version_name(self) -> str:
        return self.version

    def get_cipher_name(self) -> str:
        return self.cipher

    def get_peer_certificate(self, as_cryptography: bool = False) -> Any:
        return self.peer

    def get_servername(self) -> bytes | None:
        return self.server_name


class TLSDriver(ReplyReader):
    """One session over a :class:`TLSStringTransport`; feeds bytes, returns replies."""

    def __init__(self, edge: SmtpEdge, peer: tuple[str, int] = ("192.0.2.7", 41000)) -> None:
        address = IPv4Address("TCP", *peer)
        proto = edge.buildProtocol(address)
        assert isinstance(proto, ESMTPServerProtocol)
        self.proto = proto
        self.edge = edge
        self.transport = TLSStringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 25), peerAddress=address
        )
        proto.makeConnection(self.transport)
        self.banner = self.read()

    def starttls(self) -> list[tuple[str, str]]:
        """Send STARTTLS; the replies written in plaintext (before TLS started, if it did)."""
        replies = self.send(b"STARTTLS\r\n")
        if self.transport.tls_context is not None:
            assert replies == [], replies  # nothing may follow the 220 in plaintext
            return parse_replies(self.transport.plaintext)
        return replies

    def handshake(self, connection: Any = None) -> list[tuple[str, str]]:
        """Complete the (pretend) handshake; returns what the server wrote after it."""
        assert self.transport.tls_context is not None, "TLS was not started"
        self.transport.handle = connection or FakeTLSConnection()
        self.proto.handshakeCompleted()
        return self.read()

    def ehlo_keywords(self) -> list[str]:
        code, text = self.cmd("EHLO client.test")
        assert code == "250", (code, text)
        return text.split("\n")[1:]


def make_edge(
    context: Any = None, clock: Clock | None = None, bus: Any = None, **tls: Any
) -> SmtpEdge:
    edge = SmtpEdge(
        bus if bus is not None else RecordingBus(),
        Policy(hostname="mx.test", accepted_domains=("example.com",)),
        reactor=clock or Clock(),
    )
    if context is not None:
        edge.enable_tls(context, **tls)
    return edge


E2E_TIMEOUT = 15.0


def in_thread(f: Any, *args: Any) -> defer.Deferred[Any]:
    """Run a blocking client (smtplib, swaks) in a thread, bounded by E2E_TIMEOUT seconds."""
    return threads.deferToThread(f, *args).addTimeout(E2E_TIMEOUT, reactor)
