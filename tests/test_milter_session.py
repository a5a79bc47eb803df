"""Milters in the SMTP session, packet by packet: a scripted milter in memory, a Clock, and an
SMTP client on a StringTransport. Every action, every negotiation flag, every failure mode."""

from __future__ import annotations

import smtplib
import struct
from typing import Any

import pytest
import pytest_twisted
from smtp_driver import ReplyReader
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread

from slimta_tx import Policy, SmtpEdge
from slimta_tx.envelope import TLSInfo
from slimta_tx.milter import Milter
from slimta_tx.milter.client import Connector
from slimta_tx.protocol import ESMTPServerProtocol
from slimta_tx.testing import RecordingBus, connect
from tests.support.logs import captured_events
from tests.support.milter_server import (
    ACCEPT,
    CLOSE,
    CONTINUE,
    DISCARD,
    HANG,
    PROGRESS,
    REJECT,
    SKIP,
    TEMPFAIL,
    MemoryConnector,
    MilterScript,
    ScriptedMilter,
    add_header,
    change_header,
    insert_header,
    replycode,
    resp,
    settle,
    split_strings,
    z,
)

MESSAGE = b"From: Alice <a@sender.test>\r\nSubject: hello\r\n\r\nbody line\r\n"
POLICY = Policy(hostname="mx.test", accepted_domains=("example.com",))


class Session(ReplyReader):
    """One SMTP session on an edge whose milters are scripted (see tests/support)."""

    def __init__(
        self,
        scripts: dict[str, MilterScript] | None = None,
        milters: list[Milter] | None = None,
        edge: SmtpEdge | None = None,
        connector: MemoryConnector | None = None,
        clock: Clock | None = None,
        down: set[str] | None = None,
        high_water: int = 1 << 20,
        policy: Policy = POLICY,
    ) -> None:
        self.clock = clock or Clock()
        if edge is None:
            self.bus = RecordingBus()
            edge = SmtpEdge(
                self.bus,
                policy,
                reactor=self.clock,
                milters=milters or [Milter("inet:m:1", name="m")],
            )
            connector = MemoryConnector(
                self.clock, scripts or {"m": MilterScript()}, down, high_water
            )
            edge.milters.connector = Connector(self.clock, connector)
        assert connector is not None
        self.edge = edge
        self.bus = edge.bus  # type: ignore[assignment]
        self.connector = connector
        proto, transport = connect(edge, ("192.0.2.1", 40000))
        assert isinstance(proto, ESMTPServerProtocol)
        self.proto, self.transport = proto, transport
        settle(self.clock)
        self.banner = self.read()

    def send(self, data: bytes) -> list[tuple[str, str]]:
        """Send ``data`` as a client that pipelines as RFC 2920 allows: what follows an EHLO
        goes after its reply (an untrusted client sending on ahead gets 554 5.5.0)."""
        replies: list[tuple[str, str]] = []
        parts, rest = [], b""
        for line in data.splitlines(keepends=True):
            rest += line
            if line.startswith(b"EHLO "):
                parts, rest = [*parts, rest], b""
        for part in [*parts, rest] if rest else parts:
            self.proto.dataReceived(part)
            settle(self.clock)
            replies += self.read()
        return replies

    def milter(self, name: str = "m") -> ScriptedMilter:
        return self.connector.server(name)

    def transaction(
        self, message: bytes = MESSAGE, rcpts: tuple[str, ...] = ("u@example.com",)
    ) -> list[str]:
        lines = b"EHLO client.test\r\nMAIL FROM:<a@sender.test> SIZE=100\r\n"
        lines += b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts)
        codes = [c for c, _ in self.send(lines)]
        codes += [c for c, _ in self.send(b"DATA\r\n")]
        if codes[-1] == "354":
            codes += [c for c, _ in self.send(message + b".\r\n")]
        return codes

    def stored(self) -> list[bytes]:
        return [m.data for m in self.bus.messages]  # type: ignore[attr-defined]


def script(**kwargs: Any) -> dict[str, MilterScript]:
    return {"m": MilterScript(**kwargs)}


def on(command: bytes, answer: Any, then: Any = None) -> Any:
    """A script answering ``answer`` to ``command`` (``then`` to the others)."""

    def handle(milter: ScriptedMilter, cmd: bytes, data: bytes) -> Any:
        return answer if cmd == command else then

    return handle


# -- negotiation and the events ------------------------------------------------------------------


