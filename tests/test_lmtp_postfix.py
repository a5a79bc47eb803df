"""Postfix's real ``lmtp`` delivery agent delivering into slimta_tx's LMTP server (RFC 2033):
some recipients accepted, some refused at RCPT, some refused or deferred after the data, and
Postfix's log shows each recipient's own outcome. Then the same through slimta_tx's relay bus
to Dovecot's LMTP, whose per-recipient answers reach Postfix one by one.

Slow-ish (starts Postfix, and Dovecot); under CI=true a missing one fails the run.
"""

from __future__ import annotations

import re
import secrets
import smtplib
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.defer import succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import deferLater
from zope.interface import implementer

from slimta_tx import IBus, Policy, Reply, SmtpEdge
from slimta_tx.bus.relay import RelayBus, next_hop_endpoint
from slimta_tx.envelope import Envelope
from slimta_tx.lmtp import LmtpFactory
from tests.support.postfix import Dovecot, Postfix, running_dovecot

pytestmark = pytest.mark.slow

DOMAIN = "lmtp.test"
LOG_WAIT = 30.0


class LmtpClientPostfix(Postfix):
    """The tests' private Postfix, plus mail for lmtp.test handed to an LMTP server."""

    def __init__(self, lmtp_port: int) -> None:
        super().__init__()
        main = self.conf / "main.cf"
        main.write_text(
            main.read_text()
            + f"relay_domains = {DOMAIN}\n"
            + f"transport_maps = inline:{{ {{{DOMAIN}=lmtp:[127.0.0.1]:{lmtp_port}}} }}\n"
        )
        master = self.conf / "master.cf"
        master.write_text(master.read_text() + "lmtp unix - - n - - lmtp\n")


@implementer(IBus)
class Mailboxes:
    """Stores for anyone but 'full' (552 5.2.2) and 'later' (451 4.2.0), per recipient."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    def send(self, envelope: Envelope) -> Any:
        self.envelopes.append(envelope)
        answers = {
            "full": Reply("552", "Mailbox full", "5.2.2"),
            "later": Reply("451", "Mailbox locked, try later", "4.2.0"),
        }
        ok = Reply("250", f"Saved as {envelope.queue_id}", "2.0.0")
        return succeed([answers.get(r.split("@")[0], ok) for r in envelope.recipients])


def refuse_nobody(session: object, reply: Reply, address: str, params: object) -> None:
    if address.startswith("nobody@"):
        reply.set("550", "No such user here", "5.1.1")


async def serve_lmtp(bus: Any) -> tuple[SmtpEdge, int]:
    edge = SmtpEdge(
        bus, Policy(hostname="store.test", accepted_domains=(DOMAIN,)), reactor=reactor
    )
    edge.set_validator("RCPT", refuse_nobody)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(LmtpFactory(edge))
    edge.ports.append(port)
    return edge, port.getHost().port


def submit(postfix: Postfix, recipients: list[str], subject: str) -> None:
    """Hand the message to Postfix's smtpd, which queues it for the lmtp transport."""
    with smtplib.SMTP("127.0.0.1", postfix.port, timeout=20) as smtp:
        refused = smtp.sendmail(
            "alice@example.test",
            recipients,
            f"From: alice@example.test\r\nSubject: {subject}\r\n\r\nhello\r\n",
        )
    assert refused == {}


async def outcomes(postfix: Postfix, recipients: list[str]) -> dict[str, str]:
    """Each recipient's first ``status=... (...)`` from Postfix's lmtp, waiting up to
    LOG_WAIT seconds for all of them."""
    found: dict[str, str] = {}
    for _ in range(int(LOG_WAIT / 0.1)):
        for rcpt in recipients:
            match = re.search(
                rf"postfix/lmtp\[\d+\]: \w+: to=<{re.escape(rcpt)}>, relay=127\.0\.0\.1"
                rf"\[127\.0\.0\.1\]:\d+, .*?status=(\w+ \(.*\))",
                postfix.log,
            )
            if match:
                found[rcpt] = match[1]
        if len(found) == len(recipients):
            return found
        await deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"Postfix logged only {found} in {LOG_WAIT}s:\n{postfix.log[-3000:]}")


