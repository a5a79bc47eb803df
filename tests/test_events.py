"""The edge's events (slimta_tx/events.py): one event per fact, with bounded fields, and none
built below the configured level."""

from __future__ import annotations

from typing import Any

from twisted.logger import LogLevel

from slimta_tx import Policy
from slimta_tx.events import EVENTS, REJECTION_REASONS, EdgeEvents, level_named, result_of
from tests.smtp_driver import Driver
from tests.support.logs import captured_events

MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"


def driver_at(level: LogLevel, policy: Policy | None = None) -> Driver:
    """A session of an edge whose events are at ``level`` from the start."""
    from twisted.internet.task import Clock

    from slimta_tx import SmtpEdge
    from slimta_tx.testing import RecordingBus

    clock = Clock()
    edge = SmtpEdge(RecordingBus(), policy or Policy(hostname="mx.test"), reactor=clock)
    edge.events.set_level(level)
    return Driver(edge=edge, clock=clock)


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in events if "event" in e]


def only(events: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (event,) = [e for e in events if e.get("event") == kind]
    return event


def test_a_session_at_info_builds_no_connection_events() -> None:
    """At info (twistd slimta's default) a connection costs no log event of its own; the
    transaction gets exactly one."""
    with captured_events() as events:
        d = driver_at(LogLevel.info, Policy(hostname="mx.test", accepted_domains=("example.com",)))
        d.start_data()
        d.send(MESSAGE + b".\r\nQUIT\r\n")
        d.proto.connectionLost(None)
    assert kinds(events) == ["smtp.transaction"]


def test_at_debug_connections_open_and_close() -> None:
    with captured_events() as events:
        d = Driver(peer=("198.51.100.4", 41000))
        d.start_data()
        d.send(MESSAGE + b".\r\n")
        d.clock.advance(2)
        d.send(b"QUIT\r\n")
        d.proto.connectionLost(None)
    assert kinds(events) == ["connection.open", "smtp.transaction", "connection.close"]
    opened, closed = only(events, "connection.open"), only(events, "connection.close")
    assert (opened["client"], opened["client_port"]) == ("198.51.100.4", 41000)
    assert opened["log_level"] is LogLevel.debug
    assert closed["transactions"] == 1
    assert closed["session_id"] == opened["session_id"] == d.proto.session.session_id


def test_the_transaction_event_times_the_data_and_the_bus() -> None:
    """data_seconds runs from the 354 to the final dot, bus_seconds from the dot to the bus's
    reply (the reactor's clock)."""
    from slimta_tx.reply import Reply
    from slimta_tx.testing import PendingBus

    bus = PendingBus()
    with captured_events() as events:
        d = Driver(bus=bus)
        d.start_data()
        d.clock.advance(1.5)
        d.send(MESSAGE)
        d.clock.advance(0.25)
        d.send(b".\r\n")
        d.clock.advance(3)
        bus.pending[0][2].callback(Reply("250", "Queued", "2.6.0"))
    event = only(events, "smtp.transaction")
    assert event["data_seconds"] == 1.75
    assert event["bus_seconds"] == 3
    assert event["code"] == "250" and event["result"] == "250 2.6.0"
    assert event["helo"] == "client.test" and event["rcpts"] == 1
    assert event["size"] == len(MESSAGE)


def test_rejections_carry_a_bounded_reason() -> None:
    """Relay refused, a message too big, bare newlines, too many recipients: one smtp.reject
    event each, with a reason from the closed set."""
    with captured_events() as events:
        d = Driver(policy=Policy(hostname="mx.test", max_message_size=100, max_recipients=1))
        d.greet()
        assert d.cmd("MAIL FROM:<a@b.test> SIZE=1000")[0] == "552"
        assert d.cmd("MAIL FROM:<a@b.test>")[0] == "250"
        assert d.cmd("RCPT TO:<x@elsewhere.test>")[0] == "554"
        d2 = Driver(
            policy=Policy(hostname="mx.test", accepted_domains=("example.com",), max_recipients=1)
        )
        d2.greet()
        d2.codes(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.com>\r\n")
        assert d2.cmd("RCPT TO:<v@example.com>")[0] == "452"
        assert d2.codes(b"DATA\r\n") == ["354"]
        assert d2.codes(b"bare\nnewline\r\n.\r\n") == ["550"]
    rejects = [e for e in events if e.get("event") == "smtp.reject"]
    assert [(e["reason"], e["code"]) for e in rejects] == [
        ("size", "552"),
        ("relay", "554"),
        ("recipients", "452"),
        ("bare_newline", "550"),
    ]
    assert all(e["reason"] in REJECTION_REASONS for e in rejects)
    assert all(e["log_level"] is LogLevel.info for e in rejects)


def test_syntax_errors_are_debug_events() -> None:
    with captured_events() as events:
        d = Driver()
        d.greet()
        assert d.cmd("MAIL FROM:nonsense")[0] == "501"
        assert d.cmd("DATA")[0] == "503"
    rejects = [e for e in events if e.get("event") == "smtp.reject"]
    assert [(e["reason"], e["log_level"]) for e in rejects] == [
        ("syntax", LogLevel.debug),
        ("sequence", LogLevel.debug),
    ]
    with captured_events() as events:
        d = driver_at(LogLevel.info)
        d.greet()
        d.cmd("DATA")
    assert kinds(events) == []


def test_timeouts_name_the_state() -> None:
    with captured_events() as events:
        d = Driver()
        d.greet()
        d.clock.advance(d.edge.policy.command_timeout + 1)
    event = only(events, "smtp.timeout")
    assert event["state"] == "ready" and event["client"] == "192.0.2.1"


def test_nothing_is_built_at_critical() -> None:
    with captured_events() as events:
        d = driver_at(LogLevel.critical, Policy(hostname="mx.test", max_message_size=10))
        d.greet()
        d.cmd("MAIL FROM:<a@b.test> SIZE=1000")
        d.clock.advance(1000)
    assert kinds(events) == []


def test_helpers() -> None:
    assert level_named(" WARNING ") is LogLevel.warn
    assert level_named("debug") is LogLevel.debug
    assert [result_of(c) for c in ("250", "451", "554")] == ["accepted", "tempfailed", "rejected"]
    assert set(EVENTS) >= {"smtp.transaction", "connection.open", "tls.failure", "auth.failure"}
    events = EdgeEvents()
    assert events.debug and events.info
    events.set_level(LogLevel.warn)
    assert not events.debug and not events.info


# -- the twisted.logger internals relied on (issue 14) ------------------------------------------


def test_logger_emit_adds_the_keys_the_events_add_themselves_then_calls_observer() -> None:
    """Fails loudly when Logger.emit's event changes shape: the events here build it
    themselves (EMIT_KEYS) and call ``Logger.observer`` as emit does."""
    from typing import cast

    from twisted.logger import ILogObserver, Logger

    from slimta_tx import events as events_module

    seen: list[dict[str, Any]] = []
    observer = cast(ILogObserver, seen.append)
    log = Logger(namespace="n", source="s", observer=observer)
    assert log.observer is observer
    log.emit(LogLevel.info, "hello {who}", who="you")
    (emitted,) = seen
    assert set(emitted) == {"who", *events_module.EMIT_KEYS}
    assert emitted["log_logger"] is log and emitted["log_level"] is LogLevel.info
    assert (emitted["log_namespace"], emitted["log_source"]) == ("n", "s")
    assert emitted["log_format"] == "hello {who}" and isinstance(emitted["log_time"], float)
    assert events_module._DIRECT


def _transaction_and_rejection() -> list[dict[str, Any]]:
    with captured_events() as events:
        d = driver_at(LogLevel.info, Policy(hostname="mx.test", accepted_domains=("example.com",)))
        d.send(b"EHLO client.test\r\n")
        d.send(b"MAIL FROM:<a@example.org>\r\n")
        d.send(b"RCPT TO:<b@elsewhere.test>\r\n")  # relay refused: an smtp.reject event
        d.start_data()
        d.send(MESSAGE + b".\r\n")
    return [e for e in events if "event" in e]


def test_events_are_those_logger_emit_would_have_made() -> None:
    from twisted.logger import formatEvent

    from slimta_tx.events import EMIT_KEYS

    events = _transaction_and_rejection()
    assert [e["event"] for e in events] == ["smtp.reject", "smtp.transaction"]
    for event in events:
        assert set(EMIT_KEYS) <= set(event)
        assert formatEvent(event)  # the format and its fields agree


#: Fields that differ between two runs of the same session (times, ids, objects).
_VARYING = frozenset(
    {
        "log_time",
        "log_logger",
        "session_id",
        "queue_id",
        "seconds",
        "connect_to_mail_seconds",
        "log_source",
    }
)


def _stable(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k not in _VARYING}


def test_without_logger_observer_events_go_through_emit_with_one_warning(
    monkeypatch: Any,
) -> None:
    from slimta_tx import events as events_module

    direct = _transaction_and_rejection()
    monkeypatch.setattr(events_module, "_DIRECT", False)
    monkeypatch.setattr(events_module, "_warned", False)
    with captured_events() as warnings:
        driver_at(LogLevel.info)
        driver_at(LogLevel.info)
    assert [e["log_format"] for e in warnings if e["log_level"] is LogLevel.warn] == [
        "twisted.logger.Logger has no observer: events go through Logger.emit"
    ]
    through_emit = _transaction_and_rejection()
    assert [e["event"] for e in through_emit] == [e["event"] for e in direct]
    for a, b in zip(direct, through_emit, strict=True):
        assert set(a) == set(b)
        assert _stable(a) == _stable(b)
