"""The direct way of a transaction to the log sink (slimta_tx/events.py, slimta_tx/logsink.py).

When a :class:`LogSink` is the only observer of the global log publisher (``twistd slimta``'s
log), ``EdgeEvents.transaction`` hands it the facts without building the event. These tests
show that nothing a user sees changes: the same bytes in both formats, whatever the client
sent; every other observer still gets the events; and the private ``LogPublisher._observers``
it relies on is pinned.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest
from twisted.logger import (
    ILogObserver,
    Logger,
    LogLevel,
    LogPublisher,
    globalLogBeginner,
    globalLogPublisher,
)

from slimta_tx import events as events_module
from slimta_tx.envelope import Envelope, Session, TLSInfo
from slimta_tx.events import EdgeEvents
from slimta_tx.logsink import LogSink
from slimta_tx.reply import Reply
from tests.test_logsink import HOSTILE, Out, Reactor

NOW = 1_764_990_570.1239  # 2025-12-06T03:09:30.123Z


@pytest.fixture(autouse=True)
def frozen_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways read the clock once per event: the same time makes the same line."""
    monkeypatch.setattr(time, "time", lambda: NOW)


@pytest.fixture
def publisher(monkeypatch: pytest.MonkeyPatch) -> LogPublisher:
    """A publisher standing for the global one (the events' direct way watches it)."""
    publisher = LogPublisher()
    monkeypatch.setattr(events_module, "_PUBLISHER", publisher)
    return publisher


class Counting(LogSink):
    """Not a LogSink for the direct way (its type is another): counts what it formats."""


