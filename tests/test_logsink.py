"""The log sink of ``twistd slimta`` (slimta_tx/logsink.py): what is written, when, and how."""

from __future__ import annotations

import json
import re
import threading
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, LogPublisher, formatEventAsClassicLogText, formatTime
from twisted.python.failure import Failure

from slimta_tx.envelope import Envelope, Session, TLSInfo
from slimta_tx.events import EdgeEvents
from slimta_tx.logsink import LogSink
from slimta_tx.reply import Reply


class Out:
    """A destination that records each write and flush."""

    def __init__(self) -> None:
        self.writes: list[str] = []
        self.flushes = 0

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        self.flushes += 1

    @property
    def text(self) -> str:
        return "".join(self.writes)


class Reactor(Clock):
    """A running reactor's clock, with system event triggers."""

    def __init__(self) -> None:
        super().__init__()
        self.running = True
        self.triggers: list[tuple[str, str, Any]] = []

    def addSystemEventTrigger(self, phase: str, event: str, f: Any) -> object:
        self.triggers.append((phase, event, f))
        return (phase, event, f)

    def removeSystemEventTrigger(self, trigger: Any) -> None:
        self.triggers.remove(trigger)

    def shut_down(self) -> None:
        self.running = False
        for _phase, event, f in list(self.triggers):
            if event == "shutdown":
                f()


def sink_and_logger(
    level: LogLevel = LogLevel.info, fmt: str = "text"
) -> tuple[LogSink, Out, Reactor, Logger]:
    out, reactor = Out(), Reactor()
    sink = LogSink(out, level, fmt, reactor)
    publisher = LogPublisher(sink)
    return sink, out, reactor, Logger(namespace="test.ns", observer=publisher)


def transaction_event(tls: bool = False) -> tuple[EdgeEvents, list[dict[str, Any]]]:
    """One smtp.transaction event, captured."""
    captured: list[dict[str, Any]] = []
    events = EdgeEvents(source=None, level=LogLevel.info)
    events.log = Logger(namespace=events.log.namespace, observer=captured.append)
    session = Session(address=("192.0.2.7", 40001), ehlo_as="mail.example.org")
    if tls:
        session.tls = TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384")
        session.security = "TLS"
        session.authed = "alice"
    envelope = Envelope.start(session, "a@example.org", {})
    envelope.add_recipient("b@example.com", {})
    events.transaction(session, envelope, Reply("250", "queued", "2.6.0"), 0.0125, 0.25)
    return events, captured


# -- what is written ---------------------------------------------------------------------------


def test_below_the_level_nothing_is_formatted() -> None:
    """A debug event at level info is dropped before its fields are ever formatted."""
    formatted = []

    class Spy:
        def __format__(self, spec: str) -> str:
            formatted.append(spec)
            return "spy"

    sink, out, reactor, log = sink_and_logger(LogLevel.info)
    log.debug("{spy}", spy=Spy())
    reactor.advance(0)
    sink.flush()
    assert out.writes == [] and formatted == []
    log.info("{spy}", spy=Spy())
    sink.flush()
    assert formatted == [""] and out.text.endswith("[test.ns#info] spy\n")


def test_text_lines_are_twistds_own() -> None:
    """The text format is exactly twistd's file observer format, for the fast-formatted
    transaction event as for any other."""
    _, (event,) = transaction_event()
    sink, out, _, log = sink_and_logger()
    sink(event)
    log.info("hello {who}", who="there")
    sink.flush()
    first, second = out.text.splitlines(keepends=True)
    assert first == formatEventAsClassicLogText(event, formatTime)
    assert first.endswith(
        "[slimta_tx.factory.SmtpEdge#info] 192.0.2.7 helo=mail.example.org "
        "from=<a@example.org> rcpts=1 size=0 id=" + event["queue_id"] + " result=250 2.6.0 "
        f"{event['seconds']:.3f}s\n"
    )
    assert re.match(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[test\.ns#info\] hello there\n", second
    )


def test_json_transaction_event_carries_what_operators_query() -> None:
    """One JSON object per line with the transaction's facts as fields (issue 13)."""
    _, (event,) = transaction_event(tls=True)
    sink, out, _, _ = sink_and_logger(fmt="json")
    sink(event)
    sink.flush()
    (line,) = out.text.splitlines()
    record = json.loads(line)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])
    assert record["level"] == "info"
    assert record["namespace"] == "slimta_tx.factory.SmtpEdge"
    assert record["event"] == "smtp.transaction"
    assert record["message"].startswith("192.0.2.7 helo=mail.example.org from=<a@example.org>")
    assert {k: record[k] for k in ("client", "helo", "sender", "rcpts", "size", "code")} == {
        "client": "192.0.2.7",
        "helo": "mail.example.org",
        "sender": "a@example.org",
        "rcpts": 1,
        "size": 0,
        "code": "250",
    }
    assert record["queue_id"] == event["queue_id"]
    assert (record["tls_version"], record["tls_cipher"], record["auth"]) == (
        "TLSv1.3",
        "TLS_AES_256_GCM_SHA384",
        "alice",
    )
    assert (record["data_seconds"], record["bus_seconds"]) == (0.0125, 0.25)
    assert record["connect_to_mail_seconds"] >= 0
    assert not any(key.startswith("log_") for key in record)
    # The hand-written JSON line holds exactly the event's fields, with their values (the
    # durations to the microsecond).
    fields = {k: v for k, v in event.items() if not k.startswith("log_")}
    assert set(record) == set(fields) | {"time", "level", "namespace", "message"}
    assert all(record[k] == to_the_microsecond(k, v) for k, v in fields.items())