def test_a_clean_transaction_told_packet_by_packet() -> None:
    """Negotiation (v6, every action and flag offered), then connect, HELO, MAIL with its
    ESMTP arguments, RCPT, DATA, each header, end of headers, the body, end of message, and
    QUIT at the end; the message is stored as it came."""
    s = Session()
    assert s.banner == [("220", "mx.test ESMTP slimta_tx")]
    assert s.transaction() == ["250", "250", "250", "354", "250"]
    s.send(b"QUIT\r\n")
    settle(s.clock)
    m = s.milter()
    assert m.received[0] == (b"O", struct.pack(">III", 6, 0x1FF, 0x1FFFFF))
    assert m.events() == [b"C", b"H", b"M", b"R", b"T", b"L", b"L", b"N", b"B", b"E", b"Q"]
    assert m.data_of(b"C") == [b"[192.0.2.1]\x004" + struct.pack(">H", 40000) + b"192.0.2.1\x00"]
    assert m.data_of(b"H") == [b"client.test\x00"]
    assert split_strings(m.data_of(b"M")[0]) == [b"<a@sender.test>", b"SIZE=100"]
    assert split_strings(m.data_of(b"R")[0]) == [b"<u@example.com>"]
    assert [split_strings(d) for d in m.data_of(b"L")] == [
        [b"From", b"Alice <a@sender.test>"],
        [b"Subject", b"hello"],
    ]
    assert m.data_of(b"B") == [b"body line\r\n"]
    queue_id = s.bus.messages[0].envelope.queue_id  # type: ignore[attr-defined]
    assert m.macros[b"C"]["j"] == "mx.test"
    assert m.macros[b"C"]["{client_addr}"] == "192.0.2.1"
    assert m.macros[b"C"]["{daemon_name}"] == "mx.test"
    assert m.macros[b"M"]["{mail_addr}"] == "a@sender.test"
    assert m.macros[b"R"] == {
        "i": queue_id,
        "{rcpt_addr}": "u@example.com",
        "{rcpt_host}": "example.com",
        "{rcpt_mailer}": "smtp",
    }
    assert m.macros[b"E"]["i"] == queue_id
    assert s.stored() == [MESSAGE]
    assert s.connector.connects == 1 and s.transport.disconnecting


def test_events_the_milter_does_not_want_are_not_sent_but_their_macros_are() -> None:
    """SMFIP_NOCONNECT/NOHELO/NOMAIL/NORCPT/NODATA/NOHDRS/NOEOH/NOBODY: only the end of the
    message is sent (Postfix still sends each step's macros)."""
    s = Session(script(protocol=0x1 | 0x2 | 0x4 | 0x8 | 0x200 | 0x20 | 0x40 | 0x10))
    assert s.transaction() == ["250", "250", "250", "354", "250"]
    assert s.milter().events() == [b"E"]
    # (no HELO macros: without TLS none has a value)
    assert set(s.milter().macros) == {b"C", b"M", b"R", b"T", b"N", b"E"}


def test_no_reply_flags_are_honoured() -> None:
    """SMFIP_NR_*: the milter answers nothing until the end of the message, and the session
    does not wait for it (no timer is left running)."""
    flags = 0x1000 | 0x2000 | 0x4000 | 0x8000 | 0x10000 | 0x80 | 0x40000 | 0x80000
    s = Session(script(protocol=flags))
    pauses: list[str] = []
    s.transport.pauseProducing = lambda: pauses.append("paused")  # type: ignore[method-assign]
    assert s.transaction() == ["250", "250", "250", "354", "250"]
    assert s.milter().events() == [b"C", b"H", b"M", b"R", b"T", b"L", b"L", b"N", b"B", b"E"]
    # Only the end of the message waits (no step before it pauses the client's input).
    assert len(pauses) == 1


def test_a_message_needing_no_answer_until_its_end_is_one_write() -> None:
    """SMFIP_NR_HDR/NR_EOH/NR_BODY: the header fields, end of headers, the body and end of
    message, with their macros, reach the milter in one write and in order."""
    s = Session(script(protocol=0x80 | 0x40000 | 0x80000))
    s.send(b"EHLO c\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<u@example.com>\r\n")
    assert s.send(b"DATA\r\n")[0][0] == "354"
    link = s.proto.milters.links[0]  # type: ignore[union-attr]
    transport: Any = link.connection.transport  # type: ignore[union-attr]
    writes: list[bytes] = []
    write = transport.write
    transport.write = lambda data: (writes.append(data), write(data))
    assert s.send(MESSAGE + b".\r\n")[0][0] == "250"
    assert len(writes) == 1
    m = s.milter()
    assert m.events()[-5:] == [b"L", b"L", b"N", b"B", b"E"]
    queue_id = s.bus.messages[0].envelope.queue_id  # type: ignore[attr-defined]
    assert m.macros[b"N"] == m.macros[b"E"] == {"i": queue_id}


