"""Validator hooks: every decision point, every way of answering, and failures that stay local."""

from __future__ import annotations

from typing import Any

import pytest
from smtp_driver import Driver
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from slimta_tx import Policy, Reply, Session, SmtpEdge
from slimta_tx.envelope import Envelope
from slimta_tx.testing import RecordingBus
from slimta_tx.validators import SmtpValidators

POLICY = Policy(hostname="mx.test", accepted_domains=("example.com",))
MESSAGE = b"From: a@sender.test\r\nSubject: hello\r\nX-Spam: yes\r\n\r\nbody\r\n"


def make(bus: Any = None) -> tuple[SmtpEdge, Clock, Any]:
    clock = Clock()
    bus = bus if bus is not None else RecordingBus()
    return SmtpEdge(bus, POLICY, reactor=clock), clock, bus


def run(edge: SmtpEdge, clock: Clock, peer: tuple[str, int] = ("192.0.2.1", 40000)) -> Driver:
    return Driver(edge=edge, clock=clock, peer=peer)


@pytest.fixture
def logged() -> Any:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def test_every_hook_gets_the_session_the_reply_and_its_extras() -> None:
    """BANNER, EHLO, MAIL, RCPT, DATA, HAVE_DATA, RSET, QUIT and UNKNOWN validators are each
    called with (session, reply, extras...) at their point of the session."""
    edge, clock, bus = make()
    calls: list[tuple[str, str, tuple[Any, ...]]] = []

    def recorder(hook: str) -> Any:
        def validator(session: Session, reply: Reply, *extra: Any) -> None:
            assert isinstance(session, Session)
            shown = tuple(e.sender if isinstance(e, Envelope) else e for e in extra)
            calls.append((hook, reply.code, shown))

        return validator

    hooks = ("BANNER", "EHLO", "MAIL", "RCPT", "DATA", "HAVE_DATA", "RSET", "QUIT", "UNKNOWN")
    for hook in hooks:
        edge.set_validator(hook, recorder(hook))
    d = run(edge, clock, peer=("192.0.2.9", 4242))
    d.cmd("EHLO client.test")
    d.send(b"MAIL FROM:<a@sender.test> SIZE=100\r\nRCPT TO:<u@example.com>\r\nDATA\r\n")
    d.send(MESSAGE + b".\r\n")
    d.cmd("RSET")
    d.cmd("FROB nicate")
    d.cmd("QUIT")
    assert calls == [
        ("BANNER", "220", (("192.0.2.9", 4242),)),
        ("EHLO", "250", ("client.test",)),
        ("MAIL", "250", ("a@sender.test", {"SIZE": "100"})),
        ("RCPT", "250", ("u@example.com", {})),
        ("DATA", "354", ()),
        ("HAVE_DATA", "250", ("a@sender.test",)),
        ("RSET", "250", ()),
        ("UNKNOWN", "500", ("FROB nicate",)),
        ("QUIT", "221", ()),
    ]
    assert len(bus.messages) == 1


def test_helo_and_ehlo_share_a_hook_told_apart_by_extended_smtp() -> None:
    """The EHLO validator also runs for HELO; session.extended_smtp says which it was."""
    edge, clock, _ = make()
    seen: list[tuple[str, bool]] = []
    edge.set_validator("HELO", lambda s, r, name: seen.append((name, s.extended_smtp)))
    d = run(edge, clock)
    d.cmd("EHLO one.test")
    d.cmd("HELO two.test")
    assert seen == [("one.test", True), ("two.test", False)]


def test_validators_read_the_session_facts() -> None:
    """A RCPT validator sees the client address, EHLO name, protocol and current envelope."""
    edge, clock, _ = make()
    facts: list[Any] = []

    def rcpt(session: Session, reply: Reply, recipient: str, params: Any) -> None:
        assert session.envelope is not None
        facts.extend([session.from_ip, session.ehlo_as, session.protocol, session.envelope.sender])
        facts.extend([session.security, session.authed, session.reverse_name])

    edge.set_validator("RCPT", rcpt)
    d = run(edge, clock, peer=("198.51.100.7", 5000))
    d.greet()
    d.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<u@example.com>\r\n")
    assert facts == ["198.51.100.7", "client.test", "ESMTP", "a@sender.test", None, None, None]


