"""Pipelining discipline over real sockets, from a client that is neither trusted nor
authenticated (the edge trusts only 192.0.2.0/24 here): the real pipelining clients we have
(smtplib, Twisted's ESMTP client, swaks --pipeline, Postfix's smtp-source, raw groups) deliver
as before; the hostile shapes get 554 5.5.0 and a closed connection, also when the early bytes
wait unread in the kernel's socket buffer."""

from __future__ import annotations

import ipaddress
import os
import shutil
import smtplib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.mail.smtp import sendmail as twisted_sendmail

from slimta_tx import Policy, Reply, SmtpEdge
from slimta_tx.pipelining import _unread_in_kernel
from slimta_tx.testing import RecordingBus
from tests.support.wire import WireClient

TIMEOUT = 20.0
SYNC = ("554", "5.5.0 Error: SMTP protocol synchronization")


@dataclass
class Server:
    edge: SmtpEdge
    bus: RecordingBus
    port: int


@pytest_twisted.async_yield_fixture
async def server() -> AsyncIterator[Server]:
    bus = RecordingBus()
    policy = Policy(
        hostname="mx.test",
        accepted_domains=("example.com",),
        trusted_networks=(ipaddress.ip_network("192.0.2.0/24"),),
    )
    edge = SmtpEdge(bus, policy, reactor=reactor)
    port = await edge.listen(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
    yield Server(edge, bus, port.getHost().port)
    await edge.close()


def tool(name: str) -> str:
    path = shutil.which(name) or (
        f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None
    )
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is missing (.ci/services installs it)")
        pytest.skip(f"{name} is not installed (.ci/services installs it)")
    return path


def message(subject: str) -> bytes:
    return f"From: a@example.com\r\nTo: b@example.com\r\nSubject: {subject}\r\n\r\nhi\r\n".encode()


# -- legitimate clients ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_smtplib_delivers(server: Server) -> None:
    def client() -> list[dict[str, Any]]:
        with smtplib.SMTP("127.0.0.1", server.port) as smtp:
            return [
                smtp.sendmail("a@example.com", ["b@example.com"], message(f"m{n}"))
                for n in range(3)
            ]

    assert await threads.deferToThread(client) == [{}, {}, {}]
    assert len(server.bus.messages) == 3


@pytest_twisted.ensureDeferred
async def test_twisted_esmtp_client_delivers(server: Server) -> None:
    sent = await twisted_sendmail(
        "127.0.0.1",
        "a@example.com",
        ["b@example.com", "c@example.com"],
        message("twisted").replace(b"\r\n", b"\n"),
        port=server.port,
        requireAuthentication=False,
        requireTransportSecurity=False,
    )
    assert sent[0] == 2
    assert len(server.bus.messages) == 1


@pytest_twisted.ensureDeferred
async def test_raw_groups_content_and_next_group_deliver(server: Server) -> None:
    """RFC 2920's own shape: MAIL, RCPT, RCPT, DATA in one write; after the 354 the content,
    the final dot and the next group in one write; then content plus QUIT."""

    def client() -> list[str]:
        with WireClient(server.port) as smtp:
            codes = [smtp.reply()[0], smtp.command("EHLO client.test")[0]]
            group = b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n"
            smtp.send(group + b"RCPT TO:<c@example.com>\r\nDATA\r\n")
            codes += [smtp.reply()[0] for _ in range(4)]
            smtp.send(message("one") + b".\r\n" + group + b"DATA\r\n")
            codes += [smtp.reply()[0] for _ in range(4)]
            smtp.send(message("two") + b".\r\nQUIT\r\n")
            codes += [smtp.reply()[0] for _ in range(2)]
            return codes

    codes = await threads.deferToThread(client)
    group = ["250", "250", "250", "354"]
    assert codes == ["220", "250", *group, "250", *group[1:], "250", "221"]
    assert [m.data for m in server.bus.messages] == [message("one"), message("two")]


@pytest_twisted.inlineCallbacks
def test_swaks_pipeline_delivers(server: Server) -> Any:
    """swaks --pipeline sends MAIL, RCPT, RCPT, DATA as one group and waits for the 354."""
    swaks = tool("swaks")
    args = [
        "--server", "127.0.0.1", "--port", str(server.port), "--pipeline",
        "--ehlo", "swaks.test", "--from", "a@example.com",
        "--to", "b@example.com,c@example.com", "--body", "pipelined by swaks",
    ]  # fmt: skip
    out, err, code = yield getProcessOutputAndValue(swaks, args, env=dict(os.environ)).addTimeout(
        TIMEOUT, reactor
    )
    text = (out + err).decode()
    assert code == 0, text
    assert "554" not in text
    [stored] = server.bus.messages
    assert stored.envelope.recipients == ["b@example.com", "c@example.com"]
    assert b"pipelined by swaks" in stored.data


@pytest_twisted.inlineCallbacks
def test_postfix_smtp_source_delivers(server: Server) -> Any:
    """Postfix's smtp-source: 2 sessions of 3 messages each (-d: one connection each)."""
    source = tool("smtp-source")
    args = [
        "-s", "2", "-m", "6", "-d", "-l", "2000", "-M", "source.test",
        "-f", "a@example.com", "-t", "b@example.com", f"127.0.0.1:{server.port}",
    ]  # fmt: skip
    out, err, code = yield getProcessOutputAndValue(source, args, env=dict(os.environ)).addTimeout(
        TIMEOUT, reactor
    )
    assert code == 0, (out + err).decode()
    assert len(server.bus.messages) == 6


# -- hostile shapes ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_body_behind_data_in_one_write_is_refused(server: Server) -> None:
    def client() -> tuple[list[tuple[str, str]], bool]:
        with WireClient(server.port) as smtp:
            smtp.reply()
            smtp.command("EHLO client.test")
            smtp.send(
                b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
                + message("early")
                + b".\r\nQUIT\r\n"
            )
            replies = [smtp.reply() for _ in range(3)]
            return replies, smtp.closed_by_server()

    replies, closed = await threads.deferToThread(client)
    assert replies[2] == SYNC
    assert closed
    assert server.bus.messages == []


@pytest_twisted.ensureDeferred
async def test_early_content_still_in_the_kernel_is_seen(server: Server) -> None:
    """DATA alone, then the body in a later write while the DATA validator decides: reading
    is paused, so the body waits unread in the kernel's socket buffer. It was sent before any
    354 could have been, and the check sees it there (FIONREAD)."""
    decide: Deferred[None] = Deferred()
    server.edge.set_validator("DATA", lambda session, reply, *extra: decide)
    client = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    client.setblocking(True)
    try:
        wire = WireClient.__new__(WireClient)
        wire.sock, wire._buffer = client, b""
        await threads.deferToThread(wire.reply)
        await threads.deferToThread(wire.command, "EHLO client.test")
        await threads.deferToThread(wire.command, "MAIL FROM:<a@example.com>")
        await threads.deferToThread(wire.command, "RCPT TO:<b@example.com>")
        client.sendall(b"DATA\r\n")
        for _ in range(200):  # the session reads DATA and pauses (bounded: 200 x 10 ms)
            protos = list(server.edge.connections)
            if protos and protos[0]._waiting:
                break
            await deferLater(reactor, 0.01, lambda: None)
        [proto] = server.edge.connections
        assert proto._waiting
        client.sendall(message("early") + b".\r\n")
        for _ in range(200):
            if _unread_in_kernel(proto.transport):
                break
            await deferLater(reactor, 0.01, lambda: None)
        assert _unread_in_kernel(proto.transport) > 0
        assert proto.reader.buffered == 0  # nothing of it was read: only the kernel has it
        decide.callback(None)
        assert await threads.deferToThread(wire.reply) == SYNC
        assert await threads.deferToThread(wire.closed_by_server)
    finally:
        client.close()
    assert server.bus.messages == []


@pytest_twisted.ensureDeferred
async def test_a_client_that_waits_is_never_refused_even_when_validators_are_slow(
    server: Server,
) -> None:
    """Contrast: with the same slow DATA validator, a client that waits for the 354 delivers."""
    decide: list[Deferred[None]] = []

    def slow(session: object, reply: Reply, *extra: object) -> Deferred[None]:
        decide.append(deferLater(reactor, 0.05, lambda: None))
        return decide[-1]

    server.edge.set_validator("DATA", slow)

    def client() -> dict[str, Any]:
        with smtplib.SMTP("127.0.0.1", server.port) as smtp:
            return smtp.sendmail("a@example.com", ["b@example.com"], message("patient"))

    assert await threads.deferToThread(client) == {}
    assert len(server.bus.messages) == 1
