"""A notes service: POST /notes stores a note in PostgreSQL and counts it in Redis,
GET /notes/<id> reads it back, GET /health says it is up. SIGTERM: finish, exit 0.

Configuration comes from the environment, read when the service starts (in ``main``),
not at import time: PORT, DATABASE_URL, REDIS_URL.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg
import redis


class Notes(BaseHTTPRequestHandler):
    database_url = ""
    cache: redis.Redis | None = None

    def _send(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200, {"status": "ok"})
        elif self.path.startswith("/notes/"):
            with psycopg.connect(self.database_url) as conn:
                row = conn.execute("SELECT id, text FROM notes WHERE id = %s", (int(self.path[7:]),)).fetchone()
            if row is None:
                self._send(404, {"error": "no such note"})
            else:
                self._send(200, {"id": row[0], "text": row[1]})
        else:
            self._send(404, {"error": "no route"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if self.path != "/notes" or not isinstance(body.get("text"), str):
            self._send(400, {"error": "POST /notes with {\"text\": \"...\"}"})
            return
        with psycopg.connect(self.database_url) as conn:
            (note_id,) = conn.execute("INSERT INTO notes (text) VALUES (%s) RETURNING id", (body["text"],)).fetchone()
        assert self.cache is not None
        self._send(201, {"id": note_id, "count": self.cache.incr("notes:created")})

    def log_message(self, fmt: str, *args: object) -> None:
        pass


def main() -> int:
    Notes.database_url = os.environ["DATABASE_URL"]
    Notes.cache = redis.Redis.from_url(os.environ["REDIS_URL"])
    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Notes)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"notes listening on {server.server_address[1]}", flush=True)
    server.serve_forever()
    server.server_close()
    return 0
