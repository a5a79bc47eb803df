"""``--metrics ENDPOINT``: Prometheus metrics and ``/healthz`` over HTTP (slimta_tx.metrics).

Off by default: without it nothing imports prometheus_client and the edge's events count
nothing. With ``--workers N`` the parent serves the endpoint for all its workers
(slimta_tx/metrics/workers.py); a worker (``SLIMTA_TX_WORKER`` and ``PROMETHEUS_MULTIPROC_DIR``
in its environment) only counts.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.python import usage


class OptionGroup:
    optParameters: list[list[Any]] = [
        [
            "metrics",
            None,
            None,
            "Serve GET /metrics (Prometheus) and GET /healthz on this endpoint, "
            "e.g. tcp:9101:interface=127.0.0.1 (default: off).",
        ],
    ]


def defaults(config: Any) -> None:
    pass


def validate(config: Any) -> None:
    description = config["metrics"]
    if description is None:
        return
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(None, description)
    except Exception as e:
        raise usage.UsageError(f"--metrics: not an endpoint: {description!r} ({e})") from None


def in_worker() -> bool:
    """This process is a worker of ``--workers N`` whose parent serves the metrics."""
    return "SLIMTA_TX_WORKER" in os.environ and "PROMETHEUS_MULTIPROC_DIR" in os.environ


def configure(config: Any, edge: Any, service: Any, reactor: Any) -> None:
    if config["metrics"] is None:
        return
    from slimta_tx.metrics import install

    install(service, None if in_worker() else config["metrics"], reactor)
