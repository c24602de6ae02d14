"""``python -m shop.serve``: the Django app on PORT (wsgiref, one thread); SIGTERM: finish
the request in progress and exit 0. Settings are read when it starts, not at import."""

from __future__ import annotations

import os
import signal
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")
    from django.core.wsgi import get_wsgi_application

    server = make_server("127.0.0.1", int(os.environ["PORT"]), get_wsgi_application(), handler_class=QuietHandler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever()
    server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