def test_the_answer_timeout_runs_only_while_an_answer_is_awaited() -> None:
    """One timer per milter connection serves every wait: a session idle for longer than
    command_timeout keeps its milter; a shorter wait later (the content timeout) still times
    out on time; each message's macros carry its own queue id."""
    milters = [Milter("inet:m:1", name="m", command_timeout=10, content_timeout=3)]
    hang = {"on": False}

    def handle(m: ScriptedMilter, cmd: bytes, data: bytes) -> Any:
        return HANG if hang["on"] and cmd == b"L" else None

    s = Session(script(on_event=handle), milters=milters)
    assert s.transaction() == ["250", "250", "250", "354", "250"]
    first = s.milter().macros[b"E"]["i"]
    s.clock.advance(100)
    settle(s.clock)
    assert s.transaction() == ["250", "250", "250", "354", "250"]
    assert s.milter().macros[b"E"]["i"] != first
    assert [m.envelope.queue_id for m in s.bus.messages] == [  # type: ignore[attr-defined]
        first,
        s.milter().macros[b"E"]["i"],
    ]
    hang["on"] = True
    s.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<u@example.com>\r\n")
    assert s.send(b"DATA\r\n")[0][0] == "354"
    s.proto.dataReceived(MESSAGE + b".\r\n")
    settle(s.clock)
    s.clock.advance(2.9)
    settle(s.clock)
    assert s.read() == []
    s.clock.advance(0.1)
    settle(s.clock)
    assert s.read() == [("451", "4.7.1 Service unavailable - try again later")]


def test_leading_space_flag() -> None:
    """SMFIP_HDR_LEADSPC: header values keep their leading space both ways."""

    def handle(m: ScriptedMilter, cmd: bytes, data: bytes) -> Any:
        if cmd == b"E":
            return [add_header("X-Lead", " kept"), CONTINUE]
        return None

    s = Session(script(protocol=0x100000, on_event=handle))
    s.transaction()
    assert split_strings(s.milter().data_of(b"L")[1]) == [b"Subject", b" hello"]
    assert b"X-Lead: kept\r\n" in s.stored()[0]


def test_macro_lists_the_milter_asks_for() -> None:
    """Lists in the negotiation reply replace the defaults for their stage; unknown names and
    macros without a value are left out."""
    s = Session(
        script(macro_lists={0: "{client_addr} {no_such}", 2: "i {auth_authen} {mail_addr}"})
    )
    s.transaction()
    m = s.milter()
    assert m.macros[b"C"] == {"{client_addr}": "192.0.2.1"}
    assert m.macros[b"M"] == {"{mail_addr}": "a@sender.test"}  # no envelope yet, not authed
    assert "i" in m.macros[b"R"]  # other stages keep the defaults


def test_tls_and_auth_macros() -> None:
    """After STARTTLS and AUTH the HELO and MAIL macros carry the TLS facts and the login."""
    s = Session()
    session = s.proto.session
    session.tls = TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", server_name="mx.test")
    session.security, session.authed, session.auth_mechanism = "TLS", "alice", "PLAIN"
    assert s.transaction()[-1] == "250"
    m = s.milter()
    assert m.macros[b"H"] == {
        "{tls_version}": "TLSv1.3",
        "{cipher}": "TLS_AES_256_GCM_SHA384",
        "{tls_sni}": "mx.test",
    }
    assert m.macros[b"M"]["{auth_authen}"] == "alice"
    assert m.macros[b"M"]["{auth_type}"] == "PLAIN"


def test_an_older_protocol_version_gets_no_data_or_unknown_events() -> None:
    """A version 2 milter is not sent DATA (v4) or UNKNOWN (v3) events."""
    s = Session(script(version=2))
    s.send(b"FOO bar\r\n")
    assert s.transaction()[-1] == "250"
    assert b"T" not in s.milter().events() and b"U" not in s.milter().events()


# -- decisions ------------------------------------------------------------------------------------


def test_reject_at_rcpt_refuses_that_recipient_only() -> None:
    def handle(m: ScriptedMilter, cmd: bytes, data: bytes) -> Any:
        return REJECT if cmd == b"R" and b"bad@" in data else None

    s = Session(script(on_event=handle))
    s.send(b"EHLO c\r\nMAIL FROM:<a@sender.test>\r\n")
    assert s.send(b"RCPT TO:<bad@example.com>\r\n") == [("550", "5.7.1 Command rejected")]
    assert s.send(b"RCPT TO:<good@example.com>\r\n")[0][0] == "250"
    assert s.send(b"DATA\r\n")[0][0] == "354"
    assert s.send(MESSAGE + b".\r\n")[0][0] == "250"
    assert s.bus.messages[0].envelope.recipients == ["good@example.com"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("command", "answer", "where", "expected"),
    [
        (b"M", TEMPFAIL, "MAIL", ("451", "4.7.1 Service unavailable - try again later")),
        (b"T", REJECT, "DATA", ("550", "5.7.1 Command rejected")),
        (b"E", replycode("554 5.7.1 Spam detected"), "end", ("554", "5.7.1 Spam detected")),
        (b"L", replycode("451 4.7.0 Later"), "end", ("451", "4.7.0 Later")),
        (b"B", REJECT, "end", ("550", "5.7.1 Command rejected")),
        (b"N", TEMPFAIL, "end", ("451", "4.7.1 Service unavailable - try again later")),
    ],
)
def test_refusals_reach_the_client(
    command: bytes, answer: bytes, where: str, expected: tuple[str, str]
) -> None:
    s = Session(script(on_event=on(command, answer)))
    s.send(b"EHLO c\r\n")
    replies = s.send(b"MAIL FROM:<a@sender.test>\r\n")
    if where != "MAIL":
        s.send(b"RCPT TO:<u@example.com>\r\n")
        replies = s.send(b"DATA\r\n")
        if where == "end":
            replies = s.send(MESSAGE + b".\r\n")
    assert replies == [expected]
    assert s.stored() == []


