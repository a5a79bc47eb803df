"""End to end: real clients (smtplib, Twisted's ESMTP client, raw pipelined bytes) over
127.0.0.1 deliver into a Maildir through an edge running on the real reactor; and a 20 MB
message through a ``twistd slimta`` process with its memory watched."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import smtplib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.mail.smtp import sendmail as twisted_sendmail

from slimta_tx.bus.maildir import MaildirBus
from slimta_tx.factory import SmtpEdge
from slimta_tx.policy import Policy
from tests.support.mailbox import file_sha256, split_trace, stored_messages
from tests.support.process import running_twistd, twistd_argv
from tests.support.wire import WireClient

T = TypeVar("T")


@dataclass
class Server:
    edge: SmtpEdge
    port: int
    maildir: Path


async def start_edge(maildir: Path, policy: Policy) -> Server:
    edge = SmtpEdge(MaildirBus(str(maildir), reactor=reactor), policy, reactor=reactor)
    listening: IListeningPort = await edge.listen(
        TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    )
    return Server(edge, listening.getHost().port, maildir)


@pytest_twisted.async_yield_fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    """An edge for example.com that trusts loopback, delivering into tmp_path/md."""
    policy = Policy(hostname="mx.test", accepted_domains=("example.com",))
    running = await start_edge(tmp_path / "md", policy)
    yield running
    await running.edge.close()


@pytest_twisted.async_yield_fixture
async def strict_server(tmp_path: Path) -> AsyncIterator[Server]:
    """An edge whose trusted networks exclude 127.0.0.1: loopback is an outside client."""
    policy = Policy(
        hostname="mx.test",
        accepted_domains=("example.com",),
        trusted_networks=(ipaddress.ip_network("192.0.2.0/24"),),
    )
    running = await start_edge(tmp_path / "md", policy)
    yield running
    await running.edge.close()


async def in_thread(f: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking client off the reactor thread (the server runs on the reactor)."""
    result: T = await threads.deferToThread(f, *args, **kwargs)
    return result


def message(subject: str, body: bytes = b"Hello.\r\n") -> bytes:
    return (
        f"From: a@example.com\r\nTo: b@example.com\r\nSubject: {subject}\r\n\r\n".encode() + body
    )


@pytest_twisted.ensureDeferred
async def test_smtplib_sends_several_messages_on_one_connection(server: Server) -> None:
    """smtplib sees PIPELINING, 8BITMIME and SMTPUTF8 advertised and delivers a plain, an
    8-bit (BODY=8BITMIME) and an SMTPUTF8 message on one connection; each is stored intact
    with its envelope."""
    plain = message("plain", b"line one\r\n.starts with a dot\r\n")
    eight_bit = message("8bit", "Grüße aus Köln\r\n".encode())
    utf8 = "From: jörg@example.com\r\nSubject: ünïcode\r\n\r\nHallo\r\n".encode()

    def client() -> dict[str, Any]:
        with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.test") as smtp:
            smtp.ehlo()
            features = {k: smtp.has_extn(k) for k in ("pipelining", "8bitmime", "smtputf8")}
            refused = [
                smtp.sendmail("a@example.com", ["b@example.com", "c@example.com"], plain),
                smtp.sendmail("a@example.com", ["b@example.com"], eight_bit, ["BODY=8BITMIME"]),
                smtp.sendmail("jörg@example.com", ["zoë@example.com"], utf8, ["SMTPUTF8"]),
            ]
            return {"features": features, "refused": refused}

    result = await in_thread(client)
    assert result == {
        "features": {"pipelining": True, "8bitmime": True, "smtputf8": True},
        "refused": [{}, {}, {}],
    }
    stored = stored_messages(server.maildir)
    assert [s.body for s in stored] == [plain, eight_bit, utf8]
    envelopes = [s.envelope for s in stored]
    assert all(e is not None for e in envelopes)
    assert [e["sender"] for e in envelopes if e] == [
        "a@example.com",
        "a@example.com",
        "jörg@example.com",
    ]
    assert [[r["address"] for r in e["recipients"]] for e in envelopes if e] == [
        ["b@example.com", "c@example.com"],
        ["b@example.com"],
        ["zoë@example.com"],
    ]
    # smtplib announces SIZE on its own.
    assert [e["mail_params"] for e in envelopes if e] == [
        {"SIZE": str(len(plain))},
        {"SIZE": str(len(eight_bit)), "BODY": "8BITMIME"},
        {"SIZE": str(len(utf8)), "SMTPUTF8": None},
    ]
    assert all(b"[127.0.0.1]" in s.trace for s in stored)
    assert len({e["client"]["port"] for e in envelopes if e}) == 1  # one connection


@pytest_twisted.ensureDeferred
async def test_pipelined_groups_are_answered_in_order(server: Server) -> None:
    """A client pipelining MAIL, RCPT, RCPT, DATA in one packet, then the body, the final
    dot and the next transaction's commands in another, gets every reply in order and both
    messages are stored."""

    def client() -> list[str]:
        with WireClient(server.port) as smtp:
            codes = [smtp.reply()[0], smtp.command("EHLO client.test")[0]]
            smtp.send(
                b"MAIL FROM:<a@example.com>\r\n"
                b"RCPT TO:<b@example.com>\r\n"
                b"RCPT TO:<nobody@elsewhere.test>\r\n"
                b"DATA\r\n"
            )
            codes += [smtp.reply()[0] for _ in range(4)]
            smtp.send(
                message("first")
                + b".\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n"
            )
            codes += [smtp.reply()[0] for _ in range(4)]
            smtp.send(message("second") + b".\r\nQUIT\r\n")
            codes += [smtp.reply()[0] for _ in range(2)]
            return codes

    codes = await in_thread(client)
    # 127.0.0.1 is trusted by default, so relaying to elsewhere.test is allowed too.
    assert codes == ["220", "250", "250", "250", "250", "354"] + ["250"] * 3 + ["354"] + [
        "250",
        "221",
    ]
    stored = stored_messages(server.maildir)
    assert [s.body for s in stored] == [message("first"), message("second")]


