"""PIPELINING (RFC 2920): replies in order, one write per group, input paused while waiting."""

from __future__ import annotations

from smtp_driver import Driver
from twisted.internet.defer import Deferred

from slimta_tx import Reply
from slimta_tx.testing import PendingBus

GROUP = b"MAIL FROM:<a@b.test>\r\nRCPT TO:<1@example.com>\r\nRCPT TO:<2@example.com>\r\nDATA\r\n"


def test_a_pipelined_group_is_answered_in_one_write() -> None:
    d = Driver()
    d.greet()
    d.writes.clear()
    assert d.codes(GROUP) == ["250", "250", "250", "354"]
    assert len(d.writes) == 1


def test_message_and_next_commands_in_one_packet() -> None:
    """End of data followed by pipelined commands: each answered, in order."""
    d = Driver()
    d.greet()
    d.send(GROUP)
    d.writes.clear()
    replies = d.send(b"body\r\n.\r\nMAIL FROM:<c@d.test>\r\nRCPT TO:<3@example.com>\r\nNOOP\r\n")
    assert [code for code, _ in replies] == ["250", "250", "250", "250"]
    assert replies[0][1].startswith("2.6.0 Message queued as ")
    assert len(d.writes) == 1


def test_pending_bus_pauses_input_and_keeps_order() -> None:
    """While the bus works, nothing after the dot is answered; then all of it, in order."""
    bus = PendingBus()
    d = Driver(bus=bus)
    d.greet()
    d.send(GROUP)
    assert d.send(b"body\r\n.\r\nRSET\r\nMAIL FROM:<c@d.test>\r\nQUIT\r\n") == []
    assert d.transport.producerState == "paused"
    bus.pending[0][2].callback(Reply("250", "stored", "2.6.0"))
    assert d.read() == [
        ("250", "2.6.0 stored"),
        ("250", "2.0.0 Ok"),
        ("250", "2.1.0 Sender <c@d.test> ok"),
        ("221", "2.0.0 mx.test Bye"),
    ]
    assert d.closed


def test_slow_validators_keep_replies_in_order() -> None:
    """Asynchronous MAIL and RCPT validators: replies still come in command order, and the
    whole group is answered in one write once the last slow validator has answered."""
    d = Driver()
    pending: list[tuple[Reply, Deferred[None]]] = []

    def slow(session: object, reply: Reply, *extra: object) -> Deferred[None]:
        waiting: Deferred[None] = Deferred()
        pending.append((reply, waiting))
        return waiting

    d.edge.set_validator("MAIL", slow)
    d.edge.set_validator("RCPT", slow)
    d.greet()
    d.writes.clear()
    assert d.send(GROUP) == []
    # Only the MAIL validator runs until it answers: one command at a time.
    assert len(pending) == 1
    reply, waiting = pending.pop()
    waiting.callback(None)
    reply, waiting = pending.pop()
    reply.set("550", "No such user", "5.1.1")
    waiting.callback(None)
    # The rest of the group is still buffered: nothing is written yet.
    assert d.read() == []
    reply, waiting = pending.pop()
    waiting.callback(None)
    assert d.read() == [
        ("250", "2.1.0 Sender <a@b.test> ok"),
        ("550", "5.1.1 No such user"),
        ("250", "2.1.5 Recipient <2@example.com> ok"),
        ("354", "End data with <CR><LF>.<CR><LF>"),
    ]
    assert len(d.writes) == 1