def test_a_multi_line_reply_of_the_milter() -> None:
    s = Session(script(on_event=on(b"E", replycode("550-5.7.1 Rejected\r\n550 5.7.1 See x"))))
    s.transaction()
    assert s.transport.value() == b""  # (read already)
    s2 = Session(script(on_event=on(b"E", replycode("550-5.7.1 Rejected\r\n550 5.7.1 See x"))))
    s2.send(b"EHLO c\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n")
    s2.proto.dataReceived(MESSAGE + b".\r\n")
    settle(s2.clock)
    assert s2.transport.value() == b"550-5.7.1 Rejected\r\n550 5.7.1 See x\r\n"


def test_a_reply_that_fails_the_sanity_check_is_the_default_action() -> None:
    """'250 ok' as a milter's reply is not passed on: the milter failed (logged)."""
    s = Session(script(on_event=on(b"M", replycode("250 2.0.0 fine"))))
    with captured_events() as events:
        s.send(b"EHLO c\r\n")
        assert s.send(b"MAIL FROM:<a@sender.test>\r\n")[0][0] == "451"
    assert any("malformed SMTP reply" in str(e.get("why")) for e in events)


def test_connect_reject_refuses_the_session() -> None:
    """A 5xx at connect: 554 greeting, then only QUIT (RFC 5321 3.1)."""
    s = Session(script(on_event=on(b"C", REJECT)))
    assert s.banner == [("554", "5.7.1 mx.test ESMTP not accepting connections")]
    assert s.send(b"EHLO c\r\n")[0][0] == "503"


def test_connect_tempfail_holds_for_mail() -> None:
    """A 4xx at connect: the greeting and EHLO are fine, MAIL gets the 4xx (as Postfix)."""
    s = Session(script(on_event=on(b"C", TEMPFAIL)))
    assert s.banner[0][0] == "220"
    assert s.send(b"EHLO c\r\n")[0][0] == "250"
    assert s.send(b"MAIL FROM:<a@sender.test>\r\n") == [
        ("451", "4.7.1 Service unavailable - try again later")
    ]
    assert s.milter().events() == [b"C"]  # and the milter was let go


def test_shutdown_closes_the_session() -> None:
    s = Session(script(on_event=on(b"H", resp(b"4"))))
    assert s.send(b"EHLO c\r\n") == [("421", "4.7.0 Server closing connection")]
    assert s.transport.disconnecting


def test_accept_at_connect_ends_the_milter_for_the_session() -> None:
    s = Session(script(on_event=on(b"C", ACCEPT)))
    assert s.transaction()[-1] == "250"
    assert s.transaction()[-1] == "250"
    assert s.milter().events() == [b"C"]


def test_accept_at_mail_ends_the_milter_for_that_message_only() -> None:
    s = Session(script(on_event=on(b"M", ACCEPT)))
    assert s.transaction()[-1] == "250"
    assert s.milter().events() == [b"C", b"H", b"M"]
    assert s.transaction()[-1] == "250"
    assert s.milter().events()[3:] == [b"H", b"M"]


def test_discard_at_end_of_message_accepts_and_drops() -> None:
    s = Session(script(on_event=on(b"E", DISCARD)))
    with captured_events() as events:
        assert s.transaction()[-1] == "250"
    assert s.stored() == []
    assert any("discarded by a milter" in e.get("log_format", "") for e in events)
    assert s.transaction()[-1] == "250"  # the next message is not discarded
    assert len(s.stored()) == 0  # (the same milter discards it again)


def test_discard_at_rcpt_drops_the_message_and_tells_the_milter_nothing_more() -> None:
    s = Session(script(on_event=on(b"R", DISCARD)))
    assert s.transaction()[-1] == "250"
    assert s.stored() == []
    assert s.milter().events() == [b"C", b"H", b"M", b"R"]