@pytest_twisted.ensureDeferred
async def test_a_998_octet_line_starting_with_a_dot_is_accepted(server: Server) -> None:
    """smtplib stuffs a 998-octet line that starts with a dot to 999 octets on the wire: the
    line is 1000 octets with its CRLF once unstuffed (RFC 5321 4.5.3.1.6), so it is stored;
    a line of 999 octets after unstuffing is refused with 500 5.5.6."""
    fits = message("dot", b"." + b"d" * 997 + b"\r\n")
    over = message("over", b"." + b"d" * 998 + b"\r\n")

    def client() -> tuple[dict[str, Any], tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", server.port) as smtp:
            accepted = smtp.sendmail("a@example.com", ["b@example.com"], fits)
            try:
                smtp.sendmail("a@example.com", ["b@example.com"], over)
            except smtplib.SMTPDataError as e:
                return accepted, (e.smtp_code, e.smtp_error)
            return accepted, (250, b"")

    accepted, refused = await in_thread(client)
    assert accepted == {}
    assert refused == (500, b"5.5.6 Line too long in message")
    assert [s.body for s in stored_messages(server.maildir)] == [fits]


@pytest_twisted.ensureDeferred
async def test_twisted_esmtp_client_delivers(server: Server) -> None:
    """Twisted's own ESMTP client (no TLS, no AUTH required) delivers a message."""
    body = message("from twisted", b"a line\r\n.a dotted line\r\n")
    sent = await twisted_sendmail(
        "127.0.0.1",
        "a@example.com",
        ["b@example.com"],
        # Twisted's client turns LF into CRLF (and stuffs dots) itself.
        body.replace(b"\r\n", b"\n"),
        senderDomainName="client.test",
        port=server.port,
        requireAuthentication=False,
        requireTransportSecurity=False,
    )
    assert sent[0] == 1
    [stored] = stored_messages(server.maildir)
    assert stored.body == body
    assert stored.envelope is not None
    assert stored.envelope["client"]["helo"] == "client.test"
    assert b"with ESMTP" in stored.trace


@pytest_twisted.ensureDeferred
async def test_relay_from_untrusted_client_is_refused(strict_server: Server) -> None:
    """From an untrusted address, a recipient outside the accepted domains gets 554 5.7.1
    (no open relay), while an accepted-domain recipient in the same message gets the mail."""

    def client() -> tuple[Any, Any]:
        with smtplib.SMTP("127.0.0.1", strict_server.port) as smtp:
            try:
                smtp.sendmail("a@example.com", ["x@other.test"], message("relay"))
            except smtplib.SMTPRecipientsRefused as e:
                only_foreign = e.recipients
            else:
                only_foreign = None
            mixed = smtp.sendmail(
                "a@example.com", ["x@other.test", "b@example.com"], message("mixed")
            )
            return only_foreign, mixed

    only_foreign, mixed = await in_thread(client)
    assert only_foreign is not None
    assert only_foreign["x@other.test"][0] == 554
    assert b"5.7.1" in only_foreign["x@other.test"][1]
    assert list(mixed) == ["x@other.test"]
    [stored] = stored_messages(strict_server.maildir)
    assert stored.body == message("mixed")
    assert stored.envelope is not None
    assert [r["address"] for r in stored.envelope["recipients"]] == ["b@example.com"]


def big_message(size: int) -> bytes:
    """``size`` bytes of varied text lines, some starting with a dot (to be stuffed)."""
    lines = []
    total = 0
    n = 0
    while total < size:
        seed = hashlib.sha256(str(n).encode()).hexdigest()
        line = (("." if n % 97 == 0 else "") + seed + seed[:30] + "\r\n").encode()
        lines.append(line)
        total += len(line)
        n += 1
    return message("big") + b"".join(lines)


@pytest.mark.slow
def test_20_mb_message_is_stored_intact_with_bounded_memory(tmp_path: Path) -> None:
    """A 20 MB message through smtplib to a twistd process is stored byte for byte, and the
    server's peak resident memory grows by far less than the message size."""
    maildir = tmp_path / "md"
    body = big_message(20 * 1024 * 1024)
    expected = hashlib.sha256(body).hexdigest()
    spool = tmp_path / "spool"
    spool.mkdir()
    with running_twistd(twistd_argv(maildir, "--spool-dir", str(spool))) as server:
        with smtplib.SMTP("127.0.0.1", server.port) as smtp:
            smtp.sendmail("a@example.com", ["b@example.com"], message("warm-up"))
            rss_before, _ = server.rss()
            smtp.sendmail("a@example.com", ["b@example.com"], body)
            _, peak_after = server.rss()
    growth = peak_after - rss_before
    print(
        f"twistd RSS before: {rss_before / 2**20:.1f} MiB; peak growth: {growth / 2**20:.1f} MiB"
    )
    assert growth < 40 * 2**20, f"server memory grew by {growth / 2**20:.1f} MiB"
    names = os.listdir(maildir / "new")
    assert len(names) == 2
    big = max(names, key=lambda n: os.path.getsize(maildir / "new" / n))
    path = maildir / "new" / big
    with open(path, "rb") as f:
        trace, _ = split_trace(f.read(4096))
    assert file_sha256(path, skip=len(trace)) == expected
    assert os.path.getsize(path) - len(trace) == len(body)
