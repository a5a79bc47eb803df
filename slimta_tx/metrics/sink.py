"""The edge's metrics: what :class:`EdgeMetrics` counts beside each event of slimta_tx.events.

:class:`~slimta_tx.events.EdgeEvents` calls its sink (``events.metrics``) once per event,
whatever the log level; with no sink (the default, ``--metrics`` not given) that is one
attribute test per event. The names, types and labels are a contract (docs/metrics.md lists
them); every label value comes from :mod:`slimta_tx.metrics.labels`, a closed set.

An event costs a few plain Python increments: counts wait in the sink and go to
prometheus_client's metrics in :meth:`EdgeMetrics.flush`, which the ``/metrics`` page calls
before each scrape (and a worker of ``--workers`` every second, :class:`FlushService`). A
``Counter.inc`` takes a lock and a ``Histogram.observe`` walks its buckets: done per message,
that was a tenth of the protocol's own cost (bench/proto.py --metrics).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from twisted.application.internet import TimerService
from twisted.logger import Logger

from slimta_tx.metrics import labels

if TYPE_CHECKING:  # pragma: no cover
    from slimta_tx.envelope import Envelope, Session, TLSInfo
    from slimta_tx.reply import Reply

__all__ = [
    "FLUSH_INTERVAL",
    "PREFIX",
    "SIZE_BUCKETS",
    "TIME_BUCKETS",
    "EdgeMetrics",
    "FlushService",
    "metric_names",
]

log = Logger(namespace="slimta_tx.metrics")

PREFIX = "slimta_tx_"

#: Message sizes: 1 KiB to 64 MiB, by powers of 4.
SIZE_BUCKETS = tuple(float(1024 * 4**i) for i in range(9))
#: Bus latencies: 1 ms to 60 s.
TIME_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

_RESULTS = ("accepted", "rejected", "tempfailed")
#: Seconds between two flushes of a worker's counts (see FlushService).
FLUSH_INTERVAL = 1.0
# Reply label cache: the replies an edge sends are a handful (a relay bus forwards its next
# hop's, so the cache stops growing at this size and computes the rest each time).
_REPLY_CACHE = 256


def metric_names() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every metric of the sink: full name -> (type, label names). What docs/metrics.md
    documents and the Grafana dashboard may query (tests check both against it)."""
    return {PREFIX + name: (kind, tuple(names)) for name, kind, names, _ in _DEFINITIONS}


_DEFINITIONS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("connections_total", "counter", ("listener", "tls"), "Connections accepted."),
    ("connections_open", "gauge", (), "Connections open now."),
    ("messages_total", "counter", ("result",), "Messages that got their final reply."),
    ("recipients_total", "counter", ("result",), "Recipients of those messages."),
    ("message_size_bytes", "histogram", (), "Size of messages received in full."),
    ("bus_seconds", "histogram", ("bus",), "Time from the final dot to the bus's reply."),
    ("replies_total", "counter", ("code",), "Final replies to messages, by code class."),
    ("rejections_total", "counter", ("reason",), "Commands or messages refused, by reason."),
    ("auth_total", "counter", ("mechanism", "result"), "AUTH exchanges that ended."),
    ("tls_handshakes_total", "counter", ("result", "version"), "TLS handshakes."),
    ("timeouts_total", "counter", ("state",), "Sessions cut off by a time limit."),
    ("time_limits_total", "counter", ("limit",), "The time limit that cut a session off."),
    ("bus_ready", "gauge", (), "1 when the bus was ready at the last check, else 0."),
)


#: prometheus_client's private Histogram attributes the flush adds to (docs/architecture.md,
#: "Private internals we rely on"; pinned by tests/test_metrics_sink.py): ``_buckets``, one
#: value per bucket, not cumulative, +Inf last; ``_sum``. Each value has ``inc(amount)``.
HISTOGRAM_INTERNALS = ("_buckets", "_sum")


def has_histogram_internals(metric: Any, bounds: tuple[float, ...]) -> bool:
    buckets = getattr(metric, "_buckets", None)
    return (
        isinstance(buckets, list)
        and len(buckets) == len(bounds) + 1
        and all(callable(getattr(b, "inc", None)) for b in buckets)
        and callable(getattr(getattr(metric, "_sum", None), "inc", None))
    )