def test_json_other_events_are_plain_data() -> None:
    """Values that are not JSON become strings; a field named like a header field is renamed;
    a failure gives its error and traceback."""
    sink, out, _, log = sink_and_logger(fmt="json")
    log.info("{message} {obj}", message="text", obj=object(), time=3, items=("a", 1))
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.failure("it broke", Failure())
    sink.flush()
    plain, broken = (json.loads(line) for line in out.text.splitlines())
    assert plain["field_message"] == "text" and plain["field_time"] == 3
    assert plain["obj"].startswith("<object object at ")
    assert plain["items"] == ["a", 1]
    assert plain["message"].startswith("text <object object at ")
    assert broken["level"] == "critical"
    assert broken["error"].startswith("ZeroDivisionError: ")
    assert "Traceback" in broken["traceback"] and "1 / 0" in broken["traceback"]


def test_non_ascii_is_escaped_in_json() -> None:
    """SMTPUTF8 addresses and HELO names stay valid JSON (and ASCII) whatever they hold."""
    sink, out, _, log = sink_and_logger(fmt="json")
    log.info("{sender}", sender="dédé@exämple.test\udcff")
    sink.flush()
    line = out.writes[0]
    assert line.isascii()
    assert json.loads(line)["sender"] == "dédé@exämple.test\udcff"


# Client text as a HELO name or a sender can hold it (the protocol refuses CR, LF, NUL and
# invalid UTF-8 in commands; everything else reaches the log).
HOSTILE = [
    'q"uote',
    "back\\slash\\",
    '"},"result":"250","x":{"',
    "ctl\x01\x1b[31m\x7f\ttab",
    "sm\u00f6rg\u00e5s.\u4f8b\u3048",
    "line\u2028sep\u2029",
    "\\u0000 not a NUL",
    "emoji \U0001f4e7",
]


DURATIONS = ("seconds", "connect_to_mail_seconds", "data_seconds", "bus_seconds")


def to_the_microsecond(key: str, value: Any) -> Any:
    """A field's value as the JSON line holds it: durations to the microsecond."""
    return round(value, 6) if key in DURATIONS and value is not None else value


def hostile_event(helo: str, sender: str) -> dict[str, Any]:
    _, (event,) = transaction_event(tls=True)
    event["helo"], event["sender"] = helo, sender
    return event


@pytest.mark.parametrize("text", HOSTILE)
def test_json_transaction_escapes_client_text(text: str) -> None:
    """Whatever a client puts in its HELO name and sender, the transaction's JSON line is one
    line of ASCII that parses to exactly what was sent, in the fields and in the message, and
    the same object as the generic encoder gives."""
    event = hostile_event(text, text + "@example.org")
    sink, out, _, _ = sink_and_logger(fmt="json")
    sink(event)
    sink.flush()
    line = out.text
    assert line.isascii() and line.count("\n") == 1 and line.endswith("}\n")
    record = json.loads(line)
    assert record["helo"] == text and record["sender"] == text + "@example.org"
    assert f" helo={text} from=<{text}@example.org> " in record["message"]
    assert record["result"] == "250 2.6.0" and "x" not in record
    generic = json.loads(sink._json_generic(event, LogLevel.info))
    assert record == {k: to_the_microsecond(k, v) for k, v in generic.items()}


@pytest.mark.parametrize("text", HOSTILE)
def test_text_transaction_line_is_twistds_for_any_client_text(text: str) -> None:
    event = hostile_event(text, text)
    sink, out, _, _ = sink_and_logger()
    sink(event)
    sink.flush()
    assert out.text == formatEventAsClassicLogText(event, formatTime)


def test_json_transaction_of_unexpected_types_takes_the_generic_way() -> None:
    """A field the template does not expect (a missing HELO, a count as text) still gives a
    valid line, with the values as they are."""
    for changes in ({"helo": None}, {"rcpts": "2"}, {"data_seconds": None, "auth": None}):
        _, (event,) = transaction_event()
        event.update(changes)
        sink, out, _, _ = sink_and_logger(fmt="json")
        sink(event)
        sink.flush()
        record = json.loads(out.text)
        assert all(record[k] == v for k, v in changes.items())
        assert record["event"] == "smtp.transaction"