def test_quarantine_is_stored_and_marked() -> None:
    s = Session(script(on_event=on(b"E", [resp(b"q", z("looks odd")), CONTINUE])))
    assert s.transaction()[-1] == "250"
    envelope = s.bus.messages[0].envelope  # type: ignore[attr-defined]
    assert envelope.quarantine == "looks odd"
    assert envelope.to_json_dict()["quarantine"] == "looks odd"
    assert {
        "milter": "m",
        "action": "quarantine",
        "detail": "looks odd",
    } in envelope.milter_actions


def test_header_edits_apply_to_what_is_stored() -> None:
    edits = [
        insert_header(0, "DKIM-Signature", "v=1; d=sender.test;\n\tb=abc"),
        change_header(1, "Subject", "[SPAM] hello"),
        add_header("X-Spam", "Yes"),
        change_header(1, "From", ""),
        CONTINUE,
    ]
    s = Session(script(on_event=on(b"E", edits)))
    assert s.transaction()[-1] == "250"
    assert s.stored() == [
        b"DKIM-Signature: v=1; d=sender.test;\r\n\tb=abc\r\n"
        b"Subject: [SPAM] hello\r\nX-Spam: Yes\r\n\r\nbody line\r\n"
    ]
    actions = s.bus.messages[0].envelope.milter_actions  # type: ignore[attr-defined]
    assert [(a["action"], a["detail"]) for a in actions] == [
        ("insert_header", "DKIM-Signature"),
        ("change_header", "Subject"),
        ("add_header", "X-Spam"),
        ("change_header", "From"),
    ]


def test_replace_body_streams_into_a_new_spool() -> None:
    """Body replacement in several packets (bare LF fixed); the original spool is untouched
    and the replacement is closed when the transaction ends."""
    answer = [resp(b"b", b"new body\nline two\r\n"), resp(b"b", b"last"), ACCEPT]
    s = Session(script(on_event=on(b"E", answer)))
    assert s.transaction()[-1] == "250"
    assert s.stored() == [
        MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n\r\nnew body\r\nline two\r\nlast\r\n"
    ]


def test_envelope_changes() -> None:
    """Change sender (with args), add recipients (with and without args), delete one."""
    answer = [
        resp(b"e", z("<new@sender.test>", "RET=HDRS")),
        resp(b"+", z("<added@example.com>")),
        resp(b"2", z("<other@example.net>", "NOTIFY=NEVER")),
        resp(b"-", z("<U@example.com>")),
        CONTINUE,
    ]
    s = Session(script(on_event=on(b"E", answer)))
    assert s.transaction(rcpts=("u@example.com", "keep@example.com"))[-1] == "250"
    envelope = s.bus.messages[0].envelope  # type: ignore[attr-defined]
    assert envelope.sender == "new@sender.test"
    assert envelope.mail_params["RET"] == "HDRS"
    assert envelope.recipients == ["keep@example.com", "added@example.com", "other@example.net"]
    assert envelope.rcpt_params[2] == {"NOTIFY": "NEVER"}


def test_every_recipient_deleted_drops_the_message() -> None:
    s = Session(script(on_event=on(b"E", [resp(b"-", z("<u@example.com>")), CONTINUE])))
    assert s.transaction()[-1] == "250"
    assert s.stored() == []


def test_modifications_need_negotiating() -> None:
    """A header change from a milter that asked only for ADDHDRS fails it (default action)."""
    s = Session(
        script(actions=0x1, on_event=on(b"E", [change_header(1, "Subject", "x"), CONTINUE]))
    )
    assert s.transaction()[-1] == "451"


def test_skip_stops_the_body() -> None:
    """SMFIR_SKIP to a body chunk: no more chunks, straight to the end of the message."""
    body = b"x" * 900 + b"\r\n"
    body *= 100
    s = Session(script(protocol=0x400, on_event=on(b"B", SKIP)))
    assert s.transaction(MESSAGE + body)[-1] == "250"
    assert s.milter().events()[-2:] == [b"B", b"E"]


def test_progress_keeps_the_content_timeout_alive() -> None:
    """Progress every 200 s with a 300 s content timeout: the answer after 500 s counts."""
    milters = [Milter("inet:m:1", name="m", content_timeout=300)]

    def handle(m: ScriptedMilter, cmd: bytes, data: bytes) -> Any:
        return HANG if cmd == b"E" else None

    s = Session(script(on_event=handle), milters=milters)
    s.send(b"EHLO c\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n")
    s.proto.dataReceived(MESSAGE + b".\r\n")
    settle(s.clock)
    milter = s.milter()
    assert milter.transport is not None
    for _ in range(2):
        s.clock.advance(200)
        milter.transport.write(PROGRESS)
        settle(s.clock)
    s.clock.advance(100)
    milter.transport.write(REJECT)
    settle(s.clock)
    assert s.read() == [("550", "5.7.1 Command rejected")]


