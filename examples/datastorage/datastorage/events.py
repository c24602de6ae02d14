"""The audit event model and its wire formats (API JSON and dead-letter JSON)."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,
)
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")

DLQ_FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class Event:
    """An audit event, either validated from a request or read back from storage."""

    id: uuid.UUID
    event_type: str
    actor: str
    correlation_id: str
    occurred_at: datetime
    payload: dict[str, Any]
    received_at: datetime

    def to_api(self) -> dict[str, Any]:
        """The JSON object returned by the API."""
        return {
            "id": str(self.id),
            "event_type": self.event_type,
            "actor": self.actor,
            "correlation_id": self.correlation_id,
            "occurred_at": format_timestamp(self.occurred_at),
            "payload": self.payload,
            "received_at": format_timestamp(self.received_at),
        }

    def to_dlq(self) -> bytes:
        """Serialize for the dead-letter queue (exact, versioned)."""
        return json.dumps(
            {
                "v": DLQ_FORMAT_VERSION,
                "id": str(self.id),
                "event_type": self.event_type,
                "actor": self.actor,
                "correlation_id": self.correlation_id,
                "occurred_at": self.occurred_at.isoformat(),
                "payload": self.payload,
                "received_at": self.received_at.isoformat(),
            },
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode("utf-8")

    @classmethod
    def from_dlq(cls, raw: bytes) -> Event:
        """Inverse of :meth:`to_dlq`; raises ValueError on anything unexpected."""
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, RecursionError, json.JSONDecodeError) as exc:
            raise ValueError(f"undecodable dead-letter entry: {exc}") from exc
        if not isinstance(data, dict) or data.get("v") != DLQ_FORMAT_VERSION:
            raise ValueError("unknown dead-letter entry format")
        try:
            event = cls(
                id=uuid.UUID(data["id"]),
                event_type=data["event_type"],
                actor=data["actor"],
                correlation_id=data["correlation_id"],
                occurred_at=datetime.fromisoformat(data["occurred_at"]),
                payload=data["payload"],
                received_at=datetime.fromisoformat(data["received_at"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed dead-letter entry: {exc!r}") from exc
        texts = (event.event_type, event.actor, event.correlation_id)
        if not all(isinstance(v, str) for v in texts) or not isinstance(event.payload, dict):
            raise ValueError("malformed dead-letter entry: wrong field types")
        if event.occurred_at.tzinfo is None or event.received_at.tzinfo is None:
            raise ValueError("malformed dead-letter entry: naive timestamp")
        return event


def utcnow() -> datetime:
    return datetime.now(UTC)


def parse_timestamp(value: str) -> datetime:
    """Parse an RFC 3339 timestamp (a time zone offset is mandatory).

    Fractional seconds beyond microseconds are truncated. Raises ValueError.
    """
    match = _RFC3339.fullmatch(value)
    if match is None:
        raise ValueError(
            "must be an RFC 3339 timestamp with a time zone, e.g. 2024-05-01T12:00:00Z"
        )
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    if zulu:
        tz = UTC
    else:
        if int(off_h) > 23 or int(off_m) > 59:
            raise ValueError("has an invalid time zone offset")
        offset = timedelta(hours=int(off_h), minutes=int(off_m))
        tz = timezone(-offset if sign == "-" else offset)
    micros = int((fraction or "0")[:6].ljust(6, "0"))
    try:
        parsed = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), micros, tzinfo=tz
        )
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise ValueError(f"is not a valid timestamp ({exc})") from None


def format_timestamp(value: datetime) -> str:
    """RFC 3339 in UTC with a ``Z`` suffix; fractional seconds only when non-zero."""
    text = value.astimezone(UTC).replace(tzinfo=None).isoformat()
    if "." in text:
        text = text.rstrip("0")
    return text + "Z"


def parse_uuid(value: str) -> uuid.UUID:
    """Parse the canonical 8-4-4-4-12 hex form (any case). Raises ValueError."""
    if not _UUID.fullmatch(value):
        raise ValueError("must be a UUID in 8-4-4-4-12 hexadecimal form")
    return uuid.UUID(value)
