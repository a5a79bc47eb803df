"""The LMTP server (RFC 2033) at the protocol level: LHLO, and one reply per accepted recipient
after the data, in RCPT order, from the bus's per-recipient result."""

from __future__ import annotations

from typing import Any

import pytest
from smtp_driver import Driver
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from zope.interface import implementer

from slimta_tx import IBus, Policy, Reply, SmtpEdge
from slimta_tx.envelope import Envelope
from slimta_tx.lmtp import LmtpFactory, LMTPServerProtocol
from slimta_tx.testing import FailingBus, RecordingBus

POLICY = Policy(hostname="lmtp.test", accepted_domains=("example.com",))
ANSWERS = {
    "full": Reply("552", "Mailbox full", "5.2.2"),
    "later": Reply("451", "Mailbox locked, try later", "4.2.0"),
}


@implementer(IBus)
class MailboxBus:
    """Stores for anyone but 'full' (552) and 'later' (451)."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    def send(self, envelope: Envelope) -> Deferred[list[Reply]]:
        self.envelopes.append(envelope)
        ok = Reply("250", f"Saved as {envelope.queue_id}", "2.0.0")
        return succeed([ANSWERS.get(r.split("@")[0], ok) for r in envelope.recipients])


def lmtp(bus: Any = None, **policy: Any) -> Driver:
    edge = SmtpEdge(
        bus if bus is not None else MailboxBus(),
        POLICY.evolve(**policy),
        reactor=Clock(),
        lmtp=True,
    )
    d = Driver(edge=edge, peer=("127.0.0.1", 40000))
    assert isinstance(d.proto, LMTPServerProtocol)
    return d


def envelope_for(d: Driver, *locals_: str) -> None:
    assert d.cmd("LHLO client.test")[0] == "250"
    assert d.cmd("MAIL FROM:<s@sender.test>")[0] == "250"
    for local in locals_:
        d.cmd(f"RCPT TO:<{local}@example.com>")


def test_lhlo_replaces_ehlo_and_helo() -> None:
    d = lmtp()
    assert d.cmd("EHLO client.test") == ("500", "5.5.2 Command not recognized")
    assert d.cmd("HELO client.test") == ("500", "5.5.2 Command not recognized")
    assert d.cmd("MAIL FROM:<a@b.test>") == ("503", "5.5.1 Send LHLO first")
    code, text = d.cmd("LHLO client.test")
    assert code == "250"
    assert text.split("\n")[1:4] == ["PIPELINING", "SIZE 26214400", "8BITMIME"]
    assert d.cmd("MAIL FROM:<a@b.test>")[0] == "250"


def test_one_reply_per_accepted_recipient_in_order() -> None:
    """Refused at RCPT: no reply after the data; each accepted one: the bus's own."""
    bus = MailboxBus()
    d = lmtp(bus)

    def no_such_user(session: object, reply: Reply, address: str, params: object) -> None:
        if address.startswith("nobody@"):
            reply.set("550", "No such user", "5.1.1")

    d.edge.set_validator("RCPT", no_such_user)
    envelope_for(d, "a", "full", "nobody", "later", "b")
    d.cmd("DATA")
    replies = d.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
    queue_id = bus.envelopes[0].queue_id
    assert replies == [
        ("250", f"2.0.0 Saved as {queue_id}"),
        ("552", "5.2.2 Mailbox full"),
        ("451", "4.2.0 Mailbox locked, try later"),
        ("250", f"2.0.0 Saved as {queue_id}"),
    ]
    assert bus.envelopes[0].protocol == "LMTP"
    assert bus.envelopes[0].replies_per_recipient
    assert b"with LMTP" in bus.envelopes[0].received_header()


def test_a_single_bus_reply_is_given_for_each_recipient() -> None:
    bus = RecordingBus(Reply("250", "stored", "2.6.0"))
    d = lmtp(bus)
    envelope_for(d, "a", "b", "c")
    d.cmd("DATA")
    assert d.send(b"hi\r\n.\r\n") == [("250", "2.6.0 stored")] * 3


@pytest.mark.parametrize(
    ("bus", "data", "reply"),
    [
        (FailingBus(), b"hi\r\n.\r\n", ("451", "4.3.0 Temporary local problem, try again later")),
        (
            None,
            b"a\nb\r\n.\r\n",
            ("550", "5.5.2 Message contains bare CR or LF; lines must end with CRLF"),
        ),
        (None, b"x" * 2000 + b"\r\n.\r\n", ("500", "5.5.6 Line too long in message")),
    ],
    ids=["bus failure", "bare LF", "long line"],
)
def test_a_refusal_of_the_message_is_given_for_each_recipient(
    bus: Any, data: bytes, reply: tuple[str, str]
) -> None:
    d = lmtp(bus)
    envelope_for(d, "a", "b")
    d.cmd("DATA")
    assert d.send(data) == [reply, reply]
    assert d.cmd("NOOP")[0] == "250"