def test_rejected_recipients_are_shown_to_milters_that_ask() -> None:
    """SMFIP_RCPT_REJ: a recipient the edge refused (relay denied) is still sent, with
    {rcpt_mailer}=error; what the milter answers changes nothing."""
    s = Session(script(protocol=0x800, on_event=on(b"R", ACCEPT)))
    s.send(b"EHLO c\r\nMAIL FROM:<a@sender.test>\r\n")
    assert s.send(b"RCPT TO:<x@elsewhere.test>\r\n")[0][0] == "554"
    m = s.milter()
    assert split_strings(m.data_of(b"R")[0]) == [b"<x@elsewhere.test>"]
    assert m.macros[b"R"]["{rcpt_mailer}"] == "error"
    assert m.macros[b"R"]["{rcpt_host}"] == "5.7.1"


def test_unknown_commands_are_reported_and_a_4xx_answer_used() -> None:
    s = Session(script(on_event=on(b"U", TEMPFAIL)))
    assert s.send(b"XYZZY plugh\r\n") == [("451", "4.7.1 Service unavailable - try again later")]
    assert s.milter().data_of(b"U") == [b"XYZZY plugh\x00"]


def test_rset_and_a_new_ehlo_abort_the_milters_transaction() -> None:
    s = Session()
    s.send(b"EHLO c\r\nMAIL FROM:<a@sender.test>\r\nRSET\r\n")
    s.send(b"MAIL FROM:<a@sender.test>\r\nEHLO again\r\n")
    assert s.milter().events() == [b"C", b"H", b"M", b"A", b"M", b"A", b"H"]


def test_a_client_gone_without_quit_still_quits_the_milter() -> None:
    s = Session()
    s.send(b"EHLO c\r\n")
    s.proto.connectionLost(None)
    settle(s.clock)
    assert s.milter().events()[-1] == b"Q"
    assert s.connector.server("m").transport.connected is False  # type: ignore[union-attr]


def test_bdat_tells_the_milter_data() -> None:
    s = Session()
    s.send(b"EHLO c\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<u@example.com>\r\n")
    assert s.send(b"BDAT %d LAST\r\n" % len(MESSAGE) + MESSAGE)[0][0] == "250"
    assert s.milter().events()[-6:] == [b"T", b"L", b"L", b"N", b"B", b"E"]


def test_a_header_section_over_the_limit_is_refused() -> None:
    s = Session()
    big = b"".join(b"X-%d: %s\r\n" % (i, b"y" * 100) for i in range(11_000)) + b"\r\nbody\r\n"
    policy_ok = s.transaction(big)
    assert policy_ok[-1] == "552"


# -- two milters --------------------------------------------------------------------------------


def test_milters_in_order_the_second_sees_the_firsts_edits() -> None:
    scripts = {
        "first": MilterScript(on_event=on(b"E", [add_header("X-First", "1"), CONTINUE])),
        "second": MilterScript(on_event=on(b"E", [add_header("X-Second", "2"), CONTINUE])),
    }
    milters = [Milter("inet:a:1", name="first"), Milter("inet:b:1", name="second")]
    s = Session(scripts, milters)
    assert s.transaction()[-1] == "250"
    seen = [split_strings(d)[0] for d in s.milter("second").data_of(b"L")]
    assert seen == [b"From", b"Subject", b"X-First"]
    assert s.stored()[0].split(b"\r\n\r\n")[0].endswith(b"X-First: 1\r\nX-Second: 2")


def test_the_first_refusal_decides_and_later_milters_are_not_asked() -> None:
    scripts = {
        "first": MilterScript(on_event=on(b"M", REJECT)),
        "second": MilterScript(),
    }
    s = Session(scripts, [Milter("inet:a:1", name="first"), Milter("inet:b:1", name="second")])
    s.send(b"EHLO c\r\n")
    assert s.send(b"MAIL FROM:<a@sender.test>\r\n")[0][0] == "550"
    assert s.milter("second").events() == [b"C", b"H"]


# -- failures ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "banner", "mail_reply"),
    [("tempfail", "220", "451"), ("reject", "554", "503"), ("accept", "220", "250")],
)
def test_a_milter_that_is_down_gets_its_default_action(
    action: str, banner: str, mail_reply: str
) -> None:
    """tempfail: MAIL gets 451 for the session; reject: the connection is refused (a 5xx at
    connect, as Postfix); accept: the session goes on without the milter."""
    milters = [Milter("inet:m:1", name="m", default_action=action)]
    with captured_events() as events:
        s = Session(milters=milters, down={"m"})
    assert s.banner[0][0] == banner
    s.send(b"EHLO c\r\n")
    assert s.send(b"MAIL FROM:<a@sender.test>\r\n")[0][0] == mail_reply
    assert any("cannot connect" in str(e.get("why")) for e in events)