def test_json_time_has_milliseconds_truncated() -> None:
    """The time field says the millisecond the event happened in (never rounded up into the
    next second)."""
    _, (event,) = transaction_event()
    sink, out, _, _ = sink_and_logger(fmt="json")
    for when in (1_700_000_000.9996, 1_700_000_001.0004, 1_700_000_001.5):
        event["log_time"] = when
        sink(event)
    sink.flush()
    times = [json.loads(line)["time"] for line in out.text.splitlines()]
    assert times == [
        "2023-11-14T22:13:20.999Z",
        "2023-11-14T22:13:21.000Z",
        "2023-11-14T22:13:21.500Z",
    ]


def test_json_durations_are_the_events_numbers() -> None:
    _, (event,) = transaction_event()
    sink, out, _, _ = sink_and_logger(fmt="json")
    for seconds in (0.0, 0.000001, 0.0125, 1.0, 123.456789):  # written with six decimals
        event["seconds"] = event["bus_seconds"] = seconds
        sink(event)
    sink.flush()
    values = (0.0, 0.000001, 0.0125, 1.0, 123.456789)
    for seconds, line in zip(values, out.text.splitlines(), strict=True):
        record = json.loads(line)
        assert record["seconds"] == seconds and record["bus_seconds"] == seconds


def test_an_unformattable_event_is_reported_not_raised() -> None:
    class Broken:
        def __format__(self, spec: str) -> str:
            raise RuntimeError("no")

    for fmt in ("text", "json"):
        sink, out, _, log = sink_and_logger(fmt=fmt)
        log.info("{x}", x=Broken())
        sink.flush()
        assert "unformattable" in out.text or "Unable to format event" in out.text


# -- when it is written ------------------------------------------------------------------------


def test_lines_of_one_reactor_pass_are_one_write() -> None:
    """Info lines wait for the end of the reactor pass, then go out in one write and flush."""
    _sink, out, reactor, log = sink_and_logger()
    for i in range(5):
        log.info("line {i}", i=i)
    assert out.writes == []
    reactor.advance(0)
    assert len(out.writes) == 1 and out.flushes == 1
    assert [line.rsplit(" ", 1)[1] for line in out.text.splitlines()] == list("01234")
    reactor.advance(0)
    assert len(out.writes) == 1  # nothing more to write, no empty write


def test_warnings_and_errors_are_written_at_once_after_what_came_before() -> None:
    _sink, out, reactor, log = sink_and_logger()
    log.info("first")
    log.warn("then a warning")
    assert len(out.writes) == 1
    assert out.text.splitlines()[0].endswith("first")
    assert out.text.splitlines()[1].endswith("then a warning")
    log.error("an error")
    assert len(out.writes) == 2
    reactor.advance(0)  # the end of the pass: nothing left to write
    assert len(out.writes) == 2


def test_at_reactor_shutdown_everything_is_written() -> None:
    """The sink flushes on the reactor's shutdown, and writes at once once it has stopped."""
    sink, out, reactor, log = sink_and_logger()
    log.info("before shutdown")
    assert out.writes == []
    reactor.shut_down()
    assert out.text.endswith("before shutdown\n")
    log.info("Server Shut Down.")  # what twistd logs after the reactor stopped
    assert out.text.endswith("Server Shut Down.\n")
    sink.stop()
    assert reactor.triggers == []


def test_events_from_other_threads_are_written_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from twisted.python import threadable

    monkeypatch.setattr(threadable, "ioThread", threading.get_ident())
    _sink, out, _reactor, log = sink_and_logger()
    log.info("from the reactor thread")
    assert out.writes == []
    worker = threading.Thread(target=lambda: log.info("from a worker thread"))
    worker.start()
    worker.join(10)
    assert out.text.splitlines()[-1].endswith("from a worker thread")
    assert len(out.text.splitlines()) == 2


def test_a_burst_is_written_before_it_grows_large() -> None:
    _sink, out, reactor, log = sink_and_logger()
    for i in range(2000):
        log.info("{i} " + "x" * 100, i=i)
    assert out.writes, "64 KiB kept: written without waiting for the end of the pass"
    assert sum(len(w) for w in out.writes) <= 2000 * 200
    reactor.advance(0)
    assert len(out.text.splitlines()) == 2000


def test_a_failing_destination_does_not_break_logging() -> None:
    class Full(Out):
        def write(self, text: str) -> None:
            raise OSError(28, "No space left on device")

    reactor = Reactor()
    sink = LogSink(Full(), LogLevel.info, "text", reactor)
    log = Logger(namespace="test", observer=LogPublisher(sink))
    log.error("lost")  # no exception
    log.info("kept, then lost")
    reactor.advance(0)


def test_bad_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log format must be one of text, json"):
        LogSink(Out(), LogLevel.info, "xml", Reactor())