def calls_of_the_sink(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The events handed to any LogSink as events (the way that is not the direct one)."""
    seen: list[dict[str, Any]] = []
    call = LogSink.__call__

    def spy(self: LogSink, event: dict[str, Any]) -> None:
        seen.append(event)
        call(self, event)

    monkeypatch.setattr(LogSink, "__call__", spy)
    return seen


def transaction(
    events: EdgeEvents,
    helo: str | None = "mail.example.org",
    sender: str = "a@example.org",
    tls: bool = False,
    reply: Reply | None = None,
    data_seconds: float | None = 0.0125,
    bus_seconds: float | None = 0.25,
) -> None:
    session = Session(address=("192.0.2.7", 40001), ehlo_as=helo, session_id="9A67309A63A579C6")
    session.connected_at = NOW - 2.5
    if tls:
        session.tls = TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384")
        session.security = "TLS"
        session.authed = "alice"
    envelope = Envelope.start(session, sender, {})
    envelope.received_at = NOW - 0.0032114
    envelope.queue_id = "25U6CNCLVERPAOSS"
    envelope.add_recipient("b@example.com", {})
    envelope.add_recipient("c@example.com", {})
    events.transaction(
        session, envelope, reply or Reply("250", "queued", "2.6.0"), data_seconds, bus_seconds
    )


def lines(fmt: str, publisher: LogPublisher, direct: bool, **kwargs: Any) -> str:
    """The sink's output for one transaction, the direct way or the event's way."""
    out = Out()
    sink = LogSink(out, LogLevel.info, fmt, Reactor())
    events = EdgeEvents(level=LogLevel.info)
    if direct:
        publisher.addObserver(sink)
        events.log = Logger(namespace=events.log.namespace, observer=publisher)
    else:
        events.log = Logger(namespace=events.log.namespace, observer=LogPublisher(sink))
    try:
        transaction(events, **kwargs)
    finally:
        publisher.removeObserver(sink)
    sink.flush()
    return out.text


ODD = [
    {},
    {"tls": True},
    {"helo": None},
    {"helo": "sm\u00f6rg\u00e5s.\u4f8b\u3048", "sender": "d\u00e9d\u00e9@ex\u00e4mple.test"},
    {"data_seconds": None, "bus_seconds": None},
    {"bus_seconds": None},
    {"reply": Reply("451", "try later", "4.3.0")},
    {"reply": Reply("250", "ok")},
    *({"helo": text, "sender": text + "@example.org"} for text in HOSTILE),
]


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize("kwargs", ODD)
def test_the_direct_way_writes_what_the_event_wrote(
    fmt: str, kwargs: dict[str, Any], publisher: LogPublisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Byte for byte, for the usual line and for odd client text (quotes, escapes, non-ASCII,
    no HELO), and the direct way was taken (the sink was not handed an event)."""
    seen = calls_of_the_sink(monkeypatch)
    expected = lines(fmt, publisher, False, **kwargs)
    assert len(seen) == 1
    assert lines(fmt, publisher, True, **kwargs) == expected
    assert len(seen) == 1  # the direct way: no event
    assert expected.count("\n") == 1


def test_the_usual_json_line_is_the_documented_one(publisher: LogPublisher) -> None:
    assert lines("json", publisher, True, tls=True) == (
        '{"time":"2025-12-06T03:09:30.123Z","level":"info",'
        '"namespace":"slimta_tx.factory.SmtpEdge","message":"192.0.2.7 helo=mail.example.org '
        'from=<a@example.org> rcpts=2 size=0 id=25U6CNCLVERPAOSS result=250 2.6.0 0.003s",'
        '"event":"smtp.transaction","client":"192.0.2.7","helo":"mail.example.org",'
        '"sender":"a@example.org","rcpts":2,"size":0,"queue_id":"25U6CNCLVERPAOSS",'
        '"session_id":"9A67309A63A579C6","result":"250 2.6.0","code":"250",'
        '"tls_version":"TLSv1.3","tls_cipher":"TLS_AES_256_GCM_SHA384","auth":"alice",'
        '"seconds":0.003211,'
        '"connect_to_mail_seconds":2.496789,"data_seconds":0.012500,"bus_seconds":0.250000}\n'
    )


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_line_break_in_client_text_takes_the_events_way(
    fmt: str, publisher: LogPublisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The text format indents a continuation line (as Twisted does): the direct way leaves
    such a line to the event's way, which writes it as before."""
    seen = calls_of_the_sink(monkeypatch)
    expected = lines(fmt, publisher, False, helo="two\nlines")
    assert lines(fmt, publisher, True, helo="two\nlines") == expected
    if fmt == "text":
        assert "helo=two\n\tlines" in expected and len(seen) == 2
    else:
        assert json.loads(expected)["helo"] == "two\nlines" and len(seen) == 1


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_an_unexpected_type_takes_the_events_way(
    fmt: str, publisher: LogPublisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A HELO that is not text (no client can send that, but an embedding application could
    make such a session) is written as the event's way writes it."""
    seen = calls_of_the_sink(monkeypatch)
    odd = cast(str, 42)
    expected = lines(fmt, publisher, False, helo=odd)
    assert lines(fmt, publisher, True, helo=odd) == expected
    assert len(seen) == (2 if fmt == "json" else 1)


def test_below_the_sinks_level_nothing_is_written(publisher: LogPublisher) -> None:
    out = Out()
    sink = LogSink(out, LogLevel.warn, "text", Reactor())
    publisher.addObserver(sink)
    events = EdgeEvents(level=LogLevel.info)
    events.log = Logger(namespace=events.log.namespace, observer=publisher)
    transaction(events)
    sink.flush()
    assert out.text == ""


def test_direct_lines_wait_for_the_end_of_the_pass_with_the_others(
    publisher: LogPublisher,
) -> None:
    """One write per reactor pass, in order, whichever way each line came."""
    out, reactor = Out(), Reactor()
    sink = LogSink(out, LogLevel.info, "text", reactor)
    publisher.addObserver(sink)
    events = EdgeEvents(level=LogLevel.info)
    events.log = Logger(namespace=events.log.namespace, observer=publisher)
    transaction(events)
    Logger(namespace="other", observer=publisher).info("between")
    transaction(events, helo="second.example")
    assert out.writes == []
    reactor.advance(0)
    assert len(out.writes) == 1
    first, between, second = out.text.splitlines()
    assert "helo=mail.example.org" in first and "between" in between
    assert "helo=second.example" in second


def test_every_other_observer_still_gets_the_events(
    publisher: LogPublisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An observer added beside the sink (an application's, a test's, a worker's link to
    its parent) sees each transaction as an event from the next message on, and the sink
    writes the same line; once it is gone, the direct way again."""
    seen = calls_of_the_sink(monkeypatch)
    out = Out()
    sink = LogSink(out, LogLevel.info, "json", Reactor())
    publisher.addObserver(sink)
    events = EdgeEvents(level=LogLevel.info)
    events.log = Logger(namespace=events.log.namespace, observer=publisher)
    other: list[dict[str, Any]] = []
    observer = cast(ILogObserver, other.append)

    transaction(events)
    assert (len(seen), other) == (0, [])
    publisher.addObserver(observer)
    transaction(events)
    (event,) = other
    assert event["event"] == "smtp.transaction" and event["log_level"] is LogLevel.info
    assert len(seen) == 1
    publisher.removeObserver(observer)
    transaction(events)
    assert len(other) == 1 and len(seen) == 1
    sink.flush()
    one, two, three = (json.loads(line) for line in out.text.splitlines())
    assert one == two == three


def test_a_logger_with_its_own_observer_gets_events(publisher: LogPublisher) -> None:
    """Tests and applications that give the edge a Logger of their own keep getting events."""
    publisher.addObserver(LogSink(Out(), LogLevel.info, "text", Reactor()))
    captured: list[dict[str, Any]] = []
    events = EdgeEvents(level=LogLevel.info)
    events.log = Logger(namespace="mine", observer=cast(ILogObserver, captured.append))
    transaction(events)
    assert [e["event"] for e in captured] == ["smtp.transaction"]


def test_only_a_logsink_itself_is_taken_directly(
    publisher: LogPublisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subclass (which may do more with each event) gets events."""
    seen = calls_of_the_sink(monkeypatch)
    out = Out()
    publisher.addObserver(Counting(out, LogLevel.info, "text", Reactor()))
    events = EdgeEvents(level=LogLevel.info)
    events.log = Logger(namespace=events.log.namespace, observer=publisher)
    transaction(events)
    assert len(seen) == 1


def test_metrics_count_whichever_way_the_line_goes(publisher: LogPublisher) -> None:
    counted: list[str] = []

    class Metrics:
        def transaction(self, envelope: Envelope, reply: Reply, bus: float | None) -> None:
            counted.append(reply.code)

    publisher.addObserver(LogSink(Out(), LogLevel.info, "text", Reactor()))
    events = EdgeEvents(level=LogLevel.info)
    events.log = Logger(namespace=events.log.namespace, observer=publisher)
    events.metrics = cast(Any, Metrics())
    transaction(events)
    events.set_level(LogLevel.critical)
    transaction(events)
    assert counted == ["250", "250"]


# -- the private internal relied on: LogPublisher._observers -----------------------------------


@pytest.fixture
def global_sink() -> Iterator[tuple[LogSink, Out]]:
    """A LogSink as the only observer of the real global publisher (as twistd installs it),
    and the observers that were there put back after."""
    observers = globalLogPublisher._observers
    kept = list(observers)
    for observer in kept:
        globalLogPublisher.removeObserver(observer)
    out = Out()
    sink = LogSink(out, LogLevel.info, "text", Reactor())
    globalLogPublisher.addObserver(sink)
    try:
        yield sink, out
    finally:
        globalLogPublisher.removeObserver(sink)
        for observer in kept:
            globalLogPublisher.addObserver(observer)


def test_log_publisher_keeps_its_observers_in_a_list_it_calls() -> None:
    """Fails by name when Twisted changes ``LogPublisher._observers``: the direct way is
    taken only when that list is exactly one LogSink, so the list must be every observer the
    publisher calls, added and removed as observers are."""
    seen_a: list[dict[str, Any]] = []
    seen_b: list[dict[str, Any]] = []
    obs_a, obs_b = cast(ILogObserver, seen_a.append), cast(ILogObserver, seen_b.append)
    publisher = LogPublisher(obs_a)
    observers = publisher._observers
    assert type(observers) is list and observers == [obs_a]
    publisher.addObserver(obs_b)
    assert publisher._observers is observers and observers == [obs_a, obs_b]
    publisher({"x": 1})
    assert seen_a == seen_b == [{"x": 1}]
    publisher.removeObserver(obs_a)
    assert observers == [obs_b]
    assert type(globalLogPublisher._observers) is list
    assert globalLogBeginner._publisher is globalLogPublisher
    assert events_module._SOLE and events_module._PUBLISHER is globalLogPublisher


def test_the_global_publisher_with_only_a_sink_is_taken_directly(
    global_sink: tuple[LogSink, Out], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As under ``twistd slimta``: the edge's own Logger, the global publisher."""
    seen = calls_of_the_sink(monkeypatch)
    sink, out = global_sink
    events = EdgeEvents(level=LogLevel.info)
    assert events.log.observer is globalLogPublisher
    transaction(events)
    sink.flush()
    assert seen == [] and out.text.count("\n") == 1
    captured: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(cast(ILogObserver, captured.append))
    try:
        transaction(events)
    finally:
        globalLogPublisher.removeObserver(cast(ILogObserver, captured.append))
    assert [e["event"] for e in captured] == ["smtp.transaction"] and len(seen) == 1


def test_without_the_observers_list_every_transaction_is_an_event(
    global_sink: tuple[LogSink, Out], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard: on a Twisted whose publisher has no ``_observers`` list, the events' way,
    with one warning."""
    seen = calls_of_the_sink(monkeypatch)
    monkeypatch.setattr(events_module, "_SOLE", False)
    monkeypatch.setattr(events_module, "_warned_sole", False)
    sink, out = global_sink
    events = EdgeEvents(level=LogLevel.info)
    EdgeEvents(level=LogLevel.info)
    transaction(events)
    sink.flush()
    warnings = [line for line in out.text.splitlines() if "#warn]" in line]
    assert len(warnings) == 1 and "_observers" in warnings[0]
    assert len(seen) == 2  # the warning and the transaction


def test_a_sink_that_fails_does_not_break_the_session(publisher: LogPublisher) -> None:
    """As the publisher swallowed what its observers raised, the direct way does: a reactor
    that cannot schedule the end-of-pass write costs the line, never the message."""

    class NoTimers:
        running = True

    sink = LogSink(Out(), LogLevel.info, "text", NoTimers())
    publisher.addObserver(sink)
    events = EdgeEvents(level=LogLevel.info)
    events.log = Logger(namespace=events.log.namespace, observer=publisher)
    transaction(events)
    transaction(events)