def _failing(command: bytes, answer: Any) -> dict[str, MilterScript]:
    return script(on_event=on(command, answer))


@pytest.mark.parametrize(
    ("name", "scripts", "why"),
    [
        ("closes mid-message", _failing(b"B", CLOSE), "connection closed"),
        ("garbage length", _failing(b"L", b"\xff\xff\xff\xffx"), "bad packet"),
        ("zero length", _failing(b"N", b"\0\0\0\0"), "bad packet"),
        ("unknown response", _failing(b"H", resp(b"Z")), "unknown response"),
        ("edit outside end of message", _failing(b"R", add_header("X", "y")), "only allowed"),
        ("data after continue", _failing(b"M", resp(b"c", b"junk")), "data bytes"),
        (
            "version 7",
            {"m": MilterScript(optneg_reply=resp(b"O", struct.pack(">III", 7, 0, 0)))},
            "protocol version 7",
        ),
        (
            "actions not offered",
            {"m": MilterScript(optneg_reply=resp(b"O", struct.pack(">III", 6, 0x400, 0)))},
            "more than offered",
        ),
    ],
)
def test_broken_milters_get_the_default_action_and_are_logged(
    name: str, scripts: dict[str, MilterScript], why: str
) -> None:
    with captured_events() as events:
        s = Session(scripts)
        codes = s.transaction()
    assert "451" in codes and codes[-1] in ("451", "503")
    assert any(why in str(e.get("why")) for e in events), [e.get("why") for e in events]
    assert s.stored() == []


def test_a_slow_milter_times_out() -> None:
    """No answer within command_timeout: default action; nothing hangs."""
    milters = [Milter("inet:m:1", name="m", command_timeout=10)]
    s = Session(script(on_event=on(b"M", HANG)), milters=milters)
    s.send(b"EHLO c\r\n")
    s.proto.dataReceived(b"MAIL FROM:<a@sender.test>\r\n")
    settle(s.clock)
    assert s.read() == []
    s.clock.advance(10)
    settle(s.clock)
    assert s.read() == [("451", "4.7.1 Service unavailable - try again later")]
    assert s.send(b"MAIL FROM:<a@sender.test>\r\n")[0][0] == "451"  # for the session


def test_a_milter_silent_at_negotiation_times_out() -> None:
    milters = [Milter("inet:m:1", name="m", connect_timeout=5, default_action="accept")]
    s = Session({"m": MilterScript(optneg_reply=b"")}, milters=milters)
    assert s.banner == []
    s.clock.advance(5)
    settle(s.clock)
    assert s.read()[0][0] == "220"
    assert s.transaction()[-1] == "250"


def test_a_content_timeout_without_progress() -> None:
    milters = [Milter("inet:m:1", name="m", content_timeout=60, default_action="reject")]
    s = Session(script(on_event=on(b"E", HANG)), milters=milters)
    s.send(b"EHLO c\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n")
    s.proto.dataReceived(MESSAGE + b".\r\n")
    settle(s.clock)
    s.clock.advance(60)
    settle(s.clock)
    assert s.read() == [("550", "5.7.1 Service unavailable")]


def test_connection_limit_makes_sessions_wait_then_times_out() -> None:
    """max_connections=1: a second session waits for the first's slot; it gets it when the
    first ends, and a third that waits longer than connect_timeout gets the default action."""
    clock = Clock()
    bus = RecordingBus()
    milter = Milter("inet:m:1", name="m", max_connections=1, connect_timeout=30)
    edge = SmtpEdge(bus, POLICY, reactor=clock, milters=[milter])
    connector = MemoryConnector(clock, {"m": MilterScript()})
    edge.milters.connector = Connector(clock, connector)
    first = Session(edge=edge, connector=connector, clock=clock)
    assert first.banner[0][0] == "220"
    second = Session(edge=edge, connector=connector, clock=clock)
    assert second.banner == [] and edge.milters.connector.waiting(milter) == 1
    first.send(b"QUIT\r\n")
    settle(clock)
    assert second.read()[0][0] == "220"
    third = Session(edge=edge, connector=connector, clock=clock)
    clock.advance(30)
    settle(clock)
    assert third.read()[0][0] == "220"  # tempfail holds for MAIL
    third.send(b"EHLO c\r\n")
    assert third.send(b"MAIL FROM:<a@sender.test>\r\n")[0][0] == "451"
    assert connector.connects == 2


