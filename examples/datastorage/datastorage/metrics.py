"""Prometheus metrics (a per-app registry) and the request-metrics ASGI middleware."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

access_log = logging.getLogger("datastorage.access")

# The classic text format, which every Prometheus version understands. (Newer
# prometheus-client advertises "version=1.0.0" as CONTENT_TYPE_LATEST; the body
# is the same for the legacy-valid names used here.)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UNMATCHED_ROUTE = "unmatched"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

__all__ = ["CONTENT_TYPE", "Metrics", "MetricsMiddleware"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter(
            "http_requests",
            "HTTP requests handled, by route template, method and status code.",
            ("route", "method", "status"),
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "http_request_duration_seconds",
            "HTTP request duration in seconds, by route template.",
            ("route",),
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.dlq_depth = Gauge(
            "dlq_depth",
            "Events waiting in the Redis dead-letter queue (pending + being drained).",
            registry=self.registry,
        )
        self.events_written = Counter(
            "events_written",
            "Events accepted, by where they were stored (db, or dlq for later draining).",
            ("stored",),
            registry=self.registry,
        )
        self.dlq_drained = Counter(
            "dlq_drained",
            "Events moved from the dead-letter queue into PostgreSQL.",
            registry=self.registry,
        )
        self.dlq_drain_errors = Counter(
            "dlq_drain_errors",
            "Drain rounds that failed for a reason other than an outage (e.g. a missing table).",
            registry=self.registry,
        )
        self.db_up = Gauge(
            "database_up",
            "1 when PostgreSQL is considered reachable, else 0.",
            registry=self.registry,
        )
        for stored in ("db", "dlq"):
            self.events_written.labels(stored=stored)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts and times every HTTP request and writes one access-log line.

    Routes are resolved against the route templates (``/events/{id}``), so
    label cardinality stays bounded; unknown paths are labelled ``unmatched``.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    def _route_of(self, scope: Scope) -> str:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                return str(getattr(route, "path", UNMATCHED_ROUTE))
        return UNMATCHED_ROUTE

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - start
            route = self._route_of(scope)
            method: str = scope["method"]
            method_label = method if method in _METHODS else "OTHER"  # bounded cardinality
            self.metrics.http_requests.labels(route, method_label, str(status)).inc()
            self.metrics.http_duration.labels(route).observe(elapsed)
            if access_log.isEnabledFor(logging.INFO):
                client = scope.get("client")
                access_log.info(
                    "%s %s %s %d %.1fms",
                    client[0] if client else "-",
                    method,
                    scope["path"],
                    status,
                    elapsed * 1000.0,
                )
