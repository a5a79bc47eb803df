"""``--metrics`` with ``--workers N``: one scrape of the parent's endpoint gives every worker's
totals (prometheus_client's multiprocess mode).

- When it starts, the parent makes a private directory (``mkdtemp``, mode 0700, after twistd
  dropped privileges, so the workers can write there) and gives it to each worker as
  ``PROMETHEUS_MULTIPROC_DIR``; it removes the directory when the reactor shuts down.
- Each worker counts its own events into memory-mapped files there (prometheus_client does that
  by itself when the variable is set); it serves nothing.
- The parent serves ``/metrics`` from ``MultiProcessCollector``: counters and histograms summed
  over every worker that ever ran (a restarted worker's counts are kept, so totals never go
  back), gauges over the live ones (``livesum``; ``slimta_tx_bus_ready``: ``livemin``). When a
  worker exits, ``mark_process_dead`` drops its gauges. The ``process_*`` metrics are the
  parent's own.
- ``/healthz``: the parent is running, its listeners are bound, every worker is up, and every
  live worker's last bus check was good (``slimta_tx_bus_ready`` is 1).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from slimta_tx.metrics import process_registry
from slimta_tx.metrics.health import Check
from slimta_tx.metrics.http import metrics_service
from slimta_tx.metrics.sink import PREFIX

__all__ = ["ENV", "MetricsDirectory", "serve_for_workers", "workers_readiness"]

log = Logger(namespace="slimta_tx.metrics")

#: The variable prometheus_client reads (at import) in each worker.
ENV = "PROMETHEUS_MULTIPROC_DIR"


class MetricsDirectory(Service):
    """The workers' metrics directory, made at start (after privileges were dropped); it
    registers the collector that reads it and is removed at reactor shutdown, once the
    workers are gone."""

    def __init__(self, workers: Any, registry: CollectorRegistry, reactor: Any) -> None:
        self.workers = workers
        self.registry = registry
        self.reactor = reactor
        self.path: str | None = None
        self.collector: MultiProcessCollector | None = None

    def startService(self) -> None:
        super().startService()
        if self.path is None:
            self.path = tempfile.mkdtemp(prefix="slimta-tx-metrics-")
            self.collector = MultiProcessCollector(self.registry, path=self.path)
            self.reactor.addSystemEventTrigger("after", "shutdown", self.remove)
            log.info("the workers' metrics in {path}", path=self.path)
        self.workers.worker_env[ENV] = self.path

    def worker_exited(self, pid: int) -> None:
        if self.path is not None:
            mark_process_dead(pid, self.path)

    def remove(self) -> None:
        path, self.path = self.path, None
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)

    def bus_ready(self) -> float | None:
        """The lowest ``slimta_tx_bus_ready`` of the live workers; None before any reported."""
        if self.collector is None or self.path is None or not os.path.isdir(self.path):
            return None
        for family in self.collector.collect():
            if family.name == PREFIX + "bus_ready":
                values = [s.value for s in family.samples]
                return min(values) if values else None
        return None


def workers_readiness(workers: Any, directory: MetricsDirectory) -> Check:
    def check() -> Deferred[str | None]:
        if not workers.running:
            return succeed("not running")
        if not workers.bound:
            return succeed("no listener bound")
        pool = workers.pool
        if pool.stopping:
            return succeed("shutting down")
        if len(pool.workers) < pool.count:
            return succeed(f"{len(pool.workers)} of {pool.count} workers running")
        ready = directory.bus_ready()
        if ready is None:
            return succeed("bus readiness not reported yet")
        if ready < 1:
            return succeed("bus not ready in a worker")
        return succeed(None)

    return check


def serve_for_workers(workers: Any, description: str, reactor: Any) -> MetricsDirectory:
    """Give the parent ``workers`` (a :class:`~slimta_tx.workers.WorkersService`) its
    workers' metrics directory and ``/metrics`` + ``/healthz`` on ``description``."""
    registry = process_registry()
    directory = MetricsDirectory(workers, registry, reactor)
    directory.setServiceParent(workers)
    workers.exit_hooks.append(directory.worker_exited)
    metrics_service(
        description, registry, workers_readiness(workers, directory), reactor
    ).setServiceParent(workers)
    return directory