def test_a_client_gone_mid_step_leaves_nothing_behind() -> None:
    """The client drops while the milter thinks about MAIL: the milter connection is closed,
    its slot freed, and no failure is logged for it."""
    s = Session(script(on_event=on(b"M", HANG)))
    s.send(b"EHLO c\r\n")
    s.proto.dataReceived(b"MAIL FROM:<a@sender.test>\r\n")
    settle(s.clock)
    with captured_events() as events:
        s.proto.connectionLost(None)
        settle(s.clock)
    milter = s.edge.milters.milters[0]
    assert s.edge.milters.connector.in_use(milter) == 0
    assert not [e for e in events if "failed" in e.get("log_format", "")]
    assert s.clock.getDelayedCalls() == []


def test_many_sessions_never_open_more_than_max_connections() -> None:
    """20 sessions against max_connections=3: 3 sockets, 17 sessions waiting; each one that
    ends lets the next in."""
    clock = Clock()
    milter = Milter("inet:m:1", name="m", max_connections=3)
    edge = SmtpEdge(RecordingBus(), POLICY, reactor=clock, milters=[milter])
    connector = MemoryConnector(clock, {"m": MilterScript()})
    edge.milters.connector = Connector(clock, connector)
    sessions = [Session(edge=edge, connector=connector, clock=clock) for _ in range(20)]
    assert connector.connects == 3 and edge.milters.connector.waiting(milter) == 17
    for done in sessions[:5]:
        done.send(b"QUIT\r\n")
    settle(clock)
    assert connector.connects == 8 and edge.milters.connector.in_use(milter) == 3


def test_a_big_body_is_streamed_in_chunks_with_flow_control() -> None:
    """A 1 MB body goes out in chunks of at most 65,535 bytes, and the client waits for the
    socket buffer to drain between them (no reply expected: SMFIP_NR_BODY)."""
    body = (b"y" * 998 + b"\r\n") * 1000
    s = Session(script(protocol=0x80000), high_water=100_000)
    assert s.transaction(MESSAGE + body)[-1] == "250"
    chunks = s.milter().data_of(b"B")
    assert max(map(len, chunks)) <= 65535
    assert b"".join(chunks) == b"body line\r\n" + body


# -- over real sockets ------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_over_a_real_unix_socket_with_smtplib(tmp_path: Any) -> Any:
    """The real connector (UNIXClientEndpoint) and the real reactor: the scripted milter on a
    unix socket adds a header; smtplib's message is stored with it; the milter gets QUIT."""
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory

    servers: list[ScriptedMilter] = []

    def build() -> ScriptedMilter:
        milter = ScriptedMilter(
            MilterScript(on_event=on(b"E", [add_header("X-Unix", "1"), ACCEPT]))
        )
        servers.append(milter)
        return milter

    path = str(tmp_path / "milter.sock")
    listening = reactor.listenUNIX(path, Factory.forProtocol(build))  # type: ignore[attr-defined]
    bus = RecordingBus()
    edge = SmtpEdge(bus, POLICY, reactor=reactor, milters=[f"unix:{path},name=unix"])
    port = yield edge.listen(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))

    def client() -> Any:
        with smtplib.SMTP("127.0.0.1", port.getHost().port, timeout=20) as c:
            return c.sendmail("a@sender.test", ["u@example.com"], MESSAGE)

    try:
        assert (yield deferToThread(client)) == {}
        for _ in range(200):  # QUIT reaches the milter just after the client's
            if servers and b"Q" in servers[0].events():
                break
            yield deferLater(reactor, 0.01, lambda: None)
    finally:
        yield edge.close()
        yield listening.stopListening()
    assert bus.messages[0].data.startswith(b"From: Alice")
    assert b"X-Unix: 1\r\n\r\nbody line" in bus.messages[0].data
    assert servers[0].events()[-1] == b"Q"
    assert edge.milters.connector.in_use(edge.milters.milters[0]) == 0


def test_a_milter_that_stops_reading_holds_one_chunk_and_times_out() -> None:
    """A milter that stops reading mid-body (SMFIP_NR_BODY, so nothing to wait for but the
    socket): the client stops writing once the socket buffer is full, so at most one chunk
    more is queued; the content timeout then applies the default action."""
    milters = [Milter("inet:m:1", name="m", content_timeout=60)]

    def handle(m: ScriptedMilter, cmd: bytes, data: bytes) -> Any:
        if cmd == b"B":
            m.transport.pauseProducing()  # type: ignore[union-attr]
            return HANG
        return None

    s = Session(script(protocol=0x80000, on_event=handle), milters=milters, high_water=10_000)
    body = (b"z" * 998 + b"\r\n") * 1000
    s.send(b"EHLO c\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n")
    s.proto.dataReceived(MESSAGE + body + b".\r\n")
    settle(s.clock)
    queued = s.milter().transport.other.pending_size  # type: ignore[union-attr]
    assert 0 < queued <= 10_000 + 65_535 + 5
    assert s.read() == []
    s.clock.advance(60)
    settle(s.clock)
    assert s.read() == [("451", "4.7.1 Service unavailable - try again later")]
