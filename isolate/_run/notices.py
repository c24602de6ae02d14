"""Notices: warnings that change what a run does (a service that runs as root after all,
a user isolate made, a Redis DB it skipped), recorded by every process of the run and
shown once in the end-of-run summary whatever the verbosity, so a worker's warning is not
lost in its captured output.

A log record is a notice if it is logged with ``extra=NOTICE``; :class:`NoticeHandler`,
which the plugin installs on the ``isolate`` logger of every process, appends it to the
run's ``notices.jsonl``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

__all__ = ["NOTICE", "NoticeHandler", "read_notices"]

#: ``logger.warning(..., extra=NOTICE)``: show it in the run's summary.
NOTICE = {"isolate_notice": True}


class NoticeHandler(logging.Handler):
    """Appends the notices logged in this process to ``path`` (one JSON line each)."""

    def __init__(self, path: Path) -> None:
        super().__init__(logging.WARNING)
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        if not getattr(record, "isolate_notice", False):
            return
        message = record.getMessage().removeprefix("isolate: ")  # the summary line says it
        line = json.dumps({"message": message}) + "\n"
        with contextlib.suppress(OSError):
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)


def read_notices(path: Path) -> list[str]:
    """The run's notices, each once, in the order they came."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    found: dict[str, None] = {}
    for line in lines:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            found[str(json.loads(line)["message"])] = None
    return list(found)
