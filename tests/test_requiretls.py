"""REQUIRETLS (RFC 8689): offered and accepted on TLS sessions only (530 5.7.10 otherwise),
carried in the envelope, and passed on by the relay bus only over verified TLS to a next hop
that offers it (else 550 5.7.30, which the edge's client gets). ``TLS-Required: No`` is
recorded, not acted on. End to end: a client, an edge, and a second edge as the next hop."""

from __future__ import annotations

import json
import smtplib
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from smtp_driver import Driver
from test_tls_helpers import Certs, in_thread, make_certs
from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.ssl import Certificate, optionsForClientTLS
from zope.interface import implementer

from slimta_tx import IBus, Policy, Reply, ServerTLS, SmtpEdge
from slimta_tx.bus.outbound import NextHop, capability_refusal, mail_command
from slimta_tx.bus.relay import RelayBus, next_hop_endpoint
from slimta_tx.bus.smtp_client import Extensions
from slimta_tx.envelope import Envelope
from slimta_tx.spool import Spool
from slimta_tx.testing import RecordingBus


def tls_driver(**policy: Any) -> Driver:
    d = Driver(policy=Policy(hostname="mx.test", accepted_domains=("example.com",), **policy))
    d.proto.session.security = "TLS"  # as after a handshake
    return d


def test_offered_on_tls_sessions_only() -> None:
    assert "REQUIRETLS" not in Driver().cmd("EHLO c.test")[1].split("\n")
    assert "REQUIRETLS" in tls_driver().cmd("EHLO c.test")[1].split("\n")
    assert "REQUIRETLS" not in tls_driver(requiretls=False).cmd("EHLO c.test")[1].split("\n")


def test_refused_without_tls() -> None:
    d = Driver()
    d.greet()
    assert d.cmd("MAIL FROM:<a@b.test> REQUIRETLS") == (
        "530",
        "5.7.10 REQUIRETLS needs a TLS session (STARTTLS first)",
    )


def test_accepted_over_tls_and_carried_in_the_envelope_and_its_json() -> None:
    d = tls_driver()
    d.greet()
    assert d.cmd("MAIL FROM:<a@b.test> REQUIRETLS BODY=8BITMIME")[0] == "250"
    assert d.cmd("RCPT TO:<u@example.com>")[0] == "250"
    d.cmd("DATA")
    assert d.send(b"Subject: secret\r\n\r\nhi\r\n.\r\n")[0][0] == "250"
    env = d.bus.messages[0].envelope
    assert env.requiretls
    assert json.loads(json.dumps(env.to_json_dict()))["requiretls"] is True


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        ("MAIL FROM:<a@b.test> REQUIRETLS=YES", ("501", "5.5.4 REQUIRETLS takes no value")),
        (
            "MAIL FROM:<a@b.test> REQUIRETLS REQUIRETLS",
            ("501", "5.5.4 Duplicate parameter REQUIRETLS"),
        ),
    ],
)
def test_bad_forms(line: str, reply: tuple[str, str]) -> None:
    d = tls_driver()
    d.greet()
    assert d.cmd(line) == reply


def test_off_means_unknown() -> None:
    d = tls_driver(requiretls=False)
    d.greet()
    assert d.cmd("MAIL FROM:<a@b.test> REQUIRETLS") == (
        "555",
        "5.5.4 Unsupported MAIL parameter REQUIRETLS",
    )


