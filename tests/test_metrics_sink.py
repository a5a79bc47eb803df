"""The metrics sink (slimta_tx/metrics/sink.py) fed by real sessions on a StringTransport with a
Clock: each event counts once, with bounded labels; readiness and the HTTP pages."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.web.test.requesthelper import DummyRequest

from slimta_tx import Policy, SmtpEdge
from slimta_tx.envelope import TLSInfo
from slimta_tx.events import REJECTION_REASONS, TIME_LIMITS
from slimta_tx.metrics import EdgeMetrics, labels
from slimta_tx.metrics.health import ReadinessReporter, bus_readiness
from slimta_tx.metrics.http import HealthPage, MetricsPage
from slimta_tx.metrics.sink import metric_names
from slimta_tx.reply import Reply
from slimta_tx.testing import FailingBus, RecordingBus
from tests.smtp_driver import Driver

MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"


def metered(
    bus: Any = None, policy: Policy | None = None, level: LogLevel = LogLevel.info
) -> tuple[Driver, EdgeMetrics]:
    """A session of an edge that counts into a registry of its own."""
    clock = Clock()
    edge = SmtpEdge(
        bus if bus is not None else RecordingBus(),
        policy or Policy(hostname="mx.test", accepted_domains=("example.com",)),
        reactor=clock,
    )
    edge.events.set_level(level)
    metrics = EdgeMetrics("maildir", CollectorRegistry())
    edge.events.metrics = metrics
    return Driver(edge=edge, clock=clock), metrics


def value(metrics: EdgeMetrics, name: str, **label_values: str) -> float:
    """What a scrape would say now (the page flushes the counts first)."""
    metrics.flush()
    found = metrics.registry.get_sample_value(name, label_values)
    return 0.0 if found is None else found


def test_an_accepted_message_counts_once_in_each_metric() -> None:
    d, metrics = metered()
    assert value(metrics, "slimta_tx_connections_total", listener="smtp", tls="none") == 1
    assert value(metrics, "slimta_tx_connections_open") == 1
    d.start_data()
    d.clock.advance(0.5)
    d.send(MESSAGE + b".\r\n")
    assert value(metrics, "slimta_tx_messages_total", result="accepted") == 1
    assert value(metrics, "slimta_tx_recipients_total", result="accepted") == 1
    assert value(metrics, "slimta_tx_replies_total", code="2.6.x") == 1
    assert value(metrics, "slimta_tx_message_size_bytes_count") == 1
    assert value(metrics, "slimta_tx_message_size_bytes_sum") == len(MESSAGE)
    assert value(metrics, "slimta_tx_bus_seconds_count", bus="maildir") == 1
    d.send(b"QUIT\r\n")
    d.proto.connectionLost(None)
    assert value(metrics, "slimta_tx_connections_open") == 0


def test_counts_do_not_depend_on_the_log_level() -> None:
    d, metrics = metered(level=LogLevel.critical)
    d.start_data()
    d.send(MESSAGE + b".\r\n")
    assert value(metrics, "slimta_tx_messages_total", result="accepted") == 1


def test_relay_refusal_counts_a_rejection_and_no_message() -> None:
    d, metrics = metered()
    d.greet()
    assert d.codes(b"MAIL FROM:<a@sender.test>\r\n") == ["250"]
    code, _ = d.cmd("RCPT TO:<someone@elsewhere.test>")
    assert code.startswith("5")
    assert value(metrics, "slimta_tx_rejections_total", reason="relay") == 1
    assert value(metrics, "slimta_tx_replies_total", code="5.7.x") == 0  # no message
    assert value(metrics, "slimta_tx_messages_total", result="rejected") == 0


def test_an_oversized_body_is_a_size_rejection_without_a_bus_time() -> None:
    policy = Policy(hostname="mx.test", accepted_domains=("example.com",), max_message_size=100)
    d, metrics = metered(policy=policy)
    d.start_data()
    assert d.codes(b"Subject: big\r\n\r\n" + b"x" * 200 + b"\r\n.\r\n") == ["552"]
    assert value(metrics, "slimta_tx_rejections_total", reason="size") == 1
    assert value(metrics, "slimta_tx_messages_total", result="rejected") == 1
    assert value(metrics, "slimta_tx_message_size_bytes_count") == 0
    assert value(metrics, "slimta_tx_bus_seconds_count", bus="maildir") == 0


def test_a_failing_bus_is_a_tempfailed_message() -> None:
    d, metrics = metered(bus=FailingBus())
    d.start_data()
    assert d.codes(MESSAGE + b".\r\n") == ["451"]
    assert value(metrics, "slimta_tx_messages_total", result="tempfailed") == 1
    assert value(metrics, "slimta_tx_replies_total", code="4.3.x") == 1


def test_an_idle_timeout_counts_the_state_and_the_limit() -> None:
    d, metrics = metered()
    d.greet()
    d.clock.advance(d.proto.policy.command_timeout + 1)
    assert value(metrics, "slimta_tx_timeouts_total", state="ready") == 1
    assert value(metrics, "slimta_tx_time_limits_total", limit="idle") == 1


def test_tls_and_auth_events_count_with_closed_label_sets() -> None:
    metrics = EdgeMetrics("relay", CollectorRegistry())
    metrics.tls_handshake(TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384"))
    metrics.tls_handshake(TLSInfo("made-up <script>", "x"))
    metrics.tls_failed()
    metrics.auth("plain", True)
    metrics.auth("X-CLIENT-CHOSEN", False)
    assert value(metrics, "slimta_tx_tls_handshakes_total", result="ok", version="TLSv1.3") == 1
    assert value(metrics, "slimta_tx_tls_handshakes_total", result="ok", version="other") == 1
    assert value(metrics, "slimta_tx_tls_handshakes_total", result="failed", version="none") == 1
    assert value(metrics, "slimta_tx_auth_total", mechanism="PLAIN", result="ok") == 1
    assert value(metrics, "slimta_tx_auth_total", mechanism="other", result="failed") == 1


def test_label_values_are_closed_sets() -> None:
    assert labels.reply_code("250", "2.6.0") == "2.6.x"
    assert labels.reply_code("550", "5.7.1") == "5.7.x"
    assert labels.reply_code("550", None) == "5.x.x"
    assert labels.reply_code("550", "4.7.1") == "5.x.x"  # classes that disagree
    assert labels.reply_code("550", "5.999.1") == "5.x.x"
    assert labels.reply_code("hello", None) == labels.OTHER
    values = {
        labels.reply_code(f"{c}{x}{y}", f"{c}.{s}.{z}")
        for c in "0123456789"
        for x in "05"
        for y in "09"
        for s in range(12)
        for z in (0, 999)
    }
    assert len(values) <= 4 * 9 + 1
    assert {labels.rejection_reason(r) for r in REJECTION_REASONS} == set(REJECTION_REASONS)
    assert labels.rejection_reason("client text") == labels.OTHER
    assert {labels.time_limit(t) for t in TIME_LIMITS} == set(TIME_LIMITS)
    assert labels.state("nonsense") == labels.OTHER
    assert labels.bus_kind(RecordingBus()) == labels.OTHER

    class Mine:
        metrics_name = "kafka"

    class Bad:
        metrics_name = "two words"

    assert labels.bus_kind(Mine()) == "kafka"
    assert labels.bus_kind(Bad()) == labels.OTHER


def test_every_metric_has_the_prefix_and_the_contracted_type() -> None:
    names = metric_names()
    assert names["slimta_tx_connections_total"] == ("counter", ("listener", "tls"))
    assert names["slimta_tx_connections_open"] == ("gauge", ())
    assert names["slimta_tx_message_size_bytes"] == ("histogram", ())
    assert names["slimta_tx_bus_seconds"] == ("histogram", ("bus",))
    assert names["slimta_tx_auth_total"] == ("counter", ("mechanism", "result"))
    assert names["slimta_tx_tls_handshakes_total"] == ("counter", ("result", "version"))
    assert all(name.startswith("slimta_tx_") for name in names)


# -- readiness and the pages ---------------------------------------------------------------


class Ready:
    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def ready(self) -> Any:
        return self.answer


def test_bus_readiness_answers() -> None:
    clock = Clock()
    results: list[Any] = []
    bus_readiness(RecordingBus(), clock).addCallback(results.append)
    bus_readiness(Ready(None), clock).addCallback(results.append)
    bus_readiness(Ready("maildir not writable"), clock).addCallback(results.append)
    bus_readiness(Ready(Deferred()), clock, timeout=3).addCallback(results.append)
    clock.advance(3)
    assert results == [
        None,
        None,
        "maildir not writable",
        "bus readiness check timed out after 3 s",
    ]


def test_the_reporter_sets_the_gauge_every_interval() -> None:
    clock = Clock()
    metrics = EdgeMetrics("maildir", CollectorRegistry())
    bus = Ready(None)
    reporter = ReadinessReporter(bus, metrics, clock, interval=2)
    reporter.startService()
    assert value(metrics, "slimta_tx_bus_ready") == 1
    bus.answer = "broker not connected"
    clock.advance(2)
    assert value(metrics, "slimta_tx_bus_ready") == 0
    reporter.stopService()


def rendered(page: Any) -> DummyRequest:
    request = DummyRequest([b""])
    result = page.render_GET(request)
    if isinstance(result, bytes):
        request.write(result)
        request.finish()
    return request


@pytest.mark.parametrize(
    ("answer", "code", "body"),
    [(None, 200, b"ok\n"), ("maildir not writable", 503, b"maildir not writable\n")],
)
def test_healthz_page(answer: str | None, code: int, body: bytes) -> None:
    request = rendered(HealthPage(lambda: succeed(answer)))
    assert request.finished
    assert request.responseCode == code
    assert b"".join(request.written) == body


def test_metrics_page_is_prometheus_clients_exposition() -> None:
    metrics = EdgeMetrics("maildir", CollectorRegistry())
    metrics.rejected("relay", Reply("554", "no", "5.7.1"))
    request = rendered(MetricsPage(metrics.registry, metrics.flush))
    text = b"".join(request.written).decode()
    assert 'slimta_tx_rejections_total{reason="relay"} 1.0' in text
    [content_type] = request.responseHeaders.getRawHeaders(b"content-type") or [b""]
    assert content_type.startswith(b"text/plain")


# -- the option --------------------------------------------------------------------------------


def built(tmp_path: Any, *argv: str) -> Any:
    from twisted.internet.testing import MemoryReactorClock

    from slimta_tx.tap import Options, makeService

    config = Options()
    config.parseOptions(["--maildir", str(tmp_path / "Maildir"), *argv])
    return makeService(config, reactor=MemoryReactorClock())


def test_without_metrics_the_edge_counts_nothing(tmp_path: Any) -> None:
    service = built(tmp_path)
    assert service.edge.events.metrics is None
    assert all(getattr(child, "name", None) != "metrics" for child in service)


def test_metrics_option_adds_the_sink_and_the_endpoint(tmp_path: Any) -> None:
    service = built(tmp_path, "--metrics", "tcp:0:interface=127.0.0.1")
    assert isinstance(service.edge.events.metrics, EdgeMetrics)
    assert service.edge.events.metrics.bus == "maildir"
    assert service.getServiceNamed("metrics") is not None


def test_a_bad_metrics_endpoint_is_a_usage_error() -> None:
    from twisted.python import usage

    from slimta_tx.tap import Options

    with pytest.raises(usage.UsageError, match="--metrics: not an endpoint"):
        Options().parseOptions(["--metrics", "nonsense:9101"])


def test_counts_wait_for_the_flush_and_histograms_keep_their_buckets() -> None:
    metrics = EdgeMetrics("relay", CollectorRegistry())
    registry = metrics.registry
    for seconds in (0.0005, 0.02, 0.02, 100.0):
        metrics._bus_seconds.observe(seconds)
    metrics.rejected("relay", Reply("554", "no", "5.7.1"))
    assert registry.get_sample_value("slimta_tx_rejections_total", {"reason": "relay"}) is None
    metrics.flush()
    metrics.flush()  # a second flush adds nothing
    assert registry.get_sample_value("slimta_tx_rejections_total", {"reason": "relay"}) == 1

    def bucket(le: str) -> float | None:
        return registry.get_sample_value(
            "slimta_tx_bus_seconds_bucket", {"bus": "relay", "le": le}
        )

    assert (bucket("0.001"), bucket("0.025"), bucket("60.0"), bucket("+Inf")) == (1, 3, 3, 4)
    count = registry.get_sample_value("slimta_tx_bus_seconds_count", {"bus": "relay"})
    total = registry.get_sample_value("slimta_tx_bus_seconds_sum", {"bus": "relay"})
    assert (count, total) == (4, 100.0405)


def test_a_worker_flushes_every_second_and_when_it_stops() -> None:
    from slimta_tx.metrics.sink import FlushService

    clock = Clock()
    metrics = EdgeMetrics("maildir", CollectorRegistry())
    service = FlushService(metrics, clock)
    service.startService()
    metrics.rejected("size", Reply("552", "too big", "5.3.4"))
    read = metrics.registry.get_sample_value
    assert read("slimta_tx_rejections_total", {"reason": "size"}) is None
    clock.advance(1)
    assert read("slimta_tx_rejections_total", {"reason": "size"}) == 1
    metrics.rejected("size", Reply("552", "too big", "5.3.4"))
    service.stopService()
    assert read("slimta_tx_rejections_total", {"reason": "size"}) == 2


def test_prometheus_clients_histogram_internals_are_as_the_sink_expects() -> None:
    """Pins HISTOGRAM_INTERNALS (docs/architecture.md, private internals): one value per
    bucket, not cumulative, +Inf last, and _sum; adding to them is what observe() does."""
    from prometheus_client import Histogram

    from slimta_tx.metrics.sink import TIME_BUCKETS, has_histogram_internals

    registry = CollectorRegistry()
    observed = Histogram("observed", "x", buckets=TIME_BUCKETS, registry=registry)
    added = Histogram("added", "x", buckets=TIME_BUCKETS, registry=registry)
    assert has_histogram_internals(added, TIME_BUCKETS)
    for seconds in (0.0005, 0.02, 0.02, 100.0):
        observed.observe(seconds)
    added._buckets[0].inc(1)
    added._buckets[TIME_BUCKETS.index(0.025)].inc(2)
    added._buckets[len(TIME_BUCKETS)].inc(1)
    added._sum.inc(100.0405)
    for le in ("0.001", "0.025", "60.0", "+Inf"):
        assert registry.get_sample_value("added_bucket", {"le": le}) == registry.get_sample_value(
            "observed_bucket", {"le": le}
        )
    for suffix in ("_count", "_sum"):
        assert registry.get_sample_value("added" + suffix) == pytest.approx(
            registry.get_sample_value("observed" + suffix)
        )


def test_without_the_internals_each_observation_goes_to_observe() -> None:
    from slimta_tx.metrics.sink import _Histogram

    class Public:
        def __init__(self) -> None:
            self.seen: list[float] = []

        def observe(self, value: float) -> None:
            self.seen.append(value)

    metric = Public()
    histogram = _Histogram(metric, (1.0, 2.0))
    histogram.observe(1.5)
    histogram.flush()
    assert metric.seen == [1.5]
