"""``python -m inventory``: a small JSON API over SQLAlchemy. PORT and DATABASE_URL
(a ``postgresql://`` URL; the psycopg 3 driver is used) come from the environment,
read in ``main``. SIGTERM: finish, exit 0."""

from __future__ import annotations

import json
import os
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from sqlalchemy import create_engine, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from inventory.models import Item, Warehouse


class Api(BaseHTTPRequestHandler):
    engine: Engine

    def _send(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200, {"status": "ok"})
            return
        if not self.path.startswith("/warehouses/"):
            self._send(404, {"error": "no route"})
            return
        with Session(self.engine) as session:
            items = session.scalars(select(Item).where(Item.warehouse_id == int(self.path.split("/")[2]))).all()
            self._send(200, {"items": {item.sku: item.quantity for item in items}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if self.path not in ("/warehouses", "/items"):
            self._send(404, {"error": "no route"})
            return
        with Session(self.engine) as session, session.begin():  # committed before we answer
            if self.path == "/warehouses":
                row: Warehouse | Item = Warehouse(name=body["name"])
            else:
                row = Item(sku=body["sku"], quantity=body["quantity"], warehouse_id=body["warehouse"])
            session.add(row)
            session.flush()
            created = row.id
        self._send(201, {"id": created})

    def log_message(self, fmt: str, *args: object) -> None:
        pass


def main() -> int:
    url = os.environ["DATABASE_URL"].replace("postgresql://", "postgresql+psycopg://", 1)
    # pre-ping: a test's rebuild() of its database ends the sessions of the worker's role
    Api.engine = create_engine(url, pool_size=2, pool_pre_ping=True)
    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Api)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever()
    server.server_close()
    Api.engine.dispose()
    return 0
