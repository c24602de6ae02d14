"""A small real HTTP service for isolate's own tests (stdlib server + psycopg + redis).

Env: PORT, DATABASE_URL, REDIS_URL, ISOLATE_INSTANCE_NAME, EXIT_AT_START (exit code),
NEVER_READY (health always 503). SIGTERM: finish in-flight requests, exit 0. ``/pooled``
reads through one long-lived, checked connection (a service's connection pool).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg
import redis

INSTANCE = os.environ.get("ISOLATE_INSTANCE_NAME", "unknown")
DSN = os.environ.get("DATABASE_URL", "")
REDIS = redis.Redis.from_url(os.environ["REDIS_URL"]) if os.environ.get("REDIS_URL") else None
NEVER_READY = os.environ.get("NEVER_READY") == "1"
POOLED: dict[str, object] = {"conn": None, "connects": 0}
POOLED_LOCK = threading.Lock()


def pooled() -> psycopg.Connection:
    """One long-lived connection, checked before each use as a pool with a check does
    (psycopg-pool ``check``, SQLAlchemy ``pool_pre_ping``): a session ended by the
    server (a fresh database swapped in) is replaced by a new one."""
    conn = POOLED["conn"]
    if isinstance(conn, psycopg.Connection):
        try:
            conn.execute("SELECT 1")
            return conn
        except psycopg.Error:
            conn.close()
    conn = psycopg.connect(DSN, autocommit=True)
    POOLED.update(conn=conn, connects=int(POOLED["connects"]) + 1)  # type: ignore[call-overload]
    return conn


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: object) -> None:
        sys.stderr.write(f"{INSTANCE} {fmt % args}\n")

    def _send(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(503 if NEVER_READY else 200, {"instance": INSTANCE})
        elif self.path == "/whoami":
            schema = None
            if DSN:
                with psycopg.connect(DSN) as conn:
                    schema = conn.execute("SELECT current_schema()").fetchone()[0]  # type: ignore[index]
            self._send(200, {"instance": INSTANCE, "pid": os.getpid(), "schema": schema})
        elif self.path == "/pooled":  # the items, read through the long-lived session
            with POOLED_LOCK:
                count = pooled().execute("SELECT count(*) FROM items").fetchone()[0]  # type: ignore[index]
            self._send(200, {"items": count, "connects": POOLED["connects"]})
        elif self.path.startswith("/items/"):
            with psycopg.connect(DSN) as conn:
                row = conn.execute(
                    "SELECT id, value, instance FROM items WHERE id = %s", (int(self.path[7:]),)
                ).fetchone()
            if row is None:
                self._send(404, {"error": "not found"})
            else:
                self._send(200, {"id": row[0], "value": row[1], "instance": row[2]})
        elif self.path.startswith("/slow"):
            time.sleep(float(self.path.partition("=")[2] or "0.5"))
            self._send(200, {"slept": True})
        else:
            self._send(404, {"error": "no route"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        if self.path == "/items":
            with psycopg.connect(DSN) as conn:
                row = conn.execute(
                    "INSERT INTO items (value, instance) VALUES (%s, %s) RETURNING id",
                    (str(body["value"]), INSTANCE),
                ).fetchone()
            hits = REDIS.incr("items:written") if REDIS is not None else None
            self._send(201, {"id": row[0], "instance": INSTANCE, "hits": hits})  # type: ignore[index]
        else:
            self._send(404, {"error": "no route"})


def main() -> None:
    if os.environ.get("EXIT_AT_START"):
        print("fixture app: failing on purpose", file=sys.stderr, flush=True)
        sys.exit(int(os.environ["EXIT_AT_START"]))
    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
    server.daemon_threads = False
    server.block_on_close = True

    def on_term(signum: int, frame: object) -> None:
        print(f"{INSTANCE}: SIGTERM, shutting down", file=sys.stderr, flush=True)
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, on_term)
    print(f"{INSTANCE}: listening on {server.server_address[1]}", file=sys.stderr, flush=True)
    server.serve_forever(poll_interval=0.05)
    server.server_close()
    print(f"{INSTANCE}: bye", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