def test_a_validator_refuses_by_changing_the_reply() -> None:
    """reply.set() in a RCPT validator refuses that recipient only; the transaction goes on."""
    edge, clock, bus = make()

    def rcpt(session: Session, reply: Reply, recipient: str, params: Any) -> None:
        if recipient.startswith("nobody@"):
            reply.set("550", "No such user", "5.1.1")

    edge.set_validator("RCPT", rcpt)
    d = run(edge, clock)
    d.greet()
    replies = d.send(
        b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<nobody@example.com>\r\n"
        b"RCPT TO:<u@example.com>\r\nDATA\r\n"
    )
    assert replies[1] == ("550", "5.1.1 No such user")
    assert [code for code, _ in replies] == ["250", "550", "250", "354"]
    d.send(MESSAGE + b".\r\n")
    assert bus.messages[0].envelope.recipients == ["u@example.com"]


def test_a_returned_reply_replaces_the_proposed_one() -> None:
    """A validator may return a Reply instead of changing the one it was given."""
    edge, clock, _ = make()
    edge.set_validator("MAIL", lambda s, r, *e: Reply("450", "Try later", "4.7.1"))
    d = run(edge, clock)
    d.greet()
    assert d.cmd("MAIL FROM:<a@sender.test>") == ("450", "4.7.1 Try later")


def test_deferred_and_coroutine_validators_are_waited_for() -> None:
    """A validator returning a Deferred, or an ``async def`` one, is waited for before the
    reply goes out; input is paused meanwhile."""
    edge, clock, _ = make()
    later: Deferred[None] = Deferred()
    gate: Deferred[None] = Deferred()

    def mail(session: Session, reply: Reply, *extra: Any) -> Deferred[None]:
        reply.message = "Sender checked"
        return later

    async def rcpt(session: Session, reply: Reply, *extra: Any) -> None:
        await gate
        reply.set("550", "Checked and refused", "5.7.1")

    edge.set_validator("MAIL", mail)
    edge.set_validator("RCPT", rcpt)
    d = run(edge, clock)
    d.greet()
    assert d.send(b"MAIL FROM:<a@sender.test>\r\n") == []
    assert d.transport.producerState == "paused"
    later.callback(None)
    assert d.read() == [("250", "2.1.0 Sender checked")]
    assert d.send(b"RCPT TO:<u@example.com>\r\n") == []
    gate.callback(None)
    assert d.read() == [("550", "5.7.1 Checked and refused")]


def test_slow_coroutine_validators_in_a_pipelined_group_answer_in_order_in_one_write() -> None:
    """MAIL and RCPT validators that take a while (coroutines): the replies to a pipelined
    group come in command order, all in one write."""
    edge, clock, _ = make()
    gates: list[Deferred[None]] = []

    async def slow(session: Session, reply: Reply, *extra: Any) -> None:
        gate: Deferred[None] = Deferred()
        gates.append(gate)
        await gate
        if extra and extra[0] == "2@example.com":
            reply.set("550", "Not this one", "5.1.1")

    edge.set_validator("MAIL", slow)
    edge.set_validator("RCPT", slow)
    d = run(edge, clock)
    d.greet()
    d.writes.clear()
    group = (
        b"MAIL FROM:<a@b.test>\r\nRCPT TO:<1@example.com>\r\nRCPT TO:<2@example.com>\r\n"
        b"RCPT TO:<3@example.com>\r\nDATA\r\n"
    )
    assert d.send(group) == []
    answered = 0
    while answered < len(gates):
        gates[answered].callback(None)
        answered += 1
    assert answered == 4
    assert d.read() == [
        ("250", "2.1.0 Sender <a@b.test> ok"),
        ("250", "2.1.5 Recipient <1@example.com> ok"),
        ("550", "5.1.1 Not this one"),
        ("250", "2.1.5 Recipient <3@example.com> ok"),
        ("354", "End data with <CR><LF>.<CR><LF>"),
    ]
    assert len(d.writes) == 1


