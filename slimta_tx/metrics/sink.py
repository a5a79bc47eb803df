"""The edge's metrics: what :class:`EdgeMetrics` counts beside each event of slimta_tx.events.

:class:`~slimta_tx.events.EdgeEvents` calls its sink (``events.metrics``) once per event,
whatever the log level; with no sink (the default, ``--metrics`` not given) that is one
attribute test per event. The names, types and labels are a contract (docs/metrics.md lists
them); every label value comes from :mod:`slimta_tx.metrics.labels`, a closed set.

Label children are looked up once per value and kept (the label sets are bounded), so an
event costs a dictionary look-up and an increment, not prometheus_client's label validation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from slimta_tx.events import result_of
from slimta_tx.metrics import labels

if TYPE_CHECKING:  # pragma: no cover
    from slimta_tx.envelope import Envelope, Session, TLSInfo
    from slimta_tx.reply import Reply

__all__ = ["PREFIX", "SIZE_BUCKETS", "TIME_BUCKETS", "EdgeMetrics", "metric_names"]

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


class EdgeMetrics:
    """The metrics of one edge, registered in ``registry`` (prometheus_client's global one
    by default: it also holds the process and platform collectors).

    :param bus: the label of ``bus_seconds`` (:func:`slimta_tx.metrics.labels.bus_kind`).
    :param registry: where to register; a fresh ``CollectorRegistry()`` in tests.
    """

    def __init__(self, bus: str = "other", registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            from prometheus_client import REGISTRY as registry
        self.registry = registry
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
        self._open = made["connections_open"]
        self._sizes = made["message_size_bytes"]
        self._bus_seconds = made["bus_seconds"].labels(bus)
        self._ready = made["bus_ready"]
        self._children: dict[tuple[str, tuple[str, ...]], Any] = {}
        # The label sets every dashboard expects, at 0 from the start.
        for result in _RESULTS:
            self._child("messages_total", result)
            self._child("recipients_total", result)
        self._messages = {r: self._child("messages_total", r) for r in _RESULTS}
        self._recipients = {r: self._child("recipients_total", r) for r in _RESULTS}

    def _child(self, name: str, *values: str) -> Any:
        key = (name, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._metrics[name].labels(*values)
        return child

    # -- what EdgeEvents calls -------------------------------------------------------------------

    def opened(self, session: Session, tls: bool) -> None:
        listener = "lmtp" if session.lmtp else "smtp"
        self._child("connections_total", listener, "implicit" if tls else "none").inc()
        self._open.inc()

    def closed(self, session: Session) -> None:
        self._open.dec()

    def transaction(self, envelope: Envelope, reply: Reply, bus_seconds: float | None) -> None:
        code = reply.code
        result = result_of(code)
        self._messages[result].inc()
        self._recipients[result].inc(len(envelope.recipients))
        self._child(
            "replies_total", labels.reply_code(code, reply.effective_enhanced_code())
        ).inc()
        message = envelope.message
        if message is not None:
            # Received in full and handed on (a refused body never reaches the envelope).
            self._sizes.observe(message.size)
            if bus_seconds is not None:
                self._bus_seconds.observe(bus_seconds)

    def rejected(self, reason: str, reply: Reply) -> None:
        # (A refused body's reply is also the transaction's: counted in replies_total there.)
        self._child("rejections_total", labels.rejection_reason(reason)).inc()

    def timed_out(self, state: str, limit: str) -> None:
        self._child("timeouts_total", labels.state(state)).inc()
        self._child("time_limits_total", labels.time_limit(limit)).inc()

    def tls_handshake(self, info: TLSInfo) -> None:
        self._child("tls_handshakes_total", "ok", labels.tls_version(info.version)).inc()

    def tls_failed(self) -> None:
        self._child("tls_handshakes_total", "failed", "none").inc()

    def auth(self, mechanism: str, ok: bool) -> None:
        self._child("auth_total", labels.auth_mechanism(mechanism), "ok" if ok else "failed").inc()

    # -- readiness -----------------------------------------------------------------------------

    def bus_ready(self, ready: bool) -> None:
        """The bus readiness check's last answer (what /healthz of ``--workers`` reads)."""
        self._ready.set(1 if ready else 0)