@pytest.fixture
def postfix_for() -> Iterator[Any]:
    started: list[Postfix] = []

    def start(lmtp_port: int) -> Postfix:
        server = LmtpClientPostfix(lmtp_port)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


@pytest_twisted.ensureDeferred
async def test_postfix_lmtp_client_logs_each_recipients_outcome(postfix_for: Any) -> None:
    bus = Mailboxes()
    edge, port = await serve_lmtp(bus)
    try:
        postfix = await threads.deferToThread(postfix_for, port)
        rcpts = [f"{local}@{DOMAIN}" for local in ("ok", "full", "nobody", "later", "ok2")]
        subject = secrets.token_hex(6)
        await threads.deferToThread(submit, postfix, rcpts, subject)
        status = await outcomes(postfix, rcpts)
    finally:
        await edge.close()
    print("\n".join(f"{rcpt}: {outcome}" for rcpt, outcome in status.items()))
    [envelope] = bus.envelopes  # one LMTP transaction, the RCPT-refused recipient not in it
    # (Postfix orders the recipients its own way.)
    assert sorted(envelope.recipients) == sorted(
        f"{r}@{DOMAIN}" for r in ("ok", "full", "later", "ok2")
    )
    assert envelope.protocol == "LMTP"
    saved = f"250 2.0.0 Saved as {envelope.queue_id}"
    assert status[f"ok@{DOMAIN}"] == f"sent ({saved})"
    assert status[f"ok2@{DOMAIN}"] == f"sent ({saved})"
    assert status[f"full@{DOMAIN}"] == (
        "bounced (host 127.0.0.1[127.0.0.1] said: 552 5.2.2 Mailbox full "
        "(in reply to end of DATA command))"
    )
    assert status[f"later@{DOMAIN}"] == (
        "deferred (host 127.0.0.1[127.0.0.1] said: 451 4.2.0 Mailbox locked, try later "
        "(in reply to end of DATA command))"
    )
    assert status[f"nobody@{DOMAIN}"] == (
        "bounced (host 127.0.0.1[127.0.0.1] said: 550 5.1.1 No such user here "
        "(in reply to RCPT TO command))"
    )


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    with running_dovecot() as server:
        yield server


@pytest_twisted.ensureDeferred
async def test_postfix_to_slimta_to_dovecot_per_recipient(
    postfix_for: Any, dovecot: Dovecot
) -> None:
    """Postfix -> slimta_tx (LMTP) -> relay bus -> Dovecot (LMTP): Dovecot refuses carol at
    RCPT; alice and bob still get the message, and Postfix hears each recipient."""
    relay = RelayBus(
        next_hop_endpoint(reactor, dovecot.address),
        reactor,
        hostname="store.test",
        lmtp=True,
        tls="none",
        timeout=20.0,
    )
    edge, port = await serve_lmtp(relay)
    try:
        postfix = await threads.deferToThread(postfix_for, port)
        rcpts = [f"{local}@{DOMAIN}" for local in ("alice", "carol", "bob")]
        subject = secrets.token_hex(6)
        await threads.deferToThread(submit, postfix, rcpts, subject)
        status = await outcomes(postfix, rcpts)
    finally:
        await edge.close()
        relay.close()
    assert status[f"alice@{DOMAIN}"].startswith("sent (250 2.0.0 ")
    assert status[f"bob@{DOMAIN}"].startswith("sent (250 2.0.0 ")
    assert status[f"carol@{DOMAIN}"].startswith(
        "bounced (host 127.0.0.1[127.0.0.1] said: 550 5.1.1 "
    )
    assert status[f"carol@{DOMAIN}"].endswith("(in reply to end of DATA command))")
    for user in ("alice", "bob"):
        assert any(subject.encode() in m for m in dovecot.delivered(user))
