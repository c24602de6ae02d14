"""POST /links {"url": ...} stores a link in PostgreSQL and answers its code; GET
/links/<code> answers the URL and how often it was followed (a counter in Redis);
GET /health says it is up. SIGTERM: finish, exit 0.

Configuration comes from the environment, read when the service starts: HOST (default
127.0.0.1), PORT, DATABASE_URL, REDIS_URL.
"""

from __future__ import annotations

import os
import secrets
import signal

import psycopg
import redis.asyncio as aioredis
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def shorten(request: Request) -> JSONResponse:
    body = await request.json()
    if not isinstance(body, dict) or not isinstance(body.get("url"), str):
        return JSONResponse({"error": 'POST {"url": "..."}'}, status_code=400)
    code = secrets.token_urlsafe(6)
    async with await psycopg.AsyncConnection.connect(os.environ["DATABASE_URL"]) as conn:
        await conn.execute("INSERT INTO links (code, url) VALUES (%s, %s)", (code, body["url"]))
    return JSONResponse({"code": code}, status_code=201)


async def follow(request: Request) -> JSONResponse:
    code = request.path_params["code"]
    async with await psycopg.AsyncConnection.connect(os.environ["DATABASE_URL"]) as conn:
        cursor = await conn.execute("SELECT url FROM links WHERE code = %s", (code,))
        row = await cursor.fetchone()
    if row is None:
        return JSONResponse({"error": "no such link"}, status_code=404)
    hits = await request.app.state.redis.incr(f"hits:{code}")
    return JSONResponse({"url": row[0], "hits": hits})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


def main() -> int:
    app = Starlette(routes=[
        Route("/links", shorten, methods=["POST"]),
        Route("/links/{code}", follow),
        Route("/health", health),
    ])  # fmt: skip
    app.state.redis = aioredis.from_url(os.environ["REDIS_URL"])
    host, port = os.environ.get("HOST", "127.0.0.1"), int(os.environ["PORT"])
    # uvicorn >= 0.29 raises the SIGTERM again once its graceful shutdown is done, so the
    # process dies of it (exit 143); with a handler of ours in place it returns: exit 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    print(f"links listening on {host}:{port}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0