def test_an_exception_becomes_451_and_is_logged(logged: list[dict[str, Any]]) -> None:
    """A validator that raises (or whose coroutine raises) gives 451 4.3.0 for that command,
    logs the error, and the session goes on."""
    edge, clock, _ = make()

    def broken(session: Session, reply: Reply, *extra: Any) -> None:
        raise RuntimeError("validator bug")

    async def broken_later(session: Session, reply: Reply, *extra: Any) -> None:
        raise KeyError("async validator bug")

    edge.set_validator("MAIL", broken)
    edge.set_validator("RCPT", broken_later)
    d = run(edge, clock)
    d.greet()
    assert d.cmd("MAIL FROM:<a@sender.test>") == (
        "451",
        "4.3.0 Temporary local problem, try again later",
    )
    edge.set_validator("MAIL", None)
    assert d.cmd("MAIL FROM:<a@sender.test>")[0] == "250"
    assert d.cmd("RCPT TO:<u@example.com>")[0] == "451"
    assert d.cmd("NOOP")[0] == "250"
    failures = [e for e in logged if "log_failure" in e]
    assert [type(e["log_failure"].value) for e in failures] == [RuntimeError, KeyError]
    assert [e["command"] for e in failures] == ["MAIL", "RCPT"]


def test_an_exception_at_banner_is_421_and_closes(logged: list[dict[str, Any]]) -> None:
    """A greeting cannot be 451: a BANNER validator that raises gives 421 4.3.0 and a close."""
    edge, clock, _ = make()
    edge.set_validator("BANNER", lambda s, r, a: 1 / 0)
    d = run(edge, clock)
    assert d.banner == [("421", "4.3.0 Temporary local problem, try again later")]
    assert d.closed


def test_421_from_a_validator_closes_the_connection() -> None:
    """A validator answering 421 ends the session once the reply is written."""
    edge, clock, _ = make()
    edge.set_validator("MAIL", lambda s, r, *e: r.set("421", "mx.test Go away", "4.7.0"))
    d = run(edge, clock)
    d.greet()
    assert d.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<u@example.com>\r\n") == [
        ("421", "4.7.0 mx.test Go away")
    ]
    assert d.closed


def test_quit_validator_can_change_the_text_and_the_session_still_ends() -> None:
    """The QUIT validator may reword the 221; the connection closes either way."""
    edge, clock, _ = make()
    edge.set_validator("QUIT", lambda s, r: r.set("221", "See you", "2.0.0"))
    d = run(edge, clock)
    assert d.cmd("QUIT") == ("221", "2.0.0 See you")
    assert d.closed


def test_multi_line_replies_from_a_validator() -> None:
    """A message with newlines goes out as a multi-line reply, code and enhanced code on every
    line."""
    edge, clock, _ = make()
    edge.set_validator(
        "RCPT",
        lambda s, r, *e: r.set("550", "Mailbox unavailable\nSee https://mx.test/why", "5.7.1"),
    )
    d = run(edge, clock)
    d.greet()
    d.cmd("MAIL FROM:<a@sender.test>")
    d.proto.dataReceived(b"RCPT TO:<u@example.com>\r\n")
    assert d.transport.value() == (
        b"550-5.7.1 Mailbox unavailable\r\n550 5.7.1 See https://mx.test/why\r\n"
    )


def test_banner_validator_changes_the_greeting_per_client() -> None:
    """The BANNER validator can reword the greeting, or refuse with 554 (then only QUIT)."""
    edge, clock, _ = make()

    def banner(session: Session, reply: Reply, address: tuple[str, int]) -> None:
        if address[0] == "203.0.113.5":
            reply.set("554", "No service for you", "5.7.1")
        else:
            reply.message = f"mx.test ESMTP hello {address[0]}"

    edge.set_validator("BANNER", banner)
    ok = run(edge, clock, peer=("192.0.2.1", 1))
    assert ok.banner == [("220", "mx.test ESMTP hello 192.0.2.1")]
    refused = run(edge, clock, peer=("203.0.113.5", 1))
    assert refused.banner == [("554", "5.7.1 No service for you")]
    assert refused.cmd("EHLO x.test")[0] == "503"
    assert refused.cmd("QUIT")[0] == "221"


