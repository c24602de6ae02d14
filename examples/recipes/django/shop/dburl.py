"""A ``postgresql://`` URL (isolate's ``{dsn}``, or your ``DATABASE_URL``) as Django's
``DATABASES`` entry; the URL's ``options`` (isolate bakes ``search_path`` into it) are kept."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


def database_from_url(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    options = parse_qs(parts.query).get("options", [])
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(parts.path.lstrip("/")),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
        "OPTIONS": {"options": options[0]} if options else {},
    }