def test_bdat_last_gets_one_reply_per_recipient() -> None:
    d = lmtp()
    envelope_for(d, "full", "a")
    replies = d.send(b"BDAT 4\r\nhi\r\nBDAT 0 LAST\r\n")
    assert [code for code, _ in replies] == ["250", "552", "250"]


def test_too_big_is_given_for_each_recipient() -> None:
    d = lmtp(max_message_size=10)
    envelope_for(d, "a", "b")
    d.cmd("DATA")
    assert d.send(b"x" * 20 + b"\r\n.\r\n") == [("552", "5.3.4 Message too big for system")] * 2


def test_pipelined_transactions() -> None:
    """RFC 2920 with LMTP: the group, then content plus the next group."""
    d = lmtp()
    assert d.cmd("LHLO client.test")[0] == "250"
    group = (
        b"MAIL FROM:<s@x.test>\r\nRCPT TO:<a@example.com>\r\n"
        b"RCPT TO:<full@example.com>\r\nDATA\r\n"
    )
    assert d.codes(group) == ["250", "250", "250", "354"]
    assert d.codes(b"one\r\n.\r\n" + group) == ["250", "552", "250", "250", "250", "354"]
    assert d.codes(b"two\r\n.\r\nQUIT\r\n") == ["250", "552", "221"]


def test_the_transaction_log_records_the_fold() -> None:
    from tests.support.logs import captured_events

    d = lmtp()
    envelope_for(d, "a", "full")
    d.cmd("DATA")
    with captured_events() as events:
        d.send(b"hi\r\n.\r\n")
    [line] = [e for e in events if "result" in e]
    assert line["result"] == "552 5.2.2"


def test_lmtp_factory_serves_lmtp_beside_smtp_on_one_edge() -> None:
    """Same policy, validators and bus; its sessions count among the edge's connections."""
    edge = SmtpEdge(MailboxBus(), POLICY, reactor=Clock())
    proto = LmtpFactory(edge).buildProtocol(None)
    assert isinstance(proto, LMTPServerProtocol)
    assert proto.edge is edge
    d = Driver(edge=edge)
    assert not isinstance(d.proto, LMTPServerProtocol)


def test_help_names_lhlo() -> None:
    text = lmtp().cmd("HELP")[1]
    assert "LHLO" in text and "EHLO" not in text


@pytest.mark.slow
def test_twistd_lmtp_listen_with_swaks(tmp_path: Any) -> None:
    """``twistd slimta --lmtp-listen unix:PATH``: swaks speaking LMTP over the socket delivers
    into the Maildir, and the SMTP listener runs beside it."""
    import os
    import shutil
    import subprocess
    import time

    from tests.support.mailbox import stored_messages
    from tests.support.process import running_twistd, twistd_argv

    swaks = shutil.which("swaks")
    if swaks is None:
        if os.environ.get("CI") == "true":
            pytest.fail("swaks is missing (.ci/services installs it)")
        pytest.skip("swaks not installed")
    socket_path = tmp_path / "lmtp.sock"
    maildir = tmp_path / "md"
    argv = twistd_argv(
        maildir, "--lmtp-listen", f"unix:{socket_path}", "--accept-domain", "example.com"
    )
    with running_twistd(argv):
        deadline = time.monotonic() + 20
        while not socket_path.exists():  # bounded: twistd has greeted on SMTP already
            assert time.monotonic() < deadline, "no LMTP socket"
            time.sleep(0.02)
        done = subprocess.run(
            [
                swaks,
                "--socket",
                str(socket_path),
                "--protocol",
                "LMTP",
                "--from",
                "a@sender.test",
                "--to",
                "b@example.com,c@example.com",
                "--body",
                "over LMTP",
            ],
            capture_output=True,
            timeout=30,
            check=False,
        )
    text = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0, text
    assert "LHLO" in text
    [stored] = stored_messages(maildir)
    assert b"over LMTP" in stored.body
    assert stored.envelope is not None and stored.envelope["protocol"] == "LMTP"
    assert b"with LMTP" in stored.trace
