"""The HTTP side of ``--metrics``: ``GET /metrics`` and ``GET /healthz`` on ``twisted.web``.

``/metrics`` is prometheus_client's exposition of a registry (its own encoder: the text format,
or OpenMetrics when the scraper asks for it). ``/healthz`` runs a readiness check
(:mod:`slimta_tx.metrics.health`): ``200 ok``, or ``503`` and the reason, as plain text.
Requests are not logged: a scrape every few seconds is not news.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from twisted.application import strports
from twisted.application.service import IService
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from slimta_tx.metrics.health import Check

__all__ = ["HealthPage", "MetricsPage", "metrics_service", "metrics_site"]

_TEXT = b"text/plain; charset=utf-8"


class MetricsPage(Resource):
    isLeaf = True

    def __init__(
        self, registry: CollectorRegistry, before: Callable[[], object] | None = None
    ) -> None:
        super().__init__()
        self.registry = registry
        self.before = before

    def render_GET(self, request: Request) -> bytes:
        if self.before is not None:
            self.before()  # EdgeMetrics.flush: the counts since the last scrape
        accept = request.getHeader("accept")
        encoder, content_type = choose_encoder(accept or "")
        output: bytes = encoder(self.registry)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        return output


class HealthPage(Resource):
    isLeaf = True

    def __init__(self, check: Check) -> None:
        super().__init__()
        self.check = check

    def render_GET(self, request: Request) -> Any:
        finished: list[object] = []

        def gone(result: object) -> None:
            finished.append(result)

        request.notifyFinish().addBoth(gone)

        def answer(reason: str | None) -> None:
            if finished:
                return  # the client went away
            request.setHeader(b"content-type", _TEXT)
            request.setHeader(b"cache-control", b"no-store")
            if reason is None:
                request.setResponseCode(200)
                request.write(b"ok\n")
            else:
                request.setResponseCode(503)
                request.write(reason.encode("utf-8", "replace") + b"\n")
            request.finish()

        def failed(failure: Failure) -> None:
            answer(f"readiness check failed: {failure.type.__name__ if failure.type else ''}")

        self.check().addCallbacks(answer, failed)
        return NOT_DONE_YET


class MetricsSite(Site):
    """Logs no request (its port logs "MetricsSite starting on PORT")."""

    noisy = False

    def log(self, request: Any) -> None:
        pass


def metrics_site(
    registry: CollectorRegistry, check: Check, before: Callable[[], object] | None = None
) -> Site:
    root = Resource()
    root.putChild(b"metrics", MetricsPage(registry, before))
    root.putChild(b"healthz", HealthPage(check))
    return MetricsSite(root)


def metrics_service(
    description: str,
    registry: CollectorRegistry,
    check: Check,
    reactor: Any,
    before: Callable[[], object] | None = None,
) -> IService:
    """Serve both pages on ``description`` (a Twisted endpoint); binding fails start-up.
    ``before``: called before each scrape."""
    service: IService = strports.service(
        description, metrics_site(registry, check, before), reactor=reactor
    )
    service.setName("metrics")
    return service