def test_data_validator_can_refuse_before_354() -> None:
    """A DATA validator refusing: no 354, the body is not read as a message."""
    edge, clock, bus = make()
    edge.set_validator("DATA", lambda s, r: r.set("554", "No data today", "5.7.1"))
    d = run(edge, clock)
    d.greet()
    replies = d.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n")
    assert replies[-1] == ("554", "5.7.1 No data today")
    assert d.cmd("RSET")[0] == "250"
    assert bus.messages == []


@pytest.mark.parametrize("size", [len(MESSAGE), 400 * 1024])
def test_have_data_reads_the_spooled_message_and_its_headers(size: int) -> None:
    """HAVE_DATA runs after the final dot and before the bus: it can read the whole message
    (in memory or spooled to a file) and its parsed headers, and refuse it."""
    edge, clock, bus = make()
    seen: list[Any] = []

    def have_data(session: Session, reply: Reply, envelope: Envelope) -> None:
        assert envelope.message is not None
        headers = envelope.headers()
        seen.append((envelope.message.size, headers["Subject"], envelope.message.in_memory))
        if headers["X-Spam"] == "yes":
            reply.set("550", "Looks like spam", "5.7.1")

    edge.set_validator("HAVE_DATA", have_data)
    body = MESSAGE + (b"x" * 70 + b"\r\n") * ((size - len(MESSAGE)) // 72)
    d = run(edge, clock)
    d.start_data()
    assert d.send(body + b".\r\n") == [("550", "5.7.1 Looks like spam")]
    assert seen[0][:2] == (len(body), "hello")
    assert seen[0][2] == (size < 256 * 1024)
    assert bus.messages == []


def test_rset_and_unknown_validators_can_answer() -> None:
    """RSET and UNKNOWN validators see their command and may change its reply."""
    edge, clock, _ = make()
    edge.set_validator("RSET", lambda s, r: r.set("250", "Flushed", "2.0.0"))
    edge.set_validator(
        "UNKNOWN", lambda s, r, line: r.set("502", f"{line.split()[0]} is not for you", "5.5.1")
    )
    d = run(edge, clock)
    assert d.cmd("RSET") == ("250", "2.0.0 Flushed")
    assert d.cmd("XYZZY plugh") == ("502", "5.5.1 XYZZY is not for you")


def test_an_unknown_hook_name_is_refused() -> None:
    """set_validator with a name that is no hook raises at once, listing the hooks."""
    edge, _, _ = make()
    with pytest.raises(ValueError, match="HAVE_DATA"):
        edge.set_validator("RECIPIENT", lambda s, r: None)


class PerSession(SmtpValidators):
    """Refuses a second recipient from the same session; counts on self (one per session)."""

    instances: list[PerSession] = []

    def __init__(self, session: Session | None = None) -> None:
        super().__init__(session)
        self.recipients = 0
        PerSession.instances.append(self)

    def handle_banner(self, reply: Reply, address: tuple[str, int]) -> None:
        reply.message = f"mx.test ESMTP for {self.session.from_ip}"

    def handle_rcpt(self, reply: Reply, recipient: str, params: Any) -> Any:
        self.recipients += 1
        if self.recipients > 1:
            reply.set("452", "One recipient per session", "4.5.3")
        return succeed(None)


def test_smtp_validators_class_gets_one_instance_per_session() -> None:
    """set_validators(Class): each session gets its own instance (self.session is that
    session), and only the overridden handle_* methods become validators."""
    PerSession.instances.clear()
    edge, clock, _ = make()
    edge.set_validators(PerSession)
    assert "UNKNOWN" not in edge.validators and "RCPT" in edge.validators
    first = run(edge, clock, peer=("192.0.2.1", 1))
    second = run(edge, clock, peer=("192.0.2.2", 1))
    assert first.banner == [("220", "mx.test ESMTP for 192.0.2.1")]
    assert second.banner == [("220", "mx.test ESMTP for 192.0.2.2")]
    for d in (first, second):
        d.greet()
        codes = d.codes(
            b"MAIL FROM:<a@b.test>\r\nRCPT TO:<1@example.com>\r\nRCPT TO:<2@example.com>\r\n"
        )
        assert codes == ["250", "250", "452"]
    assert len(PerSession.instances) == 2


def test_smtp_validators_instance_and_bound_methods() -> None:
    """An instance can be shared by all sessions; a bound method works with set_validator."""

    class Shared(SmtpValidators):
        def __init__(self) -> None:
            self.senders: list[tuple[str, str]] = []

        def handle_mail(self, reply: Reply, sender: str, params: Any) -> None:
            self.senders.append((self.session.from_ip, sender))

        def check_rcpt(self, session: Session, reply: Reply, recipient: str, params: Any) -> None:
            if recipient.endswith("@blocked.example.com"):
                reply.set("550", "Blocked", "5.7.1")

    shared = Shared()
    edge, clock, _ = make()
    edge.set_validators(shared)
    edge.set_validator("RCPT", shared.check_rcpt)
    d = run(edge, clock, peer=("192.0.2.3", 1))
    d.greet()
    assert d.codes(b"MAIL FROM:<s@x.test>\r\nRCPT TO:<u@blocked.example.com>\r\n") == [
        "250",
        "550",
    ]
    assert shared.senders == [("192.0.2.3", "s@x.test")]


def test_policy_checks_run_before_the_validator_which_sees_their_verdict() -> None:
    """Checks added with add_check run in order before the validator; once one refuses, the
    later checks are skipped, and the validator sees (and may overrule) the refusal."""
    edge, clock, _ = make()
    order: list[str] = []

    def refuse(session: Session, reply: Reply, *extra: Any) -> None:
        order.append("refuse")
        reply.set("550", "Refused by policy", "5.7.1")

    edge.validators.add_check("MAIL", lambda s, r, *e: order.append("first"))
    edge.validators.add_check("MAIL", refuse)
    edge.validators.add_check("MAIL", lambda s, r, *e: order.append("skipped"))

    def validator(session: Session, reply: Reply, sender: str, params: Any) -> None:
        order.append(f"validator saw {reply.code}")
        if sender == "vip@sender.test":
            reply.set("250", "Welcome back", "2.1.0")

    edge.set_validator("MAIL", validator)
    d = run(edge, clock)
    d.greet()
    assert d.cmd("MAIL FROM:<a@sender.test>") == ("550", "5.7.1 Refused by policy")
    assert d.cmd("MAIL FROM:<vip@sender.test>") == ("250", "2.1.0 Welcome back")
    assert order == ["first", "refuse", "validator saw 550"] * 2


def test_a_validator_may_take_fewer_extras_than_the_hook_offers() -> None:
    """`def banner(session, reply)` works at BANNER (which also offers the client address),
    and `def rcpt(session, reply, address)` at RCPT (which also offers the parameters)."""
    from smtp_driver import Driver
    from twisted.internet.task import Clock

    from slimta_tx import Policy, SmtpEdge
    from slimta_tx.testing import RecordingBus

    edge = SmtpEdge(
        RecordingBus(), Policy(hostname="mx.test", accepted_domains=("example.com",)), Clock()
    )

    def banner(session: object, reply: Reply) -> None:
        reply.message = "mx.test ESMTP short validators welcome"

    seen: list[str] = []

    def rcpt(session: object, reply: Reply, address: str) -> None:
        seen.append(address)

    edge.set_validator("BANNER", banner)
    edge.set_validator("RCPT", rcpt)
    d = Driver(edge=edge)
    assert d.banner == [("220", "mx.test ESMTP short validators welcome")]
    d.greet()
    d.cmd("MAIL FROM:<a@b.test>")
    assert d.cmd("RCPT TO:<u@example.com>")[0] == "250"
    assert seen == ["u@example.com"]
