"""Prometheus metrics and a health check for an edge (``twistd slimta --metrics ENDPOINT``).

- :mod:`~slimta_tx.metrics.sink`: :class:`EdgeMetrics`, the counters, gauges and histograms
  the edge's events (slimta_tx.events) feed;
- :mod:`~slimta_tx.metrics.labels`: their label values, closed sets;
- :mod:`~slimta_tx.metrics.health`: readiness (``/healthz``, ``slimta_tx_bus_ready``);
- :mod:`~slimta_tx.metrics.http`: ``GET /metrics`` and ``GET /healthz`` on twisted.web;
- :mod:`~slimta_tx.metrics.workers`: one endpoint for all the workers of ``--workers N``.

docs/metrics.md describes every metric. Importing this package imports prometheus_client;
nothing in slimta_tx imports it unless ``--metrics`` is given (or you call :func:`install`).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from slimta_tx.metrics.sink import EdgeMetrics, FlushService

__all__ = ["EdgeMetrics", "install", "process_registry"]


def process_registry() -> CollectorRegistry:
    """A registry with prometheus_client's default collectors of this process (``process_*``,
    ``python_info``, ``python_gc_*``), as its global registry has them."""
    from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def install(service: Any, description: str | None, reactor: Any) -> EdgeMetrics:
    """Count the events of ``service.edge`` (an :class:`~slimta_tx.service.EdgeService`) and,
    given an endpoint ``description``, serve ``/metrics`` and ``/healthz`` there, as a child of
    ``service``. Without one (a worker of ``--workers``), only count, and report the bus's
    readiness (the parent serves every worker's figures)."""
    from prometheus_client import disable_created_metrics

    from slimta_tx.metrics import labels
    from slimta_tx.metrics.health import ReadinessReporter, edge_readiness
    from slimta_tx.metrics.http import metrics_service

    # No ``*_created`` series beside each counter: twice the series for nothing a dashboard
    # uses (process-wide, as prometheus_client has it).
    disable_created_metrics()
    edge = service.edge
    registry = process_registry() if description is not None else CollectorRegistry()
    metrics = EdgeMetrics(labels.bus_kind(edge.bus), registry)
    edge.events.metrics = metrics
    ReadinessReporter(edge.bus, metrics, reactor).setServiceParent(service)
    if description is not None:
        check = edge_readiness(service, reactor)
        metrics_service(description, registry, check, reactor, metrics.flush).setServiceParent(
            service
        )
    else:
        # Nobody scrapes a worker: it flushes every second, and once more after draining.
        FlushService(metrics, reactor).setServiceParent(service)
        reactor.addSystemEventTrigger("after", "shutdown", metrics.flush)
    return metrics
