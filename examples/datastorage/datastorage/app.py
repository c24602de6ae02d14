"""HTTP layer: routes, request parsing and RFC 9457 problem responses."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from datastorage.db import DatabaseUnavailable
from datastorage.events import format_timestamp, parse_uuid, utcnow
from datastorage.metrics import CONTENT_TYPE, MetricsMiddleware
from datastorage.service import Service, StorageUnavailable
from datastorage.validation import (
    FieldError,
    ValidationFailed,
    encode_cursor,
    parse_json,
    parse_list_query,
    validate_batch,
    validate_single,
)

PROBLEM_BASE = "https://datastorage.example/problems/"
PROBLEM_JSON = "application/problem+json"
DEBUG_SLOW_MAX = 60.0


def problem(
    status: int,
    kind: str | None,
    title: str,
    detail: str,
    *,
    errors: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + kind if kind else "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = [error.to_json() for error in errors]
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


# --------------------------------------------------------------------------- error handlers


async def _validation_failed(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ValidationFailed)
    fields = ", ".join(dict.fromkeys(error.field for error in exc.errors))
    return problem(exc.status, exc.kind, exc.title, f"Invalid: {fields}.", errors=exc.errors)


async def _database_unavailable(_: Request, exc: Exception) -> Response:
    return problem(
        503,
        "database-unavailable",
        "Database unavailable",
        "PostgreSQL is not reachable right now; retry later.",
        headers={"Retry-After": "1"},
    )


async def _storage_unavailable(_: Request, exc: Exception) -> Response:
    return problem(
        503,
        "storage-unavailable",
        "Storage unavailable",
        "Neither PostgreSQL nor the Redis dead-letter queue is reachable; the event was not stored.",
        headers={"Retry-After": "1"},
    )


async def _http_exception(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    titles = {404: "Not Found", 405: "Method Not Allowed"}
    title = titles.get(exc.status_code, "HTTP error")
    detail = exc.detail if exc.detail and exc.detail != title else title
    return problem(exc.status_code, None, title, str(detail), headers=dict(exc.headers or {}))


async def _internal_error(_: Request, exc: Exception) -> Response:
    # Starlette re-raises the exception after this response, and the server logs it.
    return problem(500, "internal-error", "Internal Server Error", "An unexpected error occurred.")


# --------------------------------------------------------------------------- helpers


async def read_body(request: Request, limit: int) -> bytes:
    too_large = ValidationFailed(
        [FieldError("body", f"must be at most {limit} bytes")],
        status=413,
        kind="payload-too-large",
        title="Request body too large",
    )
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _json(
    body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


class CloseWhenDraining:
    """Once shutdown has begun, responses say ``Connection: close``.

    Keep-alive clients then open a new connection for their next request, which
    the load balancer sends to another instance (and which is refused once the
    listener is closed), instead of reusing one that is about to be closed.
    uvicorn closes the connection after such a response.
    """

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start" and self.service.shutting_down:
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"connection" for name, _ in headers):
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, send_wrapper)


# --------------------------------------------------------------------------- application


def create_app(service: Service) -> ASGIApp:
    """Build the ASGI application around ``service`` (whose lifecycle it drives)."""
    settings = service.settings

    async def post_event(request: Request) -> Response:
        data = parse_json(await read_body(request, settings.max_body_bytes))
        event = validate_single(data, utcnow())
        status, body = await service.write_event(event)
        headers = {"Location": f"/events/{body['id']}"} if status in (200, 201) else None
        return _json(body, status, headers)

    async def events(request: Request) -> Response:
        # One route per path, so a 405 carries the full Allow header.
        return await (post_event if request.method == "POST" else list_events)(request)

    async def post_batch(request: Request) -> Response:
        data = parse_json(await read_body(request, settings.max_body_bytes))
        events = validate_batch(data, settings.batch_max, utcnow())
        status, body = await service.write_batch(events)
        return _json(body, status)

    async def get_event(request: Request) -> Response:
        try:
            event_id = parse_uuid(request.path_params["id"])
        except ValueError as exc:
            raise ValidationFailed([FieldError("id", str(exc))], title="Invalid event id") from None
        event = await service.db.get_event(event_id)
        if event is None:
            return problem(
                404, "event-not-found", "Event not found", f"No event with id {event_id}."
            )
        return _json(event.to_api())

    async def list_events(request: Request) -> Response:
        query = parse_list_query(
            request.query_params.multi_items(), settings.page_default, settings.page_max
        )
        events, total, more = await service.db.list_events(query)
        next_cursor = (
            encode_cursor(events[-1].occurred_at, events[-1].id) if more and events else None
        )
        return _json(
            {
                "items": [event.to_api() for event in events],
                "total": total,
                "limit": query.limit,
                "offset": query.offset,
                "next_cursor": next_cursor,
            }
        )

    async def live(_: Request) -> Response:
        return _json({"status": "alive"})

    async def ready(_: Request) -> Response:
        reason = await service.readiness()
        if reason is None:
            return _json({"status": "ready"})
        return _json({"status": "not_ready", "reason": reason}, 503, {"Retry-After": "1"})

    async def metrics(_: Request) -> Response:
        await service.refresh_dlq_depth()
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    async def schema_version(_: Request) -> Response:
        version, name, applied_at = await service.db.schema_version()
        return _json(
            {
                "version": version,
                "name": name,
                "applied_at": format_timestamp(applied_at) if applied_at else None,
            }
        )

    async def debug_slow(request: Request) -> Response:
        errors = [
            FieldError(key, "unknown query parameter")
            for key in request.query_params
            if key not in ("seconds", "release")
        ]
        raw = request.query_params.get("seconds", "1.0")
        try:
            seconds = float(raw)
            if not math.isfinite(seconds) or not 0.0 <= seconds <= DEBUG_SLOW_MAX:
                raise ValueError
        except ValueError:
            errors.append(
                FieldError("seconds", f"must be a number between 0 and {DEBUG_SLOW_MAX:g}")
            )
        if errors:
            raise ValidationFailed(errors, title="Invalid query parameters")
        release = request.query_params.get("release")
        if release:
            # Held until a test sets the Redis key debug:release:<name> (at most `seconds`):
            # the test, not a timer, decides when the request ends.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + seconds
            while loop.time() < deadline:
                if await service.redis.exists(f"debug:release:{release}"):
                    return _json({"released": release})
                await asyncio.sleep(0.01)
        else:
            await asyncio.sleep(seconds)
        return _json({"slept": seconds})

    routes: list[BaseRoute] = [
        Route("/events", events, methods=["GET", "POST"]),
        Route("/events/batch", post_batch, methods=["POST"]),
        Route("/events/{id}", get_event, methods=["GET"]),
        Route("/health/live", live, methods=["GET"]),
        Route("/health/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/schema/version", schema_version, methods=["GET"]),
    ]
    if settings.debug_endpoints:
        routes.append(Route("/debug/slow", debug_slow, methods=["POST"]))

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            ValidationFailed: _validation_failed,
            DatabaseUnavailable: _database_unavailable,
            StorageUnavailable: _storage_unavailable,
            HTTPException: _http_exception,
            Exception: _internal_error,
        },
    )
    return MetricsMiddleware(CloseWhenDraining(app, service), service.metrics, routes)
