"""BINARYMIME (RFC 3030) and the NUL policy: binary content by BDAT only (DATA is 503 5.5.1),
stored byte for byte, relayed only to a next hop that offers BINARYMIME (by BDAT), refused
otherwise with no conversion (554 5.6.3); NUL in text bodies refused (550 5.6.0), stripped or
accepted as the policy says."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
from smtp_driver import Driver
from test_relay_bus import envelope, make_bus, reply_of
from test_tls_helpers import in_thread
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint

from slimta_tx import Policy, SmtpEdge
from slimta_tx.bus.relay import RelayBus, next_hop_endpoint
from slimta_tx.testing import RecordingBus
from tests.support.wire import WireClient

BINARY = bytes(range(256)) * 8 + b"\r\n.\r\n" + b"\n" * 3 + b"z" * 3000 + b"\r"
HEADERS = b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n"


def bdat(data: bytes, last: bool = True) -> bytes:
    return b"BDAT %d%s\r\n%s" % (len(data), b" LAST" if last else b"", data)


def ready(**policy: Any) -> Driver:
    d = Driver(policy=Policy(hostname="mx.test", accepted_domains=("example.com",), **policy))
    d.greet()
    return d


def test_binarymime_goes_by_bdat_and_is_stored_byte_for_byte() -> None:
    d = ready()
    assert d.cmd("MAIL FROM:<a@b.test> BODY=BINARYMIME")[0] == "250"
    assert d.cmd("RCPT TO:<u@example.com>")[0] == "250"
    assert d.cmd("DATA") == ("503", "5.5.1 BODY=BINARYMIME needs BDAT, not DATA")
    half = len(BINARY) // 2
    replies = d.send(bdat(HEADERS + BINARY[:half], last=False) + bdat(BINARY[half:]))
    assert [code for code, _ in replies] == ["250", "250"]
    [stored] = d.bus.messages
    assert stored.data == HEADERS + BINARY
    assert stored.envelope.body == "BINARYMIME"
    assert json.loads(json.dumps(stored.envelope.to_json_dict()))["body"] == "BINARYMIME"


def test_binarymime_still_has_a_size_limit() -> None:
    d = ready(max_message_size=1000)
    d.cmd("MAIL FROM:<a@b.test> BODY=BINARYMIME")
    d.cmd("RCPT TO:<u@example.com>")
    assert d.send(bdat(b"\0" * 1001)) == [("552", "5.3.4 Message too big for system")]


@pytest.mark.parametrize(
    "policy", [{"binarymime": False}, {"chunking": False}], ids=["off", "no-chunking"]
)
def test_not_offered_without_chunking_or_when_off(policy: dict[str, Any]) -> None:
    d = ready(**policy)
    assert "BINARYMIME" not in d.cmd("EHLO c.test")[1].split("\n")
    assert d.cmd("MAIL FROM:<a@b.test> BODY=BINARYMIME") == (
        "501",
        "5.5.4 Syntax: BODY=7BIT or BODY=8BITMIME",
    )


# -- NUL ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "reply", "stored"),
    [
        ({}, ("550", "5.6.0 Message contains NUL characters"), None),
        ({"nul": "strip"}, None, b"ab\r\n"),
        ({"nul": "accept"}, None, b"a\0b\r\n"),
    ],
    ids=["reject (default)", "strip", "accept"],
)
def test_nul_in_a_text_body(
    policy: dict[str, Any], reply: tuple[str, str] | None, stored: bytes | None
) -> None:
    """DATA and BDAT alike; a refusal comes after the real end, and the session goes on."""
    for way in ("DATA", "BDAT"):
        d = ready(**policy)
        d.cmd("MAIL FROM:<a@b.test>")
        d.cmd("RCPT TO:<u@example.com>")
        if way == "DATA":
            d.cmd("DATA")
            [(code, text)] = d.send(b"a\0b\r\n.\r\n")
        else:
            [(code, text)] = d.send(bdat(b"a\0b\r\n"))
        if reply is not None:
            assert (code, text) == reply
            assert d.bus.messages == []
            assert d.cmd("NOOP")[0] == "250"
        else:
            assert code == "250"
            assert d.bus.messages[0].data == stored


# -- the relay bus ---------------------------------------------------------------------------

BINARY_EHLO = b"250-nexthop.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 BINARYMIME\r\n"


def test_relay_sends_binarymime_by_bdat_as_it_is() -> None:
    bus, hop, _ = make_bus()
    env = envelope(["u@example.test"], HEADERS + BINARY, BODY="BINARYMIME")
    d = bus.send(env)
    hop.greet(BINARY_EHLO)
    assert (
        hop.heard()
        == b"MAIL FROM:<alice@edge.test> BODY=BINARYMIME\r\nRCPT TO:<u@example.test>\r\n"
    )
    hop.say(b"250 ok\r\n250 ok\r\n")
    sent = hop.heard()
    header = env.received_header()
    assert (
        sent
        == b"BDAT %d LAST\r\n" % (len(header) + len(HEADERS + BINARY)) + header + HEADERS + BINARY
    )
    hop.say(b"250 2.0.0 queued\r\n")
    assert str(reply_of(d)) == "250 2.0.0 queued"


def test_relay_refuses_binarymime_to_a_next_hop_without_it() -> None:
    bus, hop, _ = make_bus()
    d = bus.send(envelope(["u@example.test"], BINARY, BODY="BINARYMIME"))
    hop.greet(b"250-nexthop.test\r\n250-CHUNKING\r\n250 8BITMIME\r\n")
    assert str(reply_of(d)) == "554 5.6.3 Next hop does not support BINARYMIME (no conversion)"
    assert hop.heard() == b""


@dataclass
class Relayed:
    port: int
    back: RecordingBus
    edges: list[SmtpEdge]


async def start(back_binarymime: bool) -> Relayed:
    policy = Policy(hostname="mx.test", accepted_domains=("example.com",))
    back_bus = RecordingBus()
    back = SmtpEdge(back_bus, policy.evolve(binarymime=back_binarymime), reactor=reactor)
    back_port = await back.listen(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
    relay = RelayBus(
        next_hop_endpoint(reactor, f"127.0.0.1:{back_port.getHost().port}"),
        reactor,
        hostname="front.test",
        tls="none",
        timeout=10.0,
    )
    front = SmtpEdge(relay, policy, reactor=reactor)
    front_port = await front.listen(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
    return Relayed(front_port.getHost().port, back_bus, [front, back])


def send_binary(port: int) -> tuple[str, str]:
    with WireClient(port) as smtp:
        smtp.reply()
        smtp.command("EHLO client.test")
        assert smtp.command("MAIL FROM:<a@example.com> BODY=BINARYMIME")[0] == "250"
        assert smtp.command("RCPT TO:<b@example.com>")[0] == "250"
        smtp.send(bdat(HEADERS + BINARY))
        return smtp.reply()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("back_binarymime", [True, False])
async def test_edge_to_edge(back_binarymime: bool) -> None:
    """A client's binary message through an edge and its relay bus to a second edge: byte
    for byte when the next hop offers BINARYMIME; else 554 5.6.3 to the client."""
    pair = await start(back_binarymime)
    try:
        reply = await in_thread(send_binary, pair.port)
    finally:
        for edge in pair.edges:
            await edge.close()
        pair.edges[0].bus.close()  # type: ignore[attr-defined]
    if back_binarymime:
        assert reply[0] == "250"
        [stored] = pair.back.messages
        assert stored.envelope.body == "BINARYMIME"
        assert stored.data.endswith(HEADERS + BINARY)  # after the first edge's Received:
        assert stored.data.startswith(b"Received: from client.test")
    else:
        assert reply == ("554", "5.6.3 Next hop does not support BINARYMIME (no conversion)")
        assert pair.back.messages == []