@implementer(IBus)
class JsonBus:
    """Keeps the envelope JSON as a Maildir or AMQP bus would write it (while it reads)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def send(self, envelope: Envelope) -> Any:
        self.records.append(json.loads(json.dumps(envelope.to_json_dict())))
        return succeed(Reply("250", "ok", "2.0.0"))


@pytest.mark.parametrize(
    ("header", "recorded"),
    [
        (b"TLS-Required: No\r\n", True),
        (b"tls-required:  no \r\n", True),
        (b"TLS-Required: Yes\r\n", False),
        (b"", False),
    ],
)
def test_tls_required_no_header_is_recorded(header: bytes, recorded: bool) -> None:
    bus = JsonBus()
    d = Driver(bus=bus)
    d.start_data()
    d.send(
        b"Subject: x\r\n" + header + b"\r\nTLS-Required: No (in the body: not a header)\r\n.\r\n"
    )
    assert bus.records[0]["tls_required_no"] is recorded


# -- the relay side -------------------------------------------------------------------------


def requiretls_envelope() -> Envelope:
    env = Envelope(sender="a@b.test", mail_params={"REQUIRETLS": None})
    env.add_recipient("u@example.com", {})
    env.message = Spool()
    return env


@pytest.mark.parametrize(
    ("verified", "keywords", "refused"),
    [
        (True, "REQUIRETLS", None),
        (False, "REQUIRETLS", "no verified TLS to the next hop"),
        (True, "PIPELINING", "the next hop does not offer it"),
    ],
)
def test_relay_capability(verified: bool, keywords: str, refused: str | None) -> None:
    hop = NextHop(Extensions.parse(Reply("250", f"hop\n{keywords}")), verified_tls=verified)
    reply = capability_refusal(requiretls_envelope(), hop, 10)
    if refused is None:
        assert reply is None
        assert mail_command(requiretls_envelope(), hop.extensions, 10) == (
            b"MAIL FROM:<a@b.test> REQUIRETLS"
        )
    else:
        assert reply is not None
        assert (reply.code, reply.enhanced_status_code) == ("550", "5.7.30")
        assert reply.message == f"REQUIRETLS support required: {refused}"


# -- end to end: client -> edge (TLS) -> relay bus -> edge (TLS) ---------------------------


@dataclass
class Pair:
    certs: Certs
    front_port: int
    back: RecordingBus


async def start_pair(tmp_path: Path, mode: str) -> tuple[Pair, list[SmtpEdge]]:
    certs = make_certs(tmp_path)
    server_tls = ServerTLS(str(certs.leaf("localhost", "127.0.0.1")))
    policy = Policy(hostname="mx.test", accepted_domains=("example.com",))
    back_bus = RecordingBus()
    back = SmtpEdge(back_bus, policy, reactor=reactor)
    back.enable_tls(server_tls)
    back_port = await back.listen(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
    trust = Certificate.loadPEM(certs.ca_file.read_bytes())
    relay = RelayBus(
        next_hop_endpoint(reactor, f"127.0.0.1:{back_port.getHost().port}"),
        reactor,
        hostname="front.test",
        tls=mode,  # type: ignore[arg-type]
        tls_options=optionsForClientTLS("localhost", trustRoot=trust),
        timeout=10.0,
    )
    front = SmtpEdge(relay, policy, reactor=reactor)
    front.enable_tls(server_tls)
    front_port = await front.listen(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
    return Pair(certs, front_port.getHost().port, back_bus), [front, back]


def send_requiretls(pair: Pair) -> tuple[int, bytes]:
    context = ssl.create_default_context(cafile=str(pair.certs.ca_file))
    with smtplib.SMTP("127.0.0.1", pair.front_port, local_hostname="client.test") as smtp:
        smtp.starttls(context=context)
        smtp.ehlo()
        assert smtp.has_extn("requiretls")
        try:
            smtp.sendmail(
                "a@example.com",
                ["b@example.com"],
                b"Subject: secret\r\n\r\nfor TLS eyes only\r\n",
                mail_options=["REQUIRETLS"],
            )
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error
    return 250, b""


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("mode", ["required", "opportunistic"])
async def test_relayed_only_over_verified_tls(tmp_path: Path, mode: str) -> None:
    """Through a relay bus with the next hop's certificate checked (``required``), the
    message reaches the next hop with REQUIRETLS; with ``opportunistic`` TLS (encrypted, not
    checked) it is refused and the client gets 550 5.7.30."""
    pair, edges = await start_pair(tmp_path, mode)
    try:
        code, text = await in_thread(send_requiretls, pair)
    finally:
        for edge in edges:
            await edge.close()
        edges[0].bus.close()  # type: ignore[attr-defined]
    if mode == "required":
        assert code == 250
        [stored] = pair.back.messages
        assert stored.envelope.requiretls
        assert stored.envelope.security == "TLS"
        assert b"for TLS eyes only" in stored.data
    else:
        assert (code, text) == (
            550,
            b"5.7.30 REQUIRETLS support required: no verified TLS to the next hop",
        )
        assert pair.back.messages == []