class _Histogram:
    """Observations waiting for a flush: per-bucket counts (as prometheus_client keeps them,
    not cumulative; the last one is +Inf) and their sum. Without the internals it needs
    (:data:`HISTOGRAM_INTERNALS`), each observation goes to ``metric.observe`` at once."""

    __slots__ = ("bounds", "counts", "metric", "observe", "total")

    def __init__(self, metric: Any, bounds: tuple[float, ...]) -> None:
        self.metric = metric
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        if not has_histogram_internals(metric, bounds):
            log.warn(
                "prometheus_client's Histogram has no {names}: every observation goes to "
                "observe() (slower)",
                names=", ".join(HISTOGRAM_INTERNALS),
            )
            self.observe = metric.observe
        else:
            self.observe = self._count

    def _count(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def flush(self) -> None:
        counts = self.counts
        if not any(counts):
            return
        # prometheus_client has no public way to add n observations at once (see
        # HISTOGRAM_INTERNALS).
        buckets = self.metric._buckets
        for i, n in enumerate(counts):
            if n:
                buckets[i].inc(n)
        self.metric._sum.inc(self.total)
        self.counts = [0] * len(counts)
        self.total = 0.0


class EdgeMetrics:
    """The metrics of one edge, registered in ``registry`` (prometheus_client's global one
    by default: it also holds the process and platform collectors).

    :param bus: the label of ``bus_seconds`` (:func:`slimta_tx.metrics.labels.bus_kind`).
    :param registry: where to register; a fresh ``CollectorRegistry()`` in tests.

    Counts reach the registry at :meth:`flush`.
    """

    def __init__(self, bus: str = "other", registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            from prometheus_client import REGISTRY

            registry = REGISTRY
        self.registry: CollectorRegistry = registry
        self.bus = bus
        made: dict[str, Any] = {}
        for name, kind, label_names, doc in _DEFINITIONS:
            full = PREFIX + name
            if kind == "counter":
                made[name] = Counter(full, doc, label_names, registry=registry)
            elif kind == "histogram":
                buckets = SIZE_BUCKETS if name == "message_size_bytes" else TIME_BUCKETS
                made[name] = Histogram(full, doc, label_names, buckets=buckets, registry=registry)
            else:
                # With --workers: the sum over live workers (livesum), or their minimum.
                mode: Any = "livemin" if name == "bus_ready" else "livesum"
                made[name] = Gauge(
                    full, doc, label_names, registry=registry, multiprocess_mode=mode
                )
        self._metrics = made
        self._children: dict[tuple[str, tuple[str, ...]], Any] = {}
        # (metric, label values) -> count since the last flush.
        self._pending: dict[tuple[str, tuple[str, ...]], int] = {}
        self._open = 0
        self._open_gauge = made["connections_open"]
        self._ready = made["bus_ready"]
        self._sizes = _Histogram(made["message_size_bytes"], SIZE_BUCKETS)
        self._bus_seconds = _Histogram(made["bus_seconds"].labels(bus), TIME_BUCKETS)
        self._reply_labels: dict[tuple[str, str | None], tuple[str, tuple[str, ...]]] = {}
        # The label sets every dashboard expects, at 0 from the start.
        for result in _RESULTS:
            self._child("messages_total", result)
            self._child("recipients_total", result)
        # First digit of the final reply -> the keys of its result.
        self._by_digit = {
            digit: (("messages_total", (result,)), ("recipients_total", (result,)))
            for digit, result in (("2", "accepted"), ("4", "tempfailed"), ("5", "rejected"))
        }
        self._otherwise = self._by_digit["5"]

    def _child(self, name: str, *values: str) -> Any:
        key = (name, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._metrics[name].labels(*values)
        return child

    def _count(self, name: str, *values: str) -> None:
        key = (name, values)
        pending = self._pending
        pending[key] = pending.get(key, 0) + 1

    def flush(self) -> None:
        """Hand the counts since the last flush to prometheus_client's metrics."""
        pending, self._pending = self._pending, {}
        for (name, values), count in pending.items():
            self._child(name, *values).inc(count)
        self._open_gauge.set(self._open)
        self._sizes.flush()
        self._bus_seconds.flush()

    # -- what EdgeEvents calls -------------------------------------------------------------------

    def opened(self, session: Session, tls: bool) -> None:
        self._count(
            "connections_total", "lmtp" if session.lmtp else "smtp", "implicit" if tls else "none"
        )
        self._open += 1

    def closed(self, session: Session) -> None:
        self._open -= 1

    def transaction(self, envelope: Envelope, reply: Reply, bus_seconds: float | None) -> None:
        code = reply.code
        pending = self._pending
        messages, recipients = self._by_digit.get(code[:1], self._otherwise)
        pending[messages] = pending.get(messages, 0) + 1
        pending[recipients] = pending.get(recipients, 0) + len(envelope.recipients)
        cache_key = (code, reply.enhanced_status_code)
        replies = self._reply_labels.get(cache_key)
        if replies is None:
            label = labels.reply_code(code, reply.effective_enhanced_code())
            replies = ("replies_total", (label,))
            if len(self._reply_labels) < _REPLY_CACHE:
                self._reply_labels[cache_key] = replies
        pending[replies] = pending.get(replies, 0) + 1
        message = envelope.message
        if message is not None:
            # Received in full and handed on (a refused body never reaches the envelope).
            self._sizes.observe(message.size)
            if bus_seconds is not None:
                self._bus_seconds.observe(bus_seconds)

    def rejected(self, reason: str, reply: Reply) -> None:
        # (A refused body's reply is also the transaction's: counted in replies_total there.)
        self._count("rejections_total", labels.rejection_reason(reason))

    def timed_out(self, state: str, limit: str) -> None:
        self._count("timeouts_total", labels.state(state))
        self._count("time_limits_total", labels.time_limit(limit))

    def tls_handshake(self, info: TLSInfo) -> None:
        self._count("tls_handshakes_total", "ok", labels.tls_version(info.version))

    def tls_failed(self) -> None:
        self._count("tls_handshakes_total", "failed", "none")

    def auth(self, mechanism: str, ok: bool) -> None:
        self._count("auth_total", labels.auth_mechanism(mechanism), "ok" if ok else "failed")

    # -- readiness -----------------------------------------------------------------------------

    def bus_ready(self, ready: bool) -> None:
        """The bus readiness check's last answer (what /healthz of ``--workers`` reads)."""
        self._ready.set(1 if ready else 0)


class FlushService(TimerService):
    """Flushes ``metrics`` every ``interval`` seconds and when it stops: a worker of
    ``--workers``, whose counts the parent reads from their files without asking it."""

    def __init__(self, metrics: EdgeMetrics, reactor: Any, interval: float = FLUSH_INTERVAL):
        super().__init__(interval, metrics.flush)
        self.clock = reactor
        self.metrics = metrics

    def stopService(self) -> Any:
        stopped = super().stopService()
        self.metrics.flush()
        return stopped
